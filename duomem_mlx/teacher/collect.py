"""`duomem-mlx teach`: play episodes with a teacher, cache the kept ones, write memories."""

import copy
import sys
import threading
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import Episode, episode_id, play_episode
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.fingerprints import tokenizer_fingerprint
from duomem_mlx.formats.memories import merge_duplicates
from duomem_mlx.formats.teacher_cache import CacheWriter, as_episodes, info
from duomem_mlx.io import check_destination
from duomem_mlx.progress import Progress
from duomem_mlx.teacher.backends import make_teacher
from duomem_mlx.teacher.base import load_tokenizer, shard_arrays, teacher_memories
from duomem_mlx.teacher.chats import read_chats
from duomem_mlx.teacher.inflight import in_order
from duomem_mlx.teacher.openai_compat import GaveUp, Turn, align_turns
from duomem_mlx.teacher.options import TeachOptions


def collect(teacher: str, env_name: str, out: str, options: TeachOptions = TeachOptions()) -> dict:
    if options.resume and options.force:
        raise DuomemError("--resume and --force contradict each other; pass one")
    if options.concurrency > 1 and teacher.startswith("mlx:"):
        raise DuomemError(
            "--concurrency: an mlx: teacher holds one model and KV cache in this process and plays one episode "
            "at a time; to play several at once serve the model (mlx_lm.server --model PATH batches requests) "
            "and pass --teacher openai:http://127.0.0.1:8080/v1#PATH"
        )
    if teacher == "oracle":
        options = replace(options, top_k=0)
    check_destination(out)
    model = make_teacher(teacher, options)
    if model.tokenizer is not None and not getattr(model.tokenizer, "chat_template", None):
        raise DuomemError(
            f"the tokenizer of {model.spec} has no chat template; use an instruct/chat model or add chat_template.jinja"
        )

    env = make_env(env_name, options.game_params)
    max_steps = options.max_steps or env.default_max_steps
    try:
        specs = env.task_specs(options.tasks, options.split, options.episodes, options.seed)
        settings = {
            "teacher": model.spec,
            "backend": model.backend,
            "top_k": options.top_k,
            "env": env_name,
            "tasks": options.tasks,
            "split": options.split,
            "game_params": options.game_params,
            "keep": options.keep,
            "temperature": options.temperature,
            "seed": options.seed,
            "max_steps": max_steps,
            "episodes_per_task": options.episodes,
            "memory_writer": options.memory_writer,
            "memory_kind": options.memory_kind,
            "memory_bank": options.memory_bank and str(Path(options.memory_bank).resolve()),
            "memory_k": options.memory_k if options.memory_bank else 0,
            "vocab_size": model.vocab_size,
            "tokenizer_fingerprint": fingerprint(model.tokenizer),
            "task_list": sorted({s.task for s in specs}),
        }
        say_cycles(specs, options.split)
        with CacheWriter(out, settings, resume=options.resume, force=options.force) as writer:
            workers = Workers(env, lambda: make_env(env_name, options.game_params), model, max_steps, options.keep)
            play(workers, specs, writer, options.keep_admissible, options.concurrency)
            kept = as_episodes(writer.episodes)
            memories = (
                model.memories(kept, options.memory_writer, options.memory_kind) if any(e.success for e in kept) else []
            )
            with disk_errors(out, writer):
                writer.finish(merge_duplicates(memories))
    finally:
        env.close()
    return info(out)


class Workers:
    """What each episode in flight plays with: its own environment (worker 0 the run's, the others
    started lazily in their thread, closed when they are done) and its own copy of the teacher's
    policy; the teacher's client, model and tokenizer are shared (tokenizing takes a lock)."""

    def __init__(self, env, make_env, model, max_steps: int, keep: str):
        self.env, self.make_env, self.model, self.max_steps, self.keep = env, make_env, model, max_steps, keep
        self.tokenizer_lock = threading.Lock()

    def start(self, i: int):
        teacher = copy.copy(self.model)
        teacher.policy = copy.copy(self.model.policy)  # every policy's start() resets what it keeps of an episode
        return (self.env if i == 0 else self.make_env()), teacher

    def close(self, state) -> None:
        if state[0] is not self.env:
            state[0].close()

    def play(self, state, spec) -> tuple:
        """(spec, episode, its shard arrays when kept, None), or (spec, None, None, why) when the teacher
        server kept failing one of its requests: not the teacher's episode, played again on --resume."""
        env, teacher = state
        try:
            episode = play_episode(env, spec, teacher.policy, self.max_steps)
        except GaveUp as e:
            return spec, None, None, str(e)
        if not worth_keeping(episode, self.keep):
            return spec, episode, None, None
        with self.tokenizer_lock:
            return spec, episode, teacher.arrays(episode), None


def play(workers: Workers, specs, writer: CacheWriter, keep_admissible: bool, concurrency: int) -> None:
    """Up to `concurrency` episodes in flight; each written (kept, dropped or failed) in spec order."""
    todo = [s for s in specs if episode_id(s) not in writer.done]
    bar = Progress(total=len(specs), initial=len(specs) - len(todo), desc="teach", unit="episode")
    client, streak = getattr(workers.model, "client", None), 0
    # closing: on an error too, every worker stops and is joined before the run's environment closes
    with closing(in_order(todo, concurrency, workers.start, workers.play, workers.close)) as results:
        for spec, episode, arrays, failure in results:
            with disk_errors(writer.out, writer):
                if failure:
                    writer.fail(episode_id(spec), failure)
                elif worth_keeping(episode, workers.keep):
                    writer.add(record(episode, keep_admissible), arrays)
                else:
                    writer.drop(episode.id)
            streak = streak + 1 if failure else 0
            if streak >= max(8, 2 * concurrency):
                raise DuomemError(
                    f"the teacher server failed {streak} episodes in a row (last: {failure}); "
                    f"the {len(writer.episodes)} episodes cached are intact: "
                    "fix the server and rerun with --resume"
                )
            bar.update(1)
            bar.set_postfix(**progress(writer, client))
    bar.close()
    if writer.failed:
        first = next(iter(writer.failed.values()))
        tqdm.write(
            f"warning: the teacher server failed {len(writer.failed)} episodes (e.g. {first}); "
            "they are not cached: rerun with --resume to play them again",
            file=sys.stderr,
        )


def worth_keeping(episode: Episode, keep: str) -> bool:
    return bool(episode.steps) and (episode.success or keep == "all")


def progress(writer: CacheWriter, client) -> dict:
    counts = writer.manifest["counts"]
    shown = {"success": f"{counts['success']}/{counts['played']}", "kept": counts["kept"]}
    if client is not None:
        shown.update(
            in_flight=client.in_flight, retries=client.retried, abandoned=client.abandoned, failed=len(writer.failed)
        )
    return shown


def say_cycles(specs, split: str) -> None:
    """Say so when a split has fewer variations than episodes asked for (they repeat)."""
    repeated = sorted({s.task for s in specs if s.repeat})
    if repeated:
        tqdm.write(
            f"note: {', '.join(repeated)}: fewer {split} variations than episodes; variations repeat, "
            "each repeat with its own episode id (ending /1, /2, ...)",
            file=sys.stderr,
        )


def record(episode: Episode, keep_admissible: bool) -> dict:
    """The episode as the cache keeps it, without wall-clock times: they depend on the load and
    on the episodes in flight beside it, not on the teacher (a deterministic teacher makes the
    same bytes at any --concurrency)."""
    data = episode.to_json()
    del data["seconds"]
    data["stats"] = {k: v for k, v in data["stats"].items() if not k.endswith("_seconds")}
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
            f"could not write to {out} ({e.strerror or e}); "
            f"the {len(writer.episodes)} episodes already cached are intact: free space and rerun with --resume"
        )


def fingerprint(tokenizer) -> str | None:
    return tokenizer_fingerprint(tokenizer) if tokenizer is not None else None


def collect_chats(from_chats: str, out: str, options: TeachOptions = TeachOptions(), skip_bad: bool = False) -> dict:
    """A teacher cache from logged conversations (teacher/chats.py): every record is read and
    tokenized before the cache is opened, so a bad one leaves nothing written."""
    if options.memory_writer != "rules" and options.memory_kind != "trajectory":
        raise DuomemError("--from-chats has no model to write memories with; use --memory-writer rules")
    check_destination(out)
    tokenizer = load_tokenizer(options.teacher_tokenizer) if options.teacher_tokenizer else None
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise DuomemError(
            f"the tokenizer {options.teacher_tokenizer} has no chat template; name an instruct/chat model's"
        )
    vocab_size = len(tokenizer.get_vocab()) if tokenizer else None
    chats = read_chats(from_chats, skip_bad=skip_bad, vocab_size=vocab_size)
    kept = [e for e in chats.episodes if worth_keeping(e, options.keep)]
    arrays = [chat_arrays(tokenizer, e, chats) if tokenizer else None for e in kept]
    memories = (
        teacher_memories(None, kept, options.memory_writer, options.memory_kind) if any(e.success for e in kept) else []
    )
    settings = {
        "teacher": f"chats:{Path(from_chats).resolve()}",
        "backend": "chats",
        "top_k": chats.top_k,
        "env": "chats",
        "keep": options.keep,
        "memory_writer": options.memory_writer,
        "memory_kind": options.memory_kind,
        "skip_bad": skip_bad,
        "vocab_size": vocab_size,
        "tokenizer_fingerprint": fingerprint(tokenizer),
        "task_list": sorted({e.task for e in kept}),
        "chats": {"read": chats.read, "bad": chats.bad},
    }
    with CacheWriter(out, settings, force=options.force) as writer, disk_errors(out, writer):
        for episode, shard in zip(kept, arrays):
            writer.add(record(episode, keep_admissible=False), shard)
        for episode in chats.episodes:
            if not worth_keeping(episode, options.keep):
                writer.drop(episode.id)
        writer.finish(merge_duplicates(memories))
    if chats.bad:
        tqdm.write(f"note: skipped {chats.bad} bad record(s) of {chats.read} in {from_chats}", file=sys.stderr)
    return info(out)


def chat_arrays(tokenizer, episode: Episode, chats) -> dict:
    """The shard of a logged episode: its chat tokenized as the agent sees it, and the server's
    top-k rows where the log has them (every row unaligned in an episode without)."""
    arrays = shard_arrays(tokenizer, episode)
    if chats.top_k:
        turns = chats.turns.get(episode.id) or [Turn(None, "", None)] * len(episode.steps)
        eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        arrays.update(align_turns(tokenizer, arrays["input_ids"], arrays["loss_mask"], turns, chats.top_k, eos, False))
    return arrays
