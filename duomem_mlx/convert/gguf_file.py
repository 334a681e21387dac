"""Reading a GGUF file: its metadata, and each tensor either kept in its GGML blocks as MLX
affine quantization (Q4_0, Q4_1, Q8_0 map exactly) or dequantized with the `gguf` package.

GGUF stores a matrix as ne0 (the input dim, contiguous) x ne1 rows, i.e. [out, in] in numpy
order, the layout of an mlx / torch Linear weight."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from duomem_mlx.errors import DuomemError

BLOCK = 32  # values per block in Q4_0 / Q4_1 / Q8_0; MLX's group size for them
KEEPABLE = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # GGML type -> MLX bits


@dataclass
class GGUF:
    path: Path
    metadata: dict
    tensors: dict  # name -> gguf.ReaderTensor
    fields: dict  # key -> gguf.ReaderField, with its GGUF value types (export copies them)

    @property
    def arch(self) -> str:
        return self.metadata.get("general.architecture", "?")

    def get(self, key: str, default=None):
        """An `{arch}.`-prefixed hyperparameter, e.g. get("block_count")."""
        return self.metadata.get(f"{self.arch}.{key}", default)

    def types(self) -> dict[str, int]:
        """GGML type name -> how many tensors of it."""
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
        return dict(sorted(counts.items()))


def open_gguf(path: str | Path) -> GGUF:
    """The file's metadata and tensor index (memory-mapped, nothing decoded yet)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DuomemError(f"{path} is not a file; pass a .gguf model file (or use --fetch NAME)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise DuomemError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf model file")
    try:
        reader = GGUFReader(path)
        metadata = {key: _value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}
        tensors = {t.name: t for t in reader.tensors}
        fields = dict(reader.fields)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise DuomemError(
            f"{path} is a damaged or truncated GGUF file ({e.__class__.__name__}: {e}); download it again"
        )
    return GGUF(path, metadata, tensors, fields)


def _value(field):
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value


def dequantized(tensor) -> np.ndarray:
    """Float32 values in numpy order (rows first)."""
    kind = tensor.tensor_type
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        values = np.asarray(tensor.data, dtype=np.float32)
    else:
        try:
            values = dequantize(np.asarray(tensor.data), kind)
        except NotImplementedError:
            raise DuomemError(
                f"GGML type {kind.name} of {tensor.name} cannot be dequantized by the gguf package; "
                f"use a file with F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 or K-quant tensors"
            )
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return values.reshape(shape).astype(np.float32, copy=False)


def affine_blocks(tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(weight uint32 [rows, in*bits/32], scales float32 [rows, in/32], biases, bits) for a
    Q4_0 / Q4_1 / Q8_0 tensor: MLX's affine form w = scale * q + bias, exactly the file's values."""
    kind = tensor.tensor_type.name
    rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1, _block_bytes(kind))
    scale = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint32)
        bias = -128.0 * scale
    else:
        bias = -8.0 * scale if kind == "Q4_0" else blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        packed = blocks[..., 4 if kind == "Q4_1" else 2 :]
        # GGML keeps value j in the low nibble of byte j and value j + 16 in its high nibble
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.uint32)
    bits = KEEPABLE[kind]
    per_word = 32 // bits
    q = q.reshape(rows, -1, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :]
    weight = np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)
    return weight, scale, bias, bits


def _block_bytes(kind: str) -> int:
    return {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
