"""Load students and teachers with mlx-lm, fingerprint tokenizers, build tiny local models."""

import hashlib
import json
import re
import shutil
from importlib import resources
from pathlib import Path

from .errors import DuomemError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def resolve(path_or_repo: str) -> str:
    """A local directory, or a Hub repo id that mlx-lm may download; anything else is an error."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise DuomemError(f"{path} is not a model directory (no config.json); pass an mlx-lm model path or Hub repo id")
        return str(path)
    if REPO_ID.match(path_or_repo) and not path_or_repo.startswith((".", "/")):
        return path_or_repo
    raise DuomemError(f"model path {path_or_repo} does not exist; pass a local model directory or a Hub repo id like mlx-community/Qwen3-4B-4bit")


def load(path_or_repo: str, adapter_path: str | None = None):
    """(model, tokenizer) through plain `mlx_lm.load`; safetensors only, never remote code."""
    import mlx_lm

    source = resolve(path_or_repo)
    if adapter_path and not (Path(adapter_path) / "adapter_config.json").exists():
        raise DuomemError(f"no adapter_config.json in {adapter_path}; pass an mlx-lm adapter directory (adapters.safetensors + adapter_config.json)")
    try:
        return mlx_lm.load(source, adapter_path=adapter_path)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise DuomemError(f"could not load model {path_or_repo}: {first_line}")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id): equal fingerprints mean logits can be shared."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else tokenizer.vocab
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_corpus() -> str:
    return resources.files("duomem_mlx").joinpath("data/tiny_corpus.txt").read_text()


def train_tokenizer(vocab_size: int, corpus: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(arch: str, layers: int, hidden: int, vocab_size: int, eos_id: int) -> dict:
    heads = max(1, hidden // 32)
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 3,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": eos_id,
    }
    if arch == "llama":
        config["architectures"] = ["LlamaForCausalLM"]
    else:
        config["architectures"] = ["Qwen3ForCausalLM"]
    return config


def make_tiny_model(
    out: str | Path,
    arch: str = "qwen3",
    layers: int = 2,
    hidden: int = 64,
    vocab_size: int = 2048,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write a random-init mlx-lm model + tokenizer that plain `mlx_lm.load(out)` opens."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes, save_config, save_model

    if arch not in ("qwen3", "llama"):
        raise DuomemError(f"unknown --arch {arch}; use qwen3 or llama")
    if hidden % 32 and hidden >= 32:
        raise DuomemError(f"--hidden {hidden} must be a multiple of 32")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from:
        tokenizer = _copy_tokenizer(Path(tokenizer_from), out)
    else:
        tokenizer = train_tokenizer(vocab_size, default_corpus())
        tokenizer.save_pretrained(out)
    config = tiny_config(arch, layers, hidden, len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>"))
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    save_model(out, model)
    save_config(config, out / "config.json")
    return out


def _copy_tokenizer(source: Path, out: Path):
    from transformers import PreTrainedTokenizerFast

    if not (source / "tokenizer.json").exists():
        raise DuomemError(f"--tokenizer-from {source}: no tokenizer.json there")
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return PreTrainedTokenizerFast.from_pretrained(str(out))
