"""Tiny models of the real families, each with its family's chat template: the session equals
re-encoding (templates that rewrite history, rotating and arrays caches), training layout,
`teach --teacher mlx:` and `chat` run on each."""

import random
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.utils import common_prefix_len

from duomem_mlx.cli import cli
from duomem_mlx.envs.base import Episode, Step
from duomem_mlx.formats.teacher_cache import load_shard, read_cache_records, verify
from duomem_mlx.runtime.decode import DecodeOptions
from duomem_mlx.runtime.heads import last_rows
from duomem_mlx.runtime.models import ARCHS, make_tiny_model
from duomem_mlx.runtime.prompt import encode, episode_messages, prefix_messages, render, tokenize_with_mask
from duomem_mlx.runtime.session import ReencodingSession, Session

WORDS = "open close door to kitchen go north south take apple from table look inventory examine heat pot".split()
FAMILIES = list(ARCHS)  # qwen3 (qwen3 template), llama (llama3), gemma3_text (gemma), lfm2 (chatml)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {arch: make_tiny_model(root / arch, arch=arch, sliding_window=16, vocab_size=1024) for arch in FAMILIES}


@pytest.fixture(scope="module")
def family_models(family_dirs):
    return {arch: mlx_lm.load(str(path)) for arch, path in family_dirs.items()}


def play(session_class, model, tokenizer, mode, max_context, steps=8, thinking=False):
    rng = random.Random(3)
    session = session_class(model, tokenizer, max_context, DecodeOptions(mode=mode, max_tokens=8), thinking=thinking)
    session.start(
        prefix_messages("boil water", "You are in the hallway. " * 6, ["to boil: take pot, fill it, heat it"])
    )
    actions = []
    for i in range(steps):
        admissible = [" ".join(rng.sample(WORDS, rng.randint(1, 4))) for _ in range(6)]
        actions.append(session.generate(admissible if mode == "constrained" else None))
        session.append([{"role": "user", "content": f"step {i}: " + " ".join(rng.sample(WORDS, 8))}])
    return actions, session


def next_logits_agree(session):
    """The cache the session holds (rewound / restored as a step would) gives the logits of a full forward pass."""
    target = session.prompt_ids()
    at = session.rewind(min(common_prefix_len(session.fed, target), len(target) - 1))
    step = session.model(mx.array(target[at:])[None], cache=session.cache)[0, -1]
    full = session.model(mx.array(target)[None])[0, -1]
    return mx.allclose(full, step, atol=1e-3).item()


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("arch", FAMILIES)
def test_head_on_the_rows_and_tokens_read(arch, quantized, family_dirs):
    """`last_rows` runs the model's backbone, then its head on the rows read and the tokens asked
    for: the same logits, and the head's input is those rows alone."""
    model, _ = mlx_lm.load(str(family_dirs[arch]))
    if quantized:
        nn.quantize(model, group_size=32, bits=8)
    tokens = mx.array([[5, 9, 14, 3, 7, 11, 2, 8]])
    full = model(tokens)[:, -3:]
    head_inputs = []
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens  # untied / tied
    method = "__call__" if "lm_head" in model else "as_linear"  # hooked on the class, counted for `head` alone
    original = getattr(type(head), method)
    setattr(type(head), method, lambda self, x: (self is head and head_inputs.append(x.shape)) or original(self, x))
    try:
        rows = last_rows(model, tokens, None, 3)
    finally:
        setattr(type(head), method, original)
    assert head_inputs == [(1, 3, model.args.hidden_size)]
    assert mx.allclose(full, rows, atol=1e-5).item()
    ids = [7, 500, 3, 1000]
    assert mx.allclose(full[..., mx.array(ids)], last_rows(model, tokens, None, 3, ids), atol=1e-4).item()


@pytest.mark.parametrize("mode", ["constrained", "free"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_session_equals_reencoding(family_models, arch, mode):
    model, tokenizer = family_models[arch]
    fast_actions, fast = play(Session, model, tokenizer, mode, 300)
    naive_actions, naive = play(ReencodingSession, model, tokenizer, mode, 300)
    assert fast_actions == naive_actions and fast.messages == naive.messages
    assert len(fast.messages) < 2 + 2 * 8  # the window dropped turns
    assert fast.prefill_tokens < naive.prefill_tokens
    assert fast.prompt_ids() == encode(tokenizer, render(tokenizer, fast.messages, True))
    assert next_logits_agree(fast)
    kinds = {type(c).__name__ for c in fast.cache}
    if arch == "gemma3_text":
        assert "RotatingKVCache" in kinds and max(fast.prompt_tokens) > 16 * 4  # the window wrapped
    if arch == "lfm2":
        assert "ArraysCache" in kinds and fast.snapshots


@pytest.mark.parametrize("arch", ["gemma3_text", "lfm2"])
def test_episodes_sharing_a_system_prompt_restore_it(family_models, arch):
    """Caches that cannot be cut back: from the third episode on, the system prompt and its
    memories come back from the snapshot where the last two episodes parted, not fed again;
    the actions stay those of re-encoding."""
    model, tokenizer = family_models[arch]
    memories = ["to boil: take pot, fill it, heat it " * 6]
    sessions = {
        cls: cls(model, tokenizer, 4096, DecodeOptions(mode="constrained", max_tokens=8))
        for cls in (Session, ReencodingSession)
    }
    first_feeds, actions = [], {cls: [] for cls in sessions}
    for episode in range(3):
        for cls, session in sessions.items():
            session.start(prefix_messages(f"task {episode}: boil water", "You are in the hallway.", memories))
            before = session.prefill_tokens
            actions[cls].append(session.generate(["take pot", "open door", "go north"]))
            session.append([{"role": "user", "content": "You see a pot."}])
            actions[cls].append(session.generate(["take pot", "fill pot", "heat pot"]))
            if cls is Session:
                first_feeds.append(session.prefill_tokens - before)
    assert actions[Session] == actions[ReencodingSession]
    assert first_feeds[2] < first_feeds[1] / 2, (
        first_feeds
    )  # the second episode found where they part, the third uses it
    assert next_logits_agree(sessions[Session])


class StopAt:
    """A model layer that raises KeyboardInterrupt (Ctrl-C) at its `stop`-th call."""

    def __init__(self, layer, stop: int):
        self.layer, self.stop, self.calls = layer, stop, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.layer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.layer, name)


@pytest.mark.parametrize("mode", ["constrained", "free"])
@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text", "lfm2"])
def test_a_stopped_reply_leaves_the_cache_exact(family_models, arch, mode):
    """Ctrl-C at every pass of a reply (each prefill chunk, each decode pass), in the first layer
    (between passes) or the last (inside one): chat forgets the message, and the next reply and
    logits are a fresh session's on the same chat."""
    model, tokenizer = family_models[arch]
    options = DecodeOptions(mode=mode, max_tokens=6, prefill_step=8)
    admissible = ["take pot", "open door", "go north"] if mode == "constrained" else None
    prefix = prefix_messages("boil water", "You are in the hallway. " * 6, ["to boil: take pot, fill it, heat it"])
    stopped = {"role": "user", "content": " ".join(WORDS * 3)}
    after = {"role": "user", "content": "You see a pot."}

    def session_after_one_reply():
        session = Session(model, tokenizer, 4096, options)
        session.start(prefix)
        session.generate(admissible)
        return session

    reference = session_after_one_reply()
    reference.append([after])
    expected = reference.generate(admissible)
    layers = model.model.layers
    for index in (0, len(layers) - 1):
        layer, stop = layers[index], 1
        while True:
            session = session_after_one_reply()
            session.append([stopped])
            layers[index] = StopAt(layer, stop)
            try:
                session.generate(admissible)
                break  # past the last pass
            except KeyboardInterrupt:
                session.messages.pop()  # as chat does
            finally:
                layers[index] = layer
            session.append([after])
            assert session.generate(admissible) == expected, (index, stop)
            assert next_logits_agree(session), (index, stop)
            stop += 1
        assert stop > 8, stop  # several prefill chunks and decode passes were stopped


@pytest.mark.parametrize("thinking", [False, True])
def test_qwen3_think_block_is_rewritten_and_refed(family_models, thinking):
    """Qwen3 drops the (empty) think block of a past reply: the diff re-feeds from there, exactly."""
    model, tokenizer = family_models["qwen3"]
    prompt = render(tokenizer, [{"role": "user", "content": "x"}], True, thinking)
    assert prompt.endswith("<think>\n\n</think>\n\n") != thinking
    fast_actions, fast = play(Session, model, tokenizer, "free", 4096, steps=5, thinking=thinking)
    naive_actions, _ = play(ReencodingSession, model, tokenizer, "free", 4096, steps=5, thinking=thinking)
    assert fast_actions == naive_actions
    if not thinking:
        assert all(n > 0 for n in fast.rewound_tokens[1:])


@pytest.mark.parametrize("arch", FAMILIES)
def test_training_layout(family_models, arch):
    """The whole chat as rendered; each action follows the history the agent saw (Qwen3: without
    the think block of its generation prompt, except the last action)."""
    _, tokenizer = family_models[arch]
    steps = [Step("You see a box.", "open box"), Step("It holds a key.", "take key"), Step("Done.", "look")]
    messages = episode_messages(Episode("e", "textworld", "simple", 0, "find the key", True, 1.0, steps=steps))
    ids, mask = tokenize_with_mask(tokenizer, messages)
    starts = [j for j in range(len(mask)) if mask[j] and not mask[j - 1]]
    actions = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(starts) == 3
    for start, i in zip(starts, actions):
        context = encode(tokenizer, render(tokenizer, messages[:i], True))
        end = next((j for j in range(start, len(ids)) if not mask[j]), len(ids))
        assert (
            tokenizer.decode(ids[start : end - 1]) == messages[i]["content"] and ids[end - 1] in tokenizer.eos_token_ids
        )
        if arch == "qwen3" and i != actions[-1]:  # the history it saw, without the think block Qwen3 drops later
            assert ids[:start] == encode(tokenizer, render(tokenizer, messages[:i], True, thinking=True))
            assert context[start:] == encode(tokenizer, "<think>\n\n</think>\n\n")
        else:
            assert ids[:start] == context
    assert ids == encode(tokenizer, render(tokenizer, messages, False))


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.env("textworld")
def test_teach_mlx_teacher(family_dirs, tmp_path, arch):
    out = tmp_path / "cache"
    args = [
        "teach",
        "--env",
        "textworld",
        "--max-steps",
        "4",
        "--teacher",
        f"mlx:{family_dirs[arch]}",
        "--episodes",
        "1",
        "--keep",
        "all",
        "--top-k",
        "4",
        "--max-context",
        "256",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert verify(out) == (1, [])
    model, _ = mlx_lm.load(str(family_dirs[arch]))
    arrays = load_shard(out, read_cache_records(out)[0])
    logits = model(mx.array(arrays["input_ids"])[None])[0].astype(mx.float32)
    reference = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[np.flatnonzero(arrays["loss_mask"]) - 1]
    stored = np.take_along_axis(reference, arrays["topk_ids"], 1)
    assert np.abs(stored - arrays["topk_logprobs"].astype(np.float32)).max() < 2e-2


@pytest.mark.parametrize("arch", FAMILIES)
def test_chat_piped(family_dirs, arch):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "duomem_mlx",
            "chat",
            "--model",
            str(family_dirs[arch]),
            "--max-tokens",
            "6",
            "--max-context",
            "256",
        ],
        input="hello there\n/stats\nand again\nonce more\n/stats\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stdout.splitlines() if line.startswith("prefill")]) == 2
