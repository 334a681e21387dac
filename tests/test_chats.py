"""Traces from outside: `teach --from-chats FILE.jsonl` turns OpenAI-format conversations into a
teacher cache, tokenized for the student, that goes through memory -> distill -> eval."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_tool_envs import CALENDAR, one_line_error, run

from duomem_mlx.cli import cli
from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import play_episode
from duomem_mlx.envs.calls import parse_call
from duomem_mlx.envs.example_tools import TOOLS
from duomem_mlx.envs.policies import OraclePolicy
from duomem_mlx.formats.teacher_cache import read_cache_records, read_safetensors
from duomem_mlx.teacher.base import load_tokenizer
from duomem_mlx.teacher.chats import chat_episode


def chat_record(episode, success: bool = True) -> dict:
    """A played calendar episode as an OpenAI chat log: the task in the first user turn, each
    action a tool call answered by its `tool` result."""
    first = f"Task: {episode.task_description}\n\n{episode.steps[0].observation}"
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": first}]
    for i, (step, following) in enumerate(zip(episode.steps, [*episode.steps[1:], None])):
        call = parse_call(step.action)
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_{i}",
                        "type": "function",
                        "function": {"name": call.name, "arguments": json.dumps(call.kwargs)},
                    }
                ],
            }
        )
        if following is not None:
            messages.append({"role": "tool", "tool_call_id": f"call_{i}", "content": following.observation})
    return {
        "messages": messages,
        "tools": [{"type": "function", "function": t} for t in TOOLS],
        "success": success,
        "task": episode.task,
    }


@pytest.fixture(scope="module")
def played():
    env = make_env(CALENDAR)
    return [play_episode(env, s, OraclePolicy(), env.default_max_steps) for s in env.task_specs(None, "train", 4, 0)]


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_chats_through_teach_memory_distill_eval(tiny_model, tmp_path, played):
    """Four logged conversations, three successful: three episodes whose training tokens are
    those of the same episodes played in the environment (tools and calls as the agent sees them)."""
    chats = write_jsonl(tmp_path / "chats.jsonl", [chat_record(e, success=i != 1) for i, e in enumerate(played)])
    cache, played_cache, bank, adapters, out = (tmp_path / n for n in ("cache", "played", "bank", "adapters", "r.json"))
    run("teach", "--from-chats", chats, "--teacher-tokenizer", tiny_model, "--out", cache)
    assert "ok: 3 shards" in run("cache", "verify", cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 3 and manifest["counts"]["played"] == 4 and manifest["backend"] == "chats"
    kept = read_cache_records(cache)
    assert [e["task"] for e in kept] == [played[i].task for i in (0, 2, 3)]
    assert all(e["tools"] == TOOLS and e["steps"][-1]["action"] == "finish()" for e in kept)

    run(
        "teach",
        "--teacher",
        "oracle",
        "--env",
        CALENDAR,
        "--episodes",
        4,
        "--teacher-tokenizer",
        tiny_model,
        "--out",
        played_cache,
    )
    for ours, theirs in zip(kept, [read_cache_records(played_cache)[i] for i in (0, 2, 3)]):
        a, b = read_safetensors(cache / ours["shard"]), read_safetensors(played_cache / theirs["shard"])
        assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["loss_mask"], b["loss_mask"])

    memories = [json.loads(line) for line in (cache / "memories.jsonl").read_text().splitlines()]
    assert memories and all("list_events" in m["text"] for m in memories)
    run("memory", "build", "--cache", cache, "--embedder", tiny_model, "--out", bank)
    run(
        "distill",
        "--student",
        tiny_model,
        "--cache",
        cache,
        "--out",
        adapters,
        "--kd",
        "off",
        "--iters",
        2,
        "--batch-size",
        2,
        "--val-fraction",
        0,
        "--memory-bank",
        bank,
    )
    run(
        "eval",
        "--env",
        CALENDAR,
        "--split",
        "test",
        "--episodes",
        3,
        "--max-steps",
        2,
        "--policy",
        f"model:{tiny_model}",
        "--adapter-path",
        adapters,
        "--out",
        out,
    )
    assert set(json.loads(out.read_text())["per_task"]) == {"book", "cancel", "move"}


def test_parallel_calls_and_text_replies_become_one_action_each():
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Clear monday and tuesday."}]},
            {
                "role": "assistant",
                "content": "Looking.",
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "list_events", "arguments": '{"day": "mon"}'}},
                    {"id": "b", "type": "function", "function": {"name": "list_events", "arguments": {"day": "tue"}}},
                ],
            },
            {"role": "tool", "tool_call_id": "b", "content": "{}"},
            {"role": "tool", "tool_call_id": "a", "content": '{"9": "#1 call"}'},
            {"role": "assistant", "content": "Shall I cancel #1?"},
            {"role": "user", "content": "Yes."},
            {
                "role": "assistant",
                "tool_calls": [{"id": "c", "function": {"name": "cancel_event", "arguments": '{"event_id": 1}'}}],
            },
        ],
        "tools": TOOLS,
        "reward": 0.5,
    }
    episode = chat_episode(record, 7)
    assert [(s.observation, s.action) for s in episode.steps] == [
        ("Clear monday and tuesday.", "list_events(day='mon')"),
        ('{"9": "#1 call"}', "list_events(day='tue')"),
        ("{}", "Shall I cancel #1?"),
        ("Yes.", "cancel_event(event_id=1)"),
    ]
    assert episode.success and episode.score == 0.5 and episode.text_replies and episode.id == "chats/chat/7/0"


def test_bad_records_end_in_one_line_naming_the_line(tiny_model, tmp_path, played):
    good = chat_record(played[0])
    unknown_call = json.loads(json.dumps(good))
    unknown_call["messages"][3]["tool_call_id"] = "call_99"
    cases = {
        "a record without messages": ({"tools": [], "success": True}, 'line 2: no "messages"'),
        "a result for an unknown call": (unknown_call, "line 2: message 4 is the result of call id 'call_99'"),
        "bad JSON": ('{"messages": [', "line 2: not JSON"),
        "tools not a list": ({**good, "tools": {"name": "f"}}, 'line 2: "tools" must be a list'),
        "no outcome": ({k: v for k, v in good.items() if k != "success"}, 'line 2: neither "success" nor "reward"'),
    }
    for i, (name, (bad, message)) in enumerate(cases.items()):
        chats, out = write_jsonl(tmp_path / f"{i}.jsonl", [good, bad, good]), tmp_path / f"cache{i}"
        error = one_line_error("teach", "--from-chats", chats, "--teacher-tokenizer", tiny_model, "--out", out)
        assert message in error and "--skip-bad" in error, name
        assert not out.exists() or not any(out.iterdir()), name  # nothing half-written
        result = CliRunner().invoke(
            cli,
            ["teach", "--from-chats", chats, "--teacher-tokenizer", str(tiny_model), "--skip-bad", "--out", str(out)],
        )
        assert result.exit_code == 0 and "skipped 1 bad record(s) of 3" in result.output, name
        assert json.loads((out / "manifest.json").read_text())["counts"]["kept"] == 2
    chats = write_jsonl(tmp_path / "ok.jsonl", [good])
    assert "drop --env" in one_line_error("teach", "--from-chats", chats, "--env", CALENDAR, "--out", tmp_path / "x")
    assert "missing --teacher" in one_line_error("teach", "--env", CALENDAR, "--out", tmp_path / "x")


def test_logged_logprobs_become_the_caches_top_k(tiny_model, tmp_path, played):
    """A log with each reply's token ids and top_logprobs (vLLM's `token_id:N`): the cache holds
    them as top-k rows, aligned to the student's masked tokens, and KD distills from them. An
    entry of a record naming no ids (OpenAI's text tokens) gives no rows, never wrong ones."""
    tokenizer = load_tokenizer(str(tiny_model))
    records = [chat_record(e) for e in played[:2]]
    for message in (m for m in records[0]["messages"] if m["role"] == "assistant"):
        function = message["tool_calls"][0]["function"]
        text = parse_call(json.dumps({"name": function["name"], "arguments": function["arguments"]})).text
        ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        message["logprobs"] = {
            "content": [
                {
                    "token": f"token_id:{t}",
                    "logprob": -0.25,
                    "top_logprobs": [
                        {"token": f"token_id:{t}", "logprob": -0.25},
                        {"token": f"token_id:{t + 1}", "logprob": -1.5},
                    ],
                }
                for t in ids
            ]
        }
    records[1]["messages"][2]["logprobs"] = {"content": [{"token": "list", "logprob": -0.1, "top_logprobs": []}]}
    cache, adapters = tmp_path / "cache", tmp_path / "adapters"
    run(
        "teach",
        "--from-chats",
        write_jsonl(tmp_path / "c.jsonl", records),
        "--teacher-tokenizer",
        tiny_model,
        "--out",
        cache,
    )
    assert "ok: 2 shards" in run("cache", "verify", cache)
    first, second = read_cache_records(cache)
    assert json.loads((cache / "manifest.json").read_text())["top_k"] == 2
    assert first["unaligned_rows"] == 0 and second["unaligned_rows"] == second["masked"]
    shard = read_safetensors(cache / first["shard"])
    masked = shard["input_ids"][shard["loss_mask"] == 1]
    assert np.array_equal(shard["topk_ids"][:, 0], masked) and np.array_equal(shard["topk_ids"][:, 1], masked + 1)
    assert np.allclose(shard["topk_logprobs"].astype(np.float32), [-0.25, -1.5])
    run(
        "distill",
        "--student",
        tiny_model,
        "--cache",
        cache,
        "--out",
        adapters,
        "--kd",
        "on",
        "--iters",
        1,
        "--batch-size",
        1,
        "--val-fraction",
        0,
    )
