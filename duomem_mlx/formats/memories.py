"""Procedural memories on disk: memories.jsonl (`memory write`'s, a teacher cache's, a memory
bank's), one {id, task_type, text, source, task, kind, observation} per line, and what a bank's
key embeds of each (KEYS, query_text). No mlx: the CLI's options read KINDS and KEYS."""

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.episodes import game_of
from duomem_mlx.io import HINT, read_jsonl, write_atomic

KINDS = ("script", "trajectory", "both")  # MemP's: a procedure, a solved episode, or the procedure then the episode
KEYS = ("task", "task+observation")  # what a key embeds; the first observation tells instances of one task apart
OBSERVATION_CHARS = 300  # of the first observation, in a key and in a query


def query_text(task: str, observation: str, key: str = "task") -> str:
    """What a key embeds, and what a query for a task with this first observation embeds."""
    if key == "task" or not observation:
        return task
    return task + "\n" + " ".join(observation.split())[:OBSERVATION_CHARS]


@dataclass
class Memory:
    id: str
    task_type: str
    text: str
    source: list[str] = field(default_factory=list)
    task: str = ""  # the task text it was written for: its key, since a query is a task text (else the text is)
    kind: str = "script"
    observation: str = ""  # the first observation of the episode it was written from

    def key_text(self, key: str = "task") -> str:
        return query_text(self.task or self.text, self.observation, key)


def written_from(memory: Memory, games: set[str]) -> bool:
    """Whether the memory was written from these games alone (a memory with no source never was)."""
    sources = {game_of(s) for s in memory.source}
    return bool(sources) and sources <= games


def memory_id(text: str) -> str:
    return "mem-" + hashlib.sha1(text.encode()).hexdigest()[:12]


def parse_memory(data, where: str) -> Memory:
    if not isinstance(data, dict):
        raise DuomemError(f"{where}: expected a JSON object with a text field")
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DuomemError(f'{where}: missing or empty "text"')
    source = data.get("source", [])
    if isinstance(source, str):
        source = [source]
    if not isinstance(source, list):
        raise DuomemError(f'{where}: "source" must be a list of episode ids')
    task, observation, kind = data.get("task") or "", data.get("observation") or "", data.get("kind") or "script"
    if not isinstance(task, str) or not isinstance(observation, str):
        raise DuomemError(
            f'{where}: "task" and "observation" must be the task text and first observation the memory was written for'
        )
    if kind not in KINDS:
        raise DuomemError(f"{where}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    return Memory(
        str(data.get("id") or memory_id(text)),
        str(data.get("task_type") or ""),
        text.strip(),
        [str(s) for s in source],
        task.strip(),
        kind,
        observation.strip(),
    )


def read_memories(path: str | Path) -> list[Memory]:
    """Memories from a JSONL file; id defaults to a hash of the text, task_type to "" (any)."""
    path = Path(path)
    if not path.is_file():
        raise DuomemError(f"memory file {path} does not exist; write one with `duomem-mlx memory write`")
    seen: dict[str, str] = {}

    def parse_unique(data, where: str) -> Memory:
        memory = parse_memory(data, where)
        if memory.id in seen:
            raise DuomemError(f"{where}: duplicate id {memory.id} (first on {seen[memory.id]})")
        seen[memory.id] = where.removeprefix(f"{path} ")
        return memory

    return read_jsonl(path, parse_unique, "fix or delete that line")


def merge_duplicates(memories: list[Memory]) -> list[Memory]:
    """One memory per id, the sources of its duplicates added to it."""
    by_id: dict[str, Memory] = {}
    for m in memories:
        if m.id in by_id:
            by_id[m.id].source += m.source
        else:
            by_id[m.id] = m
    return list(by_id.values())


def write_memories(path: str | Path, memories: list[Memory], hint: str = HINT) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(asdict(m), ensure_ascii=False) + "\n" for m in memories), hint)
