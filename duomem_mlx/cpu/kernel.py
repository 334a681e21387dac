"""Quantized layers on a Linux CPU: `cpu/quantized_matvec.cpp`, an MLX extension (a primitive of
its own, bound with nanobind in MLX's domain) built here once with the system's C++ compiler.

MLX's CPU quantized product and dequantize are scalar loops on one thread (~1.5 G weights/s on an
x86 core), so a 4-bit package decoded 3x slower than float32 and spent most of a short prefill
dequantizing. The extension's `quantized_matvec` (1 to 8 rows) and `dequantize` unpack eight
weights at a time (AVX2); a head's output rows are split across the cores (OpenMP). `cpu_quant`
uses them when the extension built and gives MLX's values on a probe layer; otherwise MLX's
kernels, with a one-line note. A newly built (or changed) library is first loaded and probed in a
child process, so a broken one (a truncated file, a foreign libmlx) costs a fallback, not the run;
the library that passed is remembered by its sha256 (`.ok`), a failure by its reason (`.failed`),
so no process builds or probes again. `make setup` (`python -m duomem_mlx.cpu.kernel`) forgets a
failure and tries again; DUOMEM_CPU_KERNEL=0 turns it off. Never on macOS, where MLX's Metal
kernels are the fast path."""

import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import platform
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import mlx.core as mx

from duomem_mlx.cpu.blas import compile_library, compiler
from duomem_mlx.errors import DuomemError
from duomem_mlx.io import cache_root, write_atomic

SOURCE = Path(__file__).with_name("quantized_matvec.cpp")
MODULE = "_quantized_matvec"


def cpu_flags() -> str:
    """The CPU's feature flags (the library is built with -march=native)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


def mlx_dir() -> str:
    """The installed MLX (the folder of mlx.core): `mlx` is a namespace package, so an unrelated
    `mlx/` folder in the working directory may come first among its locations."""
    return str(Path(importlib.util.find_spec("mlx.core").origin).resolve().parent)


def library_path() -> Path:
    """Where the extension for this source, MLX, nanobind, Python and CPU lives (built or not)."""
    key = [SOURCE.read_text(), sys.version, platform.machine(), cpu_flags(), mlx_dir()]  # it links this MLX's libmlx
    key += [importlib.metadata.version(name) for name in ("mlx", "nanobind")]
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:12]
    return cache_root() / "cpu_kernel" / f"{MODULE}-{digest}{importlib.machinery.EXTENSION_SUFFIXES[0]}"


def compile_command(compiler: str) -> list[str]:
    import nanobind  # noqa: PLC0415 (a dependency on Linux only, where this builds)

    mlx, nb = Path(mlx_dir()), Path(nanobind.__file__).parent
    return [
        compiler,
        "-O3",
        "-march=native",
        "-fopenmp",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-fvisibility=hidden",
        "-fno-strict-aliasing",
        "-DNB_COMPACT_ASSERTIONS",
        "-DNB_DOMAIN=mlx",  # MLX binds its arrays in domain mlx
        f"-I{mlx / 'include'}",
        f"-I{nb / 'include'}",
        f"-I{nb / 'ext' / 'robin_map' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}",
        str(SOURCE),
        str(nb / "src" / "nb_combined.cpp"),
        f"-L{mlx / 'lib'}",
        "-lmlx",
        f"-Wl,-rpath,{mlx / 'lib'}",
    ]


def build() -> Path | None:
    """Build the extension once; None (with a note) where it cannot be built: a failed build is
    remembered (`.failed`)."""
    cxx = compiler("CXX", ("c++", "g++", "clang++"))
    if cxx is None or importlib.util.find_spec("nanobind") is None:
        print(
            "duomem-mlx: no C++ compiler or no nanobind to build the CPU quantized kernel, so quantized packages "
            "decode through MLX's kernel, ~3x slower; install g++ and run 'make setup'",
            file=sys.stderr,
        )
        return None
    path = library_path()
    if path.exists():
        return path
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        print(
            "duomem-mlx: no Python headers (Python.h) to build the CPU quantized kernel; install python3-dev "
            "and run 'make setup'",
            file=sys.stderr,
        )
        return None
    print("duomem-mlx: building the CPU quantized kernel once (~10 s)", file=sys.stderr)
    failure = compile_library(compile_command(cxx), path)
    if failure:
        remember(path, "failed", f"could not build it with {cxx}: {failure}")
        print(
            f"duomem-mlx: could not build the CPU quantized kernel with {cxx} ({failure}), so quantized "
            "packages decode through MLX's kernel, ~3x slower; fix that and run 'make setup'",
            file=sys.stderr,
        )
        return None
    return path


def marker(path: Path, kind: str) -> Path:
    return path.with_name(f"{path.name}.{kind}")


def remember(path: Path, kind: str, text: str) -> None:
    """Write the library's `.ok` or `.failed` marker; a read-only cache remembers nothing."""
    try:
        write_atomic(marker(path, kind), text + "\n")
    except DuomemError:
        pass


def checked(path: Path) -> str | None:
    """None when the library at `path` is the one a child process loaded and probed (its sha256 is
    in `.ok`); else probe it in a child process now: what went wrong, remembered, or None."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    stamp = marker(path, "ok")
    if stamp.exists() and stamp.read_text().strip() == digest:
        return None
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); from duomem_mlx.cpu import kernel as cpu_kernel; "
        "sys.exit(0 if cpu_kernel.agrees(cpu_kernel.load(sys.argv[1])) else 3)"
    )
    package_parent = str(Path(__file__).resolve().parents[1])
    try:
        child = subprocess.run(
            [sys.executable, "-c", code, str(path), package_parent], capture_output=True, text=True, timeout=600
        )
        problem = probe_problem(child.returncode, child.stderr)
    except (OSError, subprocess.TimeoutExpired) as error:
        problem = f"its probe could not run ({error})"
    remember(path, "failed" if problem else "ok", problem or digest)
    return problem


def probe_problem(returncode: int, stderr: str) -> str | None:
    if returncode == 0:
        return None
    if returncode == 3:
        return "it disagrees with MLX's kernel on a probe layer"
    if returncode < 0:
        return f"loading it killed a child process with {signal.Signals(-returncode).name}"
    last = stderr.strip().splitlines()[-1:] or [f"exit status {returncode}"]
    return " ".join(last[0].split())[:200]


def load(path: str | Path):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def agrees(kernels) -> bool:
    """The extension gives MLX's values on a probe layer, 4 and 8 bits, on a CPU."""
    with mx.stream(mx.cpu):
        return all(agrees_at(kernels, bits) for bits in (4, 8))


def agrees_at(kernels, bits: int) -> bool:
    """One bit width: the dequantized layer, then the product on one and three rows."""
    weight = mx.random.normal((96, 256), key=mx.random.key(0))
    w, scales, biases = mx.quantize(weight, group_size=64, bits=bits)
    if not mx.allclose(
        kernels.dequantize(w, scales, biases, 64, bits), mx.dequantize(w, scales, biases, 64, bits), atol=1e-6
    ).item():
        return False
    for rows in (1, 3):
        x = mx.random.normal((rows, 256), key=mx.random.key(rows))
        expected = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=bits)
        if not mx.allclose(kernels.quantized_matvec(x, w, scales, biases, 64, bits), expected, atol=1e-4).item():
            return False
    return True


@functools.cache
def kernels():
    """The extension module (`quantized_matvec(x, w, scales, biases, group_size, bits)` and
    `dequantize(w, scales, biases, group_size, bits)`), or None."""
    if sys.platform != "linux" or os.environ.get("DUOMEM_CPU_KERNEL", "1") == "0":
        return None
    failed = known_failure()
    if failed:
        print(
            f"duomem-mlx: not using the CPU quantized kernel ({failed}, remembered in {failed_path().name}); "
            "quantized packages decode through MLX's kernel; fix that and run 'make setup' to try again",
            file=sys.stderr,
        )
        return None
    path = build()
    if path is None:
        return None
    os.environ.setdefault(
        "OMP_WAIT_POLICY", "passive"
    )  # idle OpenMP threads sleep: MLX's and BLAS's threads need the cores
    reason = checked(path)
    if reason is None:
        try:
            module = load(path)
            if agrees(module):
                return module
            reason = "it disagrees with MLX's kernel on a probe layer"
        except (ImportError, TypeError, ValueError, RuntimeError) as error:  # TypeError: nanobind ABI mismatch
            reason = " ".join(str(error).split())[:200]
        remember(path, "failed", reason)
    print(
        f"duomem-mlx: not using the CPU quantized kernel {path.name} ({reason}); quantized packages decode "
        "through MLX's kernel; fix that and run 'make setup' to try again",
        file=sys.stderr,
    )
    return None


def failed_path() -> Path | None:
    """Where this build's remembered failure is (None when it cannot be named: no nanobind)."""
    return marker(library_path(), "failed") if importlib.util.find_spec("nanobind") else None


def known_failure() -> str | None:
    path = failed_path()
    return path.read_text().strip() if path is not None and path.exists() else None


def forget() -> None:
    """Forget a remembered failure and the library that failed (`make setup` tries again)."""
    path = failed_path()
    if path is not None and path.exists():
        for stale in (library_path(), marker(library_path(), "ok"), path):
            stale.unlink(missing_ok=True)


if __name__ == "__main__":  # `python -m duomem_mlx.cpu.kernel` builds it (again after a failure), says if it is used
    forget()
    print(f"CPU quantized kernel: {library_path() if kernels() else 'not used (MLX kernel)'}")
