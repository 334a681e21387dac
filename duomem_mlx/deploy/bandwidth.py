"""The memory bandwidth this machine really has, the bound of bench's decode roofline.

STREAM's way: arrays of 4x the last-level cache, every core (one thread each, numpy releases the
GIL), the best of several runs; kernels copy (a = b), add (a = b + c) and read (a sum), the three
moving 2, 3 and 1 arrays' bytes; numpy's matrix-vector product (its BLAS on every core); and MLX's
own (a matrix-vector product and a sum: on a Mac, the GPU's). The fastest is the machine's. An
MLX sum on a CPU runs on one core and MLX's one-row product through Debian's OpenBLAS reads at a
third of numpy's (6-10 against 27-30 GB/s on a 2-core EPYC, where llama.cpp decodes 22 GB/s):
probed through MLX alone, the roofline flattered MLX's decode. Measured once per machine and
kept in the cache dir (`bandwidth.json`)."""

import json
import os
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

from duomem_mlx.io import cache_root, write_atomic

REPEATS = 5
FALLBACK_CACHE = 32 * 2**20  # when the system does not say


def last_level_cache() -> int:
    """Bytes of the largest CPU cache (Linux sysfs, macOS sysctl)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
    if platform.system() == "Darwin":
        for key in ("hw.l3cachesize", "hw.l2cachesize"):
            out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True).stdout.strip()
            sizes.append(int(out) if out.isdigit() else 0)
    return max(sizes, default=0) or FALLBACK_CACHE


def best(run, repeats: int) -> float:
    """The shortest of `repeats` timed runs, after one untimed."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def stream(nbytes: int, threads: int, repeats: int) -> dict[str, float]:
    """GB/s of copy, add and read over float32 arrays of `nbytes` each, split across `threads`."""
    a, b, c = (np.ones(nbytes // 4, np.float32) for _ in range(3))
    parts = [slice(i * a.size // threads, (i + 1) * a.size // threads) for i in range(threads)]
    kernels = {
        "copy": (2, lambda s: np.copyto(a[s], b[s])),
        "add": (3, lambda s: np.add(b[s], c[s], out=a[s])),
        "read": (1, lambda s: b[s].sum()),
    }
    with ThreadPoolExecutor(threads) as pool:
        return {
            name: arrays * a.nbytes / best(lambda: list(pool.map(kernel, parts)), repeats) / 1e9
            for name, (arrays, kernel) in kernels.items()
        }


def numpy_matvec(nbytes: int, repeats: int) -> float:
    """GB/s of numpy's float32 matrix-vector product over `nbytes` of matrix (its BLAS, all cores)."""
    w = np.ones((nbytes // 16384, 4096), np.float32)
    v = np.ones(4096, np.float32)
    return w.nbytes / best(lambda: w @ v, repeats) / 1e9


def mlx_reads(nbytes: int, repeats: int) -> float:
    """GB/s of MLX's fastest read, a matrix-vector product or a sum, on its default device."""
    w = mx.ones((nbytes // 16384, 4096))
    v = mx.ones((4096,))
    mx.eval(w, v)
    return max(w.nbytes / best(lambda: mx.eval(read()), repeats) / 1e9 for read in (lambda: w @ v, lambda: w.sum()))


def probe(nbytes: int | None = None, threads: int | None = None, repeats: int = REPEATS) -> dict[str, float]:
    """GB/s of every kernel, uncached; `best` is the machine's bandwidth."""
    nbytes = nbytes or 4 * last_level_cache()
    rates = stream(nbytes, threads or os.cpu_count() or 1, repeats)
    rates |= {"numpy_matvec": numpy_matvec(nbytes, repeats), "mlx": mlx_reads(nbytes, repeats)}
    return {k: round(v, 2) for k, v in rates.items()} | {"best": round(max(rates.values()), 2), "bytes": nbytes}


def machine_key() -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "host": platform.node(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "memory": memory,
        "device": str(mx.default_device()),
    }


def bandwidth() -> dict[str, float]:
    """This machine's probe, measured on the first call and read from the cache dir after."""
    path = cache_root() / "bandwidth.json"
    key = machine_key()
    try:
        cached = json.loads(path.read_text())
        if cached.get("machine") == key:
            return cached["gb_s"]
    except (OSError, ValueError, AttributeError):
        pass
    rates = probe()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        path,
        json.dumps({"machine": key, "gb_s": rates, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n",
    )
    return rates
