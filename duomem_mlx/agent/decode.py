"""Action decoding on top of mlx-lm's `generate_step`: free (stop at end of turn or newline)
or constrained to the environment's admissible commands by a token trie."""

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from ..errors import DuomemError

END = -1  # trie key marking a complete command


@dataclass
class DecodeOptions:
    mode: str = "constrained"  # free | constrained
    temperature: float = 0.0
    max_tokens: int = 48
    single_line: bool = True  # free mode: an action ends at its first newline; chat replies don't


def build_trie(tokenizer, commands: list[str]) -> dict:
    """Token trie over the commands, each followed by the end-of-turn token."""
    if not commands:
        raise DuomemError("constrained decoding got an empty admissible list; use --decode free for this environment")
    eos = tokenizer.eos_token_id
    trie: dict = {}
    for command in commands:
        node = trie
        for token in [*tokenizer.encode(command, add_special_tokens=False), eos]:
            node = node.setdefault(token, {})
        node[END] = command
    return trie


def walk(trie: dict, tokens: list[int]) -> dict:
    node = trie
    for token in tokens:
        node = node.get(token, {})
    return node


def single_completion(node: dict) -> str | None:
    """The command a trie node leads to when only one remains."""
    while END not in node:
        if len(node) != 1:
            return None
        node = next(iter(node.values()))
    return node[END] if len(node) == 1 else None


def trie_processor(trie: dict, prompt_len: int, vocab_size: int):
    """An mlx-lm logits processor that only lets through tokens continuing some command."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        node = walk(trie, tokens[prompt_len:].tolist())
        allowed = [t for t in node if t != END]
        if not allowed:
            return logits
        mask = mx.full((vocab_size,), -mx.inf)
        mask[mx.array(allowed)] = 0.0
        return logits + mask

    return process


def decode_action(model, tokenizer, cache, prompt: list[int], admissible, options: DecodeOptions, on_text=None):
    """Feed `prompt` into `cache` and decode one action. Returns (action text, generated ids).

    The generated ids include a closing end-of-turn token: the cache afterwards holds the
    prompt plus every one of them (generate_step feeds a token before yielding it)."""
    constrained = options.mode == "constrained"
    trie = build_trie(tokenizer, admissible) if constrained else None
    processors = [trie_processor(trie, len(prompt), logits_width(model, tokenizer))] if constrained else None
    eos = set(tokenizer.eos_token_ids)
    ids: list[int] = []
    detok = tokenizer.detokenizer
    detok.reset()
    steps = generate_step(
        mx.array(prompt), model, prompt_cache=cache, max_tokens=options.max_tokens,
        sampler=make_sampler(options.temperature), logits_processors=processors,
    )
    for token, _ in steps:
        ids.append(token)
        if token in eos:
            break
        if constrained:
            command = single_completion(walk(trie, ids))
            if command is not None:
                return command, ids
            continue
        detok.add_token(token)
        if options.single_line and "\n" in detok.text.lstrip():
            break
        if on_text:
            on_text(detok.last_segment)
    if constrained:  # ran out of tokens inside the trie: take the first command on that path
        return first_command(walk(trie, ids)) or admissible[0], ids
    detok.finalize()
    if on_text:
        on_text(detok.last_segment)
    text = detok.text.strip()
    return (text.split("\n")[0].strip() if options.single_line else text), ids


def first_command(node: dict) -> str | None:
    while node and END not in node:
        node = next(iter(node.values()))
    return node.get(END) if node else None


def logits_width(model, tokenizer) -> int:
    args = getattr(model, "args", None)
    return getattr(args, "vocab_size", None) or len(tokenizer.get_vocab())
