"""A conversation held in an mlx-lm KV cache: each step feeds only the tokens the cache lacks.

Before each generation the session renders the chat the model is meant to see with its own
chat template (`prompt.Rendered`: only the last few messages are rendered again, and only the
text from the first change on is tokenized again), diffs those tokens against the ones the
cache holds, cuts the cache back to the first difference and feeds the rest. So a new
observation costs its own tokens, plus whatever a template rewrites in the last turn (Qwen3
drops the empty think block of the previous reply: `rewound_tokens` in the stats).

Caches that cannot be cut back (`ArraysCache` of hybrid / state-space models, and
`RotatingKVCache` of sliding-window layers once it has wrapped) are restored from a snapshot
taken after the episode prefix and before the last generation prompt, then fed from there;
never fed on stale state. When the window is full, the oldest whole turns go down to a
low-water mark (`low_water` x max_context), so the re-feed of the kept turns is paid once
per many steps. An episode that starts with what the last one started with (the system prompt
and its memories, in an eval of a task type) marks where the two part, so the next episode
is restored from there instead of fed from nothing. With a prefix store (runtime/prefix_store.py) the
state at the end of the system prompt (tools, memories), and where an episode parts from the last
one inside it, is kept too: an episode whose head an earlier one had, other tool sets between
them, is restored from there. The result is exactly what re-encoding the
same truncated chat would give (a rotating cache over the whole chat would not be: it shifts
RoPE distances to the prefix).
"""

import copy
import time

from jinja2 import TemplateError
from mlx_lm.models.cache import CacheList, can_trim_prompt_cache, make_prompt_cache

from duomem_mlx.runtime.cost import model_shape
from duomem_mlx.runtime.decode import TRIMMABLE, DecodeOptions, DecodeStats, cache_offset, decode_action, prefill
from duomem_mlx.runtime.prompt import Rendered, common_prefix, encode, render


def trim_to(layer, keep: int):
    """Cut a trimmable layer back to `keep` tokens by what it holds itself: a pass stopped
    part-way (Ctrl-C) leaves the layers before the stop one chunk ahead of those after it."""
    for c in layer.caches if isinstance(layer, CacheList) else [layer]:
        c.trim(c.offset - keep)


class Session:
    def __init__(
        self,
        model,
        tokenizer,
        max_context: int = 4096,
        options: DecodeOptions | None = None,
        thinking: bool = False,
        low_water: float = 0.75,
        prefix_store=None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.prefix_store = prefix_store  # runtime/prefix_store.py's PrefixStore: states episodes share
        self.max_context, self.thinking, self.low_water = max_context, thinking, low_water
        self.options = options or DecodeOptions()
        self.cache = make_prompt_cache(model)
        self.fragile = [i for i, c in enumerate(self.cache) if not isinstance(c, TRIMMABLE)]
        self.fed: list[int] = []  # the token ids the cache holds, in order
        self.snapshots: dict[int, list] = {}  # position -> copies of the fragile layers there
        self.shared_len: int | None = None  # tokens this episode shares with the last one's start
        self.first_step = False
        self.shape = model_shape(model)  # None: a model whose FLOPs are not counted (runtime/cost.py)
        self.reset_stats()

    def reset_stats(self):
        self.prefill_tokens = 0
        self.restored_tokens = 0  # tokens whose state came from the prefix store instead of a prefill
        self.decode_tokens = 0
        self.step_seconds: list[float] = []
        self.prompt_tokens: list[int] = []
        self.rewound_tokens: list[int] = []  # tokens the cache held but had to give back (re-fed)
        self.render_seconds: list[float] = []  # host time building the prompt's tokens
        self.decode_stats = DecodeStats(shape=self.shape)

    def start(self, prefix: list[dict], tools=None):
        """Begin an episode / conversation; `prefix` stays in the window for its whole life.
        `tools` (runtime/tools.py's Tools): rendered as the family expects, replies decoded as calls."""
        self.tools = tools
        self.messages: list[dict] = list(prefix)
        self.n_prefix = len(prefix)
        self.prompt = Rendered(self.tokenizer)
        self.rendered = 0  # messages in self.prompt (rendered with the generation prompt)
        self.head_text = self.window = None  # window: (first message, text) of the last windowed render
        self.prefix_len = self.history_len = None  # token positions worth a snapshot
        self.first_step = self.head_changed = True

    def append(self, messages: list[dict]):
        self.messages += messages

    def set_tools(self, tools):
        """The tools offered changed (BFCL's miss_func adds some): the chat is rendered anew."""
        self.tools = tools
        self.head_text = self.window = None
        self.rendered = 0
        self.head_changed = True

    def render(self, messages, add_generation_prompt: bool) -> str:
        tools = self.tools.template_tools if self.tools else None
        return render(self.tokenizer, messages, add_generation_prompt, self.thinking, tools)

    def render_prompt(self):
        """Bring self.prompt to the chat plus generation prompt. It renders a window: a fixed
        head (the prefix and the first turn) and the messages from `a` on, where `a` stays put
        for up to 8 messages so the old window is the one rendered last step. When the old
        window's text after the head is the tail of the text we hold, only the new window's
        text from its first difference replaces that tail; otherwise the whole chat is rendered.
        Exact for templates that render a message from itself, its role, its place relative to
        the last user message and the chat's first / last message (all published ones we know)."""
        n, old, p = len(self.messages), self.rendered, self.n_prefix
        head_n = min(n, p + 2)
        head = self.messages[:head_n]
        if self.window and old - self.window[0] <= 8 and old <= n:
            a, w_old = self.window
        else:
            a = old - 2 - (old - 2 - p) % 2  # keeps roles alternating as in the chat
            w_old = self.render(head + self.messages[a:old], True) if 0 < old <= n and a >= head_n else None
        if w_old is not None:
            w_new = self.render(head + self.messages[a:], True)
            if self.head_text is None:
                self.head_text = self.render(head, False)
            h = len(self.head_text)
            text = self.prompt.text
            if w_old.startswith(self.head_text) and w_new.startswith(self.head_text) and text.endswith(w_old[h:]):
                c = common_prefix(w_old, w_new, h)
                self.prompt.replace(len(text) - (len(w_old) - c), w_new[c:])
                self.rendered, self.window = n, (a, w_new)
                self.history_len = (
                    self.mark_before_generation(head + self.messages[a:], w_new) if self.fragile else None
                )
                return
        self.prompt.replace(0, self.render(self.messages, True))
        self.rendered, self.window = n, None
        if self.fragile:
            self.history_len = self.mark_before_generation(self.messages, self.prompt.text)
            if self.prefix_len is None:
                prefix = self.render(self.messages[:p], False)
                self.prefix_len = self.prompt.token_at(len(prefix)) if self.prompt.text.startswith(prefix) else None

    def mark_before_generation(self, messages, with_generation: str) -> int | None:
        """Token position where the generation prompt starts (the next reply may rewrite what follows)."""
        without = self.render(messages, False)
        if not with_generation.startswith(without):
            return None
        return self.prompt.token_at(len(self.prompt.text) - (len(with_generation) - len(without)))

    def drop_oldest_turn(self):
        """Drop the oldest exchange after the prefix (its assistant action and following user turn)."""
        del self.messages[self.n_prefix : self.n_prefix + 2]
        self.head_text = self.window = None
        self.rendered = 0

    def prompt_ids(self) -> list[int]:
        """The tokens of the chat plus the generation prompt, within the window: when it is
        full, whole turns go down to the low-water mark."""
        start = time.perf_counter()
        self.render_prompt()
        limit = self.max_context
        while len(self.prompt.ids) + self.options.max_tokens > limit and len(self.messages) >= self.n_prefix + 2:
            limit = int(self.max_context * self.low_water)
            self.drop_oldest_turn()
            self.render_prompt()
        self.render_seconds.append(time.perf_counter() - start)
        return self.prompt.ids

    def rewind(self, keep: int) -> int:
        """Cut the cache back to its first `keep` tokens, or to the nearest snapshot below
        (a fresh cache at worst) when a layer cannot be cut; returns where it now stands."""
        held = len(self.fed)
        if keep >= held:
            return held
        if can_trim_prompt_cache(self.cache):
            for layer in self.cache:
                trim_to(layer, keep)
            at = keep
        else:
            at = max((q for q in self.snapshots if q <= keep), default=0)
            if at:
                saved = self.snapshots[at]
                for i, layer in enumerate(self.cache):
                    if saved[i] is None:
                        trim_to(layer, at)
                    else:
                        self.cache[i] = copy.deepcopy(saved[i])
            else:
                self.cache[:] = make_prompt_cache(self.model)
        self.snapshots = {q: s for q, s in self.snapshots.items() if q <= at}
        self.fed = self.fed[:at]
        return at

    def restore_prefix(self, target: list[int], held: int) -> int | None:
        """Take the prefix store's state of the longest prefix of `target` beyond the `held`
        tokens the cache holds; where the cache now stands, or None."""
        found = self.prefix_store.restore(target, held)
        if found is None:
            return None
        at, self.cache[:] = found
        self.fed, self.snapshots = target[:at], {}
        self.restored_tokens += at
        return at

    def store_marks(self, shared: int, at: int, end: int) -> list[int]:
        """Where the prefix store keeps this episode's state: at the end of the system prompt
        (its tools and memories), and where it parts from the last episode inside it (the same
        docs, other memories; anywhere, where no token starts at the system prompt's end: Gemma's
        template folds it into the first user turn, Llama 3.1's puts the tools there)."""
        try:
            system = self.render(self.messages[:1], False)
        except TemplateError:  # a template that wants a user turn (Llama 3.1's with tools puts them there)
            system = ""
        rendered = system and self.messages[0]["content"] in system and self.prompt.text.startswith(system)
        head = self.prompt.token_at(len(system)) if rendered else None
        marks = {head, shared if self.first_step and shared < (head or end) else None} - {None}
        return sorted(m for m in marks if at <= m < end)

    def snapshot_marks(self, at: int, end: int) -> list[int]:
        marks = {self.shared_len, self.prefix_len, self.history_len} - {None} if self.fragile else set()
        return sorted(m for m in marks if at < m < end and m not in self.snapshots)

    def feed(self, tokens: list[int]):
        prefill(self.model, self.cache, tokens, self.options.prefill_chunk(), self.decode_stats)
        self.fed += tokens

    def snapshot(self):
        at = len(self.fed)
        self.snapshots = {q: s for q, s in self.snapshots.items() if q in (self.shared_len, self.prefix_len)}
        self.snapshots[at] = [copy.deepcopy(c) if i in self.fragile else None for i, c in enumerate(self.cache)]

    def generate(self, admissible=None, on_text=None) -> str:
        """Decode the next assistant reply (an action) and append it to the chat."""
        start = time.perf_counter()
        target = self.prompt_ids()
        held, shared = len(self.fed), common_prefix(self.fed, target)
        if self.first_step and self.fragile:
            self.shared_len = shared or None
        at = self.rewind(min(shared, len(target) - 1))  # feed >= 1 token for logits
        if self.head_changed and self.prefix_store:
            at = self.restore_prefix(target, at) or at
        keep = self.store_marks(shared, at, len(target)) if self.head_changed and self.prefix_store else []
        self.first_step = self.head_changed = False
        self.rewound_tokens.append(held - min(at, shared))
        self.prefill_tokens += len(target) - at
        try:
            snapshots = self.snapshot_marks(at, len(target))
            for mark in sorted(set(snapshots + keep)):
                if mark > len(self.fed):
                    self.feed(target[len(self.fed) : mark])
                if mark in snapshots:
                    self.snapshot()
                if mark in keep:
                    self.prefix_store.save(self.fed, self.cache)
            at = len(self.fed)
            grammar = self.tools.grammar() if self.tools else None
            text, ids = decode_action(
                self.model,
                self.tokenizer,
                self.cache,
                target[at:],
                admissible,
                self.options,
                on_text,
                history=self.fed,
                stats=self.decode_stats,
                grammar=grammar,
            )
        except KeyboardInterrupt:  # a stopped reply: `fed` is still exact; the layers may hold part of a pass more
            self.fed.append(-1)  # an unknown tail, cut off
            self.rewind(len(self.fed) - 1)
            raise
        offset = cache_offset(self.cache)
        self.fed = (target + ids)[: offset if offset is not None else len(target) + len(ids)]
        self.decode_tokens += len(ids)
        self.prompt_tokens.append(len(target))
        self.step_seconds.append(time.perf_counter() - start)
        message, action = (
            self.tools.reply_message(text) if self.tools else ({"role": "assistant", "content": text}, text)
        )
        self.append([message])
        return action

    def stats(self) -> dict:
        return {
            "prefill_tokens": self.prefill_tokens,
            "restored_tokens": self.restored_tokens,
            "decode_tokens": self.decode_tokens,
            "prompt_tokens": self.prompt_tokens,
            "rewound_tokens": self.rewound_tokens,
            "step_seconds": [round(s, 4) for s in self.step_seconds],
            "render_seconds": [round(s, 5) for s in self.render_seconds],
            "forward_passes": self.decode_stats.forward_passes,
            "forward_flops": self.decode_stats.flops if self.shape else None,
            "constrained_fallbacks": self.decode_stats.fallbacks,
        }


class ReencodingSession(Session):
    """The naive loop a plain mlx-lm ReAct agent runs: re-encode the whole prompt each step
    (same window, same truncation). The baseline for benchmarks and the reference for the
    fast path's correctness."""

    def prompt_ids(self) -> list[int]:
        super().prompt_ids()  # applies the same window
        return encode(self.tokenizer, self.render(self.messages, True))

    def snapshot_marks(self, at: int, end: int) -> list[int]:
        return []

    def generate(self, admissible=None, on_text=None) -> str:
        self.cache[:] = make_prompt_cache(self.model)
        self.fed = []
        return super().generate(admissible, on_text)
