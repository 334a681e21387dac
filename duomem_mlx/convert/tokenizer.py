"""A transformers fast tokenizer rebuilt from a GGUF's `tokenizer.ggml.*` metadata: byte-level
BPE (`gpt2`, with the pre-tokenizer the file names) or SentencePiece BPE (`llama`, with scores
and byte fallback, as Gemma ships). Nothing from the file is executed: the chat template is
a string the tokenizer's sandboxed Jinja renders."""

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from duomem_mlx.errors import DuomemError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (digits one by one first?, split regex or None for GPT-2's own, NFC first?)
PRE_TOKENIZERS = {
    "default": (False, None, False),
    "gpt2": (False, None, False),
    "smollm": (True, None, False),  # SmolLM / StarCoder: single digits, then GPT-2's split
    "starcoder": (True, None, False),
    "llama-bpe": (False, LLAMA3_SPLIT, False),
    "llama3": (False, LLAMA3_SPLIT, False),
    "qwen2": (False, QWEN2_SPLIT, True),
}


def build_tokenizer(gguf, chat_template: str | None):
    """(tokenizer, end-of-sequence token) as transformers' PreTrainedTokenizerFast."""
    meta = gguf.metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise DuomemError(
            f"{gguf.path}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens); use a file that ships one"
        )
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if kind == "gpt2":
        backend = _byte_level_bpe(
            tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre", "default"), gguf
        )
    elif kind == "llama":
        backend = _sentencepiece_bpe(
            tokens, types, meta.get("tokenizer.ggml.scores"), meta.get("tokenizer.ggml.add_space_prefix", False)
        )
    else:
        raise DuomemError(
            f"{gguf.path}: tokenizer model {kind!r} is not supported; "
            "convert reads 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)"
        )
    _add_special_tokens(backend, tokens, types)
    special = {
        role: _token(tokens, meta.get(f"tokenizer.ggml.{role}_token_id"))
        for role in ("bos", "eos", "unknown", "padding")
    }
    if meta.get("tokenizer.ggml.add_bos_token") and special["bos"]:
        _prepend_bos(backend, special["bos"], tokens.index(special["bos"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special["bos"],
        eos_token=special["eos"],
        unk_token=special["unknown"],
        pad_token=special["padding"],
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )


def _token(tokens: list[str], index) -> str | None:
    return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None


def _byte_level_bpe(tokens, merges, pre: str, gguf):
    if pre not in PRE_TOKENIZERS:
        raise DuomemError(
            f"{gguf.path}: pre-tokenizer {pre!r} is not supported; convert knows {', '.join(PRE_TOKENIZERS)}"
        )
    digits, split, nfc = PRE_TOKENIZERS[pre]
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split:
        steps += [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    else:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    if nfc:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens, types, scores, add_space_prefix: bool):
    """SentencePiece BPE as transformers rebuilds it: merges inferred from the vocabulary, ranked
    by the merged piece's score; spaces become '▁'; unknown bytes fall back to <0xNN> tokens."""
    if scores is None:
        raise DuomemError("a SentencePiece GGUF tokenizer without tokenizer.ggml.scores cannot be rebuilt")
    vocab = {token: i for i, token in enumerate(tokens)}
    normal = {t for t, kind in zip(tokens, types) if kind == NORMAL}
    merges = []
    for token, kind, score in zip(tokens, types, scores):
        if kind != NORMAL or len(token) < 2:
            continue
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in normal and token[i:] in normal]
        merges += [(score, vocab[left], vocab[right], left, right) for left, right in local]
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk = next((t for t, kind in zip(tokens, types) if kind == UNKNOWN), None)
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return backend


def _add_special_tokens(backend, tokens, types) -> None:
    """Control tokens become special added tokens (never split, skipped when decoding with
    skip_special_tokens); user-defined ones are matched whole in raw text, as llama.cpp does."""
    for kind, add in ((CONTROL, backend.add_special_tokens), (USER_DEFINED, backend.add_tokens)):
        add(
            [AddedToken(t, special=kind == CONTROL, normalized=False) for t, k in zip(tokens, types) if k == kind and t]
        )


def _prepend_bos(backend, bos: str, bos_id: int) -> None:
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
