"""Incremental KV-cache session vs the naive loop that re-encodes the whole prompt each step.

One synthetic episode of N steps with a realistic memory prefix (~500+ tokens) and
environment-like observations, played twice with greedy decoding.

    python benchmarks/agent_session.py --steps 30 --json benchmarks/results/agent_session.json
    python benchmarks/agent_session.py --model mlx-community/Qwen3-0.6B-4bit --steps 30
    python benchmarks/agent_session.py --steps 100 --max-context 1024 --low-water 1.0 0.75   # long episodes

With several --low-water values the incremental session plays the episode once per value
(1.0: drop one turn at a time, as before; 0.75: drop whole turns down to 3/4 of the window)
and the re-encoding loop once per value with the same truncation.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from duomem_mlx.deploy.bench import synthetic_episode
from duomem_mlx.runtime.decode import DecodeOptions
from duomem_mlx.runtime.models import load, make_tiny_model
from duomem_mlx.runtime.prompt import prefix_messages
from duomem_mlx.runtime.session import ReencodingSession, Session


def play(session_class, model, tokenizer, steps, decode, max_context, low_water=0.75, thinking=False):
    memories, task, observations, admissible = synthetic_episode(steps)
    options = DecodeOptions(mode=decode, max_tokens=16)
    session = session_class(model, tokenizer, max_context, options, thinking=thinking, low_water=low_water)
    session.start(prefix_messages(task, observations[0], memories))
    actions = []
    start = time.perf_counter()
    for i in range(steps):
        actions.append(session.generate(admissible[i]))
        session.append([{"role": "user", "content": observations[i + 1]}])
    return actions, time.perf_counter() - start, session


def plot_steps(incremental: list[float], naive: list[float], path: str):
    import matplotlib  # noqa: PLC0415 (optional: the [plot] extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after matplotlib.use)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s * 1000 for s in naive], label="naive: re-encode the prompt each step")
    ax.plot([s * 1000 for s in incremental], label="incremental KV-cache session")
    ax.set(xlabel="step", ylabel="ms per step", title="Per-step latency of the agent loop")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="mlx-lm model (default: a 4-layer hidden-256 tiny model built here)")
    parser.add_argument(
        "--arch", default="qwen3", help="tiny model family when no --model (qwen3, llama, gemma3_text, lfm2)"
    )
    parser.add_argument("--template", help="tiny model chat template (default: the family's own)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--decode", choices=["free", "constrained"], default="constrained")
    parser.add_argument("--max-context", type=int, default=8192)
    parser.add_argument(
        "--low-water", type=float, nargs="+", default=[0.75], help="fractions of the window kept after a drop"
    )
    parser.add_argument("--thinking", action="store_true", help="enable_thinking=True (Qwen3 templates)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG of per-step latency (needs matplotlib)")
    args = parser.parse_args()

    model_path = args.model or str(
        make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", arch=args.arch, layers=4, hidden=256, template=args.template)
    )
    model, tokenizer = load(model_path)
    play(Session, model, tokenizer, 2, args.decode, args.max_context)  # warm-up
    runs = []
    for low_water in args.low_water:
        fast_actions, fast_s, fast = play(
            Session, model, tokenizer, args.steps, args.decode, args.max_context, low_water, args.thinking
        )
        naive_actions, naive_s, naive = play(
            ReencodingSession, model, tokenizer, args.steps, args.decode, args.max_context, low_water, args.thinking
        )
        steps_ms = [s * 1000 for s in fast.step_seconds]
        runs.append(
            {
                "low_water": low_water,
                "same_actions": fast_actions == naive_actions,
                "naive_seconds": round(naive_s, 3),
                "incremental_seconds": round(fast_s, 3),
                "speedup": round(naive_s / fast_s, 2),
                "step_ms": {
                    "mean": round(sum(steps_ms) / len(steps_ms), 2),
                    "p50": round(percentile(steps_ms, 0.5), 2),
                    "p95": round(percentile(steps_ms, 0.95), 2),
                    "max": round(max(steps_ms), 2),
                },
                "prefill_tokens_naive": naive.prefill_tokens,
                "prefill_tokens_incremental": fast.prefill_tokens,
                "prefill_reduction": round(naive.prefill_tokens / fast.prefill_tokens, 2),
                "rewound_tokens_per_step": round(sum(fast.rewound_tokens) / len(fast.rewound_tokens), 2),
                "render_ms_per_step": round(1000 * sum(fast.render_seconds) / len(fast.render_seconds), 3),
                "max_prompt_tokens": max(fast.prompt_tokens),
                "step_seconds": fast.step_seconds,
                "naive_step_seconds": naive.step_seconds,
            }
        )
    result = {
        "model": args.model or f"tiny {args.arch} (4 layers, hidden 256, template {args.template or 'its own'})",
        "steps": args.steps,
        "decode": args.decode,
        "max_context": args.max_context,
        "thinking": args.thinking,
        "runs": runs,
    }
    print(
        f"{'low water':>9}{'naive s':>9}{'incr s':>8}{'speedup':>9}{'step ms mean/p50/p95/max':>28}"
        f"{'refed/step':>11}{'render ms':>10}{'same':>6}"
    )
    for r in runs:
        ms = r["step_ms"]
        print(
            f"{r['low_water']:9.2f}{r['naive_seconds']:9.2f}{r['incremental_seconds']:8.2f}{r['speedup']:8.2f}x"
            f"{ms['mean']:10.1f}/{ms['p50']:.1f}/{ms['p95']:.1f}/{ms['max']:.1f}"
            f"{r['rewound_tokens_per_step']:11.2f}{r['render_ms_per_step']:10.2f}{str(r['same_actions']):>6}"
        )
    print(
        f"steps {args.steps}, window {args.max_context}, decode {args.decode}; refed/step: tokens the cache held and "
        "gave back"
    )
    if args.plot:
        plot_steps(runs[-1]["step_seconds"], runs[-1]["naive_step_seconds"], args.plot)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
