"""Quantized layers fed many rows on a CPU. MLX's CPU quantized matmul costs about 1 ms per row
of input for a 1536 x 576 layer, while dequantizing that layer costs ~4 ms at any row count: a
prefill chunk or a training batch through a 4-bit model runs ~20x slower than dense. On a CPU, a
quantized linear layer (or a tied head) fed ROWS rows or more dequantizes its weight and runs a
dense matmul (the same values, summed in another order); fewer rows (decoding) keep MLX's
kernel. Metal and CUDA keep MLX's kernels throughout."""

import mlx.core as mx
import mlx.nn as nn

ROWS = 8  # measured crossover ~4 rows on a 2-core x86 CPU


def _matmul(layer, x):
    """x @ W.T of a quantized layer: MLX's kernel for few rows, dense after dequantizing for many."""
    if x.size // x.shape[-1] < ROWS:
        return mx.quantized_matmul(x, layer["weight"], scales=layer["scales"], biases=layer.get("biases"), transpose=True,
                                   group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    weight = mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits,
                           mode=layer.mode, dtype=x.dtype)
    return x @ weight.T


class RowsQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        y = _matmul(self, x)
        return y + self["bias"] if "bias" in self else y


class RowsQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x):
        return _matmul(self, x)


SWAPS = {nn.QuantizedLinear: RowsQuantizedLinear, nn.QuantizedEmbedding: RowsQuantizedEmbedding}


def dense_prefill_on_cpu(model) -> None:
    """Swap the class of every plain quantized linear layer and embedding in `model` (on a CPU only)."""
    if mx.default_device() != mx.cpu:
        return
    for _, module in model.named_modules():
        if type(module) in SWAPS:
            module.__class__ = SWAPS[type(module)]
