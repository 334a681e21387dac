"""Linux CPU speed: the `mlx[cpu]` wheel links a reference BLAS (~6 GFLOP/s on a 1024²
matmul); preloading Debian's OpenBLAS (`libopenblas0-pthread`) gives ~190. Never on macOS."""

import glob
import importlib.metadata
import os
import sys

PATTERNS = (
    "/usr/lib/*/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)


def openblas_path() -> str | None:
    if sys.platform != "linux":
        return None
    for pattern in PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def uses_reference_blas() -> bool:
    try:
        importlib.metadata.version("mlx-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def reexec_with_openblas() -> None:
    """Restart this process with OpenBLAS preloaded, once, when it helps.

    LD_PRELOAD only works at process start, so the CLI re-executes itself before MLX is
    imported. DUOMEM_OPENBLAS=0 turns it off."""
    if os.environ.get("DUOMEM_OPENBLAS", "1") == "0" or not uses_reference_blas():
        return
    lib = openblas_path()
    preload = os.environ.get("LD_PRELOAD", "")
    if lib is None or lib in preload:
        return
    env = dict(os.environ, LD_PRELOAD=f"{lib} {preload}".strip(), DUOMEM_OPENBLAS="0")
    os.execve(sys.executable, [sys.executable, "-m", "duomem_mlx", *sys.argv[1:]], env)


if __name__ == "__main__":  # `python -m duomem_mlx.blas` prints the library for LD_PRELOAD
    if uses_reference_blas() and openblas_path():
        print(openblas_path())
