"""On a CPU, quantized layers fed many rows dequantize and run dense: the same outputs as MLX's
quantized kernel, which keeps the rows of decoding."""

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest

from duomem_mlx.cpu_quant import ROWS, SWAPS, cpu_streams, dense_prefill_on_cpu
from duomem_mlx.models import load


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_many_rows_run_dense_with_the_kernels_values(tiny_model, bits, group_size):
    model, _ = mlx_lm.load(str(tiny_model))
    nn.quantize(model, group_size=group_size, bits=bits)
    tokens = mx.array([[5, 9, 14, 3, 7, 11, 2, 8, 40, 41, 42, 43]])
    reference = model(tokens)
    last = model(tokens[:, -1:])
    dense_prefill_on_cpu(model)
    layers = [m for _, m in model.named_modules() if isinstance(m, tuple(SWAPS))]
    assert len(layers) > 1 and all(type(m) in SWAPS.values() for m in layers)  # the tied head's embedding too
    calls = []
    kernel = mx.quantized_matmul
    mx.quantized_matmul = lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k)
    try:
        assert tokens.shape[1] >= ROWS and mx.allclose(model(tokens), reference, atol=1e-4).item()
        assert calls == []  # every layer ran dense
        assert mx.array_equal(model(tokens[:, -1:]), last).item()  # one row: the kernel, on a stream per core
        assert len(calls) == len(layers) * len(cpu_streams()) and {shape[1] for shape in calls} == {1}
    finally:
        mx.quantized_matmul = kernel


def test_load_swaps_quantized_layers(tiny_model, tmp_path):
    from duomem_mlx.deploy.quantize import quantize_package

    package = quantize_package(str(tiny_model), str(tmp_path / "q"), bits=4, group_size=32)
    model, _ = load(str(package))
    kinds = {type(m) for _, m in model.named_modules() if isinstance(m, tuple(SWAPS))}
    assert kinds == (set(SWAPS.values()) if mx.default_device() == mx.cpu else set(SWAPS))
