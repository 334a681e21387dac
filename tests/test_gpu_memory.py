"""GPU memory as mlx-lm handles it (runtime/gpu_memory.py), checked where no GPU is: the device's figures
and its wired limit are faked in-process as Metal reports them, everything else runs for real."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from duomem_mlx.cli import cli as duomem
from duomem_mlx.deploy import quantize
from duomem_mlx.deploy.quantize import quantize_package
from duomem_mlx.distill import train
from duomem_mlx.errors import DuomemError
from duomem_mlx.runtime import gpu_memory
from duomem_mlx.runtime.models import load, make_tiny_model
from duomem_mlx.runtime.session import Session

GB = 2**30


class FakeMetal:
    """`mx.device_info()` with Metal's keys (figures shaped like a 36 GB Mac's) and a wired limit
    that `mx.set_wired_limit` sets, returning the previous one, as MLX's Metal allocator does."""

    def __init__(self, working_set: int):
        self.info = {
            "architecture": "applegpu_g15s",
            "device_name": "Apple M3 Pro",
            "memory_size": 36 * GB,
            "max_buffer_length": 18 * GB,
            "max_recommended_working_set_size": working_set,
        }
        self.wired = 0
        self.limits = []  # every limit set, in order

    def set_wired_limit(self, limit: int) -> int:
        previous, self.wired = self.wired, limit
        self.limits.append(limit)
        return previous


@pytest.fixture
def metal(monkeypatch):
    def fake(working_set=27 * GB):
        device = FakeMetal(working_set)
        monkeypatch.setattr(mx, "device_info", lambda: dict(device.info))
        monkeypatch.setattr(mx, "set_wired_limit", device.set_wired_limit)
        return device

    return fake


def run(*args, input=None):
    result = CliRunner().invoke(duomem, [str(a) for a in args], input=input)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_a_cpu_reports_no_working_set_and_its_wired_limit_is_left_alone(monkeypatch):
    """What this MLX reports on a CPU: no working set (Metal's keys are absent), so nothing is wired or said."""
    if mx.default_device() != mx.cpu:
        pytest.skip("checks the CPU backend")
    assert "max_recommended_working_set_size" not in mx.device_info() and gpu_memory.working_set() is None
    calls = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda limit: calls.append(limit) or 0)
    with gpu_memory.wired_limit():
        assert not gpu_memory.warn_if_over(10**15, "anything", "nothing")
    assert calls == []


def test_the_wired_limit_is_the_working_set_inside_and_restored_after_even_on_an_error(metal):
    device = metal()
    device.wired = 5 * GB  # a limit someone set before
    with gpu_memory.wired_limit():
        assert device.wired == 27 * GB
    assert device.wired == 5 * GB
    with pytest.raises(KeyboardInterrupt), gpu_memory.wired_limit():
        raise KeyboardInterrupt
    assert device.wired == 5 * GB and device.limits == [27 * GB, 5 * GB] * 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "cache"
    run(
        "teach",
        "--teacher",
        "oracle",
        "--env",
        "textworld",
        "--tasks",
        "simple",
        "--episodes",
        2,
        "--keep-admissible",
        "--out",
        out,
    )
    return out


def commands(model, cache, tmp_path):
    """Each command that generates, trains or benches, small, and the function its work goes through."""
    return {
        "chat": (["chat", "--model", model, "--max-tokens", 4], Session, "generate"),
        "eval": (
            [
                "eval",
                "--env",
                "textworld",
                "--tasks",
                "simple",
                "--episodes",
                1,
                "--max-steps",
                2,
                "--policy",
                f"model:{model}",
                "--out",
                tmp_path / "r.json",
            ],
            Session,
            "generate",
        ),
        "bench": (
            [
                "bench",
                model,
                "--steps",
                2,
                "--repeats",
                1,
                "--max-tokens",
                2,
                "--json",
                tmp_path / "b.json",
                "--no-save",
            ],
            Session,
            "generate",
        ),
        "distill": (distill_args(model, cache, tmp_path / "d", 2), train, "batch_for"),
        "quantize": (
            [
                "quantize",
                "--model",
                model,
                "--bits",
                4,
                "--recipe",
                "mixed4-margin",
                "--calibrate",
                cache,
                "--epochs",
                1,
                "--max-seq-length",
                512,
                "--out",
                tmp_path / "q",
            ],
            quantize,
            "calibrate",
        ),
    }


def distill_args(model, cache, out, iters):
    return [
        "distill",
        "--student",
        model,
        "--cache",
        cache,
        "--out",
        out,
        "--all",
        "--kd",
        "off",
        "--batch-size",
        1,
        "--iters",
        iters,
        "--val-fraction",
        0,
    ]


@pytest.mark.parametrize("command", ["chat", "eval", "bench", "distill", "quantize"])
def test_generation_training_and_bench_run_under_the_wired_limit_and_restore_it(
    command, tiny_model, cache, tmp_path, metal, monkeypatch
):
    device = metal()
    args, owner, name = commands(tiny_model, cache, tmp_path)[command]
    real, wired_at_work = getattr(owner, name), []
    monkeypatch.setattr(owner, name, lambda *a, **k: wired_at_work.append(device.wired) or real(*a, **k))
    run(*args, input="hello\n")
    assert wired_at_work and set(wired_at_work) == {27 * GB}, wired_at_work
    assert device.wired == 0 and device.limits[-1] == 0


def test_loading_a_model_larger_than_the_working_set_says_so_first_in_one_line(tiny_model, metal, monkeypatch, capsys):
    metal(working_set=27 * GB)
    load(str(tiny_model))
    assert capsys.readouterr().err == ""
    weights = (tiny_model / "model.safetensors").stat().st_size
    metal(working_set=weights // 2)

    def failing_load(*args, **kwargs):
        raise ValueError("the load itself failed")

    monkeypatch.setattr(mlx_lm, "load", failing_load)  # what was said, was said before loading
    with pytest.raises(DuomemError, match="the load itself failed"):
        load(str(tiny_model))
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        f"warning: loading {tiny_model} takes {weights / 2**20:.1f} MB, more than the "
        f"{weights / 2 / 2**20:.1f} MB Apple M3 Pro recommends keeping in use, of 36.0 GB "
        "memory (mx.device_info()): it will page and run slowly"
    ), line
    assert "quantize --bits 4" in line


def test_a_training_step_larger_than_the_working_set_is_named_once(tiny_model, cache, tmp_path, metal):
    weights = (tiny_model / "model.safetensors").stat().st_size
    metal(working_set=weights + 1)  # the model loads without a word; a step with its activations is larger
    mx.reset_peak_memory()
    result = run(*distill_args(tiny_model, cache, tmp_path / "d", 3))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: training step 1 ("), warnings
    assert "--batch-size" in warnings[0] and "--grad-checkpoint" in warnings[0]


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    """56 MB of float32 weights: a load outweighs what a short bench computes."""
    out = tmp_path_factory.mktemp("gpu") / "bigger"
    return make_tiny_model(out, layers=4, hidden=512, vocab_size=4096, template="chatml")


BENCH_PEAKS = """
import math, sys
from duomem_mlx.deploy.bench import Measured, bench_package
for _ in range(2):
    m = Measured(sys.argv[1])
    bench_package(m, None, 1, 2, 2, 2, 4096, 0, math.inf)
    print(len(m.loads), m.row(None)["peak_memory_mb"] * 2**20)
"""


def test_bench_holds_one_model_at_a_time(bigger):
    """Two packages, each loaded twice: the peak (MLX's own count) of each is about one model, not
    two (the previous load kept alive made it 112 MB for these 56 MB). In a child process: the peak
    counts every array alive in the process, and this one holds other tests' models."""
    weights = (bigger / "model.safetensors").stat().st_size
    child = subprocess.run(
        [sys.executable, "-c", BENCH_PEAKS, str(bigger)], capture_output=True, text=True, timeout=600
    )
    assert child.returncode == 0, child.stderr[-2000:]
    rows = [line.split() for line in child.stdout.strip().splitlines()[-2:]]
    for loads, peak in rows:
        assert int(loads) == 2
        assert weights < float(peak) < 1.3 * weights, (peak, weights)


@pytest.fixture(scope="module")
def bf16_source(tiny_model, tmp_path_factory):
    """The tiny student stored in bfloat16, as mlx-community ships models."""
    return quantize_package(str(tiny_model), str(tmp_path_factory.mktemp("gpu") / "bf16"), bits=16, dtype="bfloat16")


def quantized_in(source, out, monkeypatch) -> set:
    """Quantize `source` to 4 bits; the dtypes of the float weights mlx-lm's quantization was handed."""
    seen, real = [], quantize.quantize_model

    def spy(model, *args, **kwargs):
        seen.extend(p.dtype for _, p in tree_flatten(model.parameters()) if mx.issubdtype(p.dtype, mx.floating))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(quantize, "quantize_model", spy)
    quantize.quantize_package(str(source), str(out), bits=4)
    return set(seen)


def test_quantize_on_a_gpu_keeps_the_source_dtype_and_stores_bf16(bf16_source, tmp_path, monkeypatch):
    """On a (faked) GPU the student is quantized as stored, bf16, with no float32 copy, and the
    package stores bf16 as mlx-community's; a CPU, whose MLX emulates bf16, quantizes in float32
    and stores float16 scales (converted at load, cpu_quant)."""
    if mx.default_device() == mx.cpu:
        assert quantized_in(bf16_source, tmp_path / "cpu", monkeypatch) == {mx.float32}
        stored = mx.load(str(tmp_path / "cpu" / "model.safetensors"))
        assert stored["model.layers.0.mlp.up_proj.scales"].dtype == mx.float16
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu, 0))
    assert quantized_in(bf16_source, tmp_path / "gpu", monkeypatch) == {mx.bfloat16}
    stored = mx.load(str(tmp_path / "gpu" / "model.safetensors"))
    assert {v.dtype for k, v in stored.items() if not k.endswith(".weight") or "norm" in k} == {mx.bfloat16}
    meta = json.loads((tmp_path / "gpu" / "duomem.json").read_text())
    config = json.loads((tmp_path / "gpu" / "config.json").read_text())
    assert meta["quantization"]["dtype"] == "bfloat16" and config["torch_dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def wide_scales(bf16_source, tmp_path_factory):
    """The bf16 student with its projections x8: 4-bit scales of ~0.02, as a real model's, whose
    bf16 steps (~1e-4) are larger than Adam's at the default learning rate (1e-5)."""
    out = tmp_path_factory.mktemp("gpu") / "wide"
    shutil.copytree(bf16_source, out)
    weights = mx.load(str(out / "model.safetensors"))
    wide = {k: v * 8 if k.endswith("proj.weight") else v for k, v in weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), wide, metadata={"format": "mlx"})
    return out


def test_calibration_on_a_gpu_computes_in_bf16_and_its_steps_land(wide_scales, cache, tmp_path, monkeypatch):
    """Calibration updates a float32 copy of the scales, as mlx-lm's DWQ does, while the model
    computes in the package's bf16: updating the bf16 scales themselves, no scale moved and the
    loss stayed put (4.549 both epochs; with the float32 copy 159 of 6784 moved, 4.549 -> 4.526)."""
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu, 0))
    computed, moved, real = [], [], quantize.calibrate

    def spy(q_model, *args, **kwargs):
        before = dict(tree_flatten(q_model.parameters()))
        result = real(q_model, *args, **kwargs)
        tuned = dict(tree_flatten(q_model.trainable_parameters()))
        computed.extend(p.dtype for p in tuned.values())
        moved.append(sum((before[name] != p).sum().item() for name, p in tuned.items()))
        return result

    monkeypatch.setattr(quantize, "calibrate", spy)
    quantize.quantize_package(
        str(wide_scales),
        str(tmp_path / "q"),
        bits=4,
        recipe="mixed4-margin",
        calibrate_cache=str(cache),
        epochs=2,
        max_seq_length=512,
    )
    losses = json.loads((tmp_path / "q" / "duomem.json").read_text())["calibration"]["loss_per_epoch"]
    assert set(computed) == {mx.bfloat16} and moved[0] > 0 and losses[-1] < losses[0], (moved, losses)
