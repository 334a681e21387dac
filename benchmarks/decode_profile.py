"""Where a decoded token's time goes: the whole one-token pass (a KV cache holding --context
tokens), then its parts timed apart on the same shapes: the blocks' matrix-vector products, the
head, attention (RoPE + scaled_dot_product_attention over the cache), norms and elementwise ops
(RMSNorm, SwiGLU, residual adds), and the Python side (building the lazy graph, before eval). What
the parts leave is scheduling and what timing them apart misses. Each model three times: as the
package loads it (quantized one-row products through the kernel `cpu_kernel` builds), with MLX's
quantized kernel on a CPU stream per core (`streams`, the package before that kernel) and on one
thread (`before`, as mlx-lm runs it), with the greedy tokens compared; `--column-major` adds
the pass with dense weights stored transposed (what FACTS.md measured 17.9 against 10.5 GB/s on
one matrix; no gain on a whole model here, so the package keeps the saved layout).

    duomem-mlx quantize --model SMOLLM2 --bits 4 --group-size 32 --dtype float32 --out smollm2-4bit
    python benchmarks/decode_profile.py --column-major --model SMOLLM2 --model smollm2-4bit \\
        --json benchmarks/results/decode_profile_smollm2.json
"""

import argparse
import contextlib
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from common import model_config, versions, write_json
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from duomem_mlx.cpu import kernel as cpu_kernel
from duomem_mlx.cpu import quant as cpu_quant
from duomem_mlx.deploy.bandwidth import best
from duomem_mlx.runtime.decode import forward
from duomem_mlx.runtime.models import default_corpus, load

FORMS = ("before", "streams", "package", "column_major")


def best_ms(run, repeats: int) -> float:
    return 1000 * best(run, repeats)


def decode(model, cache, token: int, steps: int) -> tuple[list[int], float]:
    """`steps` greedy tokens from `token`; (tokens, seconds spent building graphs); the cache is cut back after."""
    ids, building = [token], 0.0
    for _ in range(steps):
        start = time.perf_counter()
        y = model(mx.array([[ids[-1]]]), cache=cache)[:, -1].argmax(-1)
        building += time.perf_counter() - start
        ids.append(y.item())
    trim_prompt_cache(cache, steps)
    return ids[1:], building


def blocks_linears(model) -> list:
    return [
        m
        for name, m in model.named_modules()
        if ".layers." in f".{name}"
        and hasattr(m, "weight")
        and m.weight.ndim == 2
        and not isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))
    ]


def head_of(model):
    head = getattr(model, "lm_head", None) or getattr(getattr(model, "language_model", None), "lm_head", None)
    if head is not None:
        return head
    return next(m for name, m in model.named_modules() if name.endswith("embed_tokens")).as_linear


def parts_ms(model, context: int, repeats: int) -> dict:
    """ms a token of each part, timed apart on decode's shapes."""
    args = model.args
    layers = len(model.layers)
    hidden, heads = args.hidden_size, args.num_attention_heads
    kv_heads = getattr(args, "num_key_value_heads", heads) or heads
    head_dim = getattr(args, "head_dim", None) or hidden // heads
    dtype = next(
        p.dtype
        for _, p in nn.utils.tree_flatten(model.parameters())
        if p.dtype in (mx.float32, mx.float16, mx.bfloat16)
    )
    linears = blocks_linears(model)
    inputs = [
        mx.random.normal((1, 1, m.weight.shape[1] * (32 // m.bits if hasattr(m, "bits") else 1))).astype(dtype)
        for m in linears
    ]
    x = mx.random.normal((1, 1, hidden)).astype(dtype)
    q = mx.random.normal((1, heads, 1, head_dim)).astype(dtype)
    k, v = (mx.random.normal((1, kv_heads, context, head_dim)).astype(dtype) for _ in range(2))
    gate = mx.random.normal((1, 1, args.intermediate_size)).astype(dtype)
    norm = mx.ones((hidden,), dtype)
    mx.eval(inputs, x, q, k, v, gate, norm)
    rope = nn.RoPE(
        head_dim, traditional=getattr(args, "rope_traditional", False), base=getattr(args, "rope_theta", 10000)
    )
    head = head_of(model)

    def attention():
        return [
            mx.fast.scaled_dot_product_attention(rope(q, offset=context), k, v, scale=head_dim**-0.5)
            for _ in range(layers)
        ]

    def elementwise():
        return [
            (mx.fast.rms_norm(x, norm, 1e-5) + x, mx.fast.rms_norm(x, norm, 1e-5) + x, nn.silu(gate) * gate)
            for _ in range(layers)
        ]

    return {
        "matmuls_ms": best_ms(lambda: mx.eval([m(i) for m, i in zip(linears, inputs)]), repeats),
        "head_ms": best_ms(lambda: mx.eval(head(x)), repeats),
        "attention_ms": best_ms(lambda: mx.eval(attention()), repeats),
        "norms_elementwise_ms": best_ms(lambda: mx.eval(elementwise()), repeats),
    }


def profile(model, tokens: list[int], steps: int, repeats: int) -> dict:
    cache = make_prompt_cache(model)
    mx.eval(forward(model, cache, tokens, 256))
    ids, _ = decode(model, cache, tokens[-1], steps)
    total = best_ms(lambda: decode(model, cache, tokens[-1], steps), repeats) / steps
    building = min(decode(model, cache, tokens[-1], steps)[1] for _ in range(repeats)) * 1000 / steps
    parts = parts_ms(model, len(tokens), repeats)
    return {
        "token_ms": total,
        **parts,
        "python_graph_ms": building,
        "unaccounted_ms": total - sum(parts.values()) - building,
        "greedy_tokens": ids,
    }


@contextlib.contextmanager
def mlx_kernel(one_thread: bool):
    """MLX's quantized kernel instead of the package's: on a CPU stream per core, or on one thread."""
    kernels, streams = cpu_kernel.kernels, cpu_quant.cpu_streams
    cpu_kernel.kernels = lambda: None
    if one_thread:
        cpu_quant.cpu_streams = lambda: [mx.default_stream(mx.cpu)]
    try:
        yield
    finally:
        cpu_kernel.kernels, cpu_quant.cpu_streams = kernels, streams


def column_major(model) -> None:
    """Every dense Linear and Embedding weight stored transposed: the same values and shape."""
    for _, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight = mx.contiguous(module.weight.T).T
    mx.eval(model.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="mlx-lm model directory (repeat for several)")
    parser.add_argument("--context", type=int, default=512, help="tokens in the cache before decoding")
    parser.add_argument("--tokens", type=int, default=16, help="tokens decoded a run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--column-major", action="store_true", help="also with dense weights stored transposed")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    rows = []
    for path in args.model:
        model, tokenizer = load(path)
        tokens = (tokenizer.encode(default_corpus()) * 4)[: args.context]
        row = {
            "model": path,
            "model_config": model_config(path),
            "package": profile(model, tokens, args.tokens, args.repeats),
        }
        if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
            for form, one_thread in (("streams", False), ("before", True)):
                with mlx_kernel(one_thread):
                    row[form] = profile(model, tokens, args.tokens, args.repeats)
        if args.column_major:
            column_major(model)
            row["column_major"] = profile(model, tokens, args.tokens, args.repeats)
        row["same_greedy_tokens"] = all(
            row[f]["greedy_tokens"] == row["package"]["greedy_tokens"] for f in row if f in FORMS
        )
        rows.append(row)
        del model
    columns = [(r, form) for r in rows for form in FORMS if form in r]
    keys = [k for k in rows[0]["package"] if k.endswith("_ms")]
    print(f"{'ms a token':22}" + "".join(f"{Path(r['model']).name[:22] + ' ' + form:>32}" for r, form in columns))
    for key in keys:
        print(f"{key:22}" + "".join(f"{r[form][key]:32.2f}" for r, form in columns))
    print("same greedy tokens: " + ", ".join(f"{Path(r['model']).name} {r['same_greedy_tokens']}" for r in rows))
    write_json(
        args.json,
        {"context": args.context, "decode_tokens": args.tokens, "repeats": args.repeats, "models": rows, **versions()},
    )


if __name__ == "__main__":
    main()
