"""Teacher cache: bytes per masked token at several k, and what caching costs during collection.

One synthetic episode (environment-like observations, admissible commands) is played by an
`mlx:` teacher (ModelPolicy, incremental KV cache), first on the bare
model, then for each k the way `teach` plays it: through a TopKRecorder, then the shard's
rows gathered and written by the cache writer. The same per-step prompts are also decoded by
plain `mlx_lm.stream_generate` (re-encoding each step, the same number of tokens).

    python benchmarks/teacher_cache.py --json benchmarks/results/teacher_cache.json
    python benchmarks/teacher_cache.py --model mlx-community/Qwen3-0.6B-4bit --steps 30
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from mlx_lm import stream_generate

from duomem_mlx.envs.base import Episode, Step, StepResult, TaskSpec
from duomem_mlx.formats.teacher_cache import CacheWriter
from duomem_mlx.runtime.models import default_corpus, load, make_tiny_model
from duomem_mlx.runtime.options import PolicyOptions
from duomem_mlx.runtime.policy import ModelPolicy
from duomem_mlx.runtime.prompt import encode, episode_messages, render
from duomem_mlx.teacher.base import shard_arrays
from duomem_mlx.teacher.topk import TopKRecorder


def synthetic_steps(steps: int, seed: int = 0):
    rng = random.Random(seed)
    lines = [line for line in default_corpus().splitlines() if 20 < len(line) < 200]
    commands = sorted({line for line in lines if len(line.split()) <= 5})
    observations = [" ".join(rng.sample(lines, 3)) for _ in range(steps)]
    return [StepResult(o, rng.sample(commands, 12)) for o in observations]


def play(policy, states) -> tuple[Episode, float, list[int]]:
    episode = Episode("bench/0", "bench", "boil", 0, "Your task is to boil water.", True, 1.0)
    start = time.perf_counter()
    policy.start(None, TaskSpec("bench", "boil", 0), episode.task_description, states[0])
    generated = []
    for state in states:
        before = policy.session.decode_tokens
        episode.steps.append(Step(state.observation, policy.act(state)))
        generated.append(policy.session.decode_tokens - before)
    return episode, time.perf_counter() - start, generated


def plain_generate(model, tokenizer, episode, generated) -> tuple[float, int]:
    """mlx_lm.stream_generate on each step's full prompt, as many tokens as the teacher made."""
    messages = episode_messages(episode)
    start, tokens = time.perf_counter(), 0
    for i, n in enumerate(generated):
        prompt = encode(tokenizer, render(tokenizer, messages[: 2 + 2 * i], add_generation_prompt=True))
        for _ in stream_generate(model, tokenizer, prompt, max_tokens=n):
            tokens += 1
    return time.perf_counter() - start, tokens


def teach_once(policy, recorder, tokenizer, states, out) -> tuple[float, dict]:
    """Play with recording, gather the shard's rows and write it: (seconds, arrays)."""
    episode, seconds, _ = play(policy, states)
    start = time.perf_counter()
    writer = CacheWriter(out, {"teacher": "bench", "top_k": recorder.k}, force=True)
    arrays = shard_arrays(tokenizer, episode)
    arrays.update(recorder.rows_for(arrays["input_ids"], arrays["loss_mask"], policy.session.cache))
    writer.add(episode.to_json(), arrays)
    return seconds + time.perf_counter() - start, arrays


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="mlx-lm model (default: a 4-layer hidden-256 tiny model built here)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ks", default="8,20,64")
    parser.add_argument("--decode", choices=["free", "constrained"], default="constrained")
    parser.add_argument(
        "--repeats", type=int, default=5, help="plays alternate bare/recorded; timings are the best of this many"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    model_path = args.model or str(make_tiny_model(tmp / "tiny", layers=4, hidden=256))
    model, tokenizer = load(model_path)
    states = synthetic_steps(args.steps)
    ks = [int(k) for k in args.ks.split(",")]
    options = PolicyOptions(decode=args.decode)
    bare = ModelPolicy(model, tokenizer, options=options)
    recorders = {k: TopKRecorder(model, k, set(tokenizer.eos_token_ids)) for k in ks}
    recorded = {k: ModelPolicy(recorders[k], tokenizer, options=options) for k in ks}
    for policy in [bare, *recorded.values()]:
        play(policy, states[:2])  # warm-up
    times = {name: [] for name in ["bare", *ks]}
    for _ in range(args.repeats):  # interleaved, so that load from elsewhere hits all alike
        episode, seconds, generated = play(bare, states)
        times["bare"].append(seconds)
        for k in ks:
            seconds, arrays = teach_once(recorded[k], recorders[k], tokenizer, states, tmp / f"cache-k{k}")
            times[k].append(seconds)
    gen_s = min(times["bare"])
    plain_s, plain_tokens = plain_generate(model, tokenizer, episode, generated)
    teacher_tokens = sum(generated)
    rows = []
    for k in ks:
        total_s = min(times[k])
        size = (tmp / f"cache-k{k}/shards/00000.safetensors").stat().st_size
        masked = int(arrays["loss_mask"].sum())
        rows.append(
            {
                "k": k,
                "shard_bytes": size,
                "masked_tokens": masked,
                "bytes_per_masked_token": round(size / masked, 1),
                "topk_bytes_per_masked_token": 6 * k,
                "seconds_with_cache": round(total_s, 4),
                "cache_overhead": round(total_s / gen_s - 1, 4),
                "refed_tokens": recorders[k].refed,
                "tokens_per_s_with_cache": round(teacher_tokens / total_s, 1),
                "ratio_vs_plain_generate": round((teacher_tokens / total_s) / (plain_tokens / plain_s), 2),
            }
        )
    result = {
        "model": args.model or "tiny qwen3 (4 layers, hidden 256)",
        "steps": args.steps,
        "decode": args.decode,
        "episode_tokens": int(len(shard_arrays(tokenizer, episode)["input_ids"])),
        "teacher_tokens": teacher_tokens,
        "generation_seconds": round(gen_s, 3),
        "teacher_tokens_per_s": round(teacher_tokens / gen_s, 1),
        "plain_generate_seconds": round(plain_s, 3),
        "plain_generate_tokens_per_s": round(plain_tokens / plain_s, 1),
        "by_k": rows,
    }
    print(
        f"episode: {args.decode} decoding, {args.steps} steps, {result['episode_tokens']} tokens, {teacher_tokens} "
        "generated by the teacher"
    )
    print(
        f"plain mlx_lm.generate  {result['plain_generate_tokens_per_s']:8.1f} tok/s   teacher (no cache) "
        f"{result['teacher_tokens_per_s']:8.1f} tok/s"
    )
    print(f"{'k':>4}{'bytes/masked':>14}{'top-k part':>12}{'seconds':>10}{'overhead':>10}{'tok/s':>9}{'vs plain':>10}")
    for r in rows:
        print(
            f"{r['k']:4d}{r['bytes_per_masked_token']:14.1f}{r['topk_bytes_per_masked_token']:12d}{r['seconds_with_cache']:10.3f}"
            f"{r['cache_overhead']:10.1%}{r['tokens_per_s_with_cache']:9.1f}{r['ratio_vs_plain_generate']:9.2f}x"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
