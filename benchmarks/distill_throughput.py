"""Distillation throughput: `duomem-mlx distill` (CE + KD, and KD off) vs mlx-lm's own LoRA
trainer (`mlx_lm.lora`'s engine, `tuner.trainer.train`, CE only) on the same model, sequences,
LoRA layers, batch and steps, each in its own process (clean peak memory), in one run.

The data is a teacher cache of synthetic episodes whose top-k rows come from the model itself
(throughput does not depend on who the teacher is). Tokens/s counts the sequence tokens fed,
averaged over the report windows after the first (which holds the compile).

    python benchmarks/distill_throughput.py --json benchmarks/results/distill_throughput.json
    python benchmarks/distill_throughput.py --model mlx-community/Qwen3-0.6B-4bit --steps 40
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from common import model_config, versions, write_json
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs, train
from mlx_lm.tuner.utils import linear_to_lora_layers
from teacher_cache import synthetic_steps

from duomem_mlx.distill.data import build_dataset
from duomem_mlx.distill.train import DistillArgs, distill
from duomem_mlx.envs.base import Episode, Step
from duomem_mlx.formats.fingerprints import tokenizer_fingerprint
from duomem_mlx.formats.teacher_cache import CacheWriter
from duomem_mlx.runtime.models import load, make_tiny_model
from duomem_mlx.teacher.base import shard_arrays
from duomem_mlx.teacher.topk import forward_topk

REPORT = 5


def make_cache(model_path: str, out: Path, episodes: int, steps: int, k: int) -> None:
    model, tokenizer = load(model_path)
    writer = CacheWriter(
        out,
        {
            "teacher": f"mlx:{model_path}",
            "backend": "mlx",
            "top_k": k,
            "env": "bench",
            "vocab_size": model.model.embed_tokens.weight.shape[0],
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        },
    )
    for i in range(episodes):
        states = synthetic_steps(steps + i % 4, seed=i)
        episode = Episode(
            f"bench/{i}",
            "bench",
            "boil",
            i,
            "Your task is to boil water.",
            True,
            1.0,
            [Step(s.observation, s.admissible[0]) for s in states],
        )
        arrays = shard_arrays(tokenizer, episode)
        arrays.update(forward_topk(model, arrays["input_ids"], arrays["loss_mask"], k))
        writer.add(episode.to_json(), arrays)
    writer.finish([])


def run_duomem(args, kd: str) -> dict:
    out = Path(tempfile.mkdtemp()) / "adapters"
    distill(
        DistillArgs(
            student=args.model,
            cache=args.cache,
            out=str(out),
            kd=kd,
            iters=args.steps,
            batch_size=args.batch_size,
            num_layers=args.num_layers,
            only_success=False,
            val_fraction=0,
            warmup=0,
            steps_per_report=REPORT,
            steps_per_eval=10**9,
            save_every=10**9,
            learning_rate=1e-5,
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in rows[1:]])),
        "peak_mb": mx.get_peak_memory() / 1e6,
    }


def run_mlx_lm(args) -> dict:
    model, tokenizer = load(args.model)
    data = build_dataset(args.cache, tokenizer, kd=False, only_success=False, val_fraction=0, progress=False)
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, min(args.num_layers, len(model.layers)), {"rank": 8, "scale": 20.0, "dropout": 0.0})
    reports = []

    class Callback(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    adapter_file = Path(tempfile.mkdtemp()) / "adapters.safetensors"
    train(
        model,
        optim.Adam(learning_rate=1e-5),
        [(e.tokens.tolist(), 0) for e in data.train],
        args=TrainingArgs(
            batch_size=args.batch_size,
            iters=args.steps,
            steps_per_report=REPORT,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            adapter_file=str(adapter_file),
            max_seq_length=4096,
        ),
        training_callback=Callback(),
    )
    return {
        "tokens_per_s": float(np.mean([r["tokens_per_second"] for r in reports[1:]])),
        "peak_mb": mx.get_peak_memory() / 1e6,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="mlx-lm model (default: a tiny 4-layer, hidden-256 qwen3 made on the spot)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=16)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--episode-steps", type=int, default=12)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--json", help="Write the results here.")
    parser.add_argument("--worker", choices=["kd", "ce", "mlx_lm"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (
            run_mlx_lm(args) if args.worker == "mlx_lm" else run_duomem(args, "on" if args.worker == "kd" else "off")
        )
        print("RESULT " + json.dumps(result))
        return
    tmp = Path(tempfile.mkdtemp())
    if not args.model:
        args.model = str(make_tiny_model(tmp / "model", layers=4, hidden=256))
    make_cache(args.model, tmp / "cache", args.episodes, args.episode_steps, args.top_k)
    results = {}
    for worker in ("mlx_lm", "kd", "ce"):
        start = time.perf_counter()
        command = [
            sys.executable,
            __file__,
            "--worker",
            worker,
            "--cache",
            str(tmp / "cache"),
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--num-layers",
            str(args.num_layers),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[worker] = json.loads(output.split("RESULT ", 1)[1])
        print(
            f"{worker:7} {results[worker]['tokens_per_s']:10.0f} tok/s  peak {results[worker]['peak_mb']:8.1f} MB  "
            f"({time.perf_counter() - start:.0f}s)",
            file=sys.stderr,
        )

    summary = {
        "model": args.model,
        "model_config": model_config(args.model),
        "num_layers": args.num_layers,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "top_k": args.top_k,
        "duomem_tokens_per_s": results["kd"]["tokens_per_s"],
        "mlx_lm_lora_tokens_per_s": results["mlx_lm"]["tokens_per_s"],
        "duomem_peak_mb": results["kd"]["peak_mb"],
        "mlx_lm_lora_peak_mb": results["mlx_lm"]["peak_mb"],
        "duomem_kd_off_tokens_per_s": results["ce"]["tokens_per_s"],
        "speed_vs_mlx_lm": results["kd"]["tokens_per_s"] / results["mlx_lm"]["tokens_per_s"],
        "memory_vs_mlx_lm": results["kd"]["peak_mb"] / results["mlx_lm"]["peak_mb"],
        "kd_overhead": results["ce"]["tokens_per_s"] / results["kd"]["tokens_per_s"],
    }
    print(f"\n{'trainer':28} {'tokens/s':>10} {'peak MB':>9}")
    for name, key in (
        ("mlx_lm.lora (CE)", "mlx_lm"),
        ("duomem-mlx distill (CE+KD)", "kd"),
        ("duomem-mlx distill (CE)", "ce"),
    ):
        print(f"{name:28} {results[key]['tokens_per_s']:10.0f} {results[key]['peak_mb']:9.1f}")
    print(
        f"\nduomem/mlx-lm speed {summary['speed_vs_mlx_lm']:.2f}x, peak memory {summary['memory_vs_mlx_lm']:.2f}x; "
        f"KD overhead (KD off / on tokens/s) {summary['kd_overhead']:.2f}x"
    )
    if args.json:
        write_json(args.json, summary | versions())


if __name__ == "__main__":
    main()
