"""Jump-forward and prompt-lookup decoding equal plain decoding on recorded ScienceWorld and
TextWorld episodes, with exact forward-pass counts; the template's own end-of-turn token."""

import mlx_lm
import pytest
from cachecheck import assert_cache_holds
from mlx_lm.utils import common_prefix_len

from duomem_mlx.envs.base import play_episode
from duomem_mlx.envs.policies import OraclePolicy
from duomem_mlx.runtime.decode import END, DecodeOptions, build_trie, end_of_turn, single_completion
from duomem_mlx.runtime.models import make_tiny_model
from duomem_mlx.runtime.prompt import encode, prefix_messages
from duomem_mlx.runtime.session import Session


class CountingModel:
    """The model, counting forward passes (every call is one)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


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
    counted = CountingModel(model)
    session = Session(counted, tokenizer, 8192, options)
    session.start(prefix_messages(episode.task_description, episode.steps[0].observation))
    out = []
    for step, following in zip(episode.steps, [*episode.steps[1:], None]):
        before, target = counted.calls, session.prompt_ids()
        keep = min(common_prefix_len(session.fed, target), len(target) - 1)
        action = session.generate(step.admissible if options.mode == "constrained" else None)
        out.append((action, counted.calls - before, len(target) - keep))
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
