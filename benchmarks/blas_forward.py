"""MLX on a Linux CPU under each BLAS preload, alternating in one run: OpenBLAS alone, and the
one-row forward (duomem_mlx/cpu/gemv_forward.c) before it, as duomem-mlx preloads them. Per
preload, in a fresh process each: a one-row product `x @ W.T` over ~400 MB of float32 (GB/s),
SmolLM2's 1536 x 576 layer on one row (us), a 1024² matmul (GFLOP/s), and prefill / decode
tokens/s of each --model as benchmarks/kernels_vs_llama_cpp.py measures ours (512-token prompt,
32 decoded tokens, best of 3). The load average is kept with each figure: the ratio within one
round is what to read on a shared machine.

    python benchmarks/blas_forward.py --model ~/.cache/duomem-mlx/models/smollm2-135m-instruct-float32 \\
        --model smollm2-4bit --rounds 2 --json benchmarks/results/blas_forward.json
    # another library to compare: --preload NAME=LIB[:LIB...] (e.g. MKL's libmkl_rt.so with MKL_INTERFACE_LAYER=LP64)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import write_json

CHILD = r"""
import json, os, sys
sys.path.insert(0, {bench!r})
import mlx.core as mx
from duomem_mlx.deploy.bandwidth import best
mx.set_default_device(mx.cpu)

result = {{"load": os.getloadavg()[0]}}
w = mx.random.normal((400 * 2**20 // 4 // 576, 576)); x = mx.random.normal((1, 576)); mx.eval(w, x)
result["one_row_gb_s"] = round(w.nbytes / best(lambda: mx.eval(x @ w.T), 7) / 1e9, 2)
del w
layer = mx.random.normal((1536, 576)); mx.eval(layer)
result["one_row_1536x576_us"] = round(1e6 * best(lambda: mx.eval(x @ layer.T), 200), 1)
a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024)); mx.eval(a, b)
result["matmul_1024_gflop_s"] = round(2 * 1024**3 / best(lambda: mx.eval(a @ b), 7) / 1e9, 1)
if {model!r}:
    from real_models import speeds
    from duomem_mlx.runtime.models import default_corpus, load
    model, tokenizer = load({model!r})
    tokens = (tokenizer.encode(default_corpus()) * 4)[:512]
    result |= speeds(model, tokens, 32, 3)
result["load_after"] = os.getloadavg()[0]
print(json.dumps(result))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="mlx-lm model directory (repeat for several)")
    parser.add_argument("--preload", action="append", default=[], help="NAME=LIB[:LIB...], besides the two defaults")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from duomem_mlx.cpu import blas  # noqa: PLC0415 (this repository's package, put first on sys.path above)

    preloads = {"openblas": [blas.openblas_path()], "gemv_forward+openblas": blas.preload()}
    if None in preloads["openblas"] or len(preloads["gemv_forward+openblas"]) < 2:
        sys.exit(
            "needs Linux, Debian's OpenBLAS and a C compiler (python -m duomem_mlx.cpu.blas says which is missing)"
        )
    preloads |= {name: libs.split(":") for name, libs in (p.split("=", 1) for p in args.preload)}
    bench = str(Path(__file__).resolve().parent)
    runs = []
    for round_ in range(args.rounds):
        for model in [None, *args.model]:
            for name, libs in preloads.items():
                env = dict(os.environ, LD_PRELOAD=" ".join(libs), DUOMEM_OPENBLAS="0")
                out = subprocess.run(
                    [sys.executable, "-c", CHILD.format(bench=bench, model=model)],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if out.returncode:
                    sys.exit(f"{name}: {out.stderr[-2000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs.append({"round": round_, "preload": name, "model": model, **result})
                print(json.dumps(runs[-1]), flush=True)
    write_json(
        args.json,
        {
            "preloads": preloads,
            "runs": runs,
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "cpu_count": os.cpu_count(),
        },
    )


if __name__ == "__main__":
    main()
