"""Prefill and decode tokens/s alone, MLX vs llama.cpp on the same weights: the model directory
(as ours runs it) and its GGUF export (as llama.cpp runs it), the same token ids, each side
with every core. Says where a whole agent step's time goes (see agent_vs_server.py).

    python benchmarks/kernels_vs_llama_cpp.py --model ~/.cache/duomem-mlx/models/smollm2-135m-instruct-float32 \\
        --gguf-type f32 --json benchmarks/results/kernels_smollm2_f32.json
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from common import llama_cpp_no_repack, model_config, versions, write_json
from real_models import speeds

from duomem_mlx.convert.export import export_gguf, source_of
from duomem_mlx.runtime.models import default_corpus, load


def llama_cpp_speeds(gguf: str, tokens: list[int], decode_tokens: int, repeats: int) -> dict:
    from llama_cpp import Llama  # noqa: PLC0415 (optional: the [llamacpp] extra)

    llm = Llama(
        gguf,
        n_ctx=max(2048, len(tokens) + decode_tokens + 16),
        n_threads=os.cpu_count(),
        n_threads_batch=os.cpu_count(),
        n_batch=512,
        verbose=False,
    )

    def best(run) -> float:
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            llm.reset()
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times[1:])

    def decode():
        llm.eval(tokens[:16])
        for token in tokens[16 : 16 + decode_tokens]:  # one token a pass, as decoding feeds them
            llm.eval([token])

    return {
        "prefill_tokens_per_s": round(len(tokens) / best(lambda: llm.eval(tokens)), 1),
        "decode_tokens_per_s": round(decode_tokens / best(decode), 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local mlx-lm model directory `duomem-mlx convert` wrote")
    parser.add_argument("--gguf", help="llama.cpp's file (default: --model exported as --gguf-type)")
    parser.add_argument("--gguf-type", default="f32", choices=["f32", "f16", "q8_0", "q4_1", "q4_0"])
    parser.add_argument("--gguf-source", help="metadata for the export (default: the GGUF --model was converted from)")
    parser.add_argument(
        "--no-repack",
        action="store_true",
        help="llama.cpp without weight repacking or AMX buffers "
        "(0.3.36 built here segfaults on quantized files without it)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.no_repack:
        llama_cpp_no_repack()
    model, tokenizer = load(args.model)
    tokens = (tokenizer.encode(default_corpus()) * 4)[: args.prompt_tokens]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.gguf or str(Path(tmp) / "m.gguf")
        if not args.gguf:
            export_gguf(args.model, gguf, args.gguf_source or source_of(args.model), args.gguf_type)
        theirs = llama_cpp_speeds(gguf, tokens, args.decode_tokens, args.repeats)
        gguf_bytes = Path(gguf).stat().st_size
    ours = speeds(model, tokens, args.decode_tokens, args.repeats)
    print(f"{'tokens/s':12}{'MLX (ours)':>12}{'llama.cpp':>12}{'ratio':>8}")
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        print(f"{key.split('_')[0]:12}{ours[key]:12.1f}{theirs[key]:12.1f}{theirs[key] / ours[key]:8.2f}x")
    write_json(
        args.json,
        {
            "model": args.model,
            "model_config": model_config(args.model),
            "gguf_type": "as given" if args.gguf else args.gguf_type,
            "gguf_bytes": gguf_bytes,
            "no_repack": args.no_repack,
            "prompt_tokens": len(tokens),
            "decode_tokens": args.decode_tokens,
            "ours_mlx": ours,
            "llama_cpp": theirs,
            "device": str(mx.default_device()),
            **versions(),
        },
    )


if __name__ == "__main__":
    main()
