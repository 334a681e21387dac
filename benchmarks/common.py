"""What every benchmark result carries: the machine and versions, and the model it ran."""

import json
import os
import platform
from pathlib import Path

import mlx.core as mx


def versions() -> dict:
    from importlib.metadata import version

    return {"machine": f"{platform.machine()} {platform.system()} {platform.processor() or ''}".strip(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "mlx": version("mlx"), "mlx_lm": version("mlx-lm"), "device": str(mx.default_device())}


def model_config(path: str | Path) -> dict:
    """hidden_size, num_hidden_layers and vocab_size of a local mlx-lm model directory."""
    config = json.loads((Path(path) / "config.json").read_text())
    config = {**config.get("text_config", {}), **config}
    return {k: config.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}


def write_json(path: str | Path, result: dict) -> None:
    """Written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
