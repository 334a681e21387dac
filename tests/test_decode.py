"""Jump-forward and prompt-lookup decoding equal plain decoding on recorded ScienceWorld and
TextWorld episodes, with exact forward-pass counts; the template's own end-of-turn token; the
mlx-lm model layout the head on chosen rows (runtime/heads.py) and the teacher's recorder rely on."""

import contextlib
import importlib

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from cachecheck import assert_cache_holds
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import common_prefix_len

from duomem_mlx.envs.base import play_episode
from duomem_mlx.envs.policies import OraclePolicy
from duomem_mlx.runtime.decode import END, DecodeOptions, build_trie, end_of_turn, single_completion
from duomem_mlx.runtime.heads import PLAIN_HEAD, hidden_logits, last_rows, logits_at, plain_head
from duomem_mlx.runtime.models import ARCHS, make_tiny_model, tiny_config
from duomem_mlx.runtime.prompt import encode, prefix_messages
from duomem_mlx.runtime.session import Session
from duomem_mlx.teacher.topk import TopKRecorder


@contextlib.contextmanager
def counting_passes(model):
    """Counts the forward passes through `model` while open: the calls of its backbone `model.model`
    (hooked on the class), one per pass whether the decoder calls the model whole or its backbone and
    head apart (runtime/heads.py)."""
    backbone, calls = model.model, [0]
    backbone_class = type(backbone)
    original = backbone_class.__call__

    def call(self, *args, **kwargs):
        calls[0] += self is backbone
        return original(self, *args, **kwargs)

    backbone_class.__call__ = call
    try:
        yield calls
    finally:
        backbone_class.__call__ = original


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    """ChatML (the default tiny qwen3) and Llama 3 (eos_token <|end_of_text|>, turns end with
    <|eot_id|>, generation_config.json names both, as Llama 3 Instruct ships them)."""
    llama3 = make_tiny_model(tmp_path_factory.mktemp("models") / "llama3", arch="llama", template="llama3", seed=3)
    return {"chatml": mlx_lm.load(str(tiny_model)), "llama3": mlx_lm.load(str(llama3))}


@pytest.fixture(scope="module")
def episodes(textworld, scienceworld):
    """Oracle episodes of both environments, recorded with their admissible lists."""
    recorded = {}
    for env in (textworld, scienceworld):
        spec = env.task_specs(None, "dev", 1, seed=0)[0]
        recorded[env.name] = play_episode(env, spec, OraclePolicy(), max_steps=6)
    return recorded


def replay(model, tokenizer, episode, options):
    """The model acts on each recorded state (the recorded observations follow); per step:
    (action, forward passes, prompt tokens fed). Checks the cache holds exactly `fed`."""
    session = Session(model, tokenizer, 8192, options)
    session.start(prefix_messages(episode.task_description, episode.steps[0].observation))
    out = []
    for step, following in zip(episode.steps, [*episode.steps[1:], None]):
        target = session.prompt_ids()
        keep = min(common_prefix_len(session.fed, target), len(target) - 1)
        with counting_passes(model) as passes:
            action = session.generate(step.admissible if options.mode == "constrained" else None)
        out.append((action, passes[0], len(target) - keep))
        assert session.fed[: len(target)] == target[: len(session.fed)]
        if following:
            session.append([{"role": "user", "content": following.observation.strip()}])
    assert_cache_holds(model, session)
    return out, session


def branch_points(tokenizer, admissible, command) -> int:
    """Trie nodes with more than one child on the way to `command`, before one command remains."""
    node, count = build_trie(tokenizer, admissible), 0
    for token in [*encode(tokenizer, command), end_of_turn(tokenizer)]:
        if single_completion(node) is not None:
            break
        count += len([t for t in node if t != END]) > 1
        node = node[token]
    return count


def plain_passes(tokenizer, admissible, command, prompt_len) -> int:
    """generate_step: the prompt minus its last token, then one pass per token it yields
    (each token is fed before it is yielded), up to the token that leaves one command."""
    node, tokens = build_trie(tokenizer, admissible), 0
    for token in [*encode(tokenizer, command), end_of_turn(tokenizer)]:
        if single_completion(node) is not None and tokens:
            break
        tokens += 1
        node = node[token]
    return (prompt_len > 1) + 1 + tokens


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("env", ["textworld", "scienceworld"])
def test_jump_forward_equals_plain_constrained_greedy(models, episodes, template, env):
    model, tokenizer = models[template]
    episode = episodes[env]
    one_pass = 4096  # prompts prefilled in one pass, so the counts below are the decode passes
    plain, plain_session = replay(model, tokenizer, episode, DecodeOptions(fast=False, prefill_step=one_pass))
    fast, fast_session = replay(model, tokenizer, episode, DecodeOptions(prefill_step=one_pass))
    assert [a for a, _, _ in fast] == [a for a, _, _ in plain]
    for step, (action, passes, prompt_len), (_, ref_passes, ref_prompt_len) in zip(episode.steps, fast, plain):
        assert action in step.admissible
        assert passes == branch_points(tokenizer, step.admissible, action)
        assert ref_passes == plain_passes(tokenizer, step.admissible, action, ref_prompt_len)
    assert sum(p for _, p, _ in fast) < sum(p for _, p, _ in plain)
    for session in (fast_session, plain_session):
        assert session.stats()["constrained_fallbacks"] == 0
    assert fast_session.stats()["forward_passes"] == sum(p for _, p, _ in fast)


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("env", ["textworld", "scienceworld"])
def test_prompt_lookup_equals_plain_greedy(models, episodes, template, env):
    model, tokenizer = models[template]
    episode = episodes[env]
    plain, _ = replay(model, tokenizer, episode, DecodeOptions(mode="free", fast=False, prefill_step=4096))
    fast, session = replay(model, tokenizer, episode, DecodeOptions(mode="free", prefill_step=4096))
    assert [a for a, _, _ in fast] == [a for a, _, _ in plain]
    stats = session.decode_stats
    assert stats.drafted > 0
    assert stats.forward_passes == sum(p for _, p, _ in fast)
    assert stats.forward_passes <= sum(p for _, p, _ in plain)


def test_the_template_end_of_turn_closes_commands(models):
    model, tokenizer = models["llama3"]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer.eos_token_id != eot and eot in tokenizer.eos_token_ids  # mlx_lm.load merged generation_config.json
    assert end_of_turn(tokenizer) == eot
    assert end_of_turn(models["chatml"][1]) == models["chatml"][1].convert_tokens_to_ids("<|im_end|>")
    # "take key" is a prefix of another command: the end-of-turn token is a real choice here
    commands = ["take key", "take key from box"]
    session = Session(model, tokenizer, 4096, DecodeOptions())
    session.start(prefix_messages("find the key", "You see a box."))
    action = session.generate(commands)
    assert action in commands
    assert eot in walk_ids(build_trie(tokenizer, commands), encode(tokenizer, "take key"))
    session.append([{"role": "user", "content": "Taken."}])
    target = session.prompt_ids()
    assert common_prefix_len(session.fed, target) == len(session.fed)  # the cache holds the template's tokens


def walk_ids(trie, tokens):
    node = trie
    for token in tokens:
        node = node[token]
    return node


def test_a_fallback_is_counted(models):
    model, tokenizer = models["chatml"]
    commands = ["open the wooden door to the kitchen", "open the wooden door to the hallway"]
    for fast in (True, False):
        session = Session(model, tokenizer, 4096, DecodeOptions(max_tokens=2, fast=fast))
        session.start(prefix_messages("t", "o"))
        assert session.generate(commands) in commands
        assert session.stats()["constrained_fallbacks"] == 1


def test_tied_logits_go_to_the_lowest_id_as_in_plain_decoding(tiny_model):
    """bf16 logits tie often; jump-forward reads only the allowed tokens' logits, and must still
    break a tie as a full-vocabulary argmax does (lowest id), whatever order the trie holds."""
    model, tokenizer = mlx_lm.load(str(tiny_model))
    words = [w for w in ("take", "open", "look", "close", "go", "examine") if len(encode(tokenizer, w)) == 1]
    low, high = sorted(words[:2], key=lambda w: encode(tokenizer, w)[0])
    embed = model.model.embed_tokens
    rows = embed.weight
    rows[encode(tokenizer, low)[0]] = rows[encode(tokenizer, high)[0]]  # the same head row: an exact tie
    embed.weight = rows
    actions = {}
    for fast in (True, False):
        session = Session(model, tokenizer, 4096, DecodeOptions(fast=fast))
        session.start(prefix_messages("do something", "You are in a room."))
        actions[fast] = session.generate([f"{high} door", f"{low} door"])  # the higher id enters the trie first
    assert actions[True] == actions[False] == f"{low} door"


def tiny_family_model(arch: str, tied: bool, quantized: bool = False):
    """A random-init mlx-lm model of `arch` as mlx-lm builds it (qwen2: the qwen3 config under its name)."""
    config = {**tiny_config("qwen3" if arch == "qwen2" else arch, 2, 64, 512, [1]), "model_type": arch}
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    model = module.Model(module.ModelArgs.from_dict({**config, "tie_word_embeddings": tied}))
    if tied and "lm_head" in model:  # gemma3_text: tied when the checkpoint has no lm_head
        model.sanitize({})
    if quantized:
        nn.quantize(model, group_size=32, bits=8)
    mx.eval(model.parameters())
    return model


def test_the_families_have_the_plain_head_layout():
    """Every family make_tiny_model builds (and Qwen2.5-Coder's qwen2) gets the head on chosen rows only."""
    assert set(ARCHS) | {"qwen2"} <= PLAIN_HEAD


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", sorted(PLAIN_HEAD))
def test_plain_head_layout(arch, tied, quantized):
    """runtime/heads.py relies on mlx-lm's layout: `model.model(inputs, cache)` gives the final hidden
    states, and the logits are `model.lm_head` of them, or `model.model.embed_tokens.as_linear` (tied).
    Exactly the model's own logits; on chosen rows and token ids, the same numbers."""
    model = tiny_family_model(arch, tied, quantized)
    assert plain_head(model)
    assert ("lm_head" in model) == (not tied and arch != "lfm2")  # lfm2 is always tied
    tokens = mx.array([[5, 9, 14, 3, 7, 11, 2, 8]])
    full = model(tokens)
    assert mx.array_equal(hidden_logits(model, model.model(tokens)), full).item()
    ids = [7, 500, 3, 100]
    assert mx.allclose(last_rows(model, tokens, None, 3, ids), full[:, -3:, mx.array(ids)], atol=1e-5).item()
    rows = mx.array([0, 4, 6])
    assert mx.allclose(logits_at(model, tokens, rows), full[0, rows], atol=1e-5).item()
    cache = make_prompt_cache(model)
    model.model(tokens[:, :5], cache=cache)
    assert mx.allclose(last_rows(model, tokens[:, 5:], cache, 1), full[:, -1:], atol=1e-5).item()


@pytest.mark.parametrize("arch", sorted(PLAIN_HEAD))
def test_recorder_makes_the_models_cache(arch):
    """The teacher's top-k recorder stands in for the model in a session: mlx-lm's make_prompt_cache
    gets the model's own cache from its `make_cache` (rotating layers for gemma3_text, arrays for lfm2),
    and the decoder calls it whole."""
    model = tiny_family_model(arch, tied=True)
    recorder = TopKRecorder(model, 4, {1})
    kinds = [type(c) for c in make_prompt_cache(model)]
    assert [type(c) for c in make_prompt_cache(recorder)] == kinds
    assert not plain_head(recorder)
    tokens = mx.array([[5, 9, 14, 3]])
    assert mx.array_equal(last_rows(recorder, tokens, make_prompt_cache(recorder), 1), model(tokens)[:, -1:]).item()
    assert len(recorder.logits) == 0 and recorder.tokens  # a prompt call: fed, no action rows to record
