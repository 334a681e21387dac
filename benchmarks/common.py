"""What every benchmark result carries: the machine and versions, and the model it ran."""

import json
import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx

from duomem_mlx.runtime.models import size_of


def versions() -> dict:
    return {
        "machine": f"{platform.machine()} {platform.system()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "device": str(mx.default_device()),
    }


model_config = size_of  # hidden_size, num_hidden_layers, vocab_size of a model directory


def write_json(path: str | Path, result: dict) -> None:
    """Written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def llama_cpp_no_repack() -> None:
    """llama.cpp loads weights without its extra CPU buffer types (weight repacking, AMX), as its
    `--no-repack` does. llama-cpp-python 0.3.36 built natively on this VM segfaults on the first pass
    of any quantized GGUF with them (F32 runs); Q4_1 has no repacked CPU kernel to lose."""
    import llama_cpp.llama_cpp as api  # noqa: PLC0415 (optional: the [llamacpp] extra)

    defaults = api.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    api.llama_model_default_params = params


def llama_cpp_server_command(no_repack: bool) -> list[str]:
    """llama-cpp-python's OpenAI server, optionally with `llama_cpp_no_repack` applied first."""
    if not no_repack:
        return [sys.executable, "-m", "llama_cpp.server"]
    launch = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import common; common.llama_cpp_no_repack(); "
        "from llama_cpp.server.__main__ import main; main()"
    )
    return [sys.executable, "-c", launch]
