"""`duomem-mlx eval`: play episodes with a policy; success rate and score per task."""

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import click

from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import Episode, play_episode
from duomem_mlx.errors import DuomemError
from duomem_mlx.io import check_destination, write_atomic
from duomem_mlx.progress import Progress
from duomem_mlx.runtime.gpu_memory import wired_limit
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


def print_table(per_task: dict, overall: dict):
    width = max(map(len, [*per_task, "task"]))
    click.echo(f"\n{'task':{width}} {'episodes':>8} {'success':>8} {'score':>7} {'steps':>7}")
    for task, row in sorted(per_task.items()) + [("all", overall)]:
        click.echo(
            f"{task:{width}} {row['episodes']:8d} {row['success_rate']:8.1%} {row['mean_score']:7.2f} {row['mean_steps']:7.1f}"
        )


@wired_limit()
def run_episodes(env, specs, policy, max_steps: int, log=None) -> list[Episode]:
    episodes = []
    bar = Progress(specs, desc="episodes", unit="ep")
    for spec in bar:
        episode = play_episode(env, spec, policy, max_steps)
        episodes.append(episode)
        if log:
            log.write(json.dumps(episode.to_json(compact=True), ensure_ascii=False) + "\n")
            log.flush()
        bar.set_postfix(success=f"{sum(e.success for e in episodes) / len(episodes):.0%}")
    return episodes


def run_eval(
    env_name,
    tasks,
    split,
    episodes,
    policy,
    adapter_path,
    memory_bank,
    memory_k,
    decode,
    max_context,
    max_steps,
    seed,
    out,
    log,
    thinking=False,
    memory_filter="none",
    game_params=None,
    prefix_cache=None,
):
    check_destination(out)
    if log:
        check_destination(log, option="--log")
        if Path(log).resolve() == Path(out).resolve():
            raise DuomemError(f"--log and --out are the same file ({out}); give the episode log its own name")
    model_options = (
        dict(
            adapter_path=adapter_path,
            memory_bank=memory_bank,
            memory_k=memory_k,
            memory_filter=memory_filter,
            decode=decode,
            max_context=max_context,
            thinking=thinking,
            prefix_cache=prefix_cache,
        )
        if policy.startswith("model:")
        else {}
    )
    agent = make_policy(policy, seed=seed, **model_options)
    env = make_env(env_name, game_params)
    max_steps = max_steps or env.default_max_steps
    start = time.perf_counter()
    try:
        specs = env.task_specs(tasks, split, episodes, seed)
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
        "seed": seed,
        "max_steps": max_steps,
        "seconds": round(time.perf_counter() - start, 2),
        "per_task": per_task,
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
        click.echo(text)  # played episodes are never lost
        raise
    print_table(per_task, overall)
    click.echo(f"wrote {out}" + (f" and {log}" if log else ""))
    return results
