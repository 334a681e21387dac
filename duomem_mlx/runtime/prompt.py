"""Prompt layout shared by student, teacher and training data.

messages = [system (+ memories), user ([task +] first observation)]   <- the episode's prefix
           + [assistant action, user observation] * turns

The tokens a model sees are always those of the whole chat rendered by its own chat template
(`render`, then `encode`), whatever the template does to earlier turns (Qwen3 drops the empty
think block of past replies, DeepSeek-R1 their reasoning). `Rendered` keeps that text and its
tokens up to date in time proportional to a change, not to the chat.
"""

import bisect
import re

from duomem_mlx.envs.calls import parse_call
from duomem_mlx.errors import DuomemError

SYSTEM_PROMPT = (
    "You are an agent in a text environment. Reply with exactly one action, the next command to type, and nothing else."
)


def memory_text(memories: list[str]) -> str:
    return "Procedural memories that may help:\n" + "\n".join(f"- {m}" for m in memories)


def system_message(memories: list[str] = (), base: str = SYSTEM_PROMPT) -> dict:
    return {"role": "system", "content": f"{base}\n\n{memory_text(memories)}" if memories else base}


def prefix_messages(task_description: str, first_observation: str, memories: list[str] = ()) -> list[dict]:
    """The task line is left out when the observation already states the task (TextWorld's
    first observation does), not to pay for it twice every episode."""
    task, observation = task_description.strip(), first_observation.strip()
    if " ".join(task.split()) not in " ".join(observation.split()):
        observation = f"Task: {task}\n\n{observation}"
    return [system_message(memories), {"role": "user", "content": observation}]


def turn_messages(action: str, observation: str, tools=None) -> list[dict]:
    """An action and what it led to; with `tools` (runtime/tools.py's Tools) as the family writes
    a call and its result."""
    if not tools:
        return [{"role": "assistant", "content": action}, {"role": "user", "content": observation.strip()}]
    return [tools.reply_message(action)[0], tools.result_message(observation, parse_call(action) is not None)]


def render(
    tokenizer,
    messages: list[dict],
    add_generation_prompt: bool,
    thinking: bool = False,
    tools: list[dict] | None = None,
) -> str:
    """The chat as the template writes it; `enable_thinking` reaches templates that know it
    (Qwen3: False writes an empty think block into the generation prompt), others ignore it;
    `tools` (OpenAI-form function schemas) those that render tools (runtime/tools.py)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DuomemError("the tokenizer has no chat template; use an instruct/chat model or add chat_template.jinja")
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False, enable_thinking=thinking, tools=tools
    )


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def common_prefix(a, b, start: int = 0) -> int:
    """Length of the common prefix of two strings or lists, known to be >= start (slice
    compares in C, no Python loop over the elements)."""
    lo, hi = start, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Rendered:
    """A rendered chat and its tokens, equal to `encode(tokenizer, text)`. A change re-tokenizes
    from the last added token (special tokens, think tags) at or before it: tokenizers split
    the text at added tokens before anything else, so the tokens before one never depend on
    the text after it. `marks` are (char, token index) of each added token; when the two
    counts disagree (an added token with lstrip/normalization) marks stop there and changes
    re-tokenize from further back, still exactly."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = {i: str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self.added_ids = set(added)
        contents = sorted(set(added.values()), key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, contents))) if contents else None
        self.text, self.ids, self.marks = "", [], []
        self.tokenized = 0  # chars tokenized by the last change (host work)

    def replace(self, at: int, tail: str):
        """text := text[:at] + tail."""
        k = bisect.bisect_right(self.marks, (at, float("inf")))
        char, tok = self.marks[k - 1] if k else (0, 0)
        self.text = self.text[:at] + tail
        new = encode(self.tokenizer, self.text[char:])
        self.ids = self.ids[:tok] + new
        self.marks = self.marks[: k - 1] if k else []
        self.tokenized = len(self.text) - char
        if self.pattern is None:
            return
        chars = [m.start() for m in self.pattern.finditer(self.text, char)]
        toks = [tok + j for j, t in enumerate(new) if t in self.added_ids]
        self.marks += list(zip(chars, toks)) if len(chars) == len(toks) else []

    def token_at(self, char: int) -> int | None:
        """The token index where an added token starts at `char`, if one does."""
        k = bisect.bisect_left(self.marks, (char, -1))
        return self.marks[k][1] if k < len(self.marks) and self.marks[k][0] == char else None


def tokenize_with_mask(
    tokenizer, messages: list[dict], thinking: bool = False, tools: list[dict] | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of an episode's chat; the mask is 1 on each assistant action and
    the end-of-turn token that closes it, i.e. exactly what the agent generates.

    Layout: the whole chat as the template renders it, i.e. each action follows the history
    the agent saw when it generated it (the template's rendering of the earlier turns). For
    templates that render a turn the same way later (ChatML, Llama 3, Gemma) every action's
    context is exact. A template that rewrites the turn being generated once a newer user
    message follows (Qwen3 drops the empty think block it writes into the generation prompt,
    DeepSeek-R1 the reasoning) cannot be exact for every action in one sequence: here each
    action but the last lacks that block right before it (Qwen3, thinking off: 4 tokens),
    and the last action's context is exact. It measured closer to the agent's contexts than
    keeping each reply in its generated form (benchmarks/training_layout.py). `tools`: those
    the template renders (runtime/tools.py's `episode_chat` gives them with the messages)."""
    ids = encode(tokenizer, render(tokenizer, messages, False, thinking, tools))
    mask = [0] * len(ids)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = common_prefix(ids, encode(tokenizer, render(tokenizer, messages[:i], True, thinking, tools)))
        end = next((j + 1 for j in range(start, len(ids)) if ids[j] in eos), len(ids))
        mask[start:end] = [1] * (end - start)
    return ids, mask


def episode_messages(episode, memories: list[str] = (), tools=None) -> list[dict]:
    """The chat an agent saw while playing `episode` (an envs.base.Episode), up to its last action.
    With `tools` (runtime/tools.py's Tools of the episode's tool set) the system prompt, each action
    and each result are the messages ModelPolicy wrote at run time."""
    steps = episode.steps
    if not steps:
        return []
    messages = (tools.prefix_messages if tools else prefix_messages)(
        episode.task_description, steps[0].observation, memories
    )
    for step, following in zip(steps, steps[1:]):
        messages += turn_messages(step.action, following.observation, tools)
    messages.append(turn_messages(steps[-1].action, "", tools)[0])
    return messages
