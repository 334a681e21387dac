"""The memory bank: procedural memories + float16 keys in the student's space, top-k cosine in MLX.

On disk (a directory): memories.jsonl (one {id, task_type, text, source, task, kind, observation}
per line; the key embeds the task text the memory was written for, or its text when it has none,
and with key "task+observation" the first observation of its episode too), keys.safetensors
("keys": float16 [N, d], unit rows), bank.json (format, embedder path and fingerprint, dim,
count, key)."""

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from duomem_mlx.errors import DuomemError
from duomem_mlx.io import atomic_dir, read_json, read_jsonl, require, write_atomic
from duomem_mlx.runtime.embed import embed, fingerprint
from duomem_mlx.runtime.retrieval import KEYS, KINDS, query_text

FORMAT = 1
FILES = ("bank.json", "memories.jsonl", "keys.safetensors")


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


def game_of(episode_id: str) -> str:
    """env/task/variation of an episode id (env/task/variation/repeat): the game, whoever played it."""
    return episode_id.rsplit("/", 1)[0] if episode_id.count("/") >= 3 else episode_id


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


def write_memories(path: str | Path, memories: list[Memory]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(asdict(m), ensure_ascii=False) + "\n" for m in memories))


def check_bank_info(info, _where=None) -> dict:
    require(
        isinstance(info, dict) and {"fingerprint", "dim", "embedder"} <= info.keys(),
        "bank.json lacks fingerprint/dim/embedder",
    )
    require(
        isinstance(info["dim"], int) and isinstance(info["fingerprint"], str),
        "dim must be an integer, fingerprint a string",
    )
    return info


@dataclass
class MemoryBank:
    memories: list[Memory]
    keys: mx.array  # float16 [N, d], unit rows
    info: dict  # bank.json: format, embedder, adapter_path, fingerprint, dim, count

    @property
    def dim(self) -> int:
        return self.info["dim"]

    def __len__(self) -> int:
        return len(self.memories)

    def save(self, out: str | Path) -> Path:
        """Write the bank directory whole (a temporary directory renamed over `out`); `out` must
        be new, empty or a bank: a bank lives in a directory of its own."""
        out = Path(out)
        others = sorted(p.name for p in out.iterdir() if p.name not in FILES) if out.is_dir() else []
        if others:
            raise DuomemError(
                f"{out} holds other files ({', '.join(others[:3])}); a memory bank goes in a directory of its own"
            )
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out) as tmp:
            write_memories(tmp / "memories.jsonl", self.memories)
            mx.save_safetensors(str(tmp / "keys.safetensors"), {"keys": self.keys.astype(mx.float16)})
            (tmp / "bank.json").write_text(json.dumps(self.info, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> "MemoryBank":
        path = Path(path)
        if not path.is_dir():
            raise DuomemError(
                f"no memory bank at {path}; build one with `duomem-mlx memory build --memories FILE --embedder MODEL --out {path}`"
            )
        missing = [name for name in FILES if not (path / name).is_file()]
        if missing:
            raise DuomemError(
                f"memory bank {path} is incomplete (missing {', '.join(missing)}); rebuild it with `duomem-mlx memory build`"
            )
        rebuild = f"the memory bank is corrupt; rebuild it with `duomem-mlx memory build --out {path}`"
        info = read_json(path / "bank.json", rebuild, check_bank_info)
        if info.get("format") != FORMAT:
            raise DuomemError(
                f"memory bank {path} has format {info.get('format')}, this version reads {FORMAT}; rebuild it"
            )
        try:
            keys = mx.load(str(path / "keys.safetensors"))["keys"]
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise DuomemError(
                f"memory bank {path} is corrupt ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}); rebuild it with `duomem-mlx memory build`"
            )
        memories = read_memories(path / "memories.jsonl")
        if keys.ndim != 2 or keys.shape[0] != len(memories) or keys.shape[1] != info.get("dim"):
            raise DuomemError(
                f"memory bank {path} is corrupt: keys {tuple(keys.shape)} for {len(memories)} memories of dim {info.get('dim')}; rebuild it"
            )
        return cls(memories, keys, info)

    def check_embedder(self, model, tokenizer) -> None:
        """Raise unless `model` is the exact network (weights, adapters, tokenizer) that built the keys."""
        if fingerprint(model, tokenizer) != self.info["fingerprint"]:
            raise DuomemError(
                f"this memory bank was built with another embedder ({self.info.get('embedder')}); rebuild it for this model "
                f"with `duomem-mlx memory build --embedder MODEL`, or use the model it was built with"
            )

    @property
    def key(self) -> str:
        return self.info.get("key", "task")

    def search(
        self,
        query,
        k: int = 3,
        task_type: str | None = None,
        model=None,
        tokenizer=None,
        exclude_games: set[str] = frozenset(),
    ) -> list[tuple[Memory, float]]:
        """Top-k (memory, cosine) for a query text (embedded with model/tokenizer) or a vector [d];
        a memory written from games in `exclude_games` (env/task/variation) alone never comes back
        (one induced from several games as well is knowledge of the task, not that game's answer)."""
        if isinstance(query, str):
            if model is None:
                raise DuomemError("a text query needs the embedder model; pass --embedder or search with a vector")
            query = embed(model, tokenizer, [query])[0]
        query = mx.array(query, dtype=mx.float32).reshape(-1)
        if query.shape[0] != self.dim:
            raise DuomemError(
                f"query has dim {query.shape[0]}, the bank's keys have {self.dim}; use the bank's embedder"
            )
        rows = np.arange(len(self.memories))
        if task_type is not None:
            rows = rows[[m.task_type == task_type for m in self.memories]]
        if exclude_games:
            rows = rows[[not written_from(self.memories[i], exclude_games) for i in rows]]
        if k <= 0 or rows.size == 0:
            return []
        keys = self.keys[mx.array(rows)].astype(mx.float32)
        scores = keys @ (query / mx.maximum(mx.linalg.norm(query), 1e-12))
        top = mx.argsort(-scores)[:k]
        scores, top = scores[top].tolist(), top.tolist()
        return [(self.memories[rows[i]], s) for i, s in zip(top, scores)]


def recorded_key(directory: str | Path) -> str:
    """The key of the bank in `directory` (a memories.jsonl beside no bank.json: "task")."""
    info = Path(directory) / "bank.json"
    return (
        read_json(info, "the memory bank is corrupt; rebuild it", check_bank_info).get("key", "task")
        if info.is_file()
        else "task"
    )


def build(
    memories: list,
    model,
    tokenizer,
    embedder: str = "",
    adapter_path: str | None = None,
    progress: bool = False,
    key: str = "task",
) -> MemoryBank:
    """A bank from Memory objects or memory dicts (e.g. a teacher cache's memories.jsonl rows)."""
    if key not in KEYS:
        raise DuomemError(f"unknown key {key!r}; use one of {', '.join(KEYS)}")
    memories = [m if isinstance(m, Memory) else parse_memory(m, f"memory {i}") for i, m in enumerate(memories)]
    if not memories:
        raise DuomemError("no memories to build a bank from; check the memory file")
    ids = [m.id for m in memories]
    if len(set(ids)) != len(ids):
        raise DuomemError(f"duplicate memory id {next(i for i in ids if ids.count(i) > 1)}; ids must be unique")
    keys = embed(model, tokenizer, [m.key_text(key) for m in memories], progress=progress)
    info = {
        "format": FORMAT,
        "embedder": embedder,
        "adapter_path": adapter_path,
        "fingerprint": fingerprint(model, tokenizer),
        "dim": int(keys.shape[1]),
        "count": len(memories),
        "key": key,
    }
    return MemoryBank(memories, keys.astype(mx.float16), info)
