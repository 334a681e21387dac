"""Linux CPU speed: the `mlx[cpu]` wheel links a reference BLAS (~6 GFLOP/s on a 1024²
matmul); preloading Debian's OpenBLAS (`libopenblas0-pthread`) gives ~100-190. Never on macOS.

Before OpenBLAS goes a small library built here from `cpu/gemv_forward.c`: MLX computes a Linear
on one token (`x @ W.T`) with `cblas_sgemm`, which OpenBLAS on x86-64 runs through its packing
GEMM driver at a third of what its `sgemv` reads; the library sends one-row and one-column
products to `sgemv` and every other call on to OpenBLAS (float32 decoding 2-3x faster on a 2-core
EPYC). `make setup` builds it into the cache dir with the system's C compiler; without one,
OpenBLAS alone is preloaded and a note says so."""

import glob
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from duomem_mlx.io import cache_root, fsync

PATTERNS = (
    "/usr/lib/*/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
SOURCE = Path(__file__).with_name("gemv_forward.c")


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


def gemv_forward_path() -> Path:
    """Where the one-row forwarding library for this source lives (built or not)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return cache_root() / "blas" / f"libgemv_forward-{digest}.so"


def compiler(env: str = "CC", names: tuple[str, ...] = ("cc", "gcc", "clang")) -> str | None:
    """The compiler `$env` names, else the first of `names` on PATH."""
    return next((c for c in (os.environ.get(env), *names) if c and shutil.which(c)), None)


def compile_library(command: list[str], path: Path) -> str | None:
    """Run a compiler `command` that writes (`-o`) a shared library atomically (fsynced) into `path`; what went
    wrong, in one line, or None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([*command, "-o", tmp], check=True, capture_output=True, text=True)
        fsync(Path(tmp))  # a power cut after the rename must not leave a truncated library (SIGBUS on load)
        os.replace(tmp, path)
        fsync(path.parent)
        return None
    except subprocess.CalledProcessError as error:
        return " ".join(error.stderr.split())[:300] or f"{command[0]} exited with status {error.returncode}"
    except OSError as error:
        return str(error)
    finally:
        Path(tmp).unlink(missing_ok=True)


def build_gemv_forward() -> Path | None:
    """Build the forwarding library once; None off Linux or without a C compiler."""
    if sys.platform != "linux":
        return None
    path = gemv_forward_path()
    if path.exists():
        return path
    cc = compiler()
    if cc is None:
        return None
    failure = compile_library([cc, "-O2", "-fPIC", "-shared", str(SOURCE), "-ldl"], path)
    if failure:
        print(f"duomem-mlx: could not build {path.name} with {cc}: {failure}", file=sys.stderr)
        return None
    return path


def preload() -> list[str]:
    """What to put in LD_PRELOAD, in order: the forwarding library (built if missing) and OpenBLAS.

    Empty off Linux or without OpenBLAS; OpenBLAS alone without a C compiler."""
    lib = openblas_path()
    if lib is None:
        return []
    forward = build_gemv_forward()
    return [str(forward), lib] if forward else [lib]


MISSING = (
    "duomem-mlx: no C compiler to build the one-row BLAS forward (cpu/gemv_forward.c), so MLX's one-row "
    "products run through OpenBLAS's sgemm, ~2-3x slower float32 decoding; install one "
    "('apt-get install gcc') and run 'make setup' or 'python -m duomem_mlx.cpu.blas'"
)


def reexec_with_openblas() -> None:
    """Restart this process with `preload()` in LD_PRELOAD, once, when it helps.

    LD_PRELOAD only works at process start, so the CLI re-executes itself before MLX is
    imported. DUOMEM_OPENBLAS=0 turns it off."""
    if os.environ.get("DUOMEM_OPENBLAS", "1") == "0" or not uses_reference_blas():
        return
    libs = preload()
    current = os.environ.get("LD_PRELOAD", "")
    if not libs or all(lib in current for lib in libs):
        return
    if len(libs) == 1:
        print(MISSING, file=sys.stderr)
    env = dict(os.environ, LD_PRELOAD=" ".join([*libs, current]).strip(), DUOMEM_OPENBLAS="0")
    os.execve(sys.executable, [sys.executable, "-m", "duomem_mlx", *sys.argv[1:]], env)


if __name__ == "__main__":  # `python -m duomem_mlx.cpu.blas` builds what it can and prints LD_PRELOAD's value
    if uses_reference_blas():
        libs = preload()
        if len(libs) == 1:
            print(MISSING, file=sys.stderr)
        print(" ".join(libs))
