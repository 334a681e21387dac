"""duomem.json: the provenance duomem-mlx writes beside a model it made.

A converted model's (`convert`: converted_by, source {file, path, sha256, bytes, license...}, gguf,
dtype, kept_quant, requantized, quantized_layers, chat_template, eos_token_id) and a package's
(`quantize`: format, name, base, teacher, adapters, quantization, calibration, license, duomem_mlx,
created, results, bytes, bits_per_weight, memory; `bench` adds results.bench and the model card reads
it all). Distill's summary has the same name and is read the same way (formats/adapters.py).

Read through `read` (checked: a JSON object whose sections, where present, are objects or null);
written through `write` (atomic, indented by 2, a final newline)."""

import json
from pathlib import Path

from duomem_mlx.io import read_json, require, write_atomic

NAME = "duomem.json"
PACKAGE_FORMAT = 1
SECTIONS = ("source", "gguf", "quantization", "calibration", "memory", "results")
FIX = "write the model again (`duomem-mlx convert` or `duomem-mlx quantize`)"
PACKAGE_FIX = "write the package again with `duomem-mlx quantize`"


def path(directory: str | Path) -> Path:
    return Path(directory) / NAME


def read(directory: str | Path, fix: str = FIX) -> dict:
    """DIRECTORY/duomem.json; a damaged one (bad bytes, bad JSON, a wrong shape) is one DuomemError naming `fix`."""
    return read_json(path(directory), fix, check)


def check(data, where: str) -> dict:
    require(isinstance(data, dict), "expected a JSON object")
    for section in SECTIONS:
        require(isinstance(data.get(section), dict | None), f"{section} must be an object or null")
    return data


def write(directory: str | Path, meta: dict) -> None:
    write_atomic(path(directory), json.dumps(meta, indent=2) + "\n")
