"""`duomem-mlx memory build | search | show | write`; stage modules are imported inside commands."""

import json
import time
from collections import Counter
from pathlib import Path

import click

from duomem_mlx.config import config_option
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.episodes import read_episodes
from duomem_mlx.formats.memories import KEYS, KINDS, read_memories, write_memories
from duomem_mlx.io import check_destination, write_atomic
from duomem_mlx.runtime.models import load


@click.group()
def memory():
    """Procedural memories: write them from episodes, build a bank, search it.

    \b
    Example:
      duomem-mlx memory write --episodes runs/oracle.jsonl --writer rules --out runs/memories.jsonl
      duomem-mlx memory build --memories runs/memories.jsonl --embedder runs/student --out runs/bank
      duomem-mlx memory search runs/bank "heat the apple" -k 3
    """


@memory.command("build")
@click.option(
    "--memories",
    "memories_path",
    type=click.Path(dir_okay=False),
    help="JSONL, one {id, task_type, text, source} per line.",
)
@click.option(
    "--cache",
    "cache_path",
    type=click.Path(file_okay=False),
    help="A teacher cache (`duomem-mlx teach`): use its memories.",
)
@click.option("--embedder", required=True, help="The student model (path or Hub id) whose hidden states are the keys.")
@click.option("--adapter-path", type=click.Path(file_okay=False), help="LoRA adapters loaded on the embedder.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Bank directory to write.")
@click.option(
    "--key",
    type=click.Choice(KEYS),
    default="task",
    show_default=True,
    help="What a memory's key embeds: its task text, or that and its episode's first observation (tells games of "
    "one task apart).",
)
@click.option("--force", is_flag=True, help="Replace an existing memory bank at --out.")
@config_option
def build_command(memories_path, cache_path, embedder, adapter_path, key, out, force):
    """Embed memories with the student and write a memory bank directory.

    \b
    Examples:
      duomem-mlx memory build --memories runs/memories.jsonl --embedder runs/student --out runs/bank
      duomem-mlx memory build --cache runs/cache --embedder runs/student --key task+observation --out runs/bank
    """
    from duomem_mlx.formats.teacher_cache import memories_file  # noqa: PLC0415 (CLI start-up without the stage)
    from duomem_mlx.runtime.embed import build  # noqa: PLC0415 (CLI start-up without the stage)

    if bool(memories_path) == bool(cache_path):
        raise DuomemError("pass exactly one of --memories FILE or --cache CACHE")
    check_bank_destination(out, force)
    memories = read_memories(memories_path or memories_file(cache_path))
    model, tokenizer = load(embedder, adapter_path)
    start = time.perf_counter()
    local = Path(embedder).expanduser()
    recorded = str(local.resolve()) if local.exists() else embedder  # so `memory search` works from any directory
    bank = build(
        memories,
        model,
        tokenizer,
        embedder=recorded,
        adapter_path=adapter_path and str(Path(adapter_path).resolve()),
        progress=True,
        key=key,
    )
    path = bank.save(out)
    size = sum(f.stat().st_size for f in path.iterdir())
    click.echo(
        f"wrote {len(bank)} memories (dim {bank.dim}, {size / 1e6:.2f} MB) to {path} in "
        f"{time.perf_counter() - start:.1f}s"
    )


def check_bank_destination(out: str, force: bool) -> None:
    """--out may be new, empty, or (with --force) a memory bank; never another directory."""
    path = Path(out)
    if path.is_dir() and any(path.iterdir()):
        if not (path / "bank.json").is_file():
            raise DuomemError(f"{out} exists and is not a memory bank; choose another --out")
        if not force:
            raise DuomemError(f"{out} already holds a memory bank; pass --force to replace it or choose another --out")
    check_destination(path)


@memory.command("search")
@click.argument("bank_path", metavar="BANK", type=click.Path())
@click.argument("query", required=False)
@click.option("-k", type=click.IntRange(1), default=3, show_default=True)
@click.option("--task-type", help="Only memories of this task type.")
@click.option(
    "--accuracy-on",
    type=click.Path(exists=True),
    help="Instead of QUERY: a teacher cache or an episode log; the share of its episodes whose top-1 memory "
    "(by their task description, similarity alone) is of their own task type.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False),
    help="With --accuracy-on: also write {accuracy, episodes, per_task} here.",
)
@click.option("--embedder", help="Model to embed the query with (default: the one recorded in the bank).")
@click.option(
    "--adapter-path", type=click.Path(file_okay=False), help="LoRA adapters (default: as recorded in the bank)."
)
@config_option
def search_command(bank_path, query, k, task_type, accuracy_on, json_out, embedder, adapter_path):
    """Show the K memories closest to QUERY (cosine in the student's space), or measure
    retrieval accuracy on the episodes of a cache or log.

    \b
    Examples:
      duomem-mlx memory search runs/bank "put a hot apple in the fridge" -k 3 --task-type heat
      duomem-mlx memory search runs/bank --accuracy-on runs/test-episodes.jsonl --json runs/retrieval.json
    """
    from duomem_mlx.formats.bank import MemoryBank  # noqa: PLC0415 (CLI start-up without the stage)
    from duomem_mlx.runtime.embed import embed  # noqa: PLC0415 (CLI start-up without the stage)

    if (query is None) == (accuracy_on is None):
        raise DuomemError("pass exactly one of QUERY or --accuracy-on CACHE_OR_EPISODES")
    if json_out and not accuracy_on:
        raise DuomemError("--json writes the retrieval accuracy: pass it with --accuracy-on")
    bank = MemoryBank.load(bank_path)
    if not (embedder or bank.info.get("embedder")):
        raise DuomemError(f"{bank_path} records no embedder; pass --embedder MODEL")
    model, tokenizer = load(
        embedder or bank.info["embedder"], adapter_path or (None if embedder else bank.info.get("adapter_path"))
    )
    bank.check_embedder(model, tokenizer)
    if accuracy_on:
        from duomem_mlx.runtime.retrieval import hits  # noqa: PLC0415 (CLI start-up without the stage)

        queries = task_queries(accuracy_on)
        found = hits(bank, model, tokenizer, queries)
        click.echo(f"top-1 task type accuracy {sum(found) / len(found):.1%} over {len(queries)} episodes")
        if json_out:
            write_accuracy(json_out, found, [task for *_, task in queries])
        return
    for memory, score in bank.search(embed(model, tokenizer, [query])[0], k, task_type):
        click.echo(f"{score:.3f}  {memory.id}  [{memory.task_type}]  {memory.text}")


def write_accuracy(path: str, found: list[bool], tasks: list[str]) -> None:
    right, seen = Counter(t for f, t in zip(found, tasks) if f), Counter(tasks)
    result = {
        "accuracy": sum(found) / len(found),
        "episodes": len(found),
        "by": "similarity alone, top-1 memory",
        "per_task": {t: right[t] / seen[t] for t in sorted(seen)},
    }
    write_atomic(path, json.dumps(result, indent=2) + "\n")


def task_queries(path: str) -> list[tuple[str, str, str]]:
    """(task description, first observation, task type) of every episode of a teacher cache or an episode log."""
    from duomem_mlx.formats.teacher_cache import read_cache_episodes  # noqa: PLC0415 (CLI start-up without the stage)

    episodes = read_cache_episodes(path) if Path(path).is_dir() else read_episodes(path)
    return [(e.task_description, e.steps[0].observation if e.steps else "", e.task) for e in episodes]


@memory.command("show")
@click.argument("bank_path", metavar="BANK", type=click.Path())
@click.option("-n", "--limit", type=click.IntRange(0), default=10, show_default=True, help="Memories to print.")
@config_option
def show_command(bank_path, limit):
    """Print a bank's embedder, size, task types and first memories.

    \b
    Example:
      duomem-mlx memory show runs/bank -n 5
    """
    from duomem_mlx.formats.bank import MemoryBank  # noqa: PLC0415 (CLI start-up without the stage)

    bank = MemoryBank.load(bank_path)
    size = sum(f.stat().st_size for f in Path(bank_path).iterdir())
    info = {k: v for k, v in bank.info.items() if k != "fingerprint"}
    click.echo(f"{bank_path}: {json.dumps(info)}  fingerprint {bank.info['fingerprint'][:12]}  {size / 1e6:.2f} MB")
    for task_type, n in sorted(Counter(m.task_type for m in bank.memories).items()):
        click.echo(f"  {task_type or '(any)'}: {n}")
    for memory in bank.memories[:limit]:
        click.echo(f"{memory.id}  [{memory.task_type}, {memory.kind}]  {memory.text}")


@memory.command("write")
@click.option(
    "--episodes", type=click.Path(dir_okay=False), required=True, help="Episode log (JSONL), e.g. from `eval --log`."
)
@click.option(
    "--writer", default="rules", show_default=True, help="rules | model:PATH (an mlx-lm model writes each memory)"
)
@click.option(
    "--max-tokens", type=click.IntRange(1), default=160, show_default=True, help="Per memory, model writer only."
)
@click.option(
    "--per-task",
    type=click.IntRange(1),
    help="Write up only the first N successful episodes of each task type (a model writer takes seconds an episode).",
)
@click.option(
    "--kind",
    type=click.Choice(KINDS),
    default="script",
    show_default=True,
    help="script: the writer's procedure; trajectory: each successful episode itself, compact; both: the procedure, "
    "then the episode.",
)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="memories.jsonl to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@config_option
def write_command(episodes, writer, max_tokens, per_task, kind, out, force):
    """Write procedural memories from the successful episodes of a log.

    `rules` abstracts each action sequence into a workflow (objects the task names, or that
    change between episodes of a task type, become X, Y, ...; what every episode names stays;
    near-identical workflows merge); a tool environment's calls become a procedure per task type
    and API set (each function with its arguments' names, a value as <name> where it changes
    between episodes or the user said it); `model:PATH` asks a model to write one per episode, and
    drops a reply that only echoes the prompt or names no step of its episode (said how many).
    `--kind trajectory` keeps each successful episode (each action, then the gist of what it
    led to: a JSON result by its keys and short values); `both` puts the writer's procedure in front of it.

    \b
    Examples:
      duomem-mlx memory write --episodes runs/oracle.jsonl --writer rules --out runs/memories.jsonl
      duomem-mlx memory write --episodes runs/teacher.jsonl --writer model:runs/teacher --per-task 2 --out runs/memories.jsonl
      duomem-mlx memory write --episodes runs/student.jsonl --kind both --out runs/self-memories.jsonl
    """  # noqa: E501 (examples: one command a line, as it is copied)
    from duomem_mlx.memory.writer import write  # noqa: PLC0415 (CLI start-up without the stage)

    if Path(out).exists() and Path(episodes).exists() and Path(out).samefile(episodes):
        raise DuomemError(f"--out {out} is the episode log itself; write the memories to another file")
    check_destination(out, force)
    written = write(episodes, writer, max_tokens, per_task, kind)
    write_memories(out, written.memories)
    dropped = f"; {written.summary()}" if written.dropped else ""
    click.echo(
        f"wrote {len(written.memories)} memories for {len({m.task_type for m in written.memories})} task type(s) to "
        f"{out}{dropped}"
    )
