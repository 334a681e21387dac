"""The adapters directory `duomem-mlx distill` writes: mlx-lm's adapters.safetensors +
adapter_config.json (what `mlx_lm.load(adapter_path=)` reads), and duomem.json, the run's summary
(student, teacher, cache, memory, losses, data, final metrics, settings), written last: a directory
holding it is a finished run."""

import json
from pathlib import Path

from duomem_mlx.errors import DuomemError
from duomem_mlx.formats import manifest
from duomem_mlx.io import write_atomic

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
SUMMARY = manifest.NAME
FIX = "train the adapters again with `duomem-mlx distill --force`"


def check_adapters(directory: str | Path) -> None:
    """Both files mlx-lm loads adapters from are there."""
    if not (Path(directory) / CONFIG).is_file() or not (Path(directory) / WEIGHTS).is_file():
        raise DuomemError(
            f"{directory} is not an mlx-lm adapter directory ({WEIGHTS} + {CONFIG}); "
            "pass the output of `duomem-mlx distill`"
        )


def write_adapter_config(directory: str | Path, config: dict) -> None:
    write_atomic(Path(directory) / CONFIG, json.dumps(config, indent=4).encode())


def finished(directory: str | Path) -> bool:
    """The run that writes `directory` got to its end (the summary is written last)."""
    return (Path(directory) / SUMMARY).exists()


def read_summary(directory: str | Path) -> dict:
    return manifest.read(directory, FIX)


def write_summary(directory: str | Path, summary: dict) -> None:
    write_atomic(Path(directory) / SUMMARY, json.dumps(summary, indent=1).encode())
