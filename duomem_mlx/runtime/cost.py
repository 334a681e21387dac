"""What playing costs: forward FLOPs from a model's shape and the tokens it processed, and the
bytes a model and its memory bank take on disk, peak memory.

FLOPs (2 per multiply-add) of a pass of n tokens at positions s .. s+n-1, the head on r of them:

    2 * P * n                                     the matmuls of the blocks; P = L * (d * h_d * (2 H + 2 K)
                                                  + 3 d I): q, k, v, o and the gated MLP's three
  + 4 * H * h_d * sum over layers, over p of k(p)  QK^T and AV; the token at p scores k(p) = p + 1 keys,
                                                  min(p + 1, w) on a sliding-window layer of window w
  + 2 * d * c * r                                 the head on r rows, over c columns (the vocabulary V,
                                                  or the few tokens a constrained step allows)

(d hidden, L layers, I intermediate, H heads, K kv heads, h_d head dim). The blocks count every token
a pass feeds, re-fed and rejected draft tokens included; a restored one (prefix store) costs nothing
here. Attention counts the causal keys a token needs: the masked half of a chunk's scores, which a
kernel may compute and throw away, is not counted. Norms, RoPE, softmax, biases and the embedding
lookup are left out (under 1% at these sizes). Which rows get the head is decode.py's: a prefill pass
computes none (its logits are never evaluated), a decode pass the rows it samples from. Weights in
4 bits do the same FLOPs as in float (fewer bytes, not fewer multiplies); LoRA adapters add
2 * r * (d_in + d_out) a token for each adapted layer, not counted. The retrieval query's embedding
(one backbone pass of at most 512 tokens an episode) is not counted either."""

import resource
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# mlx_lm.models modules whose blocks are attention + a gated MLP, read from `model.args` below
FAMILIES = frozenset({"llama", "qwen2", "qwen3", "gemma3_text"})


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True  # embeddings shared with the head (the FLOPs are the same; the parameters are not)
    windows: tuple[int | None, ...] = ()  # per layer, its sliding window (None: global); empty: all global

    @property
    def block_parameters(self) -> int:
        """Weights a token multiplies by in the blocks (embedding and head apart)."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    @property
    def parameters(self) -> int:
        """Every weight matrix: the blocks, the embedding and, untied, the head."""
        return self.block_parameters + self.vocab * self.hidden * (1 if self.tied else 2)

    def attention_keys(self, start: int, tokens: int) -> int:
        """Keys scored over all layers by `tokens` tokens at positions start, start + 1, ..."""
        windows = Counter(self.windows or [None] * self.layers)
        return sum(count * keys(start, tokens, window) for window, count in windows.items())

    def flops(self, start: int, tokens: int, head_rows: int = 0, head_columns: int | None = None) -> int:
        """A pass's FLOPs (the module's docstring): `tokens` tokens after `start` in the cache, the head
        on `head_rows` of them over `head_columns` token ids (None: the whole vocabulary)."""
        blocks = 2 * self.block_parameters * tokens + 4 * self.heads * self.head_dim * self.attention_keys(
            start, tokens
        )
        return blocks + 2 * self.hidden * (self.vocab if head_columns is None else head_columns) * head_rows


def keys(start: int, tokens: int, window: int | None) -> int:
    """sum of min(p + 1, window) for p in start .. start + tokens - 1."""
    below = tokens if window is None else max(0, min(start + tokens, window) - start)  # tokens with p + 1 <= window
    return below * start + below * (below + 1) // 2 + (tokens - below) * (window or 0)


def model_shape(model) -> Shape | None:
    """The shape of an mlx-lm model of a FAMILIES module (from its `args`, defaults filled in); None for
    another (a hybrid, a mixture of experts, an object standing in for a model): its FLOPs are not counted."""
    module, _, family = type(model).__module__.rpartition(".")
    if module != "mlx_lm.models" or family not in FAMILIES:
        return None
    args = model.args
    layers, heads = args.num_hidden_layers, args.num_attention_heads
    head_dim = args.hidden_size // heads if family == "qwen2" else getattr(args, "head_dim", None)  # qwen2: always
    if family == "gemma3_text":  # every sliding_window_pattern-th layer global, the rest sliding
        windows = [None if (i + 1) % args.sliding_window_pattern == 0 else args.sliding_window for i in range(layers)]
    elif family == "llama":
        windows = [args.sliding_window if t == "sliding_attention" else None for t in args.layer_types]
    else:
        windows = [None] * layers
    return Shape(
        hidden=args.hidden_size,
        layers=layers,
        intermediate=args.intermediate_size,
        heads=heads,
        kv_heads=args.num_key_value_heads or heads,
        head_dim=head_dim or args.hidden_size // heads,
        vocab=args.vocab_size,
        tied="lm_head" not in model,  # gemma3_text drops its head on loading tied weights, whatever args say
        windows=tuple(windows),
    )


def dir_bytes(path: str | Path | None) -> int:
    """Bytes of the files under a directory (0 when there is none)."""
    if not path or not Path(path).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def model_bytes(model_dir: str | Path, adapter_path: str | Path | None = None) -> int:
    """Bytes of the weights as loaded: the model's `model*.safetensors` (mlx-lm's pattern) and the adapters'."""
    files = [*Path(model_dir).glob("model*.safetensors")]
    if adapter_path:
        files.append(Path(adapter_path) / "adapters.safetensors")
    return sum(f.stat().st_size for f in files if f.is_file())


def peak_rss_bytes(maxrss: int | None = None, platform: str = sys.platform) -> int:
    """The process's peak resident set (since it started) in bytes: `ru_maxrss` is in bytes on macOS
    and in kilobytes on Linux (and the BSDs)."""
    if maxrss is None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if platform == "darwin" else maxrss * 1024
