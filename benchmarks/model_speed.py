"""Prefill and decode rates of models side by side: the figures that size a teacher run before it starts.

Per model, after a warm-up pass: --prompt tokens prefilled in chunks of --chunk into a fresh prompt cache
(tokens/s), then --decode greedy tokens decoded one at a time at that context (tokens/s). On a Linux CPU run
it with the BLAS preload the CLI uses: LD_PRELOAD="$(python -m duomem_mlx.cpu.blas)" DUOMEM_OPENBLAS=0.

    python benchmarks/model_speed.py MODEL [MODEL ...] --json benchmarks/results/model_speed.json
"""

import argparse
import time

import mlx.core as mx
from common import versions, write_json
from mlx_lm.models.cache import make_prompt_cache

from duomem_mlx.runtime.decode import prefill
from duomem_mlx.runtime.models import load


def prefill_rate(model, ids: list[int], cache: list, chunk: int) -> float:
    start = time.perf_counter()
    prefill(model, cache, ids, chunk)
    return len(ids) / (time.perf_counter() - start)


def decode_rate(model, cache: list, tokens: int) -> float:
    y = mx.array([[5]])
    start = time.perf_counter()
    for _ in range(tokens):
        y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)[None]
        mx.eval(y)
    return tokens / (time.perf_counter() - start)


def measure(path: str, prompt: int, chunk: int, decode: int) -> dict:
    model, _ = load(path)
    ids = [100 + i % 5000 for i in range(prompt)]
    prefill(model, make_prompt_cache(model), ids[:16], chunk)  # warm-up
    cache = make_prompt_cache(model)
    prefill_speed = prefill_rate(model, ids, cache, chunk)
    return {
        "model": path,
        "prefill_tokens_per_s": round(prefill_speed, 1),
        "decode_tokens_per_s": round(decode_rate(model, cache, decode), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--prompt", type=int, default=1024, help="tokens prefilled")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk")
    parser.add_argument("--decode", type=int, default=16, help="tokens decoded after the prompt")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    rows = []
    print(f"{'model':60} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for path in args.models:
        rows.append(measure(path, args.prompt, args.chunk, args.decode))
        print(
            f"{path[-60:]:60} {rows[-1]['prefill_tokens_per_s']:>14} {rows[-1]['decode_tokens_per_s']:>13}", flush=True
        )
    write_json(
        args.json,
        {"versions": versions(), "prompt": args.prompt, "chunk": args.chunk, "decode": args.decode, "rows": rows},
    )


if __name__ == "__main__":
    main()
