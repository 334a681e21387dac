"""Prefill cost by chunk size: one long prompt fed into a fresh KV cache in chunks of N tokens
(what `agent/decode.prefill_step` chooses), best of --repeats, in one run.

    python benchmarks/prefill_chunk.py --model M --tokens 820 --json benchmarks/results/prefill_chunk.json
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from duomem_mlx.runtime.decode import forward
from duomem_mlx.runtime.models import default_corpus, load


def prefill_ms(model, tokens: list[int], chunk: int) -> float:
    """The session's own prefill (`agent.decode.forward`) into a fresh cache, to the last logits."""
    cache = make_prompt_cache(model)
    start = time.perf_counter()
    mx.eval(forward(model, cache, tokens, chunk))
    return 1000 * (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=820)
    parser.add_argument("--chunks", type=int, nargs="+", default=[2048, 512, 256, 128, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    tokens = tokenizer.encode(default_corpus())[: args.tokens]
    prefill_ms(model, tokens, args.chunks[0])  # warm-up
    rows = {
        chunk: round(min(prefill_ms(model, tokens, chunk) for _ in range(args.repeats)), 1) for chunk in args.chunks
    }
    base = rows[args.chunks[0]]
    print(f"{'chunk':>6}{'ms':>9}{'x ' + str(args.chunks[0]):>10}   ({len(tokens)} tokens, {mx.default_device()})")
    for chunk, ms in rows.items():
        print(f"{chunk:6d}{ms:9.1f}{base / ms:10.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {"model": args.model, "tokens": len(tokens), "device": str(mx.default_device()), "prefill_ms": rows},
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
