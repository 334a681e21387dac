"""Action decoding: free (stop at end of turn or newline) or constrained to the environment's
admissible commands by a token trie.

The fast paths decode less for the same tokens:
- constrained (jump-forward): a trie node with one child costs no forward pass; the forced
  run is fed together with the next branching point in one pass, and decoding stops as soon
  as one command remains, without a look-ahead pass over the last token; a pass computes the
  head's rows of the tokens the trie allows, not the whole vocabulary;
- free, greedy (prompt lookup): drafts taken from text at hand (the reply's admissible
  commands, earlier actions and memories in the context) are verified several tokens per
  pass; the output is exactly plain greedy decoding's.
The plain path is mlx-lm's `generate_step` (sampling in free mode, and the reference).

Either way the cache afterwards holds the prompt plus a prefix of the returned ids (the
caller reads how many from the cache's offset)."""

import functools
import os
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import ConcatenateKVCache, KVCache, QuantizedKVCache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from duomem_mlx.errors import DuomemError
from duomem_mlx.runtime.cost import Shape
from duomem_mlx.runtime.heads import last_rows
from duomem_mlx.runtime.prompt import encode, render

END = -1  # trie key marking a complete command


TRIMMABLE = (KVCache, QuantizedKVCache, ConcatenateKVCache)  # can always be cut back


@dataclass
class DecodeOptions:
    mode: str = "constrained"  # free | constrained
    temperature: float = 0.0
    max_tokens: int = 48
    single_line: bool = True  # free mode: an action ends at its first newline; chat replies don't
    fast: bool = True  # jump-forward (constrained), prompt-lookup drafts (free, greedy)
    draft_tokens: int = 8  # longest prompt-lookup draft per verification pass (see lookup_greedy)
    prefill_step: int = 0  # tokens per prefill pass; 0: the device's best (see prefill_chunk)

    def prefill_chunk(self) -> int:
        """On a CPU, 256-token chunks prefill ~1.5x faster than one 2,048-token pass (the
        attention scores stay in cache: benchmarks/prefill_chunk.py); GPUs keep generate_step's 2,048."""
        return self.prefill_step or (256 if mx.default_device().type == mx.cpu else 2048)


def cache_offset(cache) -> int | None:
    """Tokens a prompt cache has seen (from any layer that counts them)."""
    return next((c.offset for c in cache if hasattr(c, "offset")), None)


@dataclass
class DecodeStats:
    """Counts over the actions a session decoded; `fallbacks` are constrained steps that ran out
    of tokens inside the trie and took a default command. With the model's `shape`, `flops` adds up
    the FLOPs of every pass the session ran, prefill included (runtime/cost.py)."""

    actions: int = 0
    forward_passes: int = 0
    fallbacks: int = 0
    drafted: int = 0
    accepted: int = 0
    shape: Shape | None = None
    flops: int = 0

    def count(self, cache, tokens: int, head_rows: int = 0, head_columns: int | None = None):
        """A pass of `tokens` tokens into `cache` (called before it), the head on `head_rows` of them."""
        if self.shape is not None:
            self.flops += self.shape.flops(cache_offset(cache) or 0, tokens, head_rows, head_columns)


def eos_ids(tokenizer) -> set[int]:
    """Every token that ends a reply: mlx-lm's `eos_token_ids` (merged with generation_config.json)."""
    return set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id]) | {end_of_turn(tokenizer)}


@functools.lru_cache(maxsize=16)
def end_of_turn(tokenizer) -> int:
    """The token the chat template closes an assistant turn with (Gemma's `<end_of_turn>`,
    Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`): the first end-of-sequence id in a rendered reply."""
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    if getattr(tokenizer, "chat_template", None):
        probe = [{"role": "user", "content": "hi"}]
        head = render(tokenizer, probe, add_generation_prompt=True)
        full = render(tokenizer, probe + [{"role": "assistant", "content": "ok"}], add_generation_prompt=False)
        tail = full[len(os.path.commonprefix([head, full])) :]
        for token in encode(tokenizer, tail):
            if token in eos:
                return token
    return tokenizer.eos_token_id


def build_trie(tokenizer, commands: list[str]) -> dict:
    """Token trie over the commands, each followed by the template's end-of-turn token."""
    if not commands:
        raise DuomemError("constrained decoding got an empty admissible list; use --decode free for this environment")
    return cached_trie(tokenizer, tuple(commands))


@functools.lru_cache(maxsize=8)  # environments repeat their lists (ScienceWorld's run to thousands of commands)
def cached_trie(tokenizer, commands: tuple[str, ...]) -> dict:
    trie: dict = {}
    for command in commands:
        node = trie
        for token in command_tokens(tokenizer, command):
            node = node.setdefault(token, {})
        node[END] = command
    return trie


@functools.lru_cache(maxsize=1 << 16)
def command_tokens(tokenizer, command: str) -> tuple[int, ...]:
    return (*encode(tokenizer, command), end_of_turn(tokenizer))


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


def first_command(node: dict) -> str | None:
    while node and END not in node:
        node = next(iter(node.values()))
    return node.get(END) if node else None


def trie_mask(node: dict, vocab_size: int) -> mx.array:
    mask = mx.full((vocab_size,), -mx.inf)
    mask[mx.array([t for t in node if t != END])] = 0.0
    return mask


def trie_processor(trie: dict, prompt_len: int):
    """An mlx-lm logits processor that only lets through tokens continuing some command."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        node = walk(trie, tokens[prompt_len:].tolist())
        return logits + trie_mask(node, logits.shape[-1]) if any(t != END for t in node) else logits

    return process


def prefill(model, cache, tokens: list[int], chunk: int, stats: DecodeStats | None = None):
    """Feed `tokens` into the cache, `chunk` tokens a pass, computing no logits (the FLOPs go to `stats`)."""
    for i in range(0, len(tokens), chunk):
        if stats is not None:
            stats.count(cache, len(tokens[i : i + chunk]))
        model(mx.array(tokens[i : i + chunk])[None], cache=cache)
        mx.eval([c.state for c in cache])


def forward(
    model,
    cache,
    tokens: list[int],
    chunk: int,
    rows: int = 1,
    vocab: list[int] | None = None,
    stats: DecodeStats | None = None,
) -> mx.array:
    """Feed `tokens` into the cache (long prompts in chunks); the logits of the last `rows`,
    over the token ids `vocab` only when given (column i is vocab[i]'s logit). Its passes
    are counted into `stats` when given."""
    head = max(0, len(tokens) - rows - 1) // chunk * chunk
    prefill(model, cache, tokens[:head], chunk, stats)
    if stats is not None:
        stats.forward_passes += head // chunk + 1
        stats.count(cache, len(tokens) - head, rows, None if vocab is None else len(vocab))
    return last_rows(model, mx.array(tokens[head:])[None], cache, rows, vocab)[0]


def counting(model, stats: DecodeStats, prompt_len: int):
    """`model` as a function for mlx-lm's `generate_step` (which only calls it as `model(inputs, cache=cache)`),
    counting its forward passes and FLOPs into `stats`. A pass computes the head (on its last row) once it
    feeds the prompt's last token: the prefill passes before it leave their logits unevaluated."""
    fed = 0

    def call(inputs, cache, **kwargs):
        nonlocal fed
        fed += inputs.shape[1]
        stats.forward_passes += 1
        stats.count(cache, inputs.shape[1], head_rows=int(fed >= prompt_len))
        return model(inputs, cache=cache, **kwargs)

    return call


def decode_action(
    model,
    tokenizer,
    cache,
    prompt: list[int],
    admissible,
    options: DecodeOptions,
    on_text=None,
    history: list[int] = (),
    stats: DecodeStats | None = None,
    grammar=None,
):
    """Feed `prompt` into `cache` (which holds `history`) and decode one action; constrained
    with a `grammar` (a (TokenIndex, start state) of runtime/grammar.py), to its language
    instead of the admissible commands. Returns (action text, generated ids); the cache then
    holds prompt + a prefix of the ids."""
    stats = stats if stats is not None else DecodeStats()
    stats.actions += 1
    if options.mode == "constrained" and grammar is not None:
        text, ids, fallback = grammar_decode(model, tokenizer, cache, prompt, *grammar, options, stats)
        stats.fallbacks += fallback
        text = text.strip()
        if on_text:
            on_text(text)
        return text, ids
    if options.mode == "constrained":
        trie = build_trie(tokenizer, admissible)
        decode = jump_forward if options.fast else constrained_plain
        command, ids, fallback = decode(model, cache, prompt, trie, options, stats)
        stats.fallbacks += fallback
        return command or admissible[0], ids
    if options.fast and options.temperature == 0 and all(isinstance(c, TRIMMABLE) for c in cache):
        # drafts that miss are cut back out of the cache: only caches that can always be trimmed
        commands = [list(command_tokens(tokenizer, c)) for c in admissible or ()]
        tokens = lookup_greedy(model, cache, [*history, *prompt], len(prompt), commands, options, stats)
    else:
        tokens = (
            t
            for t, _ in generate_step(
                mx.array(prompt),
                counting(model, stats, len(prompt)),
                prompt_cache=cache,
                prefill_step_size=options.prefill_chunk(),
                max_tokens=options.max_tokens,
                sampler=make_sampler(options.temperature),
            )
        )
    return free_text(tokenizer, tokens, options, on_text)


def jump_forward(model, cache, prompt, trie, options, stats):
    """Constrained decoding that computes logits only at trie branching points, and only
    for the tokens the trie allows there.
    Returns (command, ids, fell back); the cache holds prompt + ids minus the unfed forced tail."""
    sampler = make_sampler(options.temperature)
    chunk = options.prefill_chunk()
    node, ids, pending = trie, [], list(prompt)
    while (command := single_completion(node)) is None:
        if len(ids) == options.max_tokens:
            return first_command(node), ids, True
        allowed = sorted(t for t in node if t != END)  # by id: ties go to the lowest, as a full-vocabulary argmax
        if len(allowed) == 1:
            token = allowed[0]
        else:  # logits of the allowed tokens alone: the head's other rows are never read
            logits = forward(model, cache, pending, chunk, vocab=allowed, stats=stats)[0]
            token = allowed[sampler((logits - mx.logsumexp(logits, keepdims=True))[None]).item()]
            pending = []
        ids.append(token)
        pending.append(token)
        node = node[token]
    return command, ids, False


def grammar_decode(model, tokenizer, cache, prompt, index, state, options, stats):
    """Decoding constrained to a grammar's language, token by token: a pass computes the
    logits of the tokens the state allows (the end of turn among them once the text so far
    is complete); a state that allows one token costs no pass, and an accepted text that can
    go no further ends without one. Greedy, this is the argmax over the allowed tokens at each
    step. Out of tokens mid-call, the grammar's shortest completion ends the text (a fallback).
    Returns (text, ids, fell back); the cache holds prompt + ids minus the unfed forced tail."""
    sampler = make_sampler(options.temperature)
    chunk, eot, texts = options.prefill_chunk(), end_of_turn(tokenizer), index.texts
    accepts = index.grammar.accepts
    ids, pending, text = [], list(prompt), ""
    while True:
        allowed = index(state)
        if accepts(state) and not allowed:
            return text, [*ids, eot], False
        if len(ids) == options.max_tokens:
            return text + index.grammar.shortest_completion(state), ids, True
        candidates = index.candidates(state, eot)
        if len(candidates) == 1:
            token = candidates[0]
        else:
            few = len(candidates) <= 4096  # the head's rows of a few tokens; else all of it, then the columns
            logits = forward(model, cache, pending, chunk, vocab=candidates if few else None, stats=stats)[0]
            logits = logits if few else logits[mx.array(candidates)]
            token = candidates[sampler((logits - mx.logsumexp(logits, keepdims=True))[None]).item()]
            pending = []
        ids.append(token)
        pending.append(token)
        if token == eot:
            return text, ids, False
        text, state = text + texts[token], allowed[token]


def constrained_plain(model, cache, prompt, trie, options, stats):
    """Constrained decoding through `generate_step` and a logits processor: the reference."""
    steps = generate_step(
        mx.array(prompt),
        counting(model, stats, len(prompt)),
        prompt_cache=cache,
        prefill_step_size=options.prefill_chunk(),
        max_tokens=options.max_tokens,
        sampler=make_sampler(options.temperature),
        logits_processors=[trie_processor(trie, len(prompt))],
    )
    ids = []
    for token, _ in steps:
        ids.append(token)
        if (command := single_completion(walk(trie, ids))) is not None:
            return command, ids, False
    return first_command(walk(trie, ids)), ids, True


def lookup_greedy(model, cache, context: list[int], n_prompt: int, commands: list[list[int]], options, stats):
    """Greedy tokens, verified against prompt-lookup drafts. The draft length adapts: doubled
    (up to `draft_tokens`) after a draft accepted whole, else one more than was accepted. A
    rejected draft token still costs its row of the pass (its attention over the whole
    context: on a CPU, 8 rows cost ~4.7 single-token passes at 2.6k tokens), so drafts grow
    only while they are right. `context` ends with the `n_prompt` tokens still to feed. A
    generator: when the consumer stops, the cache is trimmed to hold the prompt plus a prefix
    of what it took."""
    reply: list[int] = []
    pending, chunk = context[-n_prompt:], options.prefill_chunk()
    extra = 0  # accepted draft tokens in the cache beyond what the consumer took
    k = min(2, options.draft_tokens)
    try:
        while len(reply) < options.max_tokens:
            draft = propose(context + reply, reply, commands, min(k, options.max_tokens - len(reply) - 1))
            logits = forward(model, cache, pending + draft, chunk, len(draft) + 1, stats=stats)
            tokens = mx.argmax(logits, axis=-1).tolist()
            n = 0
            while n < len(draft) and draft[n] == tokens[n]:
                n += 1
            trim_prompt_cache(cache, len(draft) - n)
            k = min(2 * k, options.draft_tokens) if n == len(draft) else n + 1
            stats.drafted += len(draft)
            stats.accepted += n
            for i, token in enumerate(tokens[: n + 1]):
                extra = n - i - 1 if i < n else 0
                reply.append(token)
                yield token
            pending = [tokens[n]]
    finally:
        trim_prompt_cache(cache, max(extra, 0))


def propose(context: list[int], reply: list[int], commands: list[list[int]], k: int) -> list[int]:
    """Up to k draft tokens: the rest of a command the reply has begun, else what followed
    the last earlier occurrence of the context's final 3/2/1 tokens (prompt lookup)."""
    if k <= 0:
        return []
    if reply:
        for command in commands:
            if len(command) > len(reply) and command[: len(reply)] == reply:
                return command[len(reply) : len(reply) + k]
    for n in (3, 2, 1):
        key = context[-n:]
        for i in range(len(context) - n - 1, -1, -1):
            if context[i] == key[0] and context[i : i + n] == key:
                return context[i + n : i + n + k]
    return []


def free_text(tokenizer, tokens, options: DecodeOptions, on_text=None):
    """Consume a token stream up to the end of turn (or the first newline): (text, ids)."""
    eos = eos_ids(tokenizer)
    ids: list[int] = []
    detok = tokenizer.detokenizer
    detok.reset()
    try:
        for token in tokens:
            ids.append(token)
            if token in eos:
                break
            detok.add_token(token)
            if options.single_line and "\n" in detok.text.lstrip():
                break
            if on_text:
                on_text(detok.last_segment)
    finally:
        if hasattr(tokens, "close"):
            tokens.close()
    detok.finalize()
    if on_text:
        on_text(detok.last_segment)
    text = detok.text.strip()
    return (text.split("\n")[0].strip() if options.single_line else text), ids
