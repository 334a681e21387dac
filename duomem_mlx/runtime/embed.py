"""Memory keys in the student's own space: mean-pooled final hidden states, L2-normalised."""

import hashlib
import json

import mlx.core as mx
from mlx.utils import tree_flatten

from duomem_mlx.errors import DuomemError
from duomem_mlx.progress import Progress
from duomem_mlx.runtime.models import tokenizer_fingerprint

MAX_TOKENS = 512  # longer texts are embedded from their first MAX_TOKENS tokens
SAMPLE = 4096  # elements per weight tensor that go into the fingerprint


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


def fingerprint(model, tokenizer) -> str:
    """sha256 over the tokenizer, every weight's name/shape/dtype and its first SAMPLE values.

    Cheap (no forward pass, a few KB per tensor) and platform independent; any other model,
    fine-tune, LoRA adapter or quantization gives another fingerprint."""
    h = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    for name, p in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        head, dtype = p.reshape(-1)[:SAMPLE], p.dtype
        if name.endswith(
            (".scales", ".biases")
        ):  # stored in 16 bits, converted to float32 by a CPU at load (cpu_quant)
            head, dtype = head.astype(mx.float16), "16-bit"
        if head.dtype == mx.bfloat16:
            head = head.view(mx.uint16)
        h.update(json.dumps([name, p.shape, str(dtype)]).encode())
        h.update(memoryview(head))
    return h.hexdigest()
