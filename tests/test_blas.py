"""The preloaded BLAS on a Linux CPU: OpenBLAS, and before it the library that sends one-row and
one-column sgemm calls to sgemv (duomem_mlx/cpu/gemv_forward.c). Results, never timings."""

import os
import subprocess
import sys

import pytest

from duomem_mlx.cpu import blas

linux_openblas = pytest.mark.skipif(
    blas.openblas_path() is None or blas.compiler() is None, reason="needs Linux, OpenBLAS and a C compiler"
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUOMEM_CACHE", str(tmp_path))
    return tmp_path


@linux_openblas
def test_preload_puts_the_forward_before_openblas(cache):
    libs = blas.preload()
    assert libs == [str(blas.gemv_forward_path()), blas.openblas_path()]
    assert blas.gemv_forward_path().is_relative_to(cache) and blas.gemv_forward_path().exists()
    assert blas.preload() == libs  # built once, then found


def test_preload_without_a_compiler_is_openblas_alone(cache, monkeypatch):
    monkeypatch.setattr(blas, "openblas_path", lambda: "/usr/lib/x/libopenblas.so.0")
    monkeypatch.setattr(blas, "compiler", lambda: None)
    monkeypatch.setattr(blas.sys, "platform", "linux")
    assert blas.preload() == ["/usr/lib/x/libopenblas.so.0"]


def test_nothing_is_preloaded_on_macos(cache, monkeypatch):
    monkeypatch.setattr(blas.sys, "platform", "darwin")
    assert blas.openblas_path() is None and blas.build_gemv_forward() is None and blas.preload() == []


def test_duomem_openblas_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("DUOMEM_OPENBLAS", "0")
    monkeypatch.setattr(blas, "uses_reference_blas", lambda: True)
    monkeypatch.setattr(blas.os, "execve", lambda *a: pytest.fail("re-executed with DUOMEM_OPENBLAS=0"))
    blas.reexec_with_openblas()


def test_reexec_says_when_the_forward_is_missing(monkeypatch, capsys):
    monkeypatch.delenv("DUOMEM_OPENBLAS", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(blas, "uses_reference_blas", lambda: True)
    monkeypatch.setattr(blas, "preload", lambda: ["/usr/lib/x/libopenblas.so.0"])
    calls = []
    monkeypatch.setattr(blas.os, "execve", lambda path, argv, env: calls.append(env))
    blas.reexec_with_openblas()
    assert calls[0]["LD_PRELOAD"] == "/usr/lib/x/libopenblas.so.0" and calls[0]["DUOMEM_OPENBLAS"] == "0"
    assert "no C compiler" in capsys.readouterr().err


CHECK = r"""
import ctypes, sys
import mlx.core as mx
import numpy as np
mx.set_default_device(mx.cpu)
rng = np.random.default_rng(0)
def same(got, want):
    assert np.allclose(np.array(got), want, rtol=1e-4, atol=1e-4), (np.abs(np.array(got) - want).max(), want.shape)
for m, k, n in [(1, 576, 1536), (1, 1536, 576), (9, 64, 1), (1, 64, 1), (1, 1, 5), (3, 5, 7), (1, 33, 4099)]:
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    A, B = mx.array(a), mx.array(b)
    At, Bt = mx.array(a.T.copy()).T, mx.array(b.T.copy()).T  # the same values, stored transposed
    for x, y in [(A, B), (A, Bt), (At, B), (At, Bt)]:
        same(x @ y, a @ b)
    c = rng.standard_normal((m, n)).astype(np.float32)
    same(mx.addmm(mx.array(c), A, Bt, alpha=2.0, beta=0.5), 2.0 * (a @ b) + 0.5 * c)
# rows and columns of a bigger array: strides that are not the shapes'
big = rng.standard_normal((8, 300)).astype(np.float32)
w = rng.standard_normal((200, 150)).astype(np.float32)
same(mx.array(big)[3:4, 100:250] @ mx.array(w).T, big[3:4, 100:250] @ w.T)
same(mx.array(w) @ mx.array(big)[2, :150], w @ big[2, :150])
batched = rng.standard_normal((4, 1, 64)).astype(np.float32)
same(mx.array(batched) @ mx.array(w[:, :64]).T, batched @ w[:, :64].T)
forwarded = ctypes.CDLL(sys.argv[1]).duomem_mlx_gemv_forwarded
forwarded.restype = ctypes.c_ulong
assert forwarded() > 0, "no call reached sgemv"
print("ok", forwarded())
"""


@linux_openblas
def test_forwarded_products_equal_numpy(cache):
    libs = blas.preload()
    env = dict(os.environ, LD_PRELOAD=" ".join(libs), DUOMEM_OPENBLAS="0")
    result = subprocess.run([sys.executable, "-c", CHECK, libs[0]], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
