"""`duomem-mlx eval`: play episodes with a policy; success rate and score per task."""

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import Episode, play_episode
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.episodes import write_episode
from duomem_mlx.io import check_destination, write_atomic
from duomem_mlx.progress import Progress
from duomem_mlx.runtime.cost import peak_rss_bytes
from duomem_mlx.runtime.gpu_memory import wired_limit
from duomem_mlx.runtime.options import PolicyOptions
from duomem_mlx.runtime.policy import make_policy


def summarize(episodes: list[Episode]) -> dict:
    n = len(episodes)
    return {
        "episodes": n,
        "success_rate": sum(e.success for e in episodes) / n if n else 0.0,
        "mean_score": sum(e.score for e in episodes) / n if n else 0.0,
        "mean_steps": sum(len(e.steps) for e in episodes) / n if n else 0.0,
        "errors": sum(e.error is not None for e in episodes),
    }


def cost(episodes: list[Episode]) -> dict:
    """What a task (an episode) costs on average, and a step (an action); a policy without a model
    has no tokens and no FLOPs (None)."""
    n, steps = len(episodes), sum(len(e.steps) for e in episodes)
    seconds = sum(e.seconds for e in episodes)
    row = {
        "seconds_per_task": round(seconds / n, 3) if n else None,
        "seconds_per_step": round(seconds / steps, 4) if steps else None,
    }
    for key in ("prefill_tokens", "restored_tokens", "decode_tokens", "forward_flops"):
        values = [e.stats.get(key) for e in episodes]
        row[f"{key}_per_task"] = round(sum(values) / n, 1) if n and None not in values else None
    return row


def run_cost(played: list[Episode], by_task: dict, agent) -> dict:
    """eval's `cost` block: the means over all episodes and per task, the run's peak memory and what the
    model and its memory bank take on disk (None for a policy without a model)."""
    flops = [e.stats.get("forward_flops") for e in played]
    return {
        **cost(played),
        "forward_flops": sum(flops) if flops and None not in flops else None,
        "peak_memory_bytes": mx.get_peak_memory(),  # MLX's allocations since run_eval started
        "peak_rss_bytes": peak_rss_bytes(),  # the process's, since it started
        **getattr(agent, "disk_bytes", {"model_bytes": None, "bank_bytes": None}),
        "per_task": {task: cost(eps) for task, eps in sorted(by_task.items())},
    }


def cost_line(c: dict) -> str:
    parts = [f"{c['seconds_per_task'] or 0:.2f} s/task, {c['seconds_per_step'] or 0:.3f} s/step"]
    if c["prefill_tokens_per_task"] is not None:
        parts.append(
            f"{c['prefill_tokens_per_task']:,.0f} prefilled + {c['restored_tokens_per_task']:,.0f} restored + "
            f"{c['decode_tokens_per_task']:,.0f} decoded tokens/task"
        )
    if c["forward_flops_per_task"] is not None:
        parts.append(f"{c['forward_flops_per_task'] / 1e9:.3g} GFLOPs/task")
    parts.append(f"peak memory {c['peak_memory_bytes'] / 1e6:,.0f} MB (RSS {c['peak_rss_bytes'] / 1e6:,.0f} MB)")
    if c["model_bytes"] is not None:
        parts.append(f"model {c['model_bytes'] / 1e6:,.1f} MB + bank {c['bank_bytes'] / 1e6:,.2f} MB")
    return "cost: " + "; ".join(parts)


def print_table(per_task: dict, overall: dict):
    width = max(map(len, [*per_task, "task"]))
    print(f"\n{'task':{width}} {'episodes':>8} {'success':>8} {'score':>7} {'steps':>7}")
    for task, row in sorted(per_task.items()) + [("all", overall)]:
        print(
            f"{task:{width}} {row['episodes']:8d} {row['success_rate']:8.1%} {row['mean_score']:7.2f} "
            f"{row['mean_steps']:7.1f}"
        )


@wired_limit()
def run_episodes(env, specs, policy, max_steps: int, log=None) -> list[Episode]:
    episodes = []
    bar = Progress(specs, desc="episodes", unit="ep")
    for spec in bar:
        episode = play_episode(env, spec, policy, max_steps)
        episodes.append(episode)
        if log:
            write_episode(log, episode)
        bar.set_postfix(success=f"{sum(e.success for e in episodes) / len(episodes):.0%}")
    return episodes


def run_eval(env_name, tasks, split, episodes, policy, options: PolicyOptions, max_steps, out, log, game_params=None):
    """`policy` is make_policy's spec; `options` reach a model:PATH policy (oracle and random take the seed)."""
    check_destination(out)
    if log:
        check_destination(log, option="--log")
        if Path(log).resolve() == Path(out).resolve():
            raise DuomemError(f"--log and --out are the same file ({out}); give the episode log its own name")
    mx.reset_peak_memory()
    agent = make_policy(policy, options)
    env = make_env(env_name, game_params)
    max_steps = max_steps or env.default_max_steps
    start = time.perf_counter()
    try:
        specs = env.task_specs(tasks, split, episodes, options.seed)
        with open(log, "w") if log else open(os.devnull, "w") as log_file:
            played = run_episodes(env, specs, agent, max_steps, log_file if log else None)
    finally:
        env.close()
    by_task = defaultdict(list)
    for episode in played:
        by_task[episode.task].append(episode)
    per_task = {task: summarize(eps) for task, eps in by_task.items()}
    overall = summarize(played)
    results = {
        **{k: overall[k] for k in ("success_rate", "mean_score")},
        "env": env_name,
        "game_params": game_params,
        "split": split,
        "policy": policy,
        "seed": options.seed,
        "max_steps": max_steps,
        "seconds": round(time.perf_counter() - start, 2),
        "per_task": per_task,
        "cost": run_cost(played, by_task, agent),
        "episodes": [
            {
                "task": e.task,
                "variation": e.variation,
                "success": e.success,
                "score": e.score,
                "steps": len(e.steps),
                "seconds": round(e.seconds, 3),
                "error": e.error,
            }
            for e in played
        ],
    }
    text = json.dumps(results, indent=2) + "\n"
    try:
        write_atomic(out, text, "the results follow on stdout" + (f"; the episodes are in {log}" if log else ""))
    except DuomemError:
        print(text)  # played episodes are never lost
        raise
    print_table(per_task, overall)
    print(cost_line(results["cost"]))
    print(f"wrote {out}" + (f" and {log}" if log else ""))
    return results
