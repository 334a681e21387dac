"""Every stage on the two real models (SmolLM2-135M-Instruct, Gemma 3 270M base, converted from
the GGUF files PyPI wheels carry), with short budgets: eval, chat, teach, memory, distill,
quantize, bench, and the session equal to re-encoding."""

import json
import subprocess
import sys

import mlx_lm
import pytest
from click.testing import CliRunner
from test_families import play

from duomem_mlx.cli import cli
from duomem_mlx.formats.bank import MemoryBank
from duomem_mlx.formats.teacher_cache import verify
from duomem_mlx.runtime.session import ReencodingSession, Session

SMOLLM2, GEMMA3 = "smollm2-135m-instruct", "gemma3-270m"


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def oracle_cache(real_models, tmp_path_factory):
    """TextWorldExpress oracle games tokenized for SmolLM2 (CE-only distillation data)."""
    out = tmp_path_factory.mktemp("real") / "oracle-cache"
    invoke(
        "teach",
        "--teacher",
        "oracle",
        "--teacher-tokenizer",
        real_models[SMOLLM2],
        "--env",
        "twx",
        "--tasks",
        "coin,twc",
        "--episodes",
        "2",
        "--out",
        out,
    )
    return out


@pytest.mark.parametrize("name,decode", [(SMOLLM2, "constrained"), (SMOLLM2, "free"), (GEMMA3, "constrained")])
@pytest.mark.env("twx")
def test_eval(real_models, tmp_path, name, decode):
    out = tmp_path / "r.json"
    invoke(
        "eval",
        "--env",
        "twx",
        "--tasks",
        "coin",
        "--split",
        "test",
        "--episodes",
        "1",
        "--max-steps",
        "3",
        "--policy",
        f"model:{real_models[name]}",
        "--decode",
        decode,
        "--out",
        out,
        "--log",
        tmp_path / "ep.jsonl",
    )
    episode = json.loads((tmp_path / "ep.jsonl").read_text().splitlines()[0])
    assert len(episode["steps"]) >= 1 and all(step["action"].strip() for step in episode["steps"])


def test_chat_answers(real_models):
    result = subprocess.run(
        [sys.executable, "-m", "duomem_mlx", "chat", "--model", str(real_models[SMOLLM2]), "--max-tokens", "16"],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.parametrize("name", [SMOLLM2, GEMMA3])
@pytest.mark.env("twx")
def test_teach_with_a_real_mlx_teacher(real_models, tmp_path, name):
    out = tmp_path / "cache"
    invoke(
        "teach",
        "--teacher",
        f"mlx:{real_models[name]}",
        "--env",
        "twx",
        "--tasks",
        "coin",
        "--episodes",
        "1",
        "--max-steps",
        "2",
        "--keep",
        "all",
        "--top-k",
        "4",
        "--decode",
        "constrained",
        "--out",
        out,
    )
    assert verify(out) == (1, [])


def test_memory_in_the_real_models_space(real_models, oracle_cache, tmp_path):
    invoke("memory", "build", "--cache", oracle_cache, "--embedder", real_models[SMOLLM2], "--out", tmp_path / "bank")
    bank = MemoryBank.load(tmp_path / "bank")
    assert bank.keys.shape[1] == 576 and len(bank.memories) >= 2
    result = invoke("memory", "search", tmp_path / "bank", "Your task is to find a coin.")
    assert "coin" in result.output.lower()


@pytest.mark.env("twx")
def test_memory_write_with_a_real_model(real_models, tmp_path):
    invoke(
        "eval",
        "--env",
        "twx",
        "--tasks",
        "coin",
        "--split",
        "train",
        "--episodes",
        "2",
        "--policy",
        "oracle",
        "--out",
        tmp_path / "r.json",
        "--log",
        tmp_path / "ep.jsonl",
    )
    result = invoke(
        "memory",
        "write",
        "--episodes",
        tmp_path / "ep.jsonl",
        "--writer",
        f"model:{real_models[SMOLLM2]}",
        "--max-tokens",
        "48",
        "--out",
        tmp_path / "memories.jsonl",
    )
    written = [json.loads(line) for line in (tmp_path / "memories.jsonl").read_text().splitlines()]
    assert "wrote" in result.output and all(m["text"].strip() for m in written)


def test_distill_quantize_bench(real_models, oracle_cache, tmp_path):
    """LoRA on SmolLM2's last blocks: the loss on held-out episodes falls and the adapters load in plain mlx-lm; fused,
    the 4-bit package loads and the float32 one benches (MLX's CPU quantized matmuls take a
    minute a step here, so the 4-bit package is benched on a Mac, not in tests)."""
    adapters = tmp_path / "adapters"
    invoke(
        "distill",
        "--student",
        real_models[SMOLLM2],
        "--cache",
        oracle_cache,
        "--kd",
        "off",
        "--num-layers",
        "2",
        "--rank",
        "4",
        "--iters",
        "6",
        "--batch-size",
        "1",
        "--learning-rate",
        "1e-3",
        "--val-fraction",
        "0.5",
        "--max-seq-length",
        "512",
        "--out",
        adapters,
    )
    val = [
        row["val_loss"]
        for row in map(json.loads, (adapters / "metrics.jsonl").read_text().splitlines())
        if "val_loss" in row
    ]
    assert len(val) == 2 and val[-1] < 0.8 * val[0]  # held-out episodes (2.99 -> 1.67 here), not one batch's noise
    model, tokenizer = mlx_lm.load(str(real_models[SMOLLM2]), adapter_path=str(adapters))
    assert mlx_lm.generate(model, tokenizer, "Hello", max_tokens=2)
    for bits, package in (("4", tmp_path / "q4"), ("16", tmp_path / "f32")):
        invoke(
            "quantize",
            "--model",
            real_models[SMOLLM2],
            "--adapters",
            adapters,
            "--bits",
            bits,
            "--dtype",
            "float32",
            "--out",
            package,
        )
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]["bits"] == 4
    mlx_lm.load(str(tmp_path / "q4"))
    invoke(
        "bench",
        tmp_path / "f32",
        "--steps",
        "2",
        "--max-tokens",
        "4",
        "--repeats",
        "1",
        "--json",
        tmp_path / "bench.json",
    )
    [row] = json.loads((tmp_path / "bench.json").read_text())["packages"]
    assert row["decode_tokens_per_s"] > 0 and row["decode_roofline_fraction"] <= 1


@pytest.mark.parametrize("name,mode", [(SMOLLM2, "constrained"), (SMOLLM2, "free"), (GEMMA3, "constrained")])
def test_session_equals_reencoding(real_models, name, mode):
    model, tokenizer = mlx_lm.load(str(real_models[name]))
    fast_actions, fast = play(Session, model, tokenizer, mode, 300, steps=4)
    naive_actions, naive = play(ReencodingSession, model, tokenizer, mode, 300, steps=4)
    assert fast_actions == naive_actions and fast.messages == naive.messages
    assert fast.prefill_tokens < naive.prefill_tokens
