"""The memory bank on disk (a directory): memories.jsonl (formats/memories.py; the key embeds the
task text the memory was written for, or its text when it has none, and with key
"task+observation" the first observation of its episode too), keys.safetensors ("keys":
float16 [N, d], unit rows), bank.json (format, embedder path and fingerprint, dim, count, key);
top-k cosine in MLX. Building one needs a model: runtime/embed.py."""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.fingerprints import embedder_fingerprint
from duomem_mlx.formats.memories import Memory, read_memories, write_memories, written_from
from duomem_mlx.io import atomic_dir, read_json, require

FORMAT = 1
FILES = ("bank.json", "memories.jsonl", "keys.safetensors")


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
                f"no memory bank at {path}; build one with "
                f"`duomem-mlx memory build --memories FILE --embedder MODEL --out {path}`"
            )
        missing = [name for name in FILES if not (path / name).is_file()]
        if missing:
            raise DuomemError(
                f"memory bank {path} is incomplete (missing {', '.join(missing)}); "
                "rebuild it with `duomem-mlx memory build`"
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
            first = str(e).splitlines()[0] if str(e) else ""
            raise DuomemError(
                f"memory bank {path} is corrupt ({e.__class__.__name__}: {first}); "
                "rebuild it with `duomem-mlx memory build`"
            )
        memories = read_memories(path / "memories.jsonl")
        if keys.ndim != 2 or keys.shape[0] != len(memories) or keys.shape[1] != info.get("dim"):
            raise DuomemError(
                f"memory bank {path} is corrupt: keys {tuple(keys.shape)} for {len(memories)} memories "
                f"of dim {info.get('dim')}; rebuild it"
            )
        return cls(memories, keys, info)

    def check_embedder(self, model, tokenizer) -> None:
        """Raise unless `model` is the exact network (weights, adapters, tokenizer) that built the keys."""
        if embedder_fingerprint(model, tokenizer) != self.info["fingerprint"]:
            raise DuomemError(
                f"this memory bank was built with another embedder ({self.info.get('embedder')}); "
                "rebuild it for this model with `duomem-mlx memory build --embedder MODEL`, "
                "or use the model it was built with"
            )

    @property
    def key(self) -> str:
        return self.info.get("key", "task")

    def search(
        self, query, k: int = 3, task_type: str | None = None, exclude_games: set[str] = frozenset()
    ) -> list[tuple[Memory, float]]:
        """Top-k (memory, cosine) for a query vector [d] (a text embedded by the bank's embedder:
        runtime/embed.py); a memory written from games in `exclude_games` (env/task/variation) alone
        never comes back (one induced from several games as well is knowledge of the task, not that
        game's answer)."""
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
