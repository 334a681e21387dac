"""The teacher cache on disk (docs/design.md, "Teacher cache").

    manifest.json              format, version, teacher, tokenizer, top_k, env, tasks, counts,
                               dropped ids (played, not kept), failed ids (the server failed them: why)
    episodes.jsonl             one kept episode per line (+ "shard", "tokens", "masked")
    shards/NNNNN.safetensors   input_ids int32 [T], loss_mask uint8 [T],
                               topk_ids int32 [N,k], topk_logprobs float16 [N,k] (N = sum(mask))
    memories.jsonl             the teacher's procedural memories

Shards are written under a temporary name and renamed; an episode's line is appended only
once its shard is on disk, and the manifest is rewritten atomically after every episode.
A row or entry of topk_ids equal to -1 carries no teacher distribution (an openai teacher
whose generated tokens differ from the local tokenization); its logprob is 0.
"""

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
from filelock import FileLock, Timeout

from duomem_mlx.envs.base import Episode
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.memories import Memory, parse_memory, write_memories
from duomem_mlx.io import read_json, read_jsonl, require, write_atomic

FORMAT = "duomem-teacher-cache"
VERSION = 1
# Settings a resumed run must share with the cache it continues.
LOCK = ".lock"
SETTINGS = (
    "teacher",
    "backend",
    "tokenizer_fingerprint",
    "top_k",
    "env",
    "tasks",
    "split",
    "keep",
    "temperature",
    "seed",
    "max_steps",
)
DTYPES = {"input_ids": "I32", "loss_mask": "U8", "topk_ids": "I32", "topk_logprobs": "F16"}
NUMPY = {"I32": np.int32, "U8": np.uint8, "F16": np.float16}


def shard_name(index: int) -> str:
    return f"shards/{index:05d}.safetensors"


def encode_safetensors(arrays: dict[str, np.ndarray]) -> bytes:
    return safetensors.numpy.save({n: np.ascontiguousarray(a, dtype=NUMPY[DTYPES[n]]) for n, a in arrays.items()})


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Arrays of a shard; ValueError naming what is wrong when it is truncated or malformed."""
    try:
        return safetensors.numpy.load(path.read_bytes())
    except safetensors.SafetensorError as e:
        raise ValueError(f"truncated or malformed ({e})")


def load_shard(cache: str | Path, record: dict) -> dict[str, np.ndarray]:
    path = Path(cache) / record["shard"]
    try:
        return read_safetensors(path)
    except (OSError, ValueError) as e:
        raise DuomemError(f"shard {path} is unreadable ({e}); run `duomem-mlx cache verify {cache}`")


def damaged(cache) -> str:
    return f"the cache is damaged: `duomem-mlx cache verify {cache}`, or recollect it with `duomem-mlx teach --force`"


def check_manifest(data, _where=None) -> dict:
    require(isinstance(data, dict), "expected a JSON object")
    require(isinstance(data.get("counts", {}), dict), "counts must be an object")
    require(isinstance(data.get("top_k", 0), int), "top_k must be an integer")
    require(isinstance(data.get("dropped", []), list), "dropped must be a list")
    require(isinstance(data.get("failed", {}), dict), "failed must be an object")
    return data


def check_record(record, _where=None) -> dict:
    """What info, verify and resume read from an episodes.jsonl line."""
    require(isinstance(record, dict), "expected a JSON object")
    require(isinstance(record.get("id"), str) and isinstance(record.get("task"), str), "id and task must be strings")
    shard = record.get("shard")
    require(
        shard is None or (isinstance(shard, str) and re.fullmatch(r"shards/\d{5}\.safetensors", shard)),
        f"bad shard {shard!r}",
    )
    for key in ("tokens", "masked", "unaligned_rows"):
        require(isinstance(record.get(key, 0), int), f"{key} must be an integer")
    return record


def read_manifest(cache: str | Path) -> dict:
    path = Path(cache) / "manifest.json"
    if not path.is_file():
        raise DuomemError(f"{cache} is not a teacher cache (no manifest.json); write one with `duomem-mlx teach`")
    manifest = read_json(path, damaged(cache), check_manifest)
    if manifest.get("format") != FORMAT:
        raise DuomemError(f"{cache} is not a duomem teacher cache (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise DuomemError(
            f"{cache} is teacher-cache format version {manifest.get('version')}, "
            f"this duomem-mlx reads version {VERSION}; "
            "recollect it with `duomem-mlx teach --force` or use the duomem-mlx that wrote it"
        )
    return manifest


def read_cache_records(cache: str | Path, torn_ok: bool = False) -> list[dict]:
    """The kept episodes' lines in order: an episode's JSON plus its shard, tokens, masked and
    unaligned_rows. A torn last line (a killed run) is skipped when torn_ok."""
    path = Path(cache) / "episodes.jsonl"
    return read_jsonl(path, check_record, damaged(cache), torn_ok) if path.exists() else []


def read_cache_episodes(cache: str | Path) -> list[Episode]:
    """The kept episodes of a teacher cache (its manifest checked first), as played."""
    read_manifest(cache)
    return as_episodes(read_cache_records(cache))


def as_episodes(records: list[dict]) -> list[Episode]:
    return [Episode.from_json(record) for record in records]


def read_cache_memories(cache: str | Path) -> list[Memory]:
    """The teacher's memories, each checked as a memory bank reads it (formats.memories.parse_memory)."""
    path = Path(cache) / "memories.jsonl"
    if not path.exists():
        return []
    return read_jsonl(path, parse_memory, damaged(cache))


def memories_file(cache: str | Path) -> Path:
    """A finished teacher cache's memories.jsonl: a memory file (formats.memories.read_memories reads it)."""
    path = Path(cache) / "memories.jsonl"
    if not (Path(cache) / "manifest.json").is_file():
        raise DuomemError(f"{cache} is not a teacher cache (no manifest.json); write one with `duomem-mlx teach`")
    if not path.is_file():
        raise DuomemError(
            f"{cache} holds no memories.jsonl yet (an unfinished run?); finish it with `duomem-mlx teach ... --resume`"
        )
    return path


class CacheWriter:
    """Appends episodes to a cache directory; safe to kill at any point and resume. Holds the
    directory's lock (.lock) from creation to close(), so two runs never share shard numbers."""

    def __init__(self, out: str | Path, settings: dict, resume: bool = False, force: bool = False):
        self.out = Path(out)
        manifest_path = self.out / "manifest.json"
        others = [p for p in self.out.iterdir() if p.name != LOCK] if self.out.is_dir() else []
        if others and not manifest_path.exists() and not force:
            raise DuomemError(f"{out} exists and is not a teacher cache; choose another --out or pass --force")
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(self.out / LOCK, timeout=0)
        try:
            self.lock.acquire()
        except Timeout:
            raise DuomemError(
                f"another `duomem-mlx teach` is writing {out} right now; wait for it to finish or choose another --out"
            )
        try:
            self.open(settings, resume, force)
        except BaseException:
            self.close()
            raise

    def open(self, settings: dict, resume: bool, force: bool):
        manifest_path = self.out / "manifest.json"
        if manifest_path.exists() and not (resume or force):
            state = "finished" if read_manifest(self.out).get("complete") else "unfinished"
            raise DuomemError(
                f"{self.out} already holds a {state} teacher cache; "
                "pass --resume to continue it or --force to overwrite it"
            )
        if force and not resume:
            for name in ("manifest.json", "episodes.jsonl", "memories.jsonl"):
                (self.out / name).unlink(missing_ok=True)
            for shard in (self.out / "shards").glob("*.safetensors") if (self.out / "shards").exists() else []:
                shard.unlink()
        (self.out / "shards").mkdir(exist_ok=True)
        self.episodes, self.dropped, self.failed = [], [], {}
        self.manifest = {
            "format": FORMAT,
            "version": VERSION,
            **settings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if resume and manifest_path.exists():
            old = read_manifest(self.out)
            changed = [k for k in SETTINGS if k in old and old[k] != settings.get(k)]
            if changed:
                diff = ", ".join(f"{k}: {old[k]!r} -> {settings.get(k)!r}" for k in changed)
                raise DuomemError(
                    f"--resume with different settings than {self.out} was collected with ({diff}); "
                    "use the same flags or --force"
                )
            self.manifest["created"] = old.get("created", self.manifest["created"])
            self.dropped = list(old.get("dropped", []))
            self.failed = dict(old.get("failed", {}))
            self._truncate_torn_line()
            self.episodes = read_cache_records(self.out)
        self.done = {e["id"] for e in self.episodes} | set(self.dropped)
        self.save_manifest(complete=False)

    def close(self) -> None:
        self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def _truncate_torn_line(self):
        path = self.out / "episodes.jsonl"
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def add(self, record: dict, arrays: dict[str, np.ndarray] | None) -> None:
        """Keep an episode: its shard first (atomic), then its line, then the manifest."""
        record = dict(record)
        record["shard"] = None
        if arrays is not None:
            record["shard"] = shard_name(len(self.episodes))
            record["tokens"] = int(arrays["input_ids"].shape[0])
            record["masked"] = int(arrays["loss_mask"].sum())
            if "topk_ids" in arrays:
                record["unaligned_rows"] = int((arrays["topk_ids"][:, 0] < 0).sum()) if len(arrays["topk_ids"]) else 0
            write_atomic(self.out / record["shard"], encode_safetensors(arrays), self.intact())
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.out / "episodes.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.episodes.append(record)
        self.done.add(record["id"])
        self.failed.pop(record["id"], None)
        self.save_manifest(complete=False)

    def drop(self, episode_id: str) -> None:
        """Remember a played episode that is not kept, so --resume does not replay it."""
        self.dropped.append(episode_id)
        self.done.add(episode_id)
        self.failed.pop(episode_id, None)
        self.save_manifest(complete=False)

    def fail(self, episode_id: str, reason: str) -> None:
        """Name an episode the teacher server failed (its requests' retries ran out) and why; it is
        not played: --resume plays it again."""
        self.failed[episode_id] = reason
        self.save_manifest(complete=False)

    def finish(self, memories: list[Memory]) -> None:
        write_memories(self.out / "memories.jsonl", memories, self.intact())
        self.save_manifest(complete=True, memories=len(memories))

    def save_manifest(self, complete: bool, memories: int | None = None) -> None:
        kept = self.episodes
        self.manifest.update(
            complete=complete,
            updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
            counts={
                "played": len(kept) + len(self.dropped),
                "kept": len(kept),
                "success": sum(bool(e.get("success")) for e in kept),
                "tokens": sum(e.get("tokens", 0) for e in kept),
                "masked_tokens": sum(e.get("masked", 0) for e in kept),
                "unaligned_rows": sum(e.get("unaligned_rows", 0) for e in kept),
                "memories": memories if memories is not None else self.manifest.get("counts", {}).get("memories", 0),
            },
            dropped=self.dropped,
            failed=self.failed,
        )
        write_atomic(self.out / "manifest.json", json.dumps(self.manifest, indent=1, ensure_ascii=False), self.intact())

    def intact(self) -> str:
        return f"the {len(self.episodes)} episodes already cached are intact: free space and rerun with --resume"


def info(cache: str | Path) -> dict:
    """Summary of a cache: counts, per-task success, bytes per masked token, memories."""
    manifest = read_manifest(cache)
    episodes = read_cache_records(cache)
    tasks: dict[str, list[int]] = {}
    for e in episodes:
        tasks.setdefault(e["task"], [0, 0])
        tasks[e["task"]][0] += 1
        tasks[e["task"]][1] += bool(e.get("success"))
    shard_bytes = sum(
        (Path(cache) / e["shard"]).stat().st_size
        for e in episodes
        if e.get("shard") and (Path(cache) / e["shard"]).exists()
    )
    masked = sum(e.get("masked", 0) for e in episodes)
    k = manifest.get("top_k", 0)
    return {
        "teacher": manifest.get("teacher"),
        "backend": manifest.get("backend"),
        "tokenizer_fingerprint": manifest.get("tokenizer_fingerprint"),
        "env": manifest.get("env"),
        "complete": manifest.get("complete"),
        "episodes": len(episodes),
        "played": manifest.get("counts", {}).get("played", len(episodes)),
        "failed": len(manifest.get("failed", {})),
        "success_rate": sum(bool(e.get("success")) for e in episodes) / max(1, len(episodes)),
        "tasks": {t: {"episodes": n, "success_rate": s / n} for t, (n, s) in sorted(tasks.items())},
        "tokens": sum(e.get("tokens", 0) for e in episodes),
        "masked_tokens": masked,
        "top_k": k,
        "unaligned_rows": sum(e.get("unaligned_rows", 0) for e in episodes),
        "shard_bytes": shard_bytes,
        "bytes_per_masked_token": shard_bytes / masked if masked else None,
        "topk_bytes_per_masked_token": 6 * k if masked and k else None,
        "memories": len(read_cache_memories(cache)),
    }


def verify(cache: str | Path) -> tuple[int, list[str]]:
    """(shards checked, problems): every shard readable, shapes and dtypes consistent with
    the manifest, the episode line and the mask."""
    cache = Path(cache)
    manifest = read_manifest(cache)
    k, vocab = manifest.get("top_k", 0), manifest.get("vocab_size")
    problems, seen, checked = [], set(), 0
    try:
        info(cache)  # everything `cache info` and the readers of the cache read
        episodes = read_cache_records(cache)
    except DuomemError as e:
        return 0, [str(e)]
    for e in episodes:
        if e["id"] in seen:
            problems.append(f"episodes.jsonl: duplicate episode id {e['id']}")
        seen.add(e["id"])
        if not e.get("shard"):
            continue
        path = cache / e["shard"]
        checked += 1
        try:
            arrays = read_safetensors(path)
        except FileNotFoundError:
            problems.append(f"{path}: missing (episode {e['id']})")
            continue
        except ValueError as err:
            problems.append(f"{path}: {err}")
            continue
        problems += [f"{path}: {p}" for p in check_shard(arrays, e, k, vocab)]
    return checked, problems


def check_shard(arrays: dict, episode: dict, k: int, vocab: int | None) -> list[str]:
    expected = ["input_ids", "loss_mask"] + (["topk_ids", "topk_logprobs"] if k else [])
    missing = [name for name in expected if name not in arrays]
    if missing:
        return [f"missing {', '.join(missing)}"]
    wrong = [
        f"{n} is {arrays[n].dtype}, expected {np.dtype(NUMPY[DTYPES[n]])}"
        for n in expected
        if arrays[n].dtype != NUMPY[DTYPES[n]]
    ]
    if wrong:
        return wrong
    ids, mask = arrays["input_ids"], arrays["loss_mask"]
    t, n = ids.shape[0], int(mask.sum())
    problems = []
    if ids.ndim != 1 or mask.shape != ids.shape:
        problems.append(f"input_ids {list(ids.shape)} and loss_mask {list(mask.shape)} must be equal 1-D shapes")
    if (t, n) != (episode.get("tokens"), episode.get("masked")):
        problems.append(
            f"{t} tokens / {n} masked, episodes.jsonl says {episode.get('tokens')} / {episode.get('masked')}"
        )
    if vocab and len(ids) and (ids.min() < 0 or ids.max() >= vocab):
        problems.append(f"input_ids outside the vocabulary [0, {vocab})")
    if k:
        for name in ("topk_ids", "topk_logprobs"):
            if list(arrays[name].shape) != [n, k]:
                problems.append(f"{name} is {list(arrays[name].shape)}, expected [{n}, {k}] (masked tokens x top_k)")
        if not problems:
            problems += check_topk(arrays["topk_ids"], arrays["topk_logprobs"].astype(np.float32), vocab)
    return problems


def check_topk(ids: np.ndarray, logprobs: np.ndarray, vocab: int | None) -> list[str]:
    """Ids in the vocabulary (or -1, no teacher distribution), logprobs finite and at most 0."""
    problems = []
    if ids.size and (ids.min() < -1 or (vocab and ids.max() >= vocab)):
        problems.append(f"topk_ids outside the vocabulary [0, {vocab})")
    finite = np.isfinite(logprobs)
    if not finite.all():
        problems.append(f"topk_logprobs holds {int((~finite).sum())} non-finite values (NaN or inf)")
    if (logprobs[finite] > 0).any():
        problems.append(f"topk_logprobs holds {int((logprobs[finite] > 0).sum())} positive values (a logprob is <= 0)")
    return problems
