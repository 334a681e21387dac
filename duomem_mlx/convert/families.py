"""What differs between architectures, as data: GGUF tensor names -> mlx-lm names, the config
keys the GGUF holds or lacks, and the undoings of what llama.cpp's converter did to the weights."""

from dataclasses import dataclass, field

import numpy as np

from duomem_mlx.errors import DuomemError

# mlx-lm config key <- `{arch}.` GGUF key
HYPERPARAMETERS = {
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "head_dim": "attention.key_length",
    "sliding_window": "attention.sliding_window",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}


@dataclass(frozen=True)
class Family:
    model_type: str  # mlx-lm's
    architecture: str  # transformers' class name, for the Hub
    template: str  # models.TEMPLATES key: the family's documented chat template, for a GGUF without one
    block_tensors: dict = field(default_factory=lambda: BLOCK_TENSORS)
    unpermute_qk: bool = False  # llama.cpp interleaves llama's Q/K rows for its rope; undo it (HF layout)
    norm_offset: float = 0.0  # added to every norm weight: llama.cpp folds Gemma's (1 + w) into w
    defaults: dict = field(default_factory=dict)  # config keys the GGUF does not carry
    same_as: dict = field(default_factory=dict)  # config key -> the key whose value it takes
    unsupported_tensors: tuple = ()


FAMILIES = {
    "llama": Family(
        "llama", "LlamaForCausalLM", "llama3", unpermute_qk=True, unsupported_tensors=("rope_freqs.weight",)
    ),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "chatml"),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", "qwen3"),
    "gemma3": Family(
        "gemma3_text",
        "Gemma3ForCausalLM",
        "gemma",
        block_tensors={
            **BLOCK_TENSORS,
            "ffn_norm": "pre_feedforward_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        norm_offset=-1.0,
        defaults={"rope_local_base_freq": 10000.0, "sliding_window_pattern": 6},
        same_as={"query_pre_attn_scalar": "head_dim"},
    ),
}


def family_of(gguf) -> Family:
    family = FAMILIES.get(gguf.arch)
    if family is None:
        raise DuomemError(
            f"{gguf.path}: architecture {gguf.arch!r} is not supported; convert handles {', '.join(FAMILIES)}"
        )
    for name in family.unsupported_tensors:
        if name in gguf.tensors:
            raise DuomemError(
                f"{gguf.path}: tensor {name} (Llama 3.1-style rope scaling) is not supported yet; "
                f"use a model without rope scaling (SmolLM2, Llama 3, Qwen)"
            )
    return family


def model_config(gguf, family: Family, vocab_rows: int) -> dict:
    """config.json for mlx-lm (and transformers) from the GGUF's hyperparameters."""
    config = {key: _tidy(gguf.get(source)) for key, source in HYPERPARAMETERS.items() if gguf.get(source) is not None}
    missing = [
        k for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads") if k not in config
    ]
    if missing:
        raise DuomemError(
            f"{gguf.path}: no {', '.join(missing)} in the GGUF metadata ({gguf.arch}.*); the file is incomplete"
        )
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault(
        "head_dim", gguf.get("rope.dimension_count") or config["hidden_size"] // config["num_attention_heads"]
    )
    config.setdefault("rms_norm_eps", 1e-6)
    config.setdefault("max_position_embeddings", 4096)
    config.update({k: v for k, v in family.defaults.items() if k not in config})
    config.update({k: config[v] for k, v in family.same_as.items()})
    config.update(
        model_type=family.model_type,
        architectures=[family.architecture],
        vocab_size=vocab_rows,
        tie_word_embeddings="output.weight" not in gguf.tensors,
    )
    return config


def _tidy(value):
    """GGUF stores floats as float32: 1e-05 reads back as 9.999999747378752e-06."""
    return float(f"{value:.7g}") if isinstance(value, float) else value


def mlx_name(gguf_name: str, family: Family) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for a tensor
    mlx-lm has no place for."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in family.block_tensors:
        return f"model.layers.{parts[1]}.{family.block_tensors[parts[2]]}.{kind}"
    return None


def undo_row_permutation(rows: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of Q/K rows (per head: interleaved pairs -> two halves).
    Works on any array whose first axis is the rows: weights, packed quantized weights, scales."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def heads_for_rows(gguf_name: str, config: dict) -> int | None:
    """How many heads a tensor's rows are permuted over, for families that unpermute Q/K."""
    if ".attn_q." in gguf_name:
        return config["num_attention_heads"]
    if ".attn_k." in gguf_name:
        return config["num_key_value_heads"]
    return None
