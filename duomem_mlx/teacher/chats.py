"""`teach --from-chats FILE.jsonl`: a big model's logged conversations as a teacher cache.

One OpenAI-format conversation a line:

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", ...}, ...],
     "tools": [{"type": "function", "function": {"name": ..., "parameters": {...}}}, ...],
     "success": true,            (or "reward": 1.0: a success when > 0)
     "task": "book"}             (optional: the task type memories are filed under; default "chat")

An assistant message may carry the server's `logprobs` ({"content": [{"token": ..., "logprob": ...,
"top_logprobs": [...]}]}, token ids as vLLM's `token_id:N` or an "id"); read with the teacher's
tokenizer, they become the cache's top-k rows wherever the tokens it generated are those the
chat renders (openai_compat.align_turns), the rest marked unaligned. A message of several calls
has none (its rows cannot be split between the actions).

Each becomes an Episode as if the student's agent had played it: the first user turn is the
task, each assistant reply an action (a `tool_calls` entry a call, one action each; text
content a text action, or nothing beside calls), and what answers it (its `tool` result, found
by `tool_call_id`, and any user turns after) the next observation. The log's system prompt is
not kept: training renders the agent's own (runtime/tools.py), as the student will see at run
time. A reply that is text makes the episode take text replies (the prompt says so)."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from duomem_mlx.envs.base import Episode, Step
from duomem_mlx.envs.calls import Call, parse_call
from duomem_mlx.errors import DuomemError
from duomem_mlx.teacher.openai_compat import Turn, entry_id, token_id, top_row

ROLES = ("system", "user", "assistant", "tool")


class BadRecord(ValueError):
    """What is wrong with one record (the caller names its line)."""


@dataclass
class Chats:
    episodes: list[Episode]  # one a good record
    read: int  # records read
    bad: int  # records skipped with skip_bad
    turns: dict[str, list[Turn]]  # episode id -> the server's rows of each action (read with a vocabulary)

    @property
    def top_k(self) -> int:
        return max((len(row) for turns in self.turns.values() for t in turns for row in t.rows), default=0)


def read_chats(path: str | Path, skip_bad: bool = False, vocab_size: int | None = None) -> Chats:
    """Every record of the file as an Episode (and its logprobs, given the teacher's vocabulary);
    a bad record is a DuomemError naming its line, or, with skip_bad, skipped and counted."""
    chats = Chats([], 0, 0, {})
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DuomemError(f"cannot read --from-chats {path} ({getattr(e, 'strerror', None) or e})")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        chats.read += 1
        try:
            record = parse_json(line)
            episode = chat_episode(record, number)
            turns = server_turns(record["messages"], vocab_size) if vocab_size else []
        except BadRecord as e:
            if not skip_bad:
                raise DuomemError(f"{path} line {number}: {e}; fix the record or pass --skip-bad to skip bad records")
            chats.bad += 1
            continue
        chats.episodes.append(episode)
        if any(t.rows for t in turns):
            chats.turns[episode.id] = turns
    return chats


def parse_json(line: str):
    try:
        return json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        raise BadRecord(f"not JSON ({e})")


def chat_episode(record, number: int) -> Episode:
    if not isinstance(record, dict):
        raise BadRecord("expected a JSON object")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecord('no "messages" (a list of chat messages)')
    success, score = outcome(record)
    tools = tool_specs(record.get("tools"))
    task = record.get("task", "chat")
    if not isinstance(task, str) or not task or "/" in task:
        raise BadRecord('"task" must be a non-empty string without "/"')
    first, turns = read_turns(messages)
    steps = [Step(observation, action) for observation, (action, _) in zip([first, *(o for _, o in turns)], turns)]
    text_replies = bool(tools) and any(parse_call(s.action) is None for s in steps)
    return Episode(
        f"chats/{task}/{number}/0",
        "chats",
        task,
        number,
        first,
        success,
        score,
        steps,
        tools=tools,
        text_replies=text_replies,
    )


def outcome(record: dict) -> tuple[bool, float]:
    """(success, score) from "success" (a boolean) or "reward" (a number)."""
    success, reward = record.get("success"), record.get("reward")
    if success is not None and not isinstance(success, bool):
        raise BadRecord('"success" must be true or false')
    if reward is not None and (
        not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward)
    ):
        raise BadRecord('"reward" must be a finite number')
    if success is None and reward is None:
        raise BadRecord('neither "success" nor "reward": say how the conversation went')
    success = success if success is not None else reward > 0
    return success, float(reward) if reward is not None else float(success)


def tool_specs(tools) -> list[dict] | None:
    """OpenAI's `{"type": "function", "function": {...}}` tools as the bare docs environments offer."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRecord('"tools" must be a list of function tools')
    specs = [t.get("function", t) if isinstance(t, dict) and t.get("type") == "function" else t for t in tools]
    if not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in specs):
        raise BadRecord('each of "tools" must be a function tool with a "name"')
    return specs or None


def read_turns(messages: list) -> tuple[str, list[tuple[str, str]]]:
    """(the text before the first action, [(action, the text that answered it)])."""
    before: list[str] = []
    turns: list[tuple[str, list[str]]] = []
    results: dict[str, list[str]] = {}  # call id -> where its result goes
    for i, message in enumerate(messages, 1):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise BadRecord(f"message {i} has no role among {', '.join(ROLES)}")
        if role == "user":
            (turns[-1][1] if turns else before).append(content(message, i))
        elif role == "assistant":
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise BadRecord(f"message {i}: tool_calls must be a list")
            if not calls:
                turns.append((content(message, i), []))
            for call in calls:
                turns.append((tool_call(call, i).text, []))
                if isinstance(call, dict) and call.get("id") is not None:
                    results[str(call["id"])] = turns[-1][1]
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if str(call_id) not in results:
                raise BadRecord(f"message {i} is the result of call id {call_id!r}, which no earlier tool_calls made")
            results.pop(str(call_id)).append(content(message, i))
    if not before:
        raise BadRecord("no user message before the first assistant reply (the task)")
    if not turns:
        raise BadRecord("no assistant reply to learn from")
    return "\n\n".join(before), [(action, "\n\n".join(answer)) for action, answer in turns]


def content(message: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of text parts."""
    text = message.get("content")
    if text is None:
        return ""
    if isinstance(text, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in text):
        return "".join(p["text"] for p in text)
    if not isinstance(text, str):
        raise BadRecord(f"message {i}: content must be text or a list of text parts")
    return text


def tool_call(call, i: int) -> Call:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise BadRecord(f"message {i}: a tool call without a function name")
    arguments = function.get("arguments") or {}  # a call without arguments may log "" or null
    parsed = parse_call(json.dumps({"name": name, "arguments": arguments}))
    if parsed is None:
        raise BadRecord(f"message {i}: the call of {name} has arguments that are no JSON object of literals")
    return parsed


def server_turns(messages: list, vocab_size: int) -> list[Turn]:
    """One Turn an action, in order: its message's rows and sampled ids; none where it has no
    logprobs with token ids (OpenAI's own name tokens by text only) or made several calls."""
    turns = []
    for i, message in enumerate(messages, 1):
        if message["role"] != "assistant":
            continue
        calls = message.get("tool_calls") or []
        logprobs = message.get("logprobs")
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
        if entries is not None and (not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries)):
            raise BadRecord(f"message {i}: logprobs.content must be a list of objects")
        if len(calls) > 1 or not entries or not all(map(names_ids, entries)):
            turns += [Turn(None, "", None)] * max(1, len(calls))
            continue
        try:
            rows = [top_row(e.get("top_logprobs") or [e], vocab_size) for e in entries]
        except DuomemError as e:
            raise BadRecord(f"message {i}: logprobs: {e}")
        turns.append(Turn(None, "", "stop", rows, [entry_id(e) for e in entries]))
    return turns


def names_ids(entry: dict) -> bool:
    """Whether a logprobs entry and its top_logprobs name token ids."""

    def has_id(e) -> bool:
        return isinstance(e, dict) and (type(e.get("id")) is int or token_id(e.get("token")) is not None)

    tops = entry.get("top_logprobs") or []
    return has_id(entry) and isinstance(tops, list) and all(map(has_id, tops))
