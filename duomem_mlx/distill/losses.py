"""Distillation losses over the cached top-k rows (docs/design.md, "Distillation").

Per masked token: `alpha * CE + (1 - alpha) * T^2 * KD`, where KD compares teacher and student
over k + 1 buckets: the teacher's top-k ids and one tail bucket holding the rest of the mass,
so k << vocab is still a proper distribution. The student side is exact (its log-probs at the
k ids from one logsumexp over its logits; its tail is one minus their sum); the teacher's rows
were stored at temperature 1 (float16), so a tail under 1e-3 counts as rounding (0) and at T != 1
the tail bucket is tempered as if it were one token.
Rows without a teacher distribution (ids -1) get CE only. Sparse: gathers at the k ids, never a
dense [T, vocab] teacher tensor.
"""

import math

import mlx.core as mx

KD_LOSSES = ("forward", "reverse", "jsd")
NEG = -1e9  # log-probability of an absent entry: exp() is 0, and 0 * NEG stays finite
EPS = 1e-12  # smallest tail mass (a float32 sum of k = vocab probabilities can exceed 1)
TAIL_MIN = math.log(1e-6)  # the teacher's tail bucket never has less (finite reverse KL and JSD)
TEACHER_TAIL_FLOOR = math.log(1e-3)  # float16 rows carry ~1e-3 of rounding in their sum: below it the tail is 0


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, stable on both ends; x is clamped to -EPS. Each branch sees
    only inputs of its own side: where() passes both branches' gradients on, times 0 for the one
    not taken, and log1p(-exp(x)) at x ~ 0 is -inf in float32 (0 * inf: a NaN loss once the
    student puts nearly all its mass on the teacher's top-k)."""
    x = mx.minimum(x, math.log1p(-EPS))
    near = x > -math.log(2)
    return mx.where(
        near, mx.log(-mx.expm1(mx.where(near, x, -math.log(2)))), mx.log1p(-mx.exp(mx.where(near, -math.log(2), x)))
    )


def with_tail(logprobs):
    """[..., k] log-probs (NEG where absent) -> [..., k + 1] with the leftover mass as a tail bucket."""
    tail = log1mexp(mx.logsumexp(logprobs, axis=-1, keepdims=True))
    return mx.concatenate([logprobs, tail], axis=-1)


def divergence(t, s, kind: str):
    """Per-row divergence between bucket log-probs t (teacher) and s (student), [..., k+1] -> [...]."""
    if kind == "forward":
        return (mx.exp(t) * (t - s)).sum(-1)
    if kind == "reverse":
        return (mx.exp(s) * (s - t)).sum(-1)
    if kind == "jsd":
        m = mx.logaddexp(t, s) - math.log(2)
        return 0.5 * ((mx.exp(t) * (t - m)).sum(-1) + (mx.exp(s) * (s - m)).sum(-1))
    raise ValueError(f"unknown KD loss {kind!r}; use one of {', '.join(KD_LOSSES)}")


def sparse_kd(logits, topk_ids, topk_logprobs, temperature: float = 1.0, kind: str = "forward", lse=None):
    """KD per position [...] from student logits [..., V] and teacher rows [..., k] (ids -1: absent).

    `lse` may pass the student's logsumexp of logits / temperature when the caller has it."""
    valid = topk_ids >= 0
    scaled = logits.astype(mx.float32) / temperature if temperature != 1 else logits.astype(mx.float32)
    if lse is None:
        lse = mx.logsumexp(scaled, axis=-1, keepdims=True)
    s = mx.take_along_axis(scaled, mx.where(valid, topk_ids, 0), axis=-1) - lse
    s = with_tail(mx.where(valid, s, NEG))
    t = mx.where(valid, mx.maximum(topk_logprobs.astype(mx.float32), NEG), NEG)
    t = with_tail(t)
    t = mx.concatenate([t[..., :-1], mx.where(t[..., -1:] < TEACHER_TAIL_FLOOR, NEG, t[..., -1:])], axis=-1)
    t = t / temperature
    t = t - mx.logsumexp(t, axis=-1, keepdims=True)
    t = mx.concatenate([t[..., :-1], mx.maximum(t[..., -1:], TAIL_MIN)], axis=-1)  # reverse KL stays finite
    return divergence(t, s, kind)


def distill_loss(
    logits,
    targets,
    mask,
    topk_ids=None,
    topk_logprobs=None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    kind: str = "forward",
):
    """Summed per-token losses of a batch: (loss_sum, ce_sum, kd_sum, kd_rows).

    logits [B, L, V]; targets, mask [B, L]; topk_ids / topk_logprobs [B, L, k] aligned with the
    positions (row of the token each position predicts), or None for CE only."""
    logits = logits.astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    ce = (lse - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]) * mask
    if topk_ids is None:
        ce_sum = ce.sum()
        return ce_sum, ce_sum, mx.array(0.0), mx.array(0.0)
    has_teacher = (topk_ids[..., 0] >= 0) * mask
    scaled_lse = lse[..., None] if temperature == 1 else None
    kd = sparse_kd(logits, topk_ids, topk_logprobs, temperature, kind, scaled_lse) * has_teacher
    w_ce = mx.where(has_teacher > 0, alpha, 1.0)
    loss = (w_ce * ce).sum() + (1 - alpha) * temperature**2 * kd.sum()
    return loss, ce.sum(), kd.sum(), has_teacher.sum()
