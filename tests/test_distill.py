"""Distillation: sparse losses, data from a real teacher cache, training, resume, distributed, CLI."""

import math

import mlx.core as mx
import numpy as np
import pytest

from duomem_mlx.distill.losses import distill_loss, sparse_kd


def dense(teacher_logits, student_logits, temperature, kind):
    t = teacher_logits / temperature
    t = t - mx.logsumexp(t, axis=-1, keepdims=True)
    s = student_logits / temperature
    s = s - mx.logsumexp(s, axis=-1, keepdims=True)
    p, q = mx.exp(t), mx.exp(s)
    if kind == "forward":
        return (p * (t - s)).sum(-1)
    if kind == "reverse":
        return (q * (s - t)).sum(-1)
    m = mx.log(0.5 * (p + q))
    return 0.5 * ((p * (t - m)).sum(-1) + (q * (s - m)).sum(-1))


def teacher_rows(teacher_logits, k):
    logprobs = teacher_logits - mx.logsumexp(teacher_logits, axis=-1, keepdims=True)
    ids = mx.argsort(-logprobs, axis=-1)[..., :k]
    return ids.astype(mx.int32), mx.take_along_axis(logprobs, ids, axis=-1)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kd_equals_dense_kl_at_k_equal_vocab(kind, temperature):
    mx.random.seed(0)
    vocab = 50
    teacher, student = mx.random.normal((6, vocab)) * 3, mx.random.normal((6, vocab)) * 3
    ids, lps = teacher_rows(teacher, vocab)
    sparse = sparse_kd(student, ids, lps, temperature, kind)
    assert np.allclose(np.array(sparse), np.array(dense(teacher, student, temperature, kind)), atol=1e-4)
    # with k < vocab the tail bucket keeps a proper distribution: KD is 0 iff student == teacher
    ids, lps = teacher_rows(teacher, 5)
    assert np.allclose(np.array(sparse_kd(teacher, ids, lps, 1.0, kind)), 0, atol=1e-5)
    assert (np.array(sparse_kd(student, ids, lps, 1.0, kind)) > 1e-3).all()


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_distill_loss_gradient_matches_finite_differences(kind):
    mx.random.seed(1)
    vocab, k = 12, 4
    logits = mx.random.normal((1, 3, vocab))
    ids, lps = teacher_rows(mx.random.normal((1, 3, vocab)) * 2, k)
    ids = mx.concatenate([ids[:, :2], mx.full((1, 1, k), -1, mx.int32)], axis=1)  # last row unaligned: CE only
    targets, mask = mx.array([[1, 5, 7]]), mx.array([[1.0, 1.0, 1.0]])

    def f(x):
        return distill_loss(x, targets, mask, ids, lps, alpha=0.3, temperature=2.0, kind=kind)[0]

    grad = np.array(mx.grad(f)(logits)).reshape(-1)
    base, eps = np.array(logits).reshape(-1), 1e-2
    for i in range(0, base.size, 5):
        up, down = base.copy(), base.copy()
        up[i] += eps
        down[i] -= eps
        numeric = (f(mx.array(up.reshape(logits.shape))).item() - f(mx.array(down.reshape(logits.shape))).item()) / (2 * eps)
        assert math.isclose(grad[i], numeric, rel_tol=2e-2, abs_tol=2e-3), (i, grad[i], numeric)


def test_unaligned_rows_get_ce_only_and_kd_off_is_ce():
    mx.random.seed(2)
    logits, targets, mask = mx.random.normal((1, 2, 9)), mx.array([[3, 4]]), mx.array([[1.0, 1.0]])
    none = mx.full((1, 2, 3), -1, mx.int32)
    loss, ce, kd, rows = distill_loss(logits, targets, mask, none, mx.zeros((1, 2, 3)), alpha=0.2)
    assert rows.item() == 0 and kd.item() == 0 and math.isclose(loss.item(), ce.item(), rel_tol=1e-6)
    assert math.isclose(distill_loss(logits, targets, mask)[0].item(), ce.item(), rel_tol=1e-6)
