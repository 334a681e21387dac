"""`duomem-mlx teach`: play episodes with a teacher, cache the kept ones, write memories."""

import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from ..envs.base import Episode, episode_id, play_episode
from ..errors import DuomemError
from ..io import check_destination
from ..memory.bank import merge_duplicates
from ..progress import Progress
from .backends import make_teacher
from .cache import CacheWriter, info


def collect(
    teacher: str,
    env_name: str,
    out: str,
    tasks: list[str] | None = None,
    split: str = "train",
    episodes: int = 3,
    top_k: int = 20,
    temperature: float = 0.0,
    keep: str = "success",
    memory_writer: str = "rules",
    memory_kind: str = "script",
    memory_bank: str | None = None,
    memory_k: int = 2,
    max_steps: int | None = None,
    game_params: str | None = None,
    seed: int = 0,
    teacher_tokenizer: str | None = None,
    decode: str = "constrained",
    max_context: int = 4096,
    keep_admissible: bool = False,
    resume: bool = False,
    force: bool = False,
) -> dict:
    if resume and force:
        raise DuomemError("--resume and --force contradict each other; pass one")
    if teacher == "oracle":
        top_k = 0
    check_destination(out)
    model = make_teacher(teacher, top_k, temperature, teacher_tokenizer, decode, max_context, seed,
                         memory_bank=memory_bank, memory_k=memory_k)
    if model.tokenizer is not None and not getattr(model.tokenizer, "chat_template", None):
        raise DuomemError(f"the tokenizer of {model.spec} has no chat template; use an instruct/chat model or add chat_template.jinja")
    from ..envs import make_env

    env = make_env(env_name, game_params)
    max_steps = max_steps or env.default_max_steps
    try:
        specs = env.task_specs(tasks, split, episodes, seed)
        settings = {
            "teacher": model.spec, "backend": model.backend, "top_k": top_k, "env": env_name, "tasks": tasks,
            "split": split, "game_params": game_params, "keep": keep, "temperature": temperature, "seed": seed, "max_steps": max_steps,
            "episodes_per_task": episodes, "memory_writer": memory_writer, "memory_kind": memory_kind,
            "memory_bank": memory_bank and str(Path(memory_bank).resolve()), "memory_k": memory_k if memory_bank else 0, "vocab_size": model.vocab_size,
            "tokenizer_fingerprint": fingerprint(model.tokenizer),
            "task_list": sorted({s.task for s in specs}),
        }
        say_cycles(specs, split)
        with CacheWriter(out, settings, resume=resume, force=force) as writer:
            play(env, specs, model, writer, max_steps, keep, keep_admissible)
            kept = [Episode.from_json(e) for e in writer.episodes]
            memories = model.memories(kept, memory_writer, memory_kind) if any(e.success for e in kept) else []
            with disk_errors(out, writer):
                writer.finish([asdict(m) for m in merge_duplicates(memories)])
    finally:
        env.close()
    return info(out)


def play(env, specs, model, writer: CacheWriter, max_steps: int, keep: str, keep_admissible: bool) -> None:
    todo = [s for s in specs if episode_id(s) not in writer.done]
    bar = Progress(total=len(specs), initial=len(specs) - len(todo), desc="teach", unit="episode")
    for spec in todo:
        episode = play_episode(env, spec, model.policy, max_steps)
        with disk_errors(writer.out, writer):
            if episode.steps and (episode.success or keep == "all"):
                writer.add(record(episode, keep_admissible), model.arrays(episode))
            else:
                writer.drop(episode.id)
        played = writer.manifest["counts"]["played"]
        wins = writer.manifest["counts"]["success"]
        bar.update(1)
        bar.set_postfix(success=f"{wins}/{played}", kept=len(writer.episodes))
    bar.close()


def say_cycles(specs, split: str) -> None:
    """Say so when a split has fewer variations than episodes asked for (they repeat)."""
    repeated = sorted({s.task for s in specs if s.repeat})
    if repeated:
        tqdm.write(f"note: {', '.join(repeated)}: fewer {split} variations than episodes; variations repeat, "
                   "each repeat with its own episode id (ending /1, /2, ...)", file=sys.stderr)


def record(episode: Episode, keep_admissible: bool) -> dict:
    data = episode.to_json()
    if not keep_admissible:
        for step in data["steps"]:
            step["admissible"] = None
    return data


@contextmanager
def disk_errors(out: str, writer: CacheWriter):
    """A full disk (or any write error) ends the run with one line; what is cached stays."""
    try:
        yield
    except OSError as e:
        raise DuomemError(
            f"could not write to {out} ({e.strerror or e}); the {len(writer.episodes)} episodes already cached are intact: "
            "free space and rerun with --resume"
        )


def fingerprint(tokenizer) -> str | None:
    from ..models import tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer) if tokenizer is not None else None

