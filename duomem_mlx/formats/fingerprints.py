"""Fingerprints the formats record: a tokenizer's (a teacher cache's top-k rows are in its
vocabulary) and an embedder's (a memory bank's keys are in its hidden space)."""

import hashlib
import json

import mlx.core as mx
from mlx.utils import tree_flatten

SAMPLE = 4096  # elements per weight tensor that go into the embedder fingerprint


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id): equal fingerprints mean logits can be shared."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else tokenizer.vocab
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def embedder_fingerprint(model, tokenizer) -> str:
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
