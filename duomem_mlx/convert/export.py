"""An mlx-lm model back to a GGUF file that llama.cpp (and Ollama, LM Studio) runs: a distilled,
fused student in the format its users' servers read. The metadata (hyperparameters, tokenizer,
chat template) is the GGUF the model was converted from, copied key by key; the weights are the
model's, put back in llama.cpp's layout (Q/K rows permuted for llama, Gemma's norms as 1 + w)."""

from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model

from duomem_mlx.convert.families import Family, family_of, heads_for_rows, mlx_name
from duomem_mlx.convert.fetch import cache_dir
from duomem_mlx.convert.gguf_file import open_gguf
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats import manifest
from duomem_mlx.io import atomic_file
from duomem_mlx.runtime.models import load

TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}
SOURCE_FIX = "pass --source FILE (the GGUF it was converted from)"


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `permute` of llama's Q/K rows (halves -> interleaved pairs, per head)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_tensor(name: str, values: np.ndarray, family: Family, config: dict, qtype) -> tuple[np.ndarray, object]:
    """One mlx-lm weight (float32, as mlx-lm lays it out) as llama.cpp stores `name`: the array
    and its GGML type. Matrices take `qtype`; vectors stay float32, as llama.cpp keeps them."""
    heads = heads_for_rows(name, config) if family.unpermute_qk else None
    if heads:
        values = permute(values, heads)
    if family.norm_offset and name.endswith("norm.weight"):
        values = values - family.norm_offset
    if values.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return values, gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16), qtype
    return gguf.quants.quantize(values, qtype), qtype


def model_weights(model) -> dict[str, np.ndarray]:
    """Every weight as float32 numpy, quantized layers dequantized."""
    dequantize_model(model)
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def source_of(model_dir: str | Path) -> Path:
    """The GGUF file `duomem-mlx convert` made `model_dir` from, where it is still in the fetch cache."""
    known = manifest.path(model_dir).exists()
    source = (manifest.read(model_dir, SOURCE_FIX).get("source") or {}) if known else {}
    candidates = [Path(source["path"])] if "path" in source else []
    candidates += [cache_dir() / "gguf" / source["file"]] if "file" in source else []
    for path in candidates:
        if path.exists():
            return path
    raise DuomemError(f"no GGUF source known for {model_dir}: {SOURCE_FIX}")


def export_gguf(model_dir: str | Path, out: str | Path, source: str | Path, type_name: str = "f16") -> dict:
    """Write `model_dir` (an mlx-lm model `convert` made from `source`, e.g. fused after distill)
    as the GGUF file `out`, tensor for tensor where `source` has one."""
    if type_name not in TYPES:
        raise DuomemError(f"unknown GGUF type {type_name!r}; use one of {', '.join(TYPES)}")
    original = open_gguf(source)
    family = family_of(original)
    model, tokenizer = load(str(model_dir))
    config = vars(model.args)
    weights = model_weights(model)
    path = Path(out)
    writer = gguf.GGUFWriter(None, original.arch)
    for name, field in original.fields.items():
        if name.startswith("GGUF.") or name in (
            "general.architecture",
            "general.file_type",
            "general.quantization_version",
        ):
            continue
        writer.add_key_value(name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    writer.add_file_type(int(TYPES[type_name]))
    if "tokenizer.chat_template" not in original.fields and getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(
            tokenizer.chat_template
        )  # the family's, as convert used it: llama.cpp then renders alike
    need = 0
    for tensor in original.tensors.values():
        key = mlx_name(tensor.name, family)
        if key not in weights:
            raise DuomemError(
                f"{model_dir} has no weight for {tensor.name} ({key}); export the model {source} was converted to"
            )
        if weights[key].shape[::-1] != tuple(int(n) for n in tensor.shape):
            raise DuomemError(
                f"{tensor.name}: {source} has shape {tuple(tensor.shape[::-1])}, {model_dir} {weights[key].shape}; "
                "pass the GGUF this model was converted from as --source"
            )
        values, qtype = gguf_tensor(tensor.name, weights[key], family, config, TYPES[type_name])
        writer.add_tensor(tensor.name, values, raw_dtype=qtype)
        need += values.nbytes
    with atomic_file(path, need) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return {"tensors": len(original.tensors), "bytes": path.stat().st_size, "type": type_name}
