"""Load students and teachers with mlx-lm, build tiny local models.

The CLI imports this module at start-up (its light helpers): MLX, mlx-lm, transformers and huggingface_hub's
client (~1.5 s together) are imported inside the functions that use them."""

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from duomem_mlx.errors import DuomemError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's published template: an assistant turn after the last user message carries its
# <think> block (empty when none), earlier ones lose it; enable_thinking=false writes an empty
# think block into the generation prompt; tools go into the system turn, calls as <tool_call>
# JSON, results as <tool_response> in a user turn.
QWEN3 = """{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- if message.role == 'user' %}{%- set ns.last_query_index = messages|length - 1 - loop.index0 %}{%- break %}{%- endif %}{%- endfor %}
{%- for message in messages %}
{%- set content = message.content %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning_content = '' %}
{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}
{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}
{%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}{%- endfor %}{%- endif %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""  # noqa: E501 (Jinja source: wrapping a line changes the template)
# Llama 3.1's: bos, a system header with its date lines, <|eot_id|> closing every turn; tools
# in the first user turn, a call as bare JSON with "parameters", results in an ipython turn.
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content | trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system_message = "" %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}
{{- system_message + '<|eot_id|>' }}
{%- if tools is not none %}
{%- set first_user_message = messages[0].content | trim %}{%- set messages = messages[1:] %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
{{- 'Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\\n\\n' }}
{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\\n\\n' }}
{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}
{{- first_user_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
{%- if message.tool_calls %}{%- set tool_call = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{"name": "' + tool_call.name + '", "parameters": ' }}{{- tool_call.arguments | tojson }}{{- '}<|eot_id|>' }}
{%- elif message.role == 'tool' or message.role == 'ipython' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""  # noqa: E501
# Gemma 3's: bos, the system text folded into the first user turn, roles user/model alternating.
GEMMA = """{{ bos_token }}
{%- if messages[0].role == 'system' -%}
{%- set first_user_prefix = messages[0].content + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}{%- set first_user_prefix = "" -%}{%- set loop_messages = messages -%}{%- endif -%}
{%- for message in loop_messages -%}
{%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}{%- endif -%}
{%- set role = 'model' if message.role == 'assistant' else message.role -%}
{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}{{ message.content | trim }}{{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"""  # noqa: E501


@dataclass(frozen=True)
class Template:
    """A chat template with the special tokens, bos/eos and generation eos list its family ships."""

    jinja: str
    specials: tuple[str, ...]  # added to the vocabulary first, in this order
    eos: str  # tokenizer eos_token
    eos_ids: tuple[str, ...]  # generation_config.json eos_token_id
    bos: str | None = None
    pad: str | None = None
    added: tuple[str, ...] = ()  # added, not special (Qwen3's think tags)


TEMPLATES = {
    "chatml": Template(
        CHATML, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_end|>", ("<|im_end|>",), pad="<|endoftext|>"
    ),
    "qwen3": Template(
        QWEN3,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|im_end|>",
        ("<|im_end|>", "<|endoftext|>"),
        pad="<|endoftext|>",
        added=("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
    ),
    "llama3": Template(
        LLAMA3,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|end_of_text|>",
        ("<|end_of_text|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
        pad="<|end_of_text|>",
    ),
    "gemma": Template(
        GEMMA,
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        "<eos>",
        ("<eos>", "<end_of_turn>"),
        bos="<bos>",
        pad="<pad>",
    ),
}
ARCHS = {"qwen3": "qwen3", "llama": "llama3", "gemma3_text": "gemma", "lfm2": "chatml"}  # arch -> its family's template


def default_dtype() -> str:
    """bfloat16 where MLX runs on a GPU (Metal, CUDA); float32 on a CPU, whose backend emulates
    bf16 (3-4x slower there, and 10x in quantized matmuls)."""
    import mlx.core as mx  # noqa: PLC0415 (CLI start-up imports this module)

    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def is_repo_id(name: str) -> bool:
    """A Hub repo id USER/NAME by huggingface_hub's own rules (letters, digits, '-', '_', '.'; no
    '--' or '..', no '.git' end, at most 96 characters a part)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # noqa: PLC0415 (CLI start-up imports this module)

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


# What a model or a package needs from the Hub: weights, config, tokenizer, the memory bank and
# duomem.json, the card (its license): mlx-lm's own list less "*.py", plus the bank's keys and the
# card. Never code, never pickles.
HUB_FILES = [
    "*.json",
    "*.jsonl",
    "model*.safetensors",
    "memory/keys.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jinja",
    "README.md",
]


def resolve(path_or_repo: str) -> str:
    """The local directory of a model: the path itself, or a Hub repo id's downloaded snapshot
    (HUB_FILES only; the Hub cache serves it again, offline too). Anything else is an error."""
    path = Path(path_or_repo).expanduser()
    if not path.exists() and is_repo_id(path_or_repo):
        path = hub_snapshot(path_or_repo)
    elif not path.exists():
        raise DuomemError(
            f"model path {path_or_repo} does not exist; pass a local model directory or a Hub repo id "
            "like mlx-community/Qwen3-4B-4bit"
        )
    if not (path / "config.json").exists():
        raise DuomemError(
            f"{path_or_repo} is not a model directory (no config.json in {path}); "
            "pass an mlx-lm model path or Hub repo id"
        )
    return str(path)


def hub_snapshot(repo: str, allow_patterns: list[str] = HUB_FILES) -> Path:
    """huggingface_hub's snapshot_download of `repo`'s files matching `allow_patterns`; each way
    it can fail is one line naming the fix."""
    from huggingface_hub import constants, snapshot_download  # noqa: PLC0415 (CLI start-up imports this module)
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError  # noqa: PLC0415 (CLI start-up imports this module)

    try:
        return Path(snapshot_download(repo, allow_patterns=allow_patterns))
    except GatedRepoError:
        raise DuomemError(
            f"{repo} is gated on the Hub: accept its terms on its page, then set HF_TOKEN or run `hf auth login`"
        )
    except RepositoryNotFoundError:
        raise DuomemError(
            f"{repo} is neither a local directory nor a model on the Hub at {constants.ENDPOINT}; "
            "check the path or id (a private repo needs HF_TOKEN or `hf auth login`)"
        )
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise DuomemError(
                f"{repo} is not in the Hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; "
                "unset HF_HUB_OFFLINE to download it, or pass a local model directory"
            )
        raise DuomemError(
            f"cannot reach the Hub at {constants.ENDPOINT} to download {repo}, and it is not in the Hub "
            f"cache ({constants.HF_HUB_CACHE}); check the network, HF_ENDPOINT or HTTPS_PROXY"
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        hint = (
            "check HF_TOKEN (or `hf auth login`)"
            if status in (401, 403)
            else "try again, or set HF_HUB_OFFLINE=1 to use the cache"
        )
        raise DuomemError(f"the Hub answered HTTP {status} for {repo}; {hint}")
    except transport_error() as e:
        raise DuomemError(
            f"downloading {repo} from {constants.ENDPOINT} failed ({type(e).__name__}); "
            "check the network and run again (finished files are kept in the Hub cache)"
        )
    except OSError as e:
        raise DuomemError(
            f"cannot write {repo} into the Hub cache {constants.HF_HUB_CACHE} ({e.strerror or e}); "
            "free some space or point HF_HUB_CACHE elsewhere"
        )


def transport_error() -> type:
    """The network error class of huggingface_hub's HTTP client."""
    try:
        from httpx2 import TransportError  # huggingface_hub >= 2.4  # noqa: PLC0415 (CLI start-up imports this module)
    except ImportError:
        from httpx import TransportError  # noqa: PLC0415 (CLI start-up imports this module)
    return TransportError


def load(path_or_repo: str, adapter_path: str | None = None):
    """(model, tokenizer) through plain `mlx_lm.load`; safetensors only, never remote code. On a
    CPU, quantized layers fed many rows run dense (cpu_quant)."""
    import mlx_lm  # noqa: PLC0415 (CLI start-up imports this module)

    from duomem_mlx.cpu.quant import dense_prefill_on_cpu  # noqa: PLC0415 (CLI start-up imports this module)
    from duomem_mlx.runtime.gpu_memory import warn_before_loading  # noqa: PLC0415 (CLI start-up imports this module)

    source = resolve(path_or_repo)
    if adapter_path and not (Path(adapter_path) / "adapter_config.json").exists():
        raise DuomemError(
            f"no adapter_config.json in {adapter_path}; pass an mlx-lm adapter directory "
            "(adapters.safetensors + adapter_config.json)"
        )
    warn_before_loading(source)
    try:
        model, tokenizer = mlx_lm.load(source, adapter_path=adapter_path)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise DuomemError(f"could not load model {path_or_repo}: {first_line}")
    dense_prefill_on_cpu(model)
    return model, tokenizer


def size_of(model_dir: str | Path) -> dict:
    """hidden_size, num_hidden_layers and vocab_size of a local model directory (what a figure is for)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = {**config.get("text_config", {}), **config}
    return {k: config.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}


def weight_bytes(model) -> int:
    """Bytes of the model's arrays (what its safetensors files hold, less their headers)."""
    from mlx.utils import tree_flatten  # noqa: PLC0415 (CLI start-up imports this module)

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def check_group_size(model, group_size: int) -> None:
    """mlx-lm leaves a layer whose input size the group size does not divide dense, silently:
    `convert --bits` and `quantize` refuse instead, naming those layers and the sizes that fit."""
    layers = [
        (n, m.weight.shape[-1]) for n, m in model.named_modules() if hasattr(m, "to_quantized") and hasattr(m, "weight")
    ]
    bad = sorted(f"{n} ({d})" for n, d in layers if d % group_size)
    if bad:
        fits = [g for g in (32, 64, 128) if all(d % g == 0 for _, d in layers)]
        hint = (
            f"use --group-size {' or '.join(map(str, fits))}"
            if fits
            else "this model cannot be quantized in groups of 32-128"
        )
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DuomemError(
            f"--group-size {group_size} does not divide the input size of {len(bad)} of {len(layers)} layers, "
            f"which would stay dense: {', '.join(bad[:3])}{more}; {hint}"
        )


def default_corpus() -> str:
    return resources.files("duomem_mlx").joinpath("data/tiny_corpus.txt").read_text()


def train_tokenizer(vocab_size: int, corpus: str, template: str = "chatml"):
    """A byte-level BPE wrapped as a transformers fast tokenizer carrying `template`'s chat
    template, special tokens, bos and eos as the family ships them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415 (CLI start-up imports this module)
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (CLI start-up imports this module)

    spec = TEMPLATES[template]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus.splitlines(), trainer=trainer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.added])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        chat_template=spec.jinja,
    )


def tiny_config(
    arch: str, layers: int, hidden: int, vocab_size: int, eos_ids: list[int], sliding_window: int = 32
) -> dict:
    heads = max(1, hidden // 32)
    config = {
        "model_type": arch,
        "architectures": [ARCHITECTURES[arch]],
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
        "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0],
    }
    if arch == "gemma3_text":  # sliding-window layers (RotatingKVCache) and a global one every 2nd
        config.update(
            sliding_window=sliding_window,
            sliding_window_pattern=2,
            query_pre_attn_scalar=hidden // heads,
            rope_local_base_freq=10000.0,
        )
    if arch == "lfm2":  # short-convolution layers (ArraysCache) with attention every 2nd
        config.update(
            norm_eps=1e-5,
            conv_bias=False,
            conv_L_cache=3,
            block_dim=hidden,
            block_ff_dim=hidden * 3,
            block_multiple_of=32,
            block_ffn_dim_multiplier=1.0,
            block_auto_adjust_ff_dim=False,
            layer_types=["conv" if i % 2 == 0 else "full_attention" for i in range(layers)],
        )
    return config


ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "lfm2": "Lfm2ForCausalLM",
}


def make_tiny_model(
    out: str | Path,
    arch: str = "qwen3",
    layers: int = 2,
    hidden: int = 64,
    vocab_size: int = 2048,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
    template: str | None = None,
    sliding_window: int = 32,
) -> Path:
    """Write a random-init mlx-lm model + tokenizer that plain `mlx_lm.load(out)` opens; the
    tokenizer carries `template` (default: the family's own, see ARCHS) and the model dir a
    generation_config.json with the family's eos list."""
    import mlx.core as mx  # noqa: PLC0415 (CLI start-up imports this module)
    from mlx_lm.utils import _get_classes, save_config, save_model  # noqa: PLC0415 (CLI start-up imports this module)

    if arch not in ARCHS:
        raise DuomemError(f"unknown --arch {arch}; use one of {', '.join(ARCHS)}")
    if template is not None and template not in TEMPLATES:
        raise DuomemError(f"unknown --template {template}; use one of {', '.join(TEMPLATES)}")
    if hidden % 32 and hidden >= 32:
        raise DuomemError(f"--hidden {hidden} must be a multiple of 32")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from:
        tokenizer = _copy_tokenizer(Path(tokenizer_from), out)
        eos_ids = _generation_eos(Path(tokenizer_from)) or [tokenizer.eos_token_id]
    else:
        spec = TEMPLATES[template or ARCHS[arch]]
        tokenizer = train_tokenizer(vocab_size, default_corpus(), template or ARCHS[arch])
        tokenizer.save_pretrained(out)
        eos_ids = tokenizer.convert_tokens_to_ids(list(spec.eos_ids))
        generation = {"eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0]}
        if spec.bos:
            generation["bos_token_id"] = tokenizer.bos_token_id
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    rows = max(vocab_size if not tokenizer_from else _vocab_rows(Path(tokenizer_from)), len(tokenizer))
    config = tiny_config(arch, layers, hidden, rows, eos_ids, sliding_window)
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    save_model(out, model)
    save_config(config, out / "config.json")
    return out


def _vocab_rows(model_dir: Path) -> int:
    """The source model's head size (it may exceed its tokenizer): a student must cover its ids."""
    path = model_dir / "config.json"
    return json.loads(path.read_text()).get("vocab_size", 0) if path.exists() else 0


def _generation_eos(model_dir: Path) -> list[int] | None:
    path = model_dir / "generation_config.json"
    if not path.exists():
        return None
    eos = json.loads(path.read_text()).get("eos_token_id")
    return eos if isinstance(eos, list) else [eos] if eos is not None else None


def _copy_tokenizer(source: Path, out: Path):
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (CLI start-up imports this module)

    if not (source / "tokenizer.json").exists():
        raise DuomemError(f"--tokenizer-from {source}: no tokenizer.json there")
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return PreTrainedTokenizerFast.from_pretrained(str(out))
