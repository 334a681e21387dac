"""What playing costs (runtime/cost.py): forward FLOPs by hand and against the real weights, counted at
every pass a session runs, and eval's `cost` block against its own episode log."""

import contextlib
import json
import subprocess
import sys

import mlx_lm
import pytest
from mlx.utils import tree_flatten

from duomem_mlx.runtime.cost import Shape, dir_bytes, keys, model_shape, peak_rss_bytes
from duomem_mlx.runtime.decode import DecodeOptions, cache_offset
from duomem_mlx.runtime.models import make_tiny_model
from duomem_mlx.runtime.prompt import prefix_messages
from duomem_mlx.runtime.session import ReencodingSession, Session

# d 4, 2 layers (the first sliding, window 3), I 8, 2 heads, 1 kv head of dim 2, V 10
HAND = Shape(hidden=4, layers=2, intermediate=8, heads=2, kv_heads=1, head_dim=2, vocab=10, windows=(3, None))


def test_flops_by_hand():
    # a layer: q 4x4, k 4x2, v 4x2, o 4x4 (48) + gate, up, down 4x8 (96) = 144 weights; 2 layers
    assert HAND.block_parameters == 288 and HAND.parameters == 288 + 40
    # positions 2, 3, 4: the global layer scores 3 + 4 + 5 keys, the sliding one 3 + 3 + 3
    assert HAND.attention_keys(2, 3) == 21
    blocks = 2 * 288 * 3 + 4 * 2 * 2 * 21  # 1,728 matmul + 336 attention
    assert HAND.flops(2, 3) == blocks == 2064
    assert HAND.flops(2, 3, head_rows=1) == blocks + 2 * 4 * 10  # the head on the last row
    assert HAND.flops(2, 3, head_rows=2, head_columns=3) == blocks + 2 * 2 * 4 * 3  # 3 allowed tokens
    assert keys(0, 5, None) == 15 and keys(1, 4, 3) == 2 + 3 + 3 + 3 and keys(7, 2, 3) == 6


@pytest.mark.parametrize("start", [0, 1, 5, 40])
@pytest.mark.parametrize("tokens", [1, 2, 7, 33])
@pytest.mark.parametrize("window", [None, 1, 4, 16])
def test_closed_form_keys_equal_the_sum(start, tokens, window):
    assert keys(start, tokens, window) == sum(min(p + 1, window or p + 1) for p in range(start, start + tokens))


@pytest.fixture(scope="module")
def tiny_models(tiny_model, tiny_teacher, tmp_path_factory):
    gemma = make_tiny_model(tmp_path_factory.mktemp("models") / "gemma", arch="gemma3_text", tokenizer_from=tiny_model)
    return {"qwen3": tiny_model, "llama": tiny_teacher, "gemma3_text": gemma}


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gemma3_text"])
def test_the_shape_counts_every_weight_matrix_of_a_real_model(tiny_models, arch):
    model, _ = mlx_lm.load(str(tiny_models[arch]))
    shape = model_shape(model)
    assert shape.parameters == sum(v.size for _, v in tree_flatten(model.parameters()) if v.ndim == 2)
    caches = model.make_cache() if hasattr(model, "make_cache") else [None] * shape.layers
    windows = tuple(getattr(c, "max_size", None) for c in caches)  # RotatingKVCache(max_size=window)
    assert shape.windows == windows and (arch != "gemma3_text" or set(windows) == {None, 32})


def test_a_model_of_another_shape_is_not_counted(tiny_model, tmp_path):
    hybrid = make_tiny_model(tmp_path / "lfm2", arch="lfm2", tokenizer_from=tiny_model)
    model, tokenizer = mlx_lm.load(str(hybrid))
    assert model_shape(model) is None
    session = Session(model, tokenizer)
    session.start(prefix_messages("find the key", "You see a box."))
    session.generate(["open box", "go north"])
    assert session.stats()["forward_flops"] is None and session.stats()["prefill_tokens"] > 0


@contextlib.contextmanager
def recorded_passes(model):
    """(tokens, cache offset before) of every pass through the backbone `model.model`, however it is called."""
    backbone, passes = model.model, []
    backbone_class = type(backbone)
    original = backbone_class.__call__

    def call(self, inputs, *args, **kwargs):
        if self is backbone:
            cache = kwargs["cache"] if "cache" in kwargs else args[0] if args else None
            passes.append((inputs.shape[1], cache_offset(cache) if cache else 0))
        return original(self, inputs, *args, **kwargs)

    backbone_class.__call__ = call
    try:
        yield passes
    finally:
        backbone_class.__call__ = original


ADMISSIBLE = ["open box", "take key", "go north", "unlock door with key", "look"]


def play(session, steps: int = 4) -> list[tuple[int, int]]:
    """Act `steps` times; per step (prompt tokens, tokens the cache holds after it)."""
    session.start(prefix_messages("find the key and unlock the door", "You see a box."))
    out = []
    for i in range(steps):
        if i:
            session.append([{"role": "user", "content": f"Nothing happens ({i})."}])
        session.generate(ADMISSIBLE if session.options.mode == "constrained" else None)
        out.append((session.prompt_tokens[-1], len(session.fed)))
    return out


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])  # gemma3's sliding layers: snapshots, fed apart
@pytest.mark.parametrize("mode, fast", [("free", False), ("free", True), ("constrained", True)])
def test_the_session_counts_the_flops_of_every_pass(tiny_models, arch, mode, fast):
    """The blocks' FLOPs of each pass the backbone ran (seen from outside), plus the head's rows: one a
    decoded token on the plain path, a draft's rows on prompt lookup, a few columns when constrained.
    Prompts are prefilled 32 tokens a pass."""
    model, tokenizer = mlx_lm.load(str(tiny_models[arch]))
    shape = model_shape(model)
    options = DecodeOptions(mode=mode, fast=fast, max_tokens=12, prefill_step=32)
    session = Session(model, tokenizer, 4096, options)
    with recorded_passes(model) as passes:
        steps = play(session)
    flops, stats = session.stats()["forward_flops"], session.decode_stats
    head = flops - sum(shape.flops(offset, tokens) for tokens, offset in passes)
    row = 2 * shape.hidden * shape.vocab  # the head on one row
    if mode == "free" and (not fast or arch == "gemma3_text"):  # a rotating cache takes no drafts: generate_step
        # the head on the prompt's last token, then on every decoded one fed back
        assert head == row * sum(held - prompt + 1 for prompt, held in steps)
    elif mode == "free":
        assert head % row == 0 and head >= row * stats.forward_passes and stats.drafted > 0
    else:
        assert 0 < head < row * stats.forward_passes
    assert len(passes) >= stats.forward_passes and stats.flops == flops > 0


def test_re_encoding_every_step_costs_more_flops(tiny_model):
    model, tokenizer = mlx_lm.load(str(tiny_model))
    flops = {}
    for kind in (Session, ReencodingSession):
        session = kind(model, tokenizer, 4096, DecodeOptions())
        play(session, steps=5)
        flops[kind] = session.stats()["forward_flops"]
    assert flops[ReencodingSession] > 2 * flops[Session] > 0


def test_peak_rss_is_kilobytes_on_linux_and_bytes_on_macos():
    assert peak_rss_bytes(3000, "darwin") == 3000
    assert peak_rss_bytes(3000, "linux") == 3000 * 1024
    assert peak_rss_bytes() > 20e6  # this process, MLX loaded, on any platform


def cli(*args):
    result = subprocess.run([sys.executable, "-m", "duomem_mlx", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.env("twx")
def test_eval_results_carry_the_cost_of_their_episodes(tiny_model, tmp_path):
    memories = tmp_path / "memories.jsonl"
    memories.write_text(json.dumps({"id": "coin-1", "task_type": "coin", "text": "look around, take the coin"}) + "\n")
    bank = tmp_path / "bank"
    cli("memory", "build", "--memories", str(memories), "--embedder", str(tiny_model), "--out", str(bank))
    out, log = tmp_path / "model.json", tmp_path / "model.jsonl"
    games = ["eval", "--env", "twx", "--tasks", "coin,mapreader", "--split", "test", "--episodes", "2"]
    policy = ["--policy", f"model:{tiny_model}", "--memory", str(bank), "--max-steps", "3"]
    printed = cli(*games, *policy, "--out", str(out), "--log", str(log)).stdout
    cost = json.loads(out.read_text())["cost"]
    episodes = [json.loads(line) for line in log.read_text().splitlines()]
    assert cost["forward_flops"] == sum(e["stats"]["forward_flops"] for e in episodes) > 0
    for key in ("prefill_tokens", "restored_tokens", "decode_tokens", "forward_flops"):
        assert cost[f"{key}_per_task"] == round(sum(e["stats"][key] for e in episodes) / 4, 1)
    coin = [e for e in episodes if e["task"] == "coin"]
    assert cost["per_task"]["coin"]["decode_tokens_per_task"] == round(
        sum(e["stats"]["decode_tokens"] for e in coin) / 2, 1
    )
    assert cost["seconds_per_task"] == round(sum(e["seconds"] for e in episodes) / 4, 3)
    assert cost["seconds_per_step"] == round(
        sum(e["seconds"] for e in episodes) / sum(len(e["steps"]) for e in episodes), 4
    )
    assert cost["model_bytes"] == (tiny_model / "model.safetensors").stat().st_size
    assert cost["bank_bytes"] == dir_bytes(bank) > 0
    assert cost["peak_memory_bytes"] > 0 and cost["peak_rss_bytes"] > 0
    assert "GFLOPs/task" in printed and printed.count("cost: ") == 1

    oracle = tmp_path / "oracle.json"
    cli(*games, "--policy", "oracle", "--out", str(oracle))
    cost = json.loads(oracle.read_text())["cost"]
    assert cost["model_bytes"] is None and cost["forward_flops"] is None and cost["prefill_tokens_per_task"] is None
    assert cost["seconds_per_task"] > 0
