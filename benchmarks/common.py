"""What every benchmark result carries: the machine and versions, and the model it ran."""

import json
import os
import platform
from pathlib import Path

import mlx.core as mx

from duomem_mlx.models import size_of


def versions() -> dict:
    from importlib.metadata import version

    return {"machine": f"{platform.machine()} {platform.system()} {platform.processor() or ''}".strip(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "mlx": version("mlx"), "mlx_lm": version("mlx-lm"), "device": str(mx.default_device())}


model_config = size_of  # hidden_size, num_hidden_layers, vocab_size of a model directory


def write_json(path: str | Path, result: dict) -> None:
    """Written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
