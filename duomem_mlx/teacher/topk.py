"""Teacher top-k: row i is log-softmax (temperature 1, unprocessed) of the logits at the
position before the i-th masked token, its k most likely ids. From one forward pass
(`forward_topk`), or recorded while an mlx teacher plays (`TopKRecorder`)."""

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, make_prompt_cache

from duomem_mlx.errors import DuomemError
from duomem_mlx.runtime.session import cache_offset


def topk_logprobs(logits, k: int):
    """(ids, logprobs) [n, k] of log-softmax(logits [n, V]) at temperature 1, most likely first."""
    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    top = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(logprobs, top, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(top, order, axis=-1).astype(mx.int32), mx.take_along_axis(values, order, axis=-1).astype(
        mx.float16
    )


def feed_topk(model, tokens, cache, k: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Feed `tokens` into `cache`; the top-k rows at each of their positions."""
    ids, lps = [np.zeros((0, k), np.int32)], [np.zeros((0, k), np.float16)]
    for start in range(0, len(tokens), chunk):
        top, values = topk_logprobs(model(mx.array(tokens[start : start + chunk])[None], cache=cache)[0], k)
        mx.eval(top, values)
        ids.append(np.array(top))
        lps.append(np.array(values))
    return np.concatenate(ids), np.concatenate(lps)


def forward_topk(model, input_ids, loss_mask, k: int, chunk: int = 512) -> dict[str, np.ndarray]:
    """Row i: the k most likely next tokens (log-softmax, temperature 1, unprocessed) at the
    position before the i-th masked token, from one chunked forward pass."""
    positions = masked_positions(loss_mask)
    ids, lps = feed_topk(
        model, input_ids[: positions[-1] + 1 if len(positions) else 0], make_prompt_cache(model), k, chunk
    )
    return {"topk_ids": ids[positions], "topk_logprobs": lps[positions]}


def masked_positions(loss_mask) -> np.ndarray:
    """Positions whose logits predict a masked token: the one before each."""
    positions = np.flatnonzero(loss_mask) - 1
    if len(positions) and positions[0] < 0:
        raise DuomemError("the first token of an episode is masked; the chat has no prompt before the first action")
    return positions


class TopKRecorder:
    """Wraps an mlx-lm model for a playing teacher. It remembers the tokens its KV cache holds
    and the top-k of the log-softmax at the positions whose logits generation computes anyway
    (every single-token call: the decoder, the last prompt token), plus, when a prompt starts
    with the rest of an action the decoder did not feed (constrained decoding completes a
    command once it is unique), the positions of that rest. Logits over observations are
    never computed.

    It stands in for the model in the session (runtime/session.py), which feeds and decodes through
    whatever it holds: mlx-lm has no hook for the logits of a forward pass. That asks of it a call
    `recorder(inputs, cache=...)` and, for mlx-lm's `make_prompt_cache`, `make_cache()` (used when a
    model has it, as its docstring says); the decoder calls it whole, its head never cut down (it is
    not one of runtime/heads.py's PLAIN_HEAD models). tests/test_decode.py::test_recorder_makes_the_models_cache
    checks the caches on each family."""

    def __init__(self, model, k: int, eos: set[int]):
        self.model, self.k, self.eos = model, k, eos
        self.tokens: list[tuple] = []  # (start, tokens), contiguous from 0
        self.rows: list[tuple] = []  # (positions, ids, logprobs)
        self.decoded: list[tuple] = []  # (position, token) of single-token calls since the last prompt
        self.logits: list[tuple] = []  # (positions, logits) not yet reduced to top-k
        self.refed = 0  # positions the last rows_for() call had to run again

    def make_cache(self) -> list:
        return make_prompt_cache(self.model)

    def __call__(self, inputs, cache=None, **kwargs):
        start = (cache_offset(cache) or 0) if cache else 0
        self.forget(start)
        logits = self.model(inputs, cache=cache, **kwargs)
        self.tokens.append((start, inputs[0]))
        n = inputs.shape[1]
        record = n if n == 1 else self.unfinished_action(inputs, start)
        self.decoded = self.decoded + [(start, inputs[0, 0])] if n == 1 else []
        if record:
            self.logits.append((start + np.arange(record), logits[0, :record]))
            if n > 1:  # evaluated with this prompt's forward pass, not replayed later
                mx.async_eval(self.logits[-1][1])
            if len(self.logits) >= 64:
                self.flush()
        return logits

    def forget(self, start: int):
        """Drop what lies at or after `start`: the cache was trimmed back there."""
        while self.tokens and self.tokens[-1][0] + self.tokens[-1][1].shape[0] > start:
            s, t = self.tokens.pop()
            if s < start:
                self.tokens.append((s, t[: start - s]))
        for rows in (self.rows, self.logits):
            while rows and rows[-1][0][-1] >= start:
                positions, *arrays = rows.pop()
                keep = int((positions < start).sum())
                if keep:
                    rows.append((positions[:keep], *(a[:keep] for a in arrays)))

    def flush(self):
        """Top-k of the logits kept so far, in one batch (few ops per row matter when decoding)."""
        if self.logits:
            positions = np.concatenate([p for p, _ in self.logits])
            top, values = topk_logprobs(mx.concatenate([rows for _, rows in self.logits]), self.k)
            mx.async_eval(top, values)
            self.rows.append((positions, top, values))
            self.logits = []

    def unfinished_action(self, inputs, start) -> int:
        """How many leading prompt tokens still predict the current action (up to its end of turn)."""
        decoded = [int(t) for p, t in self.decoded if p < start]
        if not decoded or any(t in self.eos for t in decoded):
            return 0
        chunk = np.array(inputs[0]).tolist()
        return next((j for j, t in enumerate(chunk) if t in self.eos), 0)

    def recorded(self) -> tuple[np.ndarray, dict]:
        """(tokens the cache holds, {position: (ids, logprobs)} for the recorded positions)."""
        self.flush()
        tokens = [np.array(t) for _, t in self.tokens]
        rows = {}
        for positions, ids, values in self.rows:
            rows.update(zip(positions.tolist(), zip(np.array(ids), np.array(values))))
        return np.concatenate(tokens) if tokens else np.zeros(0, np.int64), rows

    def rows_for(self, input_ids, loss_mask, cache) -> dict[str, np.ndarray]:
        """Top-k rows of an episode: recorded where the fed tokens equal `input_ids`; missing
        runs fed again on a copy of `cache` cut at their start (from scratch when it cannot be)."""
        positions = masked_positions(loss_mask)
        need = int(positions[-1]) + 1 if len(positions) else 0
        tokens, rows = self.recorded()
        same = next(
            (j for j, (a, b) in enumerate(zip(tokens[:need], input_ids[:need])) if a != b), min(len(tokens), need)
        )
        missing = [int(p) for p in positions if p >= same or p not in rows]
        self.refed = 0
        for a, b in runs(missing, same, need):
            tail, a = cut_cache(cache, a, self.model)
            ids, lps = feed_topk(self.model, input_ids[a:b], tail, self.k)
            rows.update(zip(range(a, b), zip(ids, lps)))
            self.refed += b - a
        return {
            "topk_ids": np.array([rows[p][0] for p in positions], np.int32).reshape(-1, self.k),
            "topk_logprobs": np.array([rows[p][1] for p in positions], np.float16).reshape(-1, self.k),
        }


def runs(missing: list[int], same: int, need: int) -> list[tuple[int, int]]:
    """Half-open ranges to feed again: each run of consecutive missing positions before
    `same`, and one range from `same` to `need` (where the fed tokens parted)."""
    out = []
    for p in sorted(set(q for q in missing if q < same)):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    if same < need:
        out.append([same, need])
    return [tuple(r) for r in out]


def cut_cache(cache, at: int, model):
    """A copy of a plain KV cache holding its first `at` positions; or a fresh cache (at = 0)
    when any layer is another kind (rotating, arrays): never a cache with stale state."""
    if at and all(type(c) is KVCache and c.offset >= at for c in cache):
        copy = [KVCache() for _ in cache]
        for new, old in zip(copy, cache):
            new.state = (old.keys[..., :at, :], old.values[..., :at, :], at)
        return copy, at
    return make_prompt_cache(model), 0
