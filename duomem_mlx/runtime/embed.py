"""Memory keys in the student's own space: mean-pooled final hidden states, L2-normalised; a
memory bank built from them (formats/bank.py is the bank on disk)."""

from pathlib import Path

import mlx.core as mx

from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.bank import FORMAT, MemoryBank
from duomem_mlx.formats.fingerprints import embedder_fingerprint
from duomem_mlx.formats.memories import KEYS, Memory, parse_memory
from duomem_mlx.progress import Progress
from duomem_mlx.runtime.models import load

MAX_TOKENS = 512  # longer texts are embedded from their first MAX_TOKENS tokens


def backbone(model):
    """The transformer without its LM head: returns final (normed) hidden states [B, T, d]."""
    inner = getattr(model, "model", None)
    if inner is None or not callable(inner):
        raise DuomemError(
            f"cannot embed with {type(model).__module__}: it has no `.model` backbone; "
            "use a llama/qwen-style mlx-lm model"
        )
    return inner


def embed(model, tokenizer, texts: list[str], batch_size: int = 16, progress: bool = False) -> mx.array:
    """float32 [N, d] unit vectors, one per text.

    Batches are right-padded: attention is causal, so padding after a text never changes its
    hidden states, and the mean runs over its own tokens only."""
    inner = backbone(model)
    if not texts:
        raise DuomemError("nothing to embed")
    ids = [list(tokenizer.encode(t))[:MAX_TOKENS] for t in texts]
    if any(not x for x in ids):
        raise DuomemError("cannot embed an empty text; every memory and query needs some words")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [None] * len(ids)
    for start in Progress(range(0, len(order), batch_size), desc="embed", unit="batch", disable=not progress):
        batch = order[start : start + batch_size]
        width = max(len(ids[i]) for i in batch)
        tokens = mx.array([ids[i] + [0] * (width - len(ids[i])) for i in batch])
        lengths = mx.array([len(ids[i]) for i in batch])
        mask = (mx.arange(width)[None, :] < lengths[:, None]).astype(mx.float32)[..., None]
        hidden = inner(tokens).astype(mx.float32)
        pooled = (hidden * mask).sum(axis=1) / lengths[:, None]
        pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        mx.eval(pooled)
        for row, i in enumerate(batch):
            out[i] = pooled[row]
    return mx.stack(out)


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
        "fingerprint": embedder_fingerprint(model, tokenizer),
        "dim": int(keys.shape[1]),
        "count": len(memories),
        "key": key,
    }
    return MemoryBank(memories, keys.astype(mx.float16), info)


def rebuild_bank(
    memories: list, model_path: str, out: Path, embedder: str, key: str, adapters: Path | None = None
) -> dict:
    """The memories embedded by the final model (`model_path` plus `adapters`, as `eval` loads it)
    into the bank `out`, fingerprinted to `embedder`: distill's OUT/memory, quantize's package's."""
    adapter_path = str(adapters.resolve()) if adapters else None
    model, tokenizer = load(model_path, adapter_path)
    bank = build(memories, model, tokenizer, embedder=embedder, adapter_path=adapter_path, progress=True, key=key)
    bank.save(out)
    return {"count": len(bank), "dim": bank.dim}
