"""Tools the way a model's family expects them.

A chat template that renders `tools` and an assistant message's `tool_calls` (Qwen's,
Llama 3.1's) gets them as such: the tools through `apply_chat_template(tools=...)`, each call
as the template writes it (found by rendering a probe call: Qwen's `<tool_call>` JSON, Llama's
bare `{"name": ..., "parameters": ...}`), results as `tool` messages where it renders them. A
template without tools (SmolLM2's ChatML, Gemma 3's) gets the prompt format BFCL's prompting
mode uses: the function docs as JSON in the system prompt, calls in Python syntax, results as
user turns.

A reply is read back with the tokenizer's own mlx-lm tool parser when its markers are there,
else `envs.calls.parse_call`; the action handed to the environment is always `Call.text`."""

import functools
import json
import os
from dataclasses import dataclass

from duomem_mlx.envs.calls import Call, parse_call
from duomem_mlx.runtime.grammar import Spelling, TokenIndex, call_grammar
from duomem_mlx.runtime.prompt import (
    SYSTEM_PROMPT,
    episode_messages,
    memory_text,
    prefix_messages,
    render,
    system_message,
)

PROMPT_FORMAT = (
    "You can call these functions (JSON Schema):\n{docs}\n\n"
    "To call one, reply with the call alone in Python syntax, keyword arguments only, e.g. {example}; "
    "its result comes back in the next message.{text}"
)
TEXT_REPLIES = " When no call is needed, reply in plain text."
PROBE_TOOL = {
    "name": "probe_fn",
    "description": "A probe.",
    "parameters": {"type": "object", "properties": {"probe_arg": {"type": "string"}}, "required": ["probe_arg"]},
}
PROBE_ARGS = {"probe_arg": "probe_value"}


@dataclass(frozen=True)
class ToolFormat:
    in_template: bool  # tools and calls through the chat template
    wrap: tuple[str, str, str] = ("", "", "")  # a templated call: before the name, between it and the arguments, after
    tool_role: bool = False  # results as `tool` messages

    @property
    def spelling(self) -> Spelling:
        return Spelling("json" if self.in_template else "python")


def schema_of(tool: dict) -> dict:
    """A tool as chat templates take it (OpenAI's form)."""
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def call_message(call: Call) -> dict:
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": call.name, "arguments": call.kwargs}}],
    }


@functools.lru_cache(maxsize=8)
def tool_format(tokenizer) -> ToolFormat:
    """Probe the chat template: does it render tools and a call, and tool results?"""
    user = [{"role": "user", "content": "hi"}]
    call = call_message(Call(PROBE_TOOL["name"], (), PROBE_ARGS))
    try:
        with_tools = render(tokenizer, user, True, tools=[schema_of(PROBE_TOOL)])
        head = render(tokenizer, user, True)
        full = render(tokenizer, user + [call], False)
    except Exception:  # a template that refuses tool messages has no tools
        return ToolFormat(False)
    reply = full[len(os.path.commonprefix([head, full])) :]
    name, args = reply.find(PROBE_TOOL["name"]), reply.find(json.dumps(PROBE_ARGS))
    if with_tools == head or name < 0 or args < name:
        return ToolFormat(False)
    end = args + len(json.dumps(PROBE_ARGS))
    after = reply[end:]
    closing = next((after.index(s) for s in end_strings(tokenizer) if s in after), len(after))
    wrap = (reply[:name], reply[name + len(PROBE_TOOL["name"]) : args], after[:closing])
    return ToolFormat(True, wrap, tool_role=renders_tool_results(tokenizer, user + [call]))


def end_strings(tokenizer) -> list[str]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    return [tokenizer.decode([i]) for i in ids]


def renders_tool_results(tokenizer, chat: list[dict]) -> bool:
    try:
        return "probe_result" in render(tokenizer, chat + [{"role": "tool", "content": "probe_result"}], True)
    except Exception:
        return False


def tool_prompt(tools: list[dict], text_replies: bool) -> str:
    """The prompt format's system text: the docs, one a line, and how to call."""
    docs = "\n".join(json.dumps({k: v for k, v in t.items() if k != "response"}) for t in tools)
    example = example_call(tools[0]) if tools else "f(x=1)"
    return PROMPT_FORMAT.format(docs=docs, example=example, text=TEXT_REPLIES if text_replies else "")


def example_call(tool: dict) -> str:
    props = tool.get("parameters", {}).get("properties", {})
    required = tool.get("parameters", {}).get("required", list(props))
    samples = {"integer": 1, "number": 1.5, "float": 1.5, "boolean": True, "array": [], "dict": {}, "object": {}}
    args = {
        p: (props[p]["enum"][0] if "enum" in props[p] else samples.get(props[p].get("type"), "text"))
        for p in required
        if p in props
    }
    return Call(tool["name"], (), args).text


def read_call(tokenizer, fmt: ToolFormat, text: str, tools: list[dict]) -> Call | None:
    """The call a reply spells: mlx-lm's parser of the family where its markers are in the
    reply, else `parse_call`; None for a text reply."""
    start, end = getattr(tokenizer, "tool_call_start", None), getattr(tokenizer, "tool_call_end", None)
    parser = getattr(tokenizer, "tool_parser", None)
    if fmt.in_template and parser and start and start in text:
        inner = text.split(start, 1)[1].split(end, 1)[0] if end else text.split(start, 1)[1]
        try:
            parsed = parser(inner, [schema_of(t) for t in tools])
        except (ValueError, json.JSONDecodeError):
            return None
        parsed = (parsed[0] if parsed else None) if isinstance(parsed, list) else parsed
        if not isinstance(parsed, dict):  # a model's reply: anything but a call is no call
            return None
        return parse_call(json.dumps({"name": parsed.get("name"), "arguments": parsed.get("arguments", {})}))
    return parse_call(text)


@functools.lru_cache(maxsize=16)
def cached_grammar(tokenizer, fmt: ToolFormat, tools_json: str, text_replies: bool):
    """(TokenIndex, start state) for a tool set: the tokens each state allows are worked out once."""
    grammar, start = call_grammar(json.loads(tools_json), fmt.spelling, fmt.wrap, text_replies)
    return TokenIndex(grammar, tokenizer), start


@dataclass
class Tools:
    """The tools of an episode, in the family's format: what the session renders and decodes with."""

    tokenizer: object
    specs: list[dict]
    text_replies: bool = False

    def __post_init__(self):
        self.format = tool_format(self.tokenizer)
        self.specs_json = json.dumps(self.specs)  # the grammar cache's key, once (a new Tools when they change)

    @property
    def template_tools(self) -> list[dict] | None:
        return [schema_of(t) for t in self.specs] if self.format.in_template else None

    def system_text(self) -> str:
        """What the prompt format adds to the system prompt ("" where the template takes the tools)."""
        return "" if self.format.in_template else tool_prompt(self.specs, self.text_replies)

    def system_message(self) -> dict:
        """The system prompt, with the function docs where the template takes no tools."""
        docs = self.system_text()
        return system_message(base=f"{SYSTEM_PROMPT}\n\n{docs}" if docs else SYSTEM_PROMPT)

    def prefix_messages(self, task_description: str, observation: str, memories: list[str] = ()) -> list[dict]:
        """An episode's system prompt and first user message. The memories open the user message: what
        every episode of a tool set shares, the system prompt and the tools (which a template that takes
        them renders after the system prompt's text), stays one prefix (runtime/prefix_store.py)."""
        _, user = prefix_messages(task_description, observation)
        if memories:
            user = {"role": "user", "content": f"{memory_text(memories)}\n\n{user['content']}"}
        return [self.system_message(), user]

    def grammar(self):
        return cached_grammar(self.tokenizer, self.format, self.specs_json, self.text_replies)

    def reply_message(self, text: str) -> tuple[dict, str]:
        """(the assistant message the chat keeps, the action for the environment)."""
        call = read_call(self.tokenizer, self.format, text, self.specs)
        if call is None:
            return {"role": "assistant", "content": text}, text
        message = call_message(call) if self.format.in_template else {"role": "assistant", "content": call.text}
        return message, call.text

    def result_message(self, observation: str, after_call: bool) -> dict:
        role = "tool" if after_call and self.format.tool_role else "user"
        return {"role": role, "content": observation.strip()}


def episode_chat(tokenizer, episode, memories: list[str] = ()) -> tuple[list[dict], list[dict] | None]:
    """(messages, template tools) of a played episode for `prompt.tokenize_with_mask`: the chat
    and tools its agent saw at run time, in `tokenizer`'s family format; a text game's as before."""
    tools = Tools(tokenizer, list(episode.tools), episode.text_replies) if episode.tools else None
    return episode_messages(episode, memories, tools), tools.template_tools if tools else None
