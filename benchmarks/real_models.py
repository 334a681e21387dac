"""The real models PyPI wheels carry, as `duomem-mlx convert` writes them, in each form: load
time, prefill and decode tokens/s (the session's own decode.forward into a fresh cache, best of
--repeats), and one LoRA step on the last blocks (mlx-lm's tuner layers), in one run.

    python benchmarks/real_models.py --json benchmarks/results/real_models.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tuner.utils import linear_to_lora_layers

from duomem_mlx.convert import convert_gguf
from duomem_mlx.convert.fetch import fetch_gguf
from duomem_mlx.runtime.decode import forward
from duomem_mlx.runtime.models import default_corpus, load

FORMS = {  # name -> convert options
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "gguf-quant float32": {"dtype": "float32", "keep_quant": True},
}


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def speeds(model, tokens: list[int], decode_tokens: int, repeats: int) -> dict:
    def prefill():
        mx.eval(forward(model, make_prompt_cache(model), tokens, 256))

    def decode():
        cache = make_prompt_cache(model)
        mx.eval(forward(model, cache, tokens[:16], 256))
        token = mx.array([[tokens[16]]])
        for _ in range(decode_tokens):
            token = model(token, cache=cache)[:, -1:].argmax(-1)
            mx.eval(token)

    prefill()  # warm-up
    return {
        "prefill_tokens_per_s": round(len(tokens) / timed(prefill, repeats), 1),
        "decode_tokens_per_s": round(decode_tokens / timed(decode, repeats), 2),
    }


def lora_step_seconds(model, tokens: list[int], layers: int) -> float:
    """One optimizer step of rank-8 LoRA on the last `layers` blocks, batch 1 (the second of two)."""
    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    optimizer = optim.Adam(learning_rate=1e-4)
    batch = mx.array(tokens)[None]

    def loss(m):
        return nn.losses.cross_entropy(m(batch[:, :-1]), batch[:, 1:]).mean()

    step = nn.value_and_grad(model, loss)

    def one():
        value, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(value, model.parameters(), optimizer.state)

    one()
    return timed(one, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--lora-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        source = fetch_gguf(name)
        for form, options in FORMS.items():
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                convert_gguf(source, Path(tmp) / "m", **options)
                convert_s = time.perf_counter() - start
                start = time.perf_counter()
                model, tokenizer = load(str(Path(tmp) / "m"))
                mx.eval(model.parameters())
                load_s = time.perf_counter() - start
                tokens = tokenizer.encode(default_corpus())[: args.prompt_tokens]
                row = {
                    "model": name,
                    "form": form,
                    "convert_s": round(convert_s, 1),
                    "load_s": round(load_s, 2),
                    "bytes": sum(f.stat().st_size for f in (Path(tmp) / "m").glob("*.safetensors")),
                    **speeds(model, tokens, args.decode_tokens, args.repeats),
                }
                if form == "float32":
                    row["lora_step_s"] = round(lora_step_seconds(model, tokens, args.lora_layers), 2)
                config = json.loads((Path(tmp) / "m" / "config.json").read_text())
                row["model_config"] = {k: config[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
            rows.append(row)
            print(
                f"{name:22s} {form:20s} convert {row['convert_s']:5.1f}s  load {row['load_s']:5.2f}s  "
                f"{row['bytes'] / 1e6:7.1f} MB  prefill {row['prefill_tokens_per_s']:7.1f} tok/s  "
                f"decode {row['decode_tokens_per_s']:6.2f} tok/s"
                + (f"  LoRA step {row['lora_step_s']} s" if "lora_step_s" in row else ""),
                flush=True,
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "device": str(mx.default_device()),
                    "prompt_tokens": args.prompt_tokens,
                    "decode_tokens": args.decode_tokens,
                    "lora_layers": args.lora_layers,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
