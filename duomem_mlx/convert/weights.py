"""GGUF tensors -> mlx-lm weights: renamed, un-permuted, norm-shifted, and either kept in the
file's own quantization (MLX affine, group 32, the blocks' float16 scales and biases exactly) or
dequantized to the chosen dtype."""

import mlx.core as mx

from duomem_mlx.convert.families import Family, heads_for_rows, mlx_name, undo_row_permutation
from duomem_mlx.convert.gguf_file import BLOCK, KEEPABLE, affine_blocks, dequantized
from duomem_mlx.progress import Progress


def mlx_weights(gguf, family: Family, config: dict, dtype, keep_quant: bool) -> tuple[dict, dict]:
    """(name -> mx.array, per-layer quantization {module path: {"bits", "group_size"}})."""
    weights, quantized = {}, {}
    scale_dtype = (
        mx.float32 if dtype == mx.float32 else mx.float16
    )  # the blocks' float16 values exactly (bfloat16 rounds them)
    for gguf_name, tensor in Progress(list(gguf.tensors.items()), desc="tensors", unit="tensor"):
        name = mlx_name(gguf_name, family)
        if name is None:
            continue
        heads = heads_for_rows(gguf_name, config) if family.unpermute_qk else None
        keep = keep_quant and name.endswith(".weight") and tensor.tensor_type.name in KEEPABLE
        if keep:
            module = name.removesuffix(".weight")
            packed, scales, biases, bits = affine_blocks(tensor)
            for suffix, rows in (("weight", packed), ("scales", scales), ("biases", biases)):
                rows = undo_row_permutation(rows, heads) if heads else rows
                weights[f"{module}.{suffix}"] = (
                    mx.array(rows).astype(scale_dtype) if suffix != "weight" else mx.array(rows)
                )
            quantized[module] = {"bits": bits, "group_size": BLOCK}
            continue
        values = dequantized(tensor)
        if family.norm_offset and gguf_name.endswith("norm.weight"):
            values = values + family.norm_offset
        weights[name] = mx.array(undo_row_permutation(values, heads) if heads else values).astype(dtype)
    return weights, quantized


def quantization_config(quantized: dict) -> dict | None:
    """mlx-lm's `quantization` entry: the most common (bits, group size) as the default, the
    layers that differ named one by one."""
    if not quantized:
        return None
    pairs = [(spec["bits"], spec["group_size"]) for spec in quantized.values()]
    bits, group_size = max(set(pairs), key=pairs.count)
    config = {"group_size": group_size, "bits": bits, "mode": "affine"}
    config.update(
        {
            path: dict(spec, mode="affine")
            for path, spec in quantized.items()
            if (spec["bits"], spec["group_size"]) != (bits, group_size)
        }
    )
    return config
