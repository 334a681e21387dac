"""The prefix store: the KV state of a system prompt (tools, memories) kept across episodes and
runs gives the same greedy actions as prefilling it, with fewer tokens prefilled."""

import json

import mlx_lm
import pytest
from cachecheck import assert_cache_holds
from click.testing import CliRunner
from mlx_lm.models.cache import KVCache

from duomem_mlx.cli import cli
from duomem_mlx.envs.calls import parse_call
from duomem_mlx.envs.example_tools import TOOLS
from duomem_mlx.runtime.decode import DecodeOptions
from duomem_mlx.runtime.models import make_tiny_model
from duomem_mlx.runtime.prefix_store import PrefixStore
from duomem_mlx.runtime.prompt import encode, render
from duomem_mlx.runtime.session import ReencodingSession, Session
from duomem_mlx.runtime.tools import Tools

A, B = TOOLS, TOOLS[::-1]  # two tool sets: their system prompts part right after the preamble
EPISODES = [  # (tools, memories, task): same docs and other memories, other docs, back to the first ones
    (A, ["book at nine"], "book a call on monday"),
    (A, ["cancel all of it"], "cancel tuesday"),
    (B, ["book at nine"], "move the review to friday"),
    (A, ["move keeps the hour"], "move lunch to thursday"),
    (B, ["book at nine"], "book lunch on wednesday"),
]


@pytest.fixture(scope="module", params=["qwen3", "gemma3_text"])
def loaded(request, tiny_model, tmp_path_factory):
    """The default student (plain KV caches, ChatML) and Gemma 3 (rotating caches restored from
    snapshots; its template folds the system prompt into the first user turn)."""
    if request.param == "qwen3":
        return mlx_lm.load(str(tiny_model))
    path = make_tiny_model(tmp_path_factory.mktemp("gemma") / "m", arch="gemma3_text", vocab_size=1024, seed=3)
    return mlx_lm.load(str(path))


def play(model, tokenizer, store=None, session_class=Session, episodes=EPISODES, steps=3):
    """Episodes one after another in one session; (actions, per-episode stats)."""
    session = session_class(
        model, tokenizer, 4096, DecodeOptions(mode="constrained", max_tokens=24), prefix_store=store
    )
    actions, stats = [], []
    for specs, memories, task in episodes:
        tools = Tools(tokenizer, list(specs), True)
        session.reset_stats()
        session.start(tools.prefix_messages(task, "It is monday.", memories), tools)
        for step in range(steps):
            actions.append(session.generate())
            session.append([tools.result_message(f"ok {step}", parse_call(actions[-1]) is not None)])
        stats.append(session.stats())
    return actions, stats, session


def test_same_actions_with_and_without_the_store_and_fewer_tokens_prefilled(loaded):
    model, tokenizer = loaded
    stored, with_store, session = play(model, tokenizer, PrefixStore(model, tokenizer))
    today, without, _ = play(model, tokenizer)
    reencoded, _, _ = play(model, tokenizer, session_class=ReencodingSession)
    assert stored == today == reencoded
    if not session.fragile:  # the check reads plain KV caches
        assert_cache_holds(model, session)
    restored = [s["restored_tokens"] for s in with_store]
    assert restored[:3] == [0, 0, 0] and restored[3] > 0  # A's docs, kept where episode 2 parted from 1
    if "<|im_start|>" in tokenizer.chat_template:  # each tool set's whole system prompt, before other memories
        system = [Tools(tokenizer, list(specs), True).system_message() for specs, _, _ in EPISODES]
        lengths = [len(encode(tokenizer, render(tokenizer, [message], False))) for message in system]
        assert restored[3] >= lengths[3] and restored[4] >= lengths[4]
    else:  # Gemma: only where episodes parted (3 from 2: the preamble before the docs)
        assert 0 < restored[4] < restored[3]
    prefilled = [(ours["prefill_tokens"], theirs["prefill_tokens"]) for ours, theirs in zip(with_store, without)]
    assert prefilled[:3] == [(theirs, theirs) for _, theirs in prefilled[:3]]
    assert all(ours < theirs / 2 for ours, theirs in prefilled[3:] if ours != theirs)  # most was the system prompt
    assert prefilled[3][0] < prefilled[3][1]


def test_the_memories_follow_the_tools_so_one_tool_sets_state_serves_any_memories(loaded):
    model, tokenizer = loaded
    tools = Tools(tokenizer, list(A), True)
    prompt = render(tokenizer, tools.prefix_messages("t", "o", ["book at nine"]), True, tools=tools.template_tools)
    assert prompt.index("book at nine") > max(prompt.index(t["name"]) for t in A)
    if "<|im_start|>" not in tokenizer.chat_template:
        return  # Gemma's template folds the system prompt into the user turn: kept where episodes part (above)
    store = PrefixStore(model, tokenizer)
    play(model, tokenizer, store, episodes=EPISODES[:1])
    _, stats, _ = play(model, tokenizer, store, episodes=EPISODES[1:2])  # a new session, other memories
    assert stats[0]["restored_tokens"] == len(encode(tokenizer, render(tokenizer, [tools.system_message()], False)))


def test_the_store_keeps_a_few_states(loaded):
    model, tokenizer = loaded
    store = PrefixStore(model, tokenizer, keep=2)
    play(model, tokenizer, store)
    assert len(store.states) == 2
    for (n, _), state in store.states.items():  # the tokens kept, not the buffer of a longer chat cut back
        assert all(c.keys.shape[2] == c.offset == n for c in state if type(c) is KVCache)


def test_states_on_disk_serve_a_later_run_and_a_bad_file_is_skipped(loaded, tmp_path, capsys):
    model, tokenizer = loaded
    later = EPISODES[3:4]  # the first tool set with other memories
    expected, _, _ = play(model, tokenizer, episodes=later)
    play(model, tokenizer, PrefixStore(model, tokenizer, tmp_path), episodes=EPISODES[:2])
    lengths = {int(f.name.split("-")[0]): f for f in tmp_path.glob("*/*.safetensors")}
    actions, stats, session = play(model, tokenizer, PrefixStore(model, tokenizer, tmp_path), episodes=later)
    assert actions == expected and stats[0]["restored_tokens"] in lengths
    if not session.fragile:
        assert_cache_holds(model, session)

    file = lengths[stats[0]["restored_tokens"]]
    capsys.readouterr()
    for torn in tmp_path.glob("*/*.safetensors"):  # the later episode's own system prompt is there now too
        torn.write_bytes(torn.read_bytes()[:1000])
    actions, stats, _ = play(model, tokenizer, PrefixStore(model, tokenizer, tmp_path), episodes=later)
    assert actions == expected and stats[0]["restored_tokens"] == 0
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings and all(
        w.startswith("warning: prefix state") and w.endswith("ignored (it is prefilled instead)") for w in warnings
    )

    play(model, tokenizer, PrefixStore(model, tokenizer, tmp_path), episodes=EPISODES[:2])  # rewrites it
    file.rename(file.with_name(f"{file.name.split('-')[0]}-{'0' * 64}.safetensors"))  # another prefix's name
    store = PrefixStore(model, tokenizer, tmp_path)
    assert store.load((int(file.name.split("-")[0]), "0" * 64)) is None
    assert "another model's or prefix's state" in capsys.readouterr().err


def test_eval_keeps_prefix_states_in_the_directory_given(tiny_model, tmp_path):
    calendar = "duomem_mlx.envs.example_tools:Calendar"
    runs = []
    for run in range(2):
        log = tmp_path / f"log{run}.jsonl"
        args = ["eval", "--env", calendar, "--episodes", "1", "--max-steps", "2", "--policy", f"model:{tiny_model}"]
        args += ["--prefix-cache", str(tmp_path / "states"), "--out", str(tmp_path / f"r{run}.json"), "--log", str(log)]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        runs.append(json.loads(log.read_text().splitlines()[0]))
    assert list((tmp_path / "states").glob("*/*.safetensors"))
    assert [s["action"] for s in runs[0]["steps"]] == [s["action"] for s in runs[1]["steps"]]
    assert runs[0]["stats"]["restored_tokens"] == 0 < runs[1]["stats"]["restored_tokens"]
