"""On a CPU, quantized layers fed many rows dequantize and run dense, and the rows of decoding go
to the kernel `cpu_kernel` builds (else MLX's kernel on a stream per core): the same outputs as
MLX's quantized kernel."""

import os
import subprocess
import sys
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest

from duomem_mlx.cpu import kernel as cpu_kernel
from duomem_mlx.cpu.quant import ROWS, SWAPS, cpu_streams, dense_prefill_on_cpu
from duomem_mlx.deploy.quantize import quantize_package
from duomem_mlx.runtime.models import load

needs_kernel = pytest.mark.skipif(sys.platform != "linux", reason="the CPU quantized kernel is built on Linux only")


def quantized_tiny(tiny_model, bits, group_size):
    model, _ = mlx_lm.load(str(tiny_model))
    nn.quantize(model, group_size=group_size, bits=bits)
    return model


def count_calls(monkeypatch, owner, name) -> list:
    calls, original = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    return calls


def counting(kernels, calls: list):
    """The extension with each call's name and first argument's shape recorded."""

    def record(name):
        return lambda *a: calls.append((name, a[0].shape)) or getattr(kernels, name)(*a)

    return SimpleNamespace(quantized_matvec=record("quantized_matvec"), dequantize=record("dequantize"))


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_many_rows_run_dense_and_one_row_a_quantized_product(tiny_model, bits, group_size, monkeypatch):
    kernels = cpu_kernel.kernels()  # built, loaded and probed before MLX's kernels are counted
    model = quantized_tiny(tiny_model, bits, group_size)
    tokens = mx.array([[5, 9, 14, 3, 7, 11, 2, 8, 40, 41, 42, 43]])
    reference, last = model(tokens), model(tokens[:, -1:])
    dense_prefill_on_cpu(model)
    layers = [m for _, m in model.named_modules() if isinstance(m, tuple(SWAPS))]
    assert len(layers) > 1 and all(type(m) in SWAPS.values() for m in layers)  # the tied head's embedding too
    if sys.platform == "linux":
        assert kernels is not None  # `make setup` built it; its absence here is a failure, not a skip
    own_calls, mlx_calls = [], count_calls(monkeypatch, mx, "quantized_matmul")
    if kernels:
        monkeypatch.setattr(cpu_kernel, "kernels", lambda: counting(kernels, own_calls))
    assert tokens.shape[1] >= ROWS and mx.allclose(model(tokens), reference, atol=1e-4).item()
    assert mlx_calls == []  # every layer ran dense
    assert sorted(own_calls) == (sorted(("dequantize", m.weight.shape) for m in layers) if kernels else [])
    own_calls.clear()
    assert mx.allclose(model(tokens[:, -1:]), last, atol=1e-4).item()
    if kernels:
        assert mlx_calls == [] and len(own_calls) == len(layers)
        assert {(name, shape[1]) for name, shape in own_calls} == {("quantized_matvec", 1)}


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_without_the_cpu_kernel_one_row_runs_mlxs_kernel_on_a_stream_per_core(
    tiny_model, bits, group_size, monkeypatch
):
    model = quantized_tiny(tiny_model, bits, group_size)
    last = model(mx.array([[43]]))
    dense_prefill_on_cpu(model)
    layers = [m for _, m in model.named_modules() if isinstance(m, tuple(SWAPS))]
    monkeypatch.setattr(cpu_kernel, "kernels", lambda: None)
    calls = count_calls(monkeypatch, mx, "quantized_matmul")
    assert mx.array_equal(model(mx.array([[43]])), last).item()  # each row computed as MLX's kernel computes it
    assert len(calls) == len(layers) * len(cpu_streams()) and {shape[1] for shape in calls} == {1}


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_cpu_kernels_give_mlxs_values(bits, group_size):
    kernels = cpu_kernel.kernels()
    weight = mx.random.normal((200, 384), key=mx.random.key(bits + group_size))
    w, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    dense = kernels.dequantize(w, scales, biases, group_size, bits)
    assert (
        dense.dtype == mx.float32
        and mx.allclose(dense, mx.dequantize(w, scales, biases, group_size, bits), atol=1e-6).item()
    )
    for rows in (1, 2, 5, 8):
        x = mx.random.normal((1, rows, 384), key=mx.random.key(rows))
        for inputs in (x, mx.swapaxes(mx.swapaxes(x, 1, 2) * 1, 1, 2)):  # row-contiguous and a strided view
            expected = mx.quantized_matmul(inputs, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
            got = kernels.quantized_matvec(inputs, w, scales, biases, group_size, bits)
            assert got.shape == (1, rows, 200) and mx.allclose(got, expected, atol=1e-4, rtol=1e-5).item()


@needs_kernel
def test_cpu_kernels_refuse_what_they_cannot_compute():
    kernels = cpu_kernel.kernels()
    w, scales, biases = mx.quantize(mx.ones((64, 128)), group_size=64, bits=4)
    x = mx.ones((1, 128))
    for args in (
        (x.astype(mx.float16), w, scales, biases, 64, 4),
        (mx.ones((9, 128)), w, scales, biases, 64, 4),
        (x, w, scales, biases, 64, 3),
        (mx.ones((1, 64)), w, scales, biases, 64, 4),
        (x, w, scales.astype(mx.float16), biases, 64, 4),
    ):
        with pytest.raises(ValueError, match="cpu_kernel"):
            kernels.quantized_matvec(*args)
    with pytest.raises(ValueError, match="cpu_kernel"):
        kernels.dequantize(w, scales, biases, 32, 4)


@needs_kernel
@pytest.mark.parametrize("env,note", [({"DUOMEM_CPU_KERNEL": "0"}, ""), ({"CXX": "false"}, "could not build")])
def test_without_a_built_extension_there_are_no_kernels(tmp_path, env, note):
    code = "from duomem_mlx.cpu import kernel as cpu_kernel; print(cpu_kernel.kernels())"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DUOMEM_CACHE": str(tmp_path), **env},
    )
    assert result.returncode == 0 and result.stdout.strip() == "None"
    lines = result.stderr.strip().splitlines()
    assert (note in lines[-1] and "make setup" in lines[-1] and len(lines) <= 2) if note else lines == []
    assert not list(tmp_path.glob("cpu_kernel/*.so"))


def test_load_swaps_quantized_layers(tiny_model, tmp_path):
    package = quantize_package(str(tiny_model), str(tmp_path / "q"), bits=4, group_size=32)
    model, _ = load(str(package))
    kinds = {type(m) for _, m in model.named_modules() if isinstance(m, tuple(SWAPS))}
    assert kinds == (set(SWAPS.values()) if mx.default_device() == mx.cpu else set(SWAPS))


@needs_kernel
def test_cpu_kernels_give_mlxs_gradients():
    """Calibration trains scales and biases through a quantized layer: the same gradients as MLX's ops."""
    kernels = cpu_kernel.kernels()
    w, scales, biases = mx.quantize(mx.random.normal((64, 128), key=mx.random.key(0)), group_size=64, bits=4)
    x, row = mx.random.normal((3, 128), key=mx.random.key(1)), mx.random.normal((1, 128), key=mx.random.key(2))

    def loss(dequantize, matvec):
        return lambda s, b, x: (x @ dequantize(s, b).T).square().sum() + matvec(row * x[:1], s, b).sum()

    own = loss(
        lambda s, b: kernels.dequantize(w, s, b, 64, 4), lambda x, s, b: kernels.quantized_matvec(x, w, s, b, 64, 4)
    )
    mlx = loss(
        lambda s, b: mx.dequantize(w, s, b, 64, 4),
        lambda x, s, b: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=4),
    )
    for got, expected in zip(
        mx.grad(own, argnums=(0, 1, 2))(scales, biases, x), mx.grad(mlx, argnums=(0, 1, 2))(scales, biases, x)
    ):
        assert mx.allclose(got, expected, atol=1e-3, rtol=1e-4).item()
