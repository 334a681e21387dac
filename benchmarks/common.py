"""What every benchmark result carries: the machine and versions, and the model it ran; the real servers
benchmarks run as peers on loopback (`mlx_lm.server`, llama.cpp's)."""

import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
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


class Peer:
    """A real OpenAI-compatible server on loopback, started and stopped here."""

    label = ""

    def __init__(self, command: list[str], model: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.model = model
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(
                        f"Error: {self.label} exited at start; run `{' '.join(command)}` by hand to see why"
                    )
                time.sleep(0.2)
        self.close()
        raise SystemExit(f"Error: {self.label} did not start within 120 s")

    def chat(self, messages: list[dict], **body) -> dict:
        data = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": 0.0,
                "chat_template_kwargs": {"enable_thinking": False},
                **body,
            }
        ).encode()  # as our Session renders
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())

    def close(self):
        self.proc.kill()
        self.proc.wait(timeout=10)


class MlxLmServer(Peer):
    """`mlx_lm.server` on the model directory, default settings."""

    label = "mlx_lm.server"

    def __init__(self, model_path: str):
        super().__init__([sys.executable, "-m", "mlx_lm.server", "--model", model_path], model_path)
        self.bytes = weight_bytes(model_path)


class LlamaCppServer(Peer):
    """llama-cpp-python's server on a GGUF file: its default settings but the context and threads ours has."""

    label = "llama.cpp server"

    def __init__(self, gguf: str, context: int, no_repack: bool = False):
        try:
            import llama_cpp.server.app  # noqa: F401, PLC0415 (optional; the package imports without its [server] extras)
        except ImportError:
            raise SystemExit(
                "Error: --peer llama_cpp needs llama.cpp's server: pip install 'llama-cpp-python[server]' "
                "(builds llama.cpp from source with cmake and a C++ compiler: ~6 min on 2 cores for 0.3.36)"
            )
        super().__init__(
            [
                *llama_cpp_server_command(no_repack),
                "--model",
                gguf,
                "--n_ctx",
                str(context),
                "--n_threads",
                str(os.cpu_count()),
                "--n_threads_batch",
                str(os.cpu_count()),
            ],
            gguf,
        )
        self.bytes = Path(gguf).stat().st_size


def weight_bytes(model_path: str) -> int:
    return sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
