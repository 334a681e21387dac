"""Deployment: quantized packages (fuse, QLoRA, calibration, memory bank), bench, Hub upload."""

import base64
import hashlib
import http.server
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace
from urllib.parse import unquote

import mlx.core as mx
import mlx_lm
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.tuner.utils import linear_to_lora_layers

from duomem_mlx.cli import cli as duomem
from duomem_mlx.cpu import kernel as cpu_kernel
from duomem_mlx.deploy import bench
from duomem_mlx.deploy.bench import KEYS, bytes_per_token
from duomem_mlx.deploy.quantize import cache_episodes, calibration_data, direct_url, duomem_install, greedy_actions
from duomem_mlx.deploy.recipes import RECIPES, chat_windows, pick
from duomem_mlx.envs.base import play_episode
from duomem_mlx.envs.policies import OraclePolicy
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.bank import MemoryBank
from duomem_mlx.runtime.heads import logits_at
from duomem_mlx.runtime.models import load
from duomem_mlx.runtime.session import Session
from duomem_mlx.teacher.topk import masked_positions

LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}


def cli(*args, stdin=None, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "duomem_mlx", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_clean_failure(result, *phrases):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def make_adapters(base, out, seed=0):
    """mlx-lm LoRA adapters (its own layers and file format) with a nonzero update."""
    model, _ = mlx_lm.load(str(base))
    model.freeze()
    mx.random.seed(seed)  # lora_a too: drawn from the state earlier tests left, its rounding flipped an action
    linear_to_lora_layers(model, 2, LORA)
    weights = {
        name: (mx.random.normal(p.shape) * 0.1 if name.endswith("lora_b") else p)
        for name, p in tree_flatten(model.trainable_parameters())
    }
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": LORA})
    )
    return out


@pytest.fixture(scope="module")
def recorded(textworld):
    """A real TextWorld episode (observations, admissible commands, the oracle's actions)."""
    spec = textworld.task_specs(["simple"], "train", 1, 0)[0]
    episode = play_episode(textworld, spec, OraclePolicy(), 50)
    episode.steps = episode.steps[:6]
    return [episode]


@pytest.fixture(scope="module")
def qlora_base(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "base-4bit"
    mlx_lm.convert(str(tiny_model), str(out), quantize=True, q_group_size=32, q_bits=4)
    return out


@pytest.mark.parametrize("base_kind", ["float", "qlora"])
def test_fused_8bit_package_acts_like_base_plus_adapters(base_kind, tiny_model, qlora_base, recorded, tmp_path):
    base = tiny_model if base_kind == "float" else qlora_base
    adapters = make_adapters(base, tmp_path / "adapters")
    expected = greedy_actions(*mlx_lm.load(str(base), adapter_path=str(adapters)), recorded)
    assert expected != greedy_actions(*mlx_lm.load(str(base)), recorded)  # the adapters change the actions
    result = cli(
        "quantize",
        "--model",
        base,
        "--adapters",
        adapters,
        "--bits",
        "8",
        "--group-size",
        "32",
        "--dtype",
        "float32",
        "--out",
        tmp_path / "pkg",
    )  # only the 8-bit rounding differs from base + adapters
    assert result.returncode == 0, result.stderr
    model, tokenizer = mlx_lm.load(str(tmp_path / "pkg"))
    assert not any("lora" in name for name, _ in tree_flatten(model.parameters()))
    assert model.layers[0].self_attn.q_proj.bits == 8
    assert greedy_actions(model, tokenizer, recorded) == expected
    meta = json.loads((tmp_path / "pkg" / "duomem.json").read_text())
    assert (
        meta["quantization"]
        == {
            "bits": 8,
            "group_size": 32,
            "mode": "affine",
            "dtype": "float32",
            "recipe": "affine8",
            "layers": {"8-bit g32": 15},
        }
        and meta["adapters"]
    )
    assert "no memory bank" in result.stdout


@pytest.mark.env("textworld")
def test_package_with_bank_loads_everywhere(tiny_model, tmp_path):
    memories = tmp_path / "memories.jsonl"
    memories.write_text(
        json.dumps({"id": "tw-1", "task_type": "simple", "text": "open the chest, take the key, unlock the door"})
        + "\n"
    )
    bank = tmp_path / "bank"
    assert cli("memory", "build", "--memories", memories, "--embedder", tiny_model, "--out", bank).returncode == 0
    pkg = tmp_path / "converted" / "student-4bit"
    result = cli("quantize", "--model", tiny_model, "--memory", bank, "--bits", "4", "--group-size", "32", "--out", pkg)
    assert result.returncode == 0, result.stderr
    assert not list(pkg.parent.glob(".*"))  # no temp dir left behind

    model, tokenizer = mlx_lm.load(str(pkg))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "open the door"}], add_generation_prompt=True)
    assert mlx_lm.generate(model, tokenizer, prompt, max_tokens=4)
    MemoryBank.load(pkg / "memory").check_embedder(model, tokenizer)  # rebuilt in the package's space
    with pytest.raises(DuomemError, match="another embedder"):
        MemoryBank.load(bank).check_embedder(model, tokenizer)  # the student's bank would be refused

    meta = json.loads((pkg / "duomem.json").read_text())
    assert meta["memory"]["count"] == 1 and meta["bits_per_weight"] < 8
    bf16 = cli("quantize", "--model", tiny_model, "--bits", "16", "--dtype", "bfloat16", "--out", tmp_path / "bf16")
    assert bf16.returncode == 0, bf16.stderr
    assert meta["bytes"] < 0.4 * json.loads((tmp_path / "bf16" / "duomem.json").read_text())["bytes"]
    assert mlx_lm.load(str(tmp_path / "bf16"))[0].layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    card = (pkg / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: mlx" in card and "- duomem" in card
    assert f'load("{pkg.parent.name}/{pkg.name}")' in card and "| memories | 1 |" in card

    chat = cli("chat", "--model", pkg, "--max-tokens", "4", stdin="open the door\n/memory\n")
    assert chat.returncode == 0 and "tw-1" in chat.stdout, chat.stderr
    log = tmp_path / "ep.jsonl"
    ran = cli(
        "eval",
        "--env",
        "textworld",
        "--tasks",
        "simple",
        "--episodes",
        "1",
        "--policy",
        f"model:{pkg}",
        "--max-steps",
        "3",
        "--out",
        tmp_path / "r.json",
        "--log",
        log,
    )
    assert ran.returncode == 0, ran.stderr
    assert json.loads(log.read_text())["memories"] == ["tw-1"]  # the package's bank, found on its own


def test_quantize_bad_input_is_one_line_and_leaves_nothing(tiny_model, tiny_teacher, tmp_path):
    wrong = make_adapters(tiny_teacher, tmp_path / "teacher-adapters")
    assert_clean_failure(
        cli("quantize", "--model", tiny_model, "--adapters", wrong, "--out", tmp_path / "a"),
        str(wrong),
        str(tiny_model),
        "do not match",
    )
    assert_clean_failure(
        cli("quantize", "--model", tiny_model, "--bits", "8", "--mode", "mxfp4", "--out", tmp_path / "b"), "mxfp4"
    )
    assert_clean_failure(
        cli("quantize", "--model", tiny_model, "--group-size", "128", "--out", tmp_path / "c"), "--group-size 32 or 64"
    )
    assert_clean_failure(
        cli("quantize", "--model", tiny_model, "--bits", "8", "--calibrate", tmp_path, "--out", tmp_path / "d"),
        "--bits 4",
    )
    assert_clean_failure(
        cli("quantize", "--model", tiny_model, "--recipe", "nope", "--out", tmp_path / "g"),
        "unknown --recipe nope",
        "mixed4",
    )
    assert_clean_failure(
        cli("quantize", "--model", tiny_model, "--recipe", "mixed4", "--out", tmp_path / "h"), "--calibrate CACHE"
    )
    bad_memories = tmp_path / "bad.jsonl"
    bad_memories.write_text("{not json\n")
    assert_clean_failure(
        cli("quantize", "--model", tiny_model, "--memory", bad_memories, "--group-size", "32", "--out", tmp_path / "e"),
        "line 1",
    )
    (tmp_path / "f").mkdir()
    assert_clean_failure(
        cli("quantize", "--model", tiny_model, "--group-size", "32", "--out", tmp_path / "f"), "--force"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "f", "teacher-adapters"]


def mean_kl(model, reference, sequences):
    """KL(reference || model) per action token, where the agent is scored and calibration trains."""
    total, count = 0.0, 0
    for ids, mask in sequences:
        x, rows = mx.array(ids)[None], mx.array(masked_positions(mask))
        p = logits_at(reference, x, rows).astype(mx.float32)
        q = logits_at(model, x, rows).astype(mx.float32)
        logp, logq = p - mx.logsumexp(p, -1, keepdims=True), q - mx.logsumexp(q, -1, keepdims=True)
        total += (mx.exp(logp) * (logp - logq)).sum().item()
        count += rows.size
    return total / count


def test_quantize_on_a_cpu_says_which_precision_decodes_fastest(tiny_model, tmp_path):
    """On a CPU a quantized package can decode slower than a dense one (SmolLM2 through MLX's kernel:
    4-bit 9.1 against float32 14.0 tokens/s; through cpu_kernel 45 against 36): quantize measures
    both and says which is faster, by how much."""
    result = cli("quantize", "--model", tiny_model, "--bits", "4", "--group-size", "32", "--out", tmp_path / "q")
    assert result.returncode == 0, result.stderr
    rates = json.loads((tmp_path / "q" / "duomem.json").read_text())["results"].get("cpu_decode_tokens_per_s")
    if mx.default_device() != mx.cpu:
        assert rates is None and "decoding on this CPU" not in result.stdout
        return
    assert set(rates) == {"float32", "affine4"} and all(
        v > 0 for v in rates.values()
    )  # keyed by recipe, as benchmarks/quantization.py reads it
    fastest = max(rates, key=rates.get)
    assert f"decoding on this CPU: {fastest} " in result.stdout
    assert ("--bits 16 --dtype float32" in result.stdout) == (fastest == "float32")


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory, need_env):
    need_env("textworld")
    cache = tmp_path_factory.mktemp("cache") / "cache"
    teach = cli(
        "teach",
        "--teacher",
        "oracle",
        "--env",
        "textworld",
        "--tasks",
        "simple",
        "--episodes",
        "2",
        "--keep-admissible",
        "--out",
        cache,
    )
    assert teach.returncode == 0, teach.stderr
    return cache


def test_mixed_recipe_spends_8_bits_where_the_actions_are_sensitive(tiny_model, train_cache, tmp_path):
    assert pick(4, None, True) == "affine4" and pick(4, None, False) == "affine4" and pick(8, None, True) == "affine8"
    plain = cli(
        "quantize", "--model", tiny_model, "--bits", "4", "--calibrate", train_cache, "--out", tmp_path / "plain"
    )
    assert plain.returncode == 0 and "recipe affine4" in plain.stdout and "is unused" in plain.stdout, (
        plain.stdout + plain.stderr
    )
    result = cli(
        "quantize",
        "--model",
        tiny_model,
        "--bits",
        "4",
        "--recipe",
        "mixed4",
        "--calibrate",
        train_cache,
        "--max-seq-length",
        512,
        "--out",
        tmp_path / "mixed",
    )
    assert result.returncode == 0, result.stderr
    assert "recipe mixed4" in result.stdout and "sensitivity" in result.stdout
    meta = json.loads((tmp_path / "mixed" / "duomem.json").read_text())
    layers = meta["quantization"]["layers"]
    assert meta["quantization"]["recipe"] == "mixed4" and set(layers) == {"4-bit g64", "8-bit g64"}, layers
    assert 4.5 < meta["bits_per_weight"] <= RECIPES["mixed4"].target_bpw + 0.05
    model = mlx_lm.load(str(tmp_path / "mixed"))[0]
    assert {m.bits for _, m in model.named_modules() if hasattr(m, "bits")} == {
        4,
        8,
    }  # mlx-lm reads the per-layer config


@pytest.mark.parametrize("recipe", ["gptq4", "awq4"])
def test_gptq_and_awq_round_with_the_chats_and_keep_the_logits_closer_than_rounding_to_nearest(
    recipe, tiny_model, train_cache, tmp_path
):
    for name in ("affine4", recipe):
        result = cli(
            "quantize",
            "--model",
            tiny_model,
            "--bits",
            "4",
            "--recipe",
            name,
            "--calibrate",
            train_cache,
            "--out",
            tmp_path / name,
        )
        assert result.returncode == 0, result.stderr
    assert f"{recipe.rstrip('4').upper()} on the chats" in result.stdout
    meta = json.loads((tmp_path / recipe / "duomem.json").read_text())
    assert meta["quantization"]["recipe"] == recipe and set(meta["quantization"]["layers"]) == {"4-bit g64"}
    assert 4.5 <= meta["bits_per_weight"] < 4.6
    dense, tokenizer = load(str(tiny_model))
    windows = chat_windows([ids for ids, _ in calibration_data(tokenizer, cache_episodes(str(train_cache)), 2048)])
    error = {
        name: ((load(str(tmp_path / name))[0](windows) - dense(windows)) ** 2).mean().item()
        for name in ("affine4", recipe)
    }
    assert error[recipe] < error["affine4"], error


def test_margin_calibration_lowers_its_hinge_on_the_students_own_actions(tiny_model, train_cache, tmp_path):
    result = cli(
        "quantize",
        "--model",
        tiny_model,
        "--bits",
        "4",
        "--group-size",
        "32",
        "--calibrate",
        train_cache,
        "--max-seq-length",
        512,
        "--recipe",
        "mixed4-margin",
        "--learning-rate",
        "1e-4",
        "--out",
        tmp_path / "calibrated",
    )
    assert result.returncode == 0, result.stderr
    assert "recipe mixed4-margin" in result.stdout and "after calibration" in result.stdout
    calibration = json.loads((tmp_path / "calibrated" / "duomem.json").read_text())["calibration"]
    assert (
        calibration["steps"] > 0
        and 0 <= calibration["agreement_before"] <= 1
        and 0 <= calibration["agreement_after"] <= 1
    )
    assert calibration["margin"] > 0 and len(calibration["loss_per_epoch"]) == calibration["epochs"]
    assert calibration["loss_per_epoch"][-1] < calibration["loss_per_epoch"][0] / 2


def test_quantized_package_stores_16_bit_scales_and_a_cpu_computes_in_float32(tiny_model, tmp_path, monkeypatch):
    result = cli("quantize", "--model", tiny_model, "--bits", "4", "--out", tmp_path / "q")
    assert result.returncode == 0, result.stderr
    stored = mx.load(str(tmp_path / "q" / "model.safetensors"))
    assert stored["model.layers.0.self_attn.q_proj.scales"].dtype == mx.float16
    assert (
        4.5 <= json.loads((tmp_path / "q" / "duomem.json").read_text())["bits_per_weight"] < 4.6
    )  # 16-bit scales and biases, groups of 64
    model = load(str(tmp_path / "q"))[0]
    layer = model.layers[0].self_attn.q_proj
    assert layer.scales.dtype == (mx.float32 if mx.default_device() == mx.cpu else mx.float16)
    if mx.default_device() != mx.cpu:
        return
    # what a decoded token hands a CPU kernel (the package's or MLX's), tied head included: 16-bit scales
    # run MLX's ~50x slower (SmolLM2 4-bit: 0.1 against 5 tokens/s in one process) and skip the package's
    seen = []
    kernel, own = mx.quantized_matmul, cpu_kernel.kernels()
    monkeypatch.setattr(
        mx,
        "quantized_matmul",
        lambda x, w, scales=None, biases=None, **k: (
            seen.append((x.dtype, scales.dtype, biases.dtype)) or kernel(x, w, scales=scales, biases=biases, **k)
        ),
    )
    if own is not None:
        monkeypatch.setattr(
            cpu_kernel,
            "kernels",
            lambda: SimpleNamespace(
                quantized_matvec=lambda x, w, scales, biases, *a: (
                    seen.append((x.dtype, scales.dtype, biases.dtype)) or own.quantized_matvec(x, w, scales, biases, *a)
                )
            ),
        )
    mx.eval(model(mx.array([[5]])))
    layers = sum(1 for _, m in model.named_modules() if hasattr(m, "scales"))
    assert len(seen) >= layers and set(seen) == {(mx.float32, mx.float32, mx.float32)}


@pytest.fixture(scope="module")
def package(tiny_model, tmp_path_factory):
    """A 4-bit package with a memory bank, plus files that must never be uploaded."""
    root = tmp_path_factory.mktemp("pkg")
    memories = root / "memories.jsonl"
    memories.write_text(json.dumps({"id": "m-1", "task_type": "", "text": "look around, then open the door"}) + "\n")
    pkg = root / "student-4bit"
    result = cli(
        "quantize", "--model", tiny_model, "--memory", memories, "--bits", "4", "--group-size", "32", "--out", pkg
    )
    assert result.returncode == 0, result.stderr
    for junk in (".env", "run.log", "modeling.py", "memory/.keys.safetensors.tmp"):
        (pkg / junk).write_text("junk")
    (pkg / ".cache").mkdir()
    (pkg / ".cache" / "x.json").write_text("{}")
    return pkg


UPLOADED = {
    "README.md",
    "config.json",
    "duomem.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "generation_config.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "memory/bank.json",
    "memory/memories.jsonl",
    "memory/keys.safetensors",
}


def test_the_cards_install_lines_work_as_written(package):
    """duomem-mlx is not on PyPI: the card pip-installs mlx-lm, and duomem-mlx only from a public
    URL pip recorded for this install (pinned to its commit), else from its source."""
    card = (package / "README.md").read_text()
    pip_lines = [line for line in card.splitlines() if line.startswith("pip install")]
    assert pip_lines == ["pip install mlx-lm", *filter(None, [duomem_install(direct_url())[1].strip()])]
    assert ("`pip install .` in a checkout of duomem-mlx" in card) == (len(pip_lines) == 1)
    git = {"url": "https://example.org/duomem-mlx.git", "vcs_info": {"vcs": "git", "commit_id": "a" * 40}}
    assert duomem_install(git)[1] == f'pip install "duomem-mlx @ git+https://example.org/duomem-mlx.git@{"a" * 40}"\n'
    assert duomem_install({"url": "https://example.org/duomem_mlx-0.1.0.tar.gz", "archive_info": {}})[1].startswith(
        'pip install "duomem-mlx @ https://example.org/'
    )
    local = {"url": "file:///work/duomem-mlx", "dir_info": {"editable": True}}
    for record in ({**git, "url": "https://user:token@example.org/r.git"}, {**git, "url": "file:///w/r"}, local, {}):
        how, line = duomem_install(record)
        assert line == "" and "`pip install .` in a checkout of duomem-mlx" in how


def test_bench_measures_packages_side_by_side(tiny_model, package, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = cli("bench", tiny_model, package, "--steps", "3", "--repeats", "1", "--json", out, "--plot", png)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["machine"]) >= {"chip", "memory_gb", "os", "mlx", "mlx_lm", "device", "bandwidth_gb_s"}
    assert [r["package"] for r in report["packages"]] == [str(tiny_model), str(package)]
    for row in report["packages"]:
        assert all(row[key] > 0 for key in KEYS), row
        assert row["step_latency_p95_ms"] >= row["step_latency_p50_ms"]
        assert row["model_config"] == {
            k: json.loads((tiny_model / "config.json").read_text())[k]
            for k in ("hidden_size", "num_hidden_layers", "vocab_size")
        }
    small, big = report["packages"][1], report["packages"][0]
    assert (
        small["model_bytes"] < big["model_bytes"] and small["bytes_per_decoded_token"] < big["bytes_per_decoded_token"]
    )
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "decode_roofline_fraction" in result.stdout
    assert json.loads((package / "duomem.json").read_text())["results"]["bench"]["ttft_ms"] == small["ttft_ms"]


def test_bytes_per_token_reads_a_tied_embedding_once_as_the_head(tiny_model):
    def weights(model):
        return sum(p.nbytes for _, p in tree_flatten(model.parameters()))

    tied, _ = mlx_lm.load(str(tiny_model))
    embedding = tied.model.embed_tokens.weight.nbytes
    kv = bytes_per_token(tied, 100) - bytes_per_token(tied, 0)
    assert (
        kv == 2 * len(tied.layers) * tied.args.num_key_value_heads * tied.args.head_dim * 100 * 4
    )  # float32 model: 4 bytes
    assert bytes_per_token(tied, 0) == weights(tied)  # the matrix once: the head reads it, the lookup one row of it
    args = llama.ModelArgs(
        "llama", 64, 2, 192, 2, 1e-6, tied.args.vocab_size, num_key_value_heads=1, tie_word_embeddings=False
    )
    untied = llama.Model(args)
    assert bytes_per_token(untied, 0) == weights(untied) - untied.model.embed_tokens.weight.nbytes
    assert weights(untied) - bytes_per_token(untied, 0) == embedding  # the lookup-only table is the one left out


def test_roofline_fraction_never_exceeds_one(tiny_model, tmp_path, monkeypatch):
    # The reported case: 5.6 tokens/s x 550 MB against a 2.6 GB/s probe read as 1.18 of the roofline.
    assert 5.6 * 550e6 / 2.6e9 > 1
    assert bench.roofline(5.6, 550e6, 2.6e9) == pytest.approx(
        {"decode_gb_s": 3.08, "decode_roofline_fraction": 1.0, "roofline_bound": "decode"}
    )
    assert bench.roofline(1.0, 550e6, 2.6e9)["decode_roofline_fraction"] == pytest.approx(0.55 / 2.6)
    # A probe that under-reads (a one-core sum did, against decode on every core) through the whole run:
    monkeypatch.setattr(bench, "bandwidth", lambda: {"best": 1e-6})
    out = tmp_path / "b.json"
    result = CliRunner().invoke(
        duomem,
        [
            "bench",
            str(tiny_model),
            "--steps",
            "2",
            "--repeats",
            "1",
            "--max-tokens",
            "2",
            "--json",
            str(out),
            "--no-save",
        ],
    )
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())["packages"][0]
    assert row["decode_tokens_per_s"] * row["bytes_per_decoded_token"] > 1e3  # the old fraction: far above 1
    assert row["decode_roofline_fraction"] == 1.0 and row["roofline_bound"] == "decode"
    assert "above the probe's" in result.output


def test_small_bench_is_small_and_says_how_it_goes(tiny_model, tmp_path):
    out = tmp_path / "b.json"
    env = {**os.environ, "DUOMEM_PROGRESS_SECONDS": "0"}
    result = cli(
        "bench", tiny_model, "--steps", "2", "--repeats", "1", "--max-tokens", "2", "--json", out, "--no-save", env=env
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"{tiny_model.name}: ")]
    total = 1 + 1 + 2 + 1  # a load, the warm-up step, the episode's steps, a throughput run
    assert [line.split()[1] for line in lines] == [f"{n}/{total}" for n in range(1, total + 1)], result.stdout
    assert "phase=warm-up" in lines[1] and "phase=episode 1/1" in lines[2] and "phase=throughput 1/1" in lines[-1]
    report = json.loads(out.read_text())
    assert "partial" not in report and report["packages"][0]["steps"] == 2


def test_a_small_run_feeds_few_tokens(tiny_model, monkeypatch):
    def fed(steps, max_tokens):
        tokens, decoded = [], []
        feed = Session.feed
        monkeypatch.setattr(Session, "feed", lambda self, ids: (tokens.append(len(ids)), feed(self, ids)))
        monkeypatch.setattr(
            bench, "throughput", lambda model, prompt, n: (tokens.append(len(prompt)), decoded.append(n), (1.0, 1.0))[2]
        )
        bench.bench_package(bench.Measured(str(tiny_model)), None, 1, steps, 1, max_tokens, 4096, 0, math.inf)
        return sum(tokens), decoded

    small, big = fed(2, 2), fed(20, 32)
    assert small[1] == [2] and big[1] == [32]
    assert small[0] < big[0] / 3, (small, big)


def test_bench_runs_a_package_as_chat_loads_it(package, monkeypatch):
    """bench loads through the package's own loader: on a CPU the 4-bit layers fed a prefill run
    dense (cpu_quant) as in chat and eval; plain mlx_lm.load kept MLX's per-row kernel there
    (a SmolLM2 4-bit package prefilled 15.6 tokens/s in bench against 259 through the loader)."""
    seen = []
    monkeypatch.setattr(
        bench, "throughput", lambda model, prompt, n: (seen.append({type(m) for m in model.modules()}), (1.0, 1.0))[1]
    )
    bench.bench_package(bench.Measured(str(package)), None, 1, 2, 1, 2, 4096, 0, math.inf)
    assert seen and seen[0] == {type(m) for m in load(str(package))[0].modules()}


def test_an_interrupted_bench_writes_what_it_measured(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "bandwidth", lambda: {"best": 10.0})
    calls, generate = [], Session.generate

    def generate_until_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the warm-up, two steps of the episode, then Ctrl-C
            raise KeyboardInterrupt
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Session, "generate", generate_until_ctrl_c)
    out = tmp_path / "b.json"
    result = CliRunner().invoke(
        duomem, ["bench", str(tiny_model), "--steps", "5", "--repeats", "1", "--json", str(out), "--no-save"]
    )
    assert result.exit_code == 1 and "Error: interrupted in" in result.output and "after 2 steps" in result.output, (
        result.output
    )
    report = json.loads(out.read_text())
    assert report["partial"] is True and report["stopped"] == "interrupted"
    (row,) = report["packages"]
    assert row["partial"] is True and row["steps"] == 2 and row["ttft_ms"] > 0 and row["load_seconds"] > 0
    assert "decode_tokens_per_s" not in row and "episode_seconds" not in row


def test_sigterm_and_time_limit_leave_a_partial_json(tiny_model, tmp_path):
    out = tmp_path / "b.json"
    env = {**os.environ, "DUOMEM_PROGRESS_SECONDS": "0"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "duomem_mlx",
            "bench",
            str(tiny_model),
            "--steps",
            "200",
            "--json",
            str(out),
            "--no-save",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().startswith(f"{tiny_model.name}: 1/")  # the first load is done
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in stderr and "Error: interrupted" in stderr, stderr
    report = json.loads(out.read_text())
    assert report["stopped"] == "interrupted" and report["packages"][0]["partial"] is True
    assert report["packages"][0]["steps"] < 3 * 200

    limited = cli("bench", tiny_model, "--steps", "200", "--time-limit", "0.001", "--json", out, "--no-save")
    assert limited.returncode == 0 and "--time-limit reached" in limited.stdout, limited.stderr
    report = json.loads(out.read_text())
    assert report["stopped"] == "time limit" and report["packages"][0]["partial"] is True
    assert report["packages"][0]["load_seconds"] > 0 and report["packages"][0]["steps"] == 0


def test_dry_run_lists_allow_listed_files_and_never_the_token(package):
    env = {**__import__("os").environ, "HF_TOKEN": "hf_secret_dry_run_token", "HF_ENDPOINT": "http://127.0.0.1:9"}
    result = cli("upload", package, "--repo", "me/student-4bit", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[1] for line in result.stdout.splitlines() if len(line.split()) == 2}
    assert listed == UPLOADED
    assert "hf_secret" not in result.stdout + result.stderr


class FakeHub:
    """The Hub endpoints huggingface_hub uses to upload (create_repo + upload_folder) and to
    download (snapshot_download: a revision's info, its file tree, HEAD and GET of
    /{repo}/resolve/{commit}/{file}), over loopback, recording calls. A repo serves the files its
    commits sent; its commit hash is that of its contents."""

    def __init__(self):
        self.calls = []
        self.repos: dict[str, dict[str, bytes]] = {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.calls.append((self.command, self.path, dict(self.headers), body))
                status, headers, data = hub.answer(self.command, self.path.split("?")[0], body)
                self.send_response(status)
                for key, value in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def commit(self, repo: str) -> str:
        files = sorted((path, hashlib.sha256(data).hexdigest()) for path, data in self.repos[repo].items())
        return hashlib.sha1(json.dumps(files).encode()).hexdigest()

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict, bytes]:
        path = unquote(path)
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree|preupload|commit)/[^/]+", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
        repo = (api or resolve).group(1) if api or resolve else None
        if path == "/api/repos/create":
            return self.json({"url": f"{self.endpoint}/me/{json.loads(body)['name']}"})
        if path == "/api/validate-yaml":
            return self.json({"errors": [], "warnings": []})
        if api and api.group(2) == "preupload":
            files = json.loads(body)["files"]
            return self.json(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if api and api.group(2) == "commit":
            sent = [json.loads(line)["value"] for line in body.splitlines() if json.loads(line)["key"] == "file"]
            self.repos.setdefault(repo, {}).update({file["path"]: base64.b64decode(file["content"]) for file in sent})
            commit = self.commit(repo)
            return self.json({"commitUrl": f"{self.endpoint}/{repo}/commit/{commit}", "commitOid": commit})
        if repo not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound"}, b""
        files = self.repos[repo]
        if api and api.group(2) == "revision":
            return self.json({"id": repo, "sha": self.commit(repo), "siblings": [{"rfilename": f} for f in files]})
        if api and api.group(2) == "tree":
            return self.json(
                [
                    {"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for f, data in files.items()
                ]
            )
        if resolve and resolve.group(2) in files:
            data = files[resolve.group(2)]
            return 200, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": self.commit(repo)}, data
        return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.commit(repo)}, b""

    @staticmethod
    def json(answer) -> tuple[int, dict, bytes]:
        return 200, {"Content-Type": "application/json"}, json.dumps(answer).encode()


def test_upload_to_a_loopback_hub_is_one_commit_of_allow_listed_files(package):
    hub = FakeHub()
    token = "hf_secret_loopback_token"
    env = {
        **os.environ,
        "HF_TOKEN": token,
        "HF_ENDPOINT": hub.endpoint,
        "NO_PROXY": "127.0.0.1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    try:
        result = cli("upload", package, "--repo", "me/student-4bit", "--private", "--message", "first", env=env)
    finally:
        hub.server.shutdown()
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout + result.stderr
    paths = [path.split("?")[0] for _, path, _, _ in hub.calls]
    commits = [call for call in hub.calls if call[1].startswith("/api/models/me/student-4bit/commit/")]
    assert len(commits) == 1 and all(
        p in ("/api/repos/create", "/api/validate-yaml") or "/me/student-4bit/" in p for p in paths
    )
    assert json.loads(hub.calls[0][3])["visibility"] == "private"
    lines = [json.loads(line) for line in commits[0][3].splitlines()]
    assert lines[0]["key"] == "header" and lines[0]["value"]["summary"] == "first"
    sent = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]}
    assert set(sent) == UPLOADED
    assert sent["model.safetensors"] == (package / "model.safetensors").read_bytes()
    assert (
        b"library_name: mlx" in sent["README.md"] and b"me/student-4bit" in sent["README.md"]
    )  # card refreshed for the repo
    for _, _, headers, body in hub.calls:
        assert {k.lower(): v for k, v in headers.items()}["authorization"] == f"Bearer {token}"
        assert sum(token in v for v in headers.values()) == 1 and token.encode() not in body


def test_a_package_from_the_loopback_hub_runs_with_its_own_memories(package, tmp_path):
    """upload, then chat / eval / bench / quantize / memory with the Hub id: the snapshot they
    download holds the package's bank (the memory ids shown are its), bench measures the real
    files, a repo's code and pickles never come down, and the Hub cache serves it offline."""
    hub, repo = FakeHub(), "me/student-4bit"
    env = {
        **os.environ,
        "HF_TOKEN": "hf_loopback",
        "HF_ENDPOINT": hub.endpoint,
        "NO_PROXY": "127.0.0.1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
    }
    log, bench_json, memories = tmp_path / "ep.jsonl", tmp_path / "b.json", package / "memory" / "memories.jsonl"
    try:
        assert cli("upload", package, "--repo", repo, env=env).returncode == 0
        hub.repos[repo] |= {"modeling_student.py": b"raise SystemExit('code ran')", "pytorch_model.bin": b"pickle"}
        chat = cli("chat", "--model", repo, "--max-tokens", "4", stdin="open the door\n/memory\n", env=env)
        ran = cli(
            "eval",
            "--env",
            "textworld",
            "--tasks",
            "simple",
            "--episodes",
            "1",
            "--policy",
            f"model:{repo}",
            "--max-steps",
            "3",
            "--out",
            tmp_path / "r.json",
            "--log",
            log,
            env=env,
        )
        bench = cli("bench", repo, "--steps", "2", "--repeats", "1", "--max-tokens", "2", "--json", bench_json, env=env)
        missing = cli("chat", "--model", "me/no-such-package", stdin="", env=env)
        requantized = cli(
            "quantize", "--model", repo, "--bits", "8", "--group-size", "32", "--out", tmp_path / "8bit", env=env
        )
        bank = cli("memory", "build", "--memories", memories, "--embedder", repo, "--out", tmp_path / "bank", env=env)
    finally:
        hub.server.shutdown()
    assert chat.returncode == 0, chat.stderr
    assert "[memory m-1] look around, then open the door" in chat.stdout  # only the package's bank holds m-1
    assert ran.returncode == 0, ran.stderr
    assert json.loads(log.read_text())["memories"] == ["m-1"]
    assert bench.returncode == 0, bench.stderr
    row = json.loads(bench_json.read_text())["packages"][0]
    assert row["package"] == repo and row["model_bytes"] == (package / "model.safetensors").stat().st_size
    assert row["model_config"]["hidden_size"] == json.loads((package / "config.json").read_text())["hidden_size"]
    [snapshot] = (tmp_path / "hf" / "hub" / "models--me--student-4bit" / "snapshots").iterdir()
    assert {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()} == UPLOADED
    fetched = {
        path.split("/resolve/")[1].split("/", 1)[1]
        for method, path, _, _ in hub.calls
        if method == "GET" and "/resolve/" in path
    }
    assert fetched == UPLOADED
    assert_clean_failure(missing, "me/no-such-package is neither a local directory nor a model on the Hub", "HF_TOKEN")
    assert requantized.returncode == 0, requantized.stderr  # the downloaded bank, re-embedded; the base named by its id
    meta = json.loads((tmp_path / "8bit" / "duomem.json").read_text())
    assert meta["base"] == repo and meta["memory"]["count"] == 1 and meta["memory"]["source"].startswith(str(snapshot))
    assert bank.returncode == 0, bank.stderr
    assert json.loads((tmp_path / "bank" / "bank.json").read_text())["embedder"] == repo  # what `memory search` loads

    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    cached = cli("chat", "--model", repo, "--max-tokens", "2", stdin="open the door\n/memory\n", env=offline)
    assert cached.returncode == 0 and "m-1" in cached.stdout, cached.stderr
    assert_clean_failure(
        cli("bench", "me/other", "--json", tmp_path / "x.json", env=offline), "not in the Hub cache", "HF_HUB_OFFLINE"
    )


def test_every_command_that_takes_a_model_gets_a_hub_id_from_the_one_download(package, train_cache, tmp_path):
    """chat, eval, bench, quantize, memory, teach (mlx: and its tokenizer) and distill all reach the
    Hub through models.hub_snapshot: with it unreachable and nothing cached, each says so in its one line."""
    hub = "http://127.0.0.1:9"
    env = {**os.environ, "HF_ENDPOINT": hub, "HF_HUB_CACHE": str(tmp_path / "hub"), "NO_PROXY": "127.0.0.1"}
    out, memories, textworld = tmp_path / "out", package / "memory" / "memories.jsonl", ("--env", "textworld")
    commands = [
        ("chat", "--model", "me/absent"),
        ("eval", *textworld, "--policy", "model:me/absent", "--out", out),
        ("bench", "me/absent", "--json", out),
        ("quantize", "--model", "me/absent", "--out", out),
        ("memory", "build", "--memories", memories, "--embedder", "me/absent", "--out", out),
        ("teach", "--teacher", "mlx:me/absent", *textworld, "--episodes", "1", "--out", out),
        ("teach", "--teacher", "oracle", "--teacher-tokenizer", "me/absent", *textworld, "--out", out),
        ("distill", "--student", "me/absent", "--cache", train_cache, "--out", out),
    ]
    for args in commands:
        assert_clean_failure(cli(*args, stdin="", env=env), f"cannot reach the Hub at {hub} to download me/absent")
        assert not out.exists() or not any(out.iterdir()), args  # distill leaves its empty OUT


def test_upload_bad_input(package, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    assert_clean_failure(cli("upload", package, "--repo", "me/bad name!", env=env), "not a Hub repo id")
    assert_clean_failure(cli("upload", package, "--repo", "me/x", env={**env, "HF_HOME": str(tmp_path)}), "HF_TOKEN")
    assert_clean_failure(
        cli("upload", package, "--repo", "me/x", env={**env, "HF_TOKEN": "hf_x", "HF_ENDPOINT": "http://127.0.0.1:9"}),
        "cannot reach the Hub",
    )
    assert_clean_failure(cli("upload", tmp_path, "--repo", "me/x", "--dry-run"), "not a model package")
