"""The vocabulary head on chosen rows (positions) and columns (token ids) only, as plain functions.

A real family's head is large (Qwen3: 151,936 x hidden: 10-26% of the weights a decode pass reads
from 4B down to 0.6B, and of a prefill token's FLOPs); mlx-lm computes all of it, at every position
of a pass. These functions run the model's backbone, `model.model(inputs, cache)` (the final, normed
hidden states), and apply the head to the rows and columns asked for. A model of another layout
(another family, or an object standing in for a model, such as the teacher's top-k recorder) is
called whole and its logits are cut down afterwards: the same numbers, at full cost."""

import mlx.core as mx
import mlx.nn as nn

# mlx_lm.models modules whose `Model.__call__` is `head(self.model(inputs, cache, input_embeddings))`, `head`
# being `self.lm_head`, or `self.model.embed_tokens.as_linear` when the embeddings are tied (then there is
# no `lm_head`; gemma3_text pops it). A module, not a config's model_type: mlx-lm maps several types to one
# module (mistral -> llama). That layout is mlx-lm's, not a documented API:
# tests/test_decode.py::test_plain_head_layout checks it on a tiny model of each.
PLAIN_HEAD = frozenset({"llama", "qwen2", "qwen3", "gemma3_text", "lfm2"})
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def plain_head(model) -> bool:
    """Whether `model` has the layout of PLAIN_HEAD: a backbone `model.model` and a head these functions apply."""
    module, _, name = type(model).__module__.rpartition(".")
    return module == "mlx_lm.models" and name in PLAIN_HEAD


def hidden_logits(model, hidden: mx.array, vocab: list[int] | None = None) -> mx.array:
    """The head of a `plain_head` model on final hidden states [..., d]: the logits, over the token
    ids `vocab` only when given (column i is vocab[i]'s logit)."""
    tied = "lm_head" not in model
    head = model.model.embed_tokens if tied else model.lm_head
    full = head.as_linear if tied else head
    return full(hidden) if vocab is None else head_subset(head, full, hidden, mx.array(vocab))


def head_subset(head: nn.Module, full, hidden: mx.array, ids: mx.array) -> mx.array:
    """`full(hidden)[..., ids]` with only the rows `ids` of the head's weight read (full precision or
    quantized); `head` is a linear layer or, tied, the embedding `full` = `head.as_linear` belongs to.
    An adapted or unknown head runs `full`, then takes the columns."""
    if isinstance(head, QUANTIZED):
        biases = head.get("biases")
        out = mx.quantized_matmul(
            hidden,
            head["weight"][ids],
            scales=head["scales"][ids],
            biases=None if biases is None else biases[ids],
            transpose=True,
            group_size=head.group_size,
            bits=head.bits,
            mode=head.mode,
        )
    elif isinstance(head, (nn.Linear, nn.Embedding)):
        out = hidden @ head["weight"][ids].T
    else:
        return full(hidden)[..., ids]
    return out + head["bias"][ids] if "bias" in head else out


def last_rows(model, inputs: mx.array, cache, rows: int, vocab: list[int] | None = None) -> mx.array:
    """`model(inputs, cache=cache)[:, -rows:, vocab]`, the head computed for those rows and columns only.
    mlx-lm skips the head over a prompt with a second pass over its last token, which reads the
    weights again, and computes all of it for every generated token."""
    if not plain_head(model):
        logits = model(inputs, cache=cache)[:, -rows:]
        return logits if vocab is None else logits[..., mx.array(vocab)]
    return hidden_logits(model, model.model(inputs, cache=cache)[:, -rows:], vocab)


def logits_at(model, inputs: mx.array, rows: mx.array) -> mx.array:
    """`model(inputs).reshape(-1, V)[rows]`, the head computed at those rows of the flattened batch only
    (training scores a few action tokens of each episode)."""
    if not plain_head(model):
        logits = model(inputs)
        return logits.reshape(-1, logits.shape[-1])[rows]
    hidden = model.model(inputs)
    return hidden_logits(model, hidden.reshape(1, -1, hidden.shape[-1])[:, rows])[0]
