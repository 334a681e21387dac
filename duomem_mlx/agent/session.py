"""A conversation held in an mlx-lm KV cache: each step feeds only the tokens the cache lacks.

The session keeps the chat as messages and their token segments (see prompt.py). Before
each generation it diffs the target token list against what the cache holds, trims the
cache back to the common prefix and feeds the rest. So a new observation costs only its
own tokens, and when the window is full and the oldest whole turns are dropped, the cache
falls back to the unchanged episode prefix and re-feeds the kept turns: the result is
exactly what re-encoding the truncated chat would give (a rotating cache would not be:
it shifts RoPE distances to the prefix)."""

import time

from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.utils import common_prefix_len

from .decode import DecodeOptions, DecodeStats, decode_action
from .prompt import encode, render, segment


class Session:
    def __init__(self, model, tokenizer, max_context: int = 4096, options: DecodeOptions | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_context = max_context
        self.options = options or DecodeOptions()
        self.cache = make_prompt_cache(model)
        self.fed: list[int] = []  # the token ids the cache holds, in order
        self.reset_stats()

    def reset_stats(self):
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.step_seconds: list[float] = []
        self.prompt_tokens: list[int] = []
        self.decode_stats = DecodeStats()

    def start(self, prefix: list[dict]):
        """Begin an episode / conversation; `prefix` stays in the window for its whole life."""
        self.messages: list[dict] = []
        self.segments: list[list[int]] = []
        self.n_prefix = len(prefix)
        self.append(prefix)

    def append(self, messages: list[dict]):
        for message in messages:
            self.messages.append(message)
            self.segments.append(segment(self.tokenizer, self.messages, len(self.messages) - 1, len(self.messages), False))

    def drop_oldest_turn(self):
        """Drop the oldest exchange after the prefix (its assistant action and following user turn)."""
        del self.messages[self.n_prefix : self.n_prefix + 2]
        self.segments = self.segments[: self.n_prefix] + [
            segment(self.tokenizer, self.messages, i, i + 1, False) for i in range(self.n_prefix, len(self.messages))
        ]

    def prompt_ids(self) -> list[int]:
        """The tokens of the chat plus the generation prompt, within the window."""
        while True:
            gen = segment(self.tokenizer, self.messages, len(self.messages), len(self.messages), True)
            ids = [t for seg in self.segments for t in seg] + gen
            fits = len(ids) + self.options.max_tokens <= self.max_context
            if fits or len(self.messages) < self.n_prefix + 2:
                return ids
            self.drop_oldest_turn()

    def generate(self, admissible=None, on_text=None) -> str:
        """Decode the next assistant reply (an action) and append it to the chat."""
        start = time.perf_counter()
        target = self.prompt_ids()
        keep = min(common_prefix_len(self.fed, target), len(target) - 1)  # feed >= 1 token for logits
        trim_prompt_cache(self.cache, len(self.fed) - keep)
        self.fed = target[:keep]
        self.prefill_tokens += len(target) - keep
        try:
            text, ids = decode_action(self.model, self.tokenizer, self.cache, target[keep:], admissible, self.options, on_text,
                                     history=self.fed, stats=self.decode_stats)
        except KeyboardInterrupt:  # a stopped chat reply: forget it, keep the cache consistent
            trim_prompt_cache(self.cache, self.cache[0].offset - keep)
            raise
        self.fed = (target + ids)[: self.cache[0].offset]
        self.decode_tokens += len(ids)
        self.prompt_tokens.append(len(target))
        self.step_seconds.append(time.perf_counter() - start)
        self.append([{"role": "assistant", "content": text}])
        return text

    def stats(self) -> dict:
        return {
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "prompt_tokens": self.prompt_tokens,
            "step_seconds": [round(s, 4) for s in self.step_seconds],
            "forward_passes": self.decode_stats.forward_passes,
            "constrained_fallbacks": self.decode_stats.fallbacks,
        }


class ReencodingSession(Session):
    """The naive loop a plain mlx-lm ReAct agent runs: re-encode the whole prompt each step.
    The baseline for benchmarks and the reference for the fast path's correctness."""

    def prompt_ids(self) -> list[int]:
        super().prompt_ids()  # applies the same window
        return encode(self.tokenizer, render(self.tokenizer, self.messages, add_generation_prompt=True))

    def generate(self, admissible=None, on_text=None) -> str:
        self.cache = make_prompt_cache(self.model)
        self.fed = []
        return super().generate(admissible, on_text)
