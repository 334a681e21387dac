"""Tool calls as actions: each family's tool format round-trips a call, constrained decoding
never writes a call its schema refuses (random-init tiny models of every family, the real
SmolLM2 on the calendar and BFCL), it is the argmax over the allowed tokens, and the session
with tools still equals re-encoding."""

import json
import math
import random

import mlx.core as mx
import mlx_lm
import pytest
from click.testing import CliRunner
from test_families import FAMILIES

from duomem_mlx.cli import cli
from duomem_mlx.deploy import bench
from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import Episode, TaskSpec, play_episode
from duomem_mlx.envs.bfcl import split_indices
from duomem_mlx.envs.calls import Call, parse_call
from duomem_mlx.envs.example_tools import TOOLS
from duomem_mlx.runtime.decode import DecodeOptions, decode_action, end_of_turn
from duomem_mlx.runtime.grammar import Spelling, TokenIndex, call_grammar
from duomem_mlx.runtime.models import make_tiny_model
from duomem_mlx.runtime.options import PolicyOptions
from duomem_mlx.runtime.policy import ModelPolicy
from duomem_mlx.runtime.prompt import encode, prefix_messages, render, tokenize_with_mask
from duomem_mlx.runtime.session import ReencodingSession, Session
from duomem_mlx.runtime.tools import Tools, call_message, episode_chat, read_call

TYPES = {
    "integer": int,
    "number": (int, float),
    "float": (int, float),
    "boolean": bool,
    "string": str,
    "array": (list, tuple),
    "dict": dict,
    "object": dict,
}
# every kind of value the grammar writes: enums, integers, numbers, booleans, free strings, arrays, any
MIXED = [
    *TOOLS,
    {
        "name": "send",
        "description": "Send a message.",
        "parameters": {
            "type": "dict",
            "properties": {
                "to": {"type": "string"},
                "price": {"type": "float"},
                "urgent": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "extra": {"type": "any"},
            },
            "required": ["to"],
        },
    },
]


def schema_errors(call: Call, tools: list[dict]) -> list[str]:
    """What in a call its tool's schema refuses: the name, unknown, missing or reordered arguments, types, enums."""
    tool = next((t for t in tools if t["name"] == call.name), None)
    if tool is None or call.args:
        return [f"no tool {call.name} / positional arguments"]
    props, required = tool["parameters"].get("properties", {}), tool["parameters"].get("required", [])
    errors = [f"unknown {k}" for k in call.kwargs if k not in props]
    errors += [f"missing {k}" for k in required if k not in call.kwargs]
    if list(call.kwargs) != [k for k in props if k in call.kwargs]:
        errors.append("arguments out of their declared order")
    for k, v in call.kwargs.items():
        spec = props.get(k, {})
        kind = TYPES.get(spec.get("type"))
        if kind and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            errors.append(f"{k}={v!r} is no {spec['type']}")
        if "enum" in spec and v not in spec["enum"]:
            errors.append(f"{k}={v!r} not in its enum")
    return errors


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("tool-families")
    return {
        arch: mlx_lm.load(str(make_tiny_model(root / arch, arch=arch, vocab_size=1024, seed=2))) for arch in FAMILIES
    }


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_family_round_trips_a_call(arch, families):
    """The tools reach the prompt (template or system text), a call written as the family
    writes it is in the grammar and reads back as the same call, its result renders back."""
    _, tokenizer = families[arch]
    tools = Tools(tokenizer, TOOLS)
    templated = arch in ("qwen3", "llama")  # the published templates with tools; Gemma 3's and ChatML have none
    assert tools.format.in_template == templated
    call = Call("add_event", (), {"day": "tue", "hour": 9, "title": "call"})
    system = {"role": "system", "content": "Be brief.\n\n" + tools.system_text()}
    chat = [system, {"role": "user", "content": "book a call"}]
    head = render(tokenizer, chat, True, tools=tools.template_tools)
    message = call_message(call) if templated else {"role": "assistant", "content": call.text}
    full = render(tokenizer, chat + [message], False, tools=tools.template_tools)
    assert '"add_event"' in head and full.startswith(head)
    reply = full[len(head) :].split(tokenizer.decode([end_of_turn(tokenizer)]))[0]
    if arch == "qwen3":
        assert reply.startswith("<tool_call>\n") and tokenizer.tool_parser is not None  # mlx-lm's json_tools
    index, start = tools.grammar()
    assert index.grammar.matches(start, reply)
    assert read_call(tokenizer, tools.format, reply, TOOLS) == call
    assert tools.reply_message(reply) == (message, call.text)
    result = tools.result_message('{"id": 7}', after_call=True)
    assert result["role"] == ("tool" if templated else "user")
    after = render(tokenizer, chat + [message, result], True, tools=tools.template_tools)
    assert after.count("add_event") == full.count("add_event") and '{"id": 7}' in after
    assert ("<tool_response>" in after) == (arch == "qwen3")
    assert ("ipython<|end_header_id|>" in after) == (arch == "llama")


@pytest.mark.parametrize("text_replies", [False, True])
@pytest.mark.parametrize("arch", FAMILIES)
def test_constrained_calls_always_fit_the_schema(arch, text_replies, tmp_path):
    """Random-init models of every family, several seeds, many steps: every action is a call
    its schema accepts, or (text replies allowed) a line `parse_call` reads as no call. Seed 0
    decodes greedily, the others sample (temperature 1) to reach more of the grammar."""
    seen = set()
    for seed in range(4):
        path = make_tiny_model(tmp_path / f"{arch}{seed}", arch=arch, vocab_size=1024, seed=seed)
        model, tokenizer = mlx_lm.load(str(path))
        tools = Tools(tokenizer, MIXED, text_replies)
        mx.random.seed(seed)
        options = DecodeOptions(mode="constrained", max_tokens=40, temperature=float(seed > 0))
        session = Session(model, tokenizer, 2048, options)
        session.start(prefix_messages("plan my week", "It is monday."), tools)
        for step in range(6):
            action = session.generate()
            call = parse_call(action)
            assert call is not None or text_replies, action
            assert call is None or not schema_errors(call, MIXED), (action, schema_errors(call, MIXED))
            seen.add(call.name if call else "text")
            session.append([tools.result_message(f"result {step}", call is not None)])
    assert text_replies or len(seen) >= 3  # not one degenerate call


@pytest.mark.parametrize("spelling", ["python", "json"])
def test_what_the_grammar_accepts_is_a_valid_call_or_no_call(spelling):
    """Random strings over the characters that matter to a parser: whatever the grammar
    accepts is a call its schema takes, or a text `parse_call` reads as none (`foó(x=1)` is a call)."""
    grammar, start = call_grammar(MIXED, Spelling(spelling), text_replies=True)
    rng, alphabet, accepted = random.Random(0), "sendo_1 (){}[]<>'\"=.,:#`\u0301é\t-", 0
    tricky = [
        "foo\u0301(x=1)",
        "foo (x=1)",
        "send (to='a')",
        "```send(to='a')```",
        " send(to='a')",
        '{"name": "f"}',
        "[finish()]",
        "(finish)()",
        "f\t(x=1)",
        "ｆoo(x=1)",
        "send(to='a', to='b')",
        "send(to='a',)",
    ]
    heads = ["", "send(", "finish", "{"]
    texts = tricky + [
        rng.choice(heads) + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(20000)
    ]
    for text in texts:
        if grammar.matches(start, text):
            accepted += 1
            call = parse_call(text)
            assert call is None or not schema_errors(call, MIXED), text
    assert accepted > 1000


@pytest.mark.parametrize("spelling", ["python", "json"])
def test_grammar_decoding_is_the_argmax_over_allowed_tokens(spelling, families):
    """The decoder (cached, passes skipped where one token is allowed) picks what a full
    forward pass over the whole sequence, masked to the allowed tokens, picks at each step."""
    model, tokenizer = families["qwen3"]
    wrap = ('<tool_call>\n{"name": "', '", "arguments": ', "}\n</tool_call>")
    grammar = call_grammar(MIXED, Spelling(spelling), wrap, True)
    index = TokenIndex(grammar[0], tokenizer)
    prompt = encode(tokenizer, render(tokenizer, prefix_messages("book a call", "Tools: add_event"), True))
    session = Session(model, tokenizer, 2048, DecodeOptions(mode="constrained", max_tokens=30))
    session.feed(prompt[:-1])
    text, ids = decode_action(
        model, tokenizer, session.cache, prompt[-1:], None, session.options, grammar=(index, grammar[1])
    )
    eot, at, expected = end_of_turn(tokenizer), grammar[1], []
    for _ in range(len(ids)):
        allowed = index(at)
        candidates = sorted([*allowed, eot] if index.grammar.accepts(at) else allowed)
        if index.grammar.accepts(at) and not allowed:
            expected.append(eot)
            break
        logits = model(mx.array(prompt + expected)[None])[0, -1]
        token = candidates[int(mx.argmax(logits[mx.array(candidates)]).item())]
        expected.append(token)
        if token == eot:
            break
        at = allowed[token]
    assert ids == expected and text == "".join(index.texts[t] for t in ids if t != eot).strip()


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gemma3_text"])
def test_session_with_tools_equals_reencoding(arch, families):
    """Calls, tool results and the KV cache kept across steps: the same actions as re-encoding
    the whole chat each step."""
    model, tokenizer = families[arch]

    def play(session_class):
        tools = Tools(tokenizer, MIXED, True)
        session = session_class(model, tokenizer, 1024, DecodeOptions(mode="constrained", max_tokens=24))
        session.start(prefix_messages("tidy my week", "It is monday."), tools)
        actions = []
        for step in range(5):
            actions.append(session.generate())
            session.append([tools.result_message(f"ok {step}", parse_call(actions[-1]) is not None)])
        return actions, session

    (fast, session), (slow, reencoding) = play(Session), play(ReencodingSession)
    assert fast == slow
    assert session.prefill_tokens < reencoding.prefill_tokens / 2  # each step feeds its new tokens only


def test_real_smollm2_calls_fit_the_schema_on_calendar_and_bfcl(real_models):
    """The real SmolLM2, untrained: a few steps of the calendar and of a BFCL entry, all calls
    schema-valid (the prompt format: Python syntax, the docs in the system prompt). BFCL's text
    replies are turned off for the check, so that every step is a call."""
    policy = ModelPolicy.from_options(real_models["smollm2-135m-instruct"], PolicyOptions(max_context=4096))
    for name, tasks, steps in [("duomem_mlx.envs.example_tools:Calendar", ["move"], 4), ("bfcl", ["base"], 3)]:
        env = make_env(name)
        env.text_replies = False
        episode = play_episode(env, env.task_specs(tasks, "test", 1, 0)[0], policy, steps)
        assert episode.error is None and len(episode.steps) == steps
        for step in episode.steps:
            call = parse_call(step.action)
            assert call is not None and not schema_errors(call, env.tools()), step.action
        env.close()
    assert "You can call these functions" in policy.session.messages[0]["content"]


def test_chat_and_bench_play_an_env_of_tools(tmp_path):
    """`chat --env` and `bench --env`'s episodes on the calendar, a Qwen3-family model: the tools through
    its template, every action a call."""
    model = make_tiny_model(tmp_path / "qwen3", arch="qwen3", vocab_size=1024)
    calendar = "duomem_mlx.envs.example_tools:Calendar"
    chat = CliRunner().invoke(cli, ["chat", "--model", str(model), "--env", calendar, "--max-steps", "3"])
    assert chat.exit_code == 0, chat.output
    actions = [line[2:].rsplit("   (", 1)[0] for line in chat.output.splitlines() if line.startswith("> ")]
    assert len(actions) == 3 and all(not schema_errors(parse_call(a), TOOLS) for a in actions), chat.output
    measured = bench.Measured(str(model), env=calendar)  # what `bench --env` times
    bench.bench_package(measured, calendar, 2, 2, 1, 2, 4096, 0, math.inf)
    row = measured.row(None)
    assert row["episodes"] == 2 and row["episode_seconds"] > 0
    assert row["episode_prefilled_tokens"] > 0 and row["episode_restored_tokens"] >= 0  # the prefix store's figure


def test_tools_added_mid_episode_reach_the_prompt_and_the_grammar(tiny_model):
    """BFCL's miss_func offers a withheld tool at a later turn: the policy's system docs (prompt
    format) and its grammar take it from the next step on."""
    policy = ModelPolicy.from_options(str(tiny_model), PolicyOptions(max_context=32768))
    env = make_env("bfcl")
    split = next(s for s in ("train", "dev", "test") if 0 in split_indices(s)["miss_func"])
    spec = TaskSpec("bfcl", "miss_func", 0, split)  # miss_func_0: `sort` comes back at turn 3
    task, state = env.reset(spec)
    policy.start(env, spec, task, state)
    policy.act(state)
    assert "sort" not in policy.session.messages[0]["content"]
    for action in env.expert_actions()[:8]:
        state = env.step(action)
    action = policy.act(state)
    assert '"name": "sort"' in policy.session.messages[0]["content"]
    index, start = policy.tools.grammar()
    assert index.grammar.matches(start, "sort(file_name='a.txt')")
    assert parse_call(action) is None or not schema_errors(parse_call(action), env.tools())


@pytest.mark.parametrize("arch", FAMILIES)
def test_training_renders_the_chat_and_tools_the_agent_saw(arch, families):
    """A played episode of tools, rendered for training (teach shards, distill), is the chat the
    session held at run time, tools and memories included, to the character."""
    model, tokenizer = families[arch]
    policy = ModelPolicy(model, tokenizer, options=PolicyOptions(max_context=4096))
    policy.retrieve = lambda *a, **k: [type("M", (), {"text": "list the day first", "id": "m"})()]
    env = make_env("duomem_mlx.envs.example_tools:Calendar")
    episode = play_episode(env, env.task_specs(["move"], "dev", 1, 0)[0], policy, 4)
    assert len(episode.steps) == 4 and episode.tools == TOOLS
    messages, tools = episode_chat(
        tokenizer, Episode.from_json(json.loads(json.dumps(episode.to_json()))), ["list the day first"]
    )
    session = policy.session
    assert messages == session.messages and tools == (session.tools.template_tools)
    assert render(tokenizer, messages, False, tools=tools) == session.render(session.messages, False)
    ids, mask = tokenize_with_mask(tokenizer, messages, tools=tools)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert all(parse_call(s.action).name in trained for s in episode.steps)  # the loss is on the calls
