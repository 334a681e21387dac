"""GPU memory as mlx-lm handles it. On a Mac the GPU shares the machine's memory, and Metal
reports how much of it a process should keep in use (`mx.device_info()`'s
`max_recommended_working_set_size`, below its `memory_size`). mlx-lm's generate, server and
trainer wire that much while they work, so the model's buffers stay resident instead of paging;
here generation (chat, eval), training (distill, calibration) and bench do the same, and a model
or a training step larger than that size is named in one line before it crawls. A CPU and CUDA
report no such size: there the limit is left alone and nothing is said."""

import contextlib
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.utils import maybe_set_recommended_wired_limit


def working_set() -> int | None:
    """The GPU's recommended working set in bytes, None where MLX reports none (a CPU, CUDA)."""
    return mx.device_info().get("max_recommended_working_set_size")


@contextlib.contextmanager
def wired_limit():
    """The wired limit at the recommended working set while the block runs, the previous one after
    (mlx-lm's `generate.wired_limit`, without its model-size warning: `warn_if_over` says it once)."""
    previous = maybe_set_recommended_wired_limit()
    try:
        yield
    finally:
        if previous is not None:  # the limit must not change under a running evaluation: mlx-lm's generate_step
            mx.synchronize(generation_stream)  # (bench's throughput) evaluates ahead on a stream of its own
            mx.synchronize()
            mx.set_wired_limit(previous)


def bytes_text(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def warn_if_over(nbytes: int, what: str, fix: str) -> bool:
    """One line on stderr when `nbytes` exceed the recommended working set, with the device's
    figures; whether it was said."""
    limit = working_set()
    if not limit or nbytes <= limit:
        return False
    info = mx.device_info()
    device = info.get("device_name") or info.get("architecture", "this GPU")
    total = f", of {bytes_text(info['memory_size'])} memory" if info.get("memory_size") else ""
    print(
        f"warning: {what} takes {bytes_text(nbytes)}, more than the {bytes_text(limit)} {device} recommends "
        f"keeping in use{total} (mx.device_info()): it will page and run slowly; {fix}",
        file=sys.stderr,
    )
    return True


def warn_before_loading(model_dir: str) -> None:
    """Before a load: the weights' bytes on disk (a local directory: a Hub id's snapshot) against
    the working set."""
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    warn_if_over(weights, f"loading {model_dir}", "use a smaller or quantized model (duomem-mlx quantize --bits 4)")
