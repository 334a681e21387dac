"""Quantized layers on a CPU. MLX's CPU quantized matmul costs about 0.2 ms per row of input for a
1536 x 576 layer, while dequantizing that layer costs ~0.75 ms at any row count: a prefill chunk
or a training batch through a 4-bit model runs several times slower than dense. On a CPU, a
quantized linear layer (or a tied head) fed ROWS rows or more dequantizes its weight and runs a
dense matmul (the same values, summed in another order); fewer rows (decoding) run a quantized
product. Both go to the kernels `cpu_kernel` builds (AVX2; 4 and 8 bits, float32)
where it did, else to MLX's: its product runs on one thread, so the layer's output rows are split
across a CPU stream per core (each row computed as before). Metal and CUDA keep MLX's kernels."""

import functools
import os

import mlx.core as mx
import mlx.nn as nn

from duomem_mlx.cpu import kernel as cpu_kernel

ROWS = 8  # measured crossover ~4 rows on a 2-core x86 CPU


@functools.cache
def cpu_streams() -> list:
    return [mx.new_stream(mx.cpu) for _ in range(os.cpu_count() or 1)]


def _few_rows(layer, x):
    """MLX's kernel, which runs on one thread: the layer's output rows split across a CPU stream
    per core (each its own thread), each part computed as the whole layer would compute it."""
    w, scales, biases, streams = layer["weight"], layer["scales"], layer.get("biases"), cpu_streams()
    cuts = [i * w.shape[0] // len(streams) for i in range(len(streams) + 1)]
    parts = [
        mx.quantized_matmul(
            x,
            w[a:b],
            scales=scales[a:b],
            biases=None if biases is None else biases[a:b],
            transpose=True,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
            stream=stream,
        )
        for stream, a, b in zip(streams, cuts, cuts[1:])
    ]
    return mx.concatenate(parts, -1)


def _own_kernels(layer, x):
    """`cpu_kernel`'s extension where it is built and takes this layer and input, else None."""
    fits = (
        layer.mode == "affine"
        and layer.bits in (4, 8)
        and x.dtype == mx.float32
        and "biases" in layer
        and layer["scales"].dtype == mx.float32
    )
    return cpu_kernel.kernels() if fits else None


def _matmul(layer, x):
    """x @ W.T of a quantized layer: a quantized product for few rows, dense after dequantizing for many."""
    own, quantized = _own_kernels(layer, x), (layer["weight"], layer["scales"], layer.get("biases"))
    if x.size // x.shape[-1] < ROWS:
        return own.quantized_matvec(x, *quantized, layer.group_size, layer.bits) if own else _few_rows(layer, x)
    if own:
        return x @ own.dequantize(*quantized, layer.group_size, layer.bits).T
    return x @ mx.dequantize(*quantized, layer.group_size, layer.bits, mode=layer.mode, dtype=x.dtype).T


class RowsQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        y = _matmul(self, x)
        return y + self["bias"] if "bias" in self else y


class RowsQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x):
        return _matmul(self, x)


SWAPS = {nn.QuantizedLinear: RowsQuantizedLinear, nn.QuantizedEmbedding: RowsQuantizedEmbedding}


def dense_prefill_on_cpu(model) -> None:
    """Swap the class of every plain quantized linear layer and embedding in `model` (on a CPU only),
    its scales and biases converted to float32: a package stores them in 16 bits, as a Mac computes
    with them, and MLX's CPU quantized kernels run several times slower on 16-bit scales."""
    if mx.default_device() != mx.cpu:
        return
    for _, module in model.named_modules():
        if type(module) in SWAPS:
            module.__class__ = SWAPS[type(module)]
            module.update({k: module[k].astype(mx.float32) for k in ("scales", "biases") if k in module})
