"""Incremental KV-cache session vs the naive loop that re-encodes the whole prompt each step.

One synthetic episode of N steps with a realistic memory prefix (~500+ tokens) and
environment-like observations, played twice with greedy decoding.

    python benchmarks/agent_session.py --steps 30 --json benchmarks/results/agent_session.json
    python benchmarks/agent_session.py --model mlx-community/Qwen3-0.6B-4bit --steps 30
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from duomem_mlx.agent.decode import DecodeOptions
from duomem_mlx.agent.prompt import prefix_messages
from duomem_mlx.agent.session import ReencodingSession, Session
from duomem_mlx.models import default_corpus, load, make_tiny_model


def synthetic_episode(steps: int, seed: int = 0):
    """(memories, task, observations, admissible sets) drawn from environment text."""
    rng = random.Random(seed)
    lines = [line for line in default_corpus().splitlines() if 20 < len(line) < 200]
    commands = sorted({line for line in lines if len(line.split()) <= 5})
    memories = [" ".join(rng.sample(lines, 4)) for _ in range(8)]
    observations = [" ".join(rng.sample(lines, 3)) for _ in range(steps + 1)]
    admissible = [rng.sample(commands, 12) for _ in range(steps)]
    return memories, "Your task is to boil water.", observations, admissible


def play(session_class, model, tokenizer, steps, decode, max_context):
    memories, task, observations, admissible = synthetic_episode(steps)
    session = session_class(model, tokenizer, max_context, DecodeOptions(mode=decode, max_tokens=16))
    session.start(prefix_messages(task, observations[0], memories))
    actions = []
    start = time.perf_counter()
    for i in range(steps):
        actions.append(session.generate(admissible[i]))
        session.append([{"role": "user", "content": observations[i + 1]}])
    return actions, time.perf_counter() - start, session


def plot_steps(incremental: list[float], naive: list[float], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s * 1000 for s in naive], label="naive: re-encode the prompt each step")
    ax.plot([s * 1000 for s in incremental], label="incremental KV-cache session")
    ax.set(xlabel="step", ylabel="ms per step", title="Per-step latency of the agent loop")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="mlx-lm model (default: a 4-layer hidden-256 tiny model built here)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--decode", choices=["free", "constrained"], default="constrained")
    parser.add_argument("--max-context", type=int, default=8192)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG of per-step latency (needs matplotlib)")
    args = parser.parse_args()

    model_path = args.model or str(make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", layers=4, hidden=256))
    model, tokenizer = load(model_path)
    play(Session, model, tokenizer, 2, args.decode, args.max_context)  # warm-up
    fast_actions, fast_s, fast = play(Session, model, tokenizer, args.steps, args.decode, args.max_context)
    naive_actions, naive_s, naive = play(ReencodingSession, model, tokenizer, args.steps, args.decode, args.max_context)
    result = {
        "model": args.model or "tiny qwen3 (4 layers, hidden 256)",
        "steps": args.steps,
        "decode": args.decode,
        "prefix_tokens": len([t for seg in fast.segments[: fast.n_prefix] for t in seg]),
        "same_actions": fast_actions == naive_actions,
        "naive_seconds": round(naive_s, 3),
        "incremental_seconds": round(fast_s, 3),
        "speedup": round(naive_s / fast_s, 2),
        "prefill_tokens_naive": naive.prefill_tokens,
        "prefill_tokens_incremental": fast.prefill_tokens,
        "prefill_reduction": round(naive.prefill_tokens / fast.prefill_tokens, 2),
    }
    print(f"{'':24}{'naive':>12}{'incremental':>14}{'ratio':>8}")
    print(f"{'seconds':24}{naive_s:12.3f}{fast_s:14.3f}{result['speedup']:8.2f}x")
    print(f"{'prefill tokens':24}{naive.prefill_tokens:12d}{fast.prefill_tokens:14d}{result['prefill_reduction']:8.2f}x")
    print(f"steps {args.steps}, prefix {result['prefix_tokens']} tokens, same greedy actions: {result['same_actions']}")
    if args.plot:
        plot_steps(fast.step_seconds, naive.step_seconds, args.plot)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
