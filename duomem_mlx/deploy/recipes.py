"""Quantization recipes: how many bits each layer gets, chosen on the agent's own chats.

A recipe is a `quant_predicate` for mlx-lm's `quantize_model`. The mixed ones follow mlx-lm's
`dynamic_quant`: a first-order estimate of how much each layer's 4-bit rounding moves a loss
(the gradient at the 4-bit model times the weight change to the higher precision), then the most
sensitive layers keep the higher precision up to a bits-per-weight budget, most sensitive first.
mlx-lm scores every token of a text corpus; here the loss is the KL from the unquantized student
at the action tokens of the agent's chats, where the agent is judged. gptq4 and awq4 hand the
same chats, cut into rows, to mlx-lm's GPTQ and AWQ."""

import copy
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config
from mlx_lm.quant.gptq import gptq_quantize
from mlx_lm.tuner.losses import kl_div_loss

from duomem_mlx.errors import DuomemError
from duomem_mlx.runtime.heads import logits_at


@dataclass(frozen=True)
class Recipe:
    bits: int
    group_size: int
    summary: str
    high: tuple[int, int] | None = None  # (bits, group size) of the most sensitive layers
    target_bpw: float | None = None  # as stored: float16 scales, biases and unquantized weights
    calibrate: bool = False  # then tune the scales to the float student's action margins
    method: str = "rtn"  # round to nearest, or mlx-lm's "gptq" / "awq" fed the agent's chats

    @property
    def needs_data(self) -> bool:
        return self.high is not None or self.calibrate or self.method != "rtn"


RECIPES = {
    "affine8": Recipe(8, 64, "8-bit, groups of 64"),
    "affine4": Recipe(4, 64, "4-bit, groups of 64 (mlx-lm's default)"),
    "affine4-g32": Recipe(4, 32, "4-bit, groups of 32"),
    "mixed4": Recipe(
        4,
        64,
        "4-bit groups of 64; the layers whose rounding moves the agent's actions most at 8 bits, 4.75 bits a weight",
        high=(8, 64),
        target_bpw=4.75,
    ),
    "mixed4-margin": Recipe(
        4,
        64,
        "mixed4, then its scales tuned to the float student's action margins",
        high=(8, 64),
        target_bpw=4.75,
        calibrate=True,
    ),
    "gptq4": Recipe(
        4,
        64,
        "4-bit groups of 64, GPTQ (mlx-lm) on the agent's chats: each column's rounding error moved onto the "
        "columns not yet rounded, weighted by the chats' activations",
        method="gptq",
    ),
    "awq4": Recipe(
        4,
        64,
        "4-bit groups of 64, AWQ (mlx-lm) on the agent's chats: channel scales and clipping searched to keep "
        "each block's outputs",
        method="awq",
    ),
}
# with the agent's chats: on run 12's demo student (424 dev steps) mixed4 kept no more of the float student's actions
# than affine4 (94.1% both), gptq4 91.0%, awq4 92.0%; on run 13's (benchmarks/results/quantization_smollm2.json, 322
# steps) affine4 95.7%, mixed4 97.5%, gptq4 97.2%, neither lead an effect (McNemar on the steps, p 0.11 and 0.33):
# affine4 stays, the smallest and fastest on a CPU (mixed4-margin: its curve falls, README "Benchmarks")
DEFAULT = {8: "affine8", 4: "affine4"}


def pick(bits: int, name: str | None, has_data: bool) -> str:
    """The recipe `quantize` uses: the one named (refused where it needs chats and has none), else the best
    measured for BITS."""
    if name is None:
        return DEFAULT[bits]
    if name not in RECIPES:
        raise DuomemError(f"unknown --recipe {name}; choose one of {', '.join(RECIPES)}")
    if RECIPES[name].needs_data and not has_data:
        raise DuomemError(f"--recipe {name} measures the agent's chats; pass --calibrate CACHE (a teacher cache)")
    return name


def quantizable(model) -> dict:
    layers = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    return {k: m for k, m in layers if hasattr(m, "to_quantized")}


def fake_quantized(w, bits: int, group_size: int):
    return mx.dequantize(*mx.quantize(w, group_size, bits), group_size, bits).astype(w.dtype)


def sensitivities(model, sequences, recipe: Recipe) -> dict[str, float]:
    """Per quantizable layer, the first-order loss drop from keeping it at `recipe.high` instead of
    its low precision (mlx-lm's `estimate_sensitivities`, the loss at action tokens only).
    `sequences`: (token ids, rows of the action tokens' logits) per episode."""
    low, high = (recipe.bits, recipe.group_size), recipe.high
    q_model = copy.deepcopy(model)
    q_model.freeze()
    layers = quantizable(q_model)
    for layer in layers.values():
        layer.weight = fake_quantized(layer.weight, *low)
        layer.unfreeze(keys=["weight"], recurse=False)

    def loss(inputs, rows, target):
        return kl_div_loss(logits_at(q_model, inputs, rows).astype(mx.float32), target).mean()

    grad = nn.value_and_grad(q_model, loss)
    total = None
    for ids, rows in sequences:
        inputs = mx.array(ids)[None]
        target = logits_at(model, inputs, rows).astype(mx.float32)
        _, g = grad(inputs, rows, target)
        total = g if total is None else tree_map(mx.add, total, g)
        mx.eval(total)
    originals, grads = quantizable(model), dict(tree_flatten(total))
    return {
        name: (
            (grads[f"{name}.weight"] / len(sequences)) * (layer.weight - fake_quantized(originals[name].weight, *high))
        )
        .sum()
        .item()
        / (layer.weight.size / 1e6)
        for name, layer in layers.items()
    }


def bits_per_weight(bits: int, group_size: int) -> float:
    return bits + 32 / group_size  # a 16-bit scale and bias per group


def predicate(model, recipe: Recipe, sensitivity: dict[str, float] | None):
    """mlx-lm's `quant_predicate` for the recipe (None: every layer alike). The most sensitive
    layers go to the higher precision, most sensitive first, while the whole model stays within
    `recipe.target_bpw` as stored (mlx-lm's `estimate_threshold` bisects to a threshold that can
    land a layer past the budget: 4.95 bits a weight for a 4.75 target on a tiny model)."""
    if recipe.high is None:
        return None
    layers = {name: m.weight.size for name, m in quantizable(model).items()}
    total = sum(p.size for _, p in tree_flatten(model.parameters()))
    low = bits_per_weight(recipe.bits, recipe.group_size)
    budget = recipe.target_bpw * total - low * sum(layers.values()) - 16 * (total - sum(layers.values()))
    extra = bits_per_weight(*recipe.high) - low
    chosen = set()
    for name in sorted(layers, key=lambda n: -sensitivity.get(n, 0)):
        if sensitivity.get(name, 0) > 0 and layers[name] * extra <= budget:
            chosen.add(name)
            budget -= layers[name] * extra
    high = {"bits": recipe.high[0], "group_size": recipe.high[1]}
    return lambda path, module: hasattr(module, "to_quantized") and (high if path in chosen else True)


CHAT_WINDOW = 512  # tokens a row of the chats GPTQ and AWQ measure, as mlx-lm's calibration set has them
CHAT_WINDOWS = (
    16  # rows: AWQ runs every block ~60 times over them (SmolLM2: 67-85 s a block, 37 min, on 2 shared CPU cores)
)


def chat_windows(token_lists: list[list[int]]) -> mx.array:
    """The agent's chats end to end, cut into at most CHAT_WINDOWS rows of CHAT_WINDOW tokens, spread over them."""
    stream = [t for ids in token_lists for t in ids]
    rows = len(stream) // CHAT_WINDOW
    if rows == 0:
        raise DuomemError(
            f"the agent's chats hold {len(stream)} tokens; GPTQ and AWQ need {CHAT_WINDOW}: "
            "record more episodes with `duomem-mlx teach`"
        )
    windows = mx.array(stream[: rows * CHAT_WINDOW]).reshape(rows, CHAT_WINDOW)
    return windows[:: max(1, rows // CHAT_WINDOWS)][:CHAT_WINDOWS]


def with_method(model, config, windows, recipe: Recipe):
    """(model, config) quantized by mlx-lm's GPTQ or AWQ on the chat windows; the layers either
    leaves alone (GPTQ: the embedding; AWQ: none) are rounded to nearest at the recipe's precision."""
    if recipe.method == "gptq":
        model, config["quantization"] = gptq_quantize(
            model, windows, recipe.bits, recipe.group_size, recipe.bits, recipe.group_size, batch_size=4
        )
    else:
        if model.model_type not in AWQ_MODEL_CONFIGS:
            raise DuomemError(f"mlx-lm's AWQ does not know {model.model_type} models; use --recipe gptq4 or affine4")
        awq_quantize(
            model,
            windows,
            AWQ_MODEL_CONFIGS[model.model_type],
            recipe.group_size,
            recipe.bits,
            embed_group_size=recipe.group_size,
            embed_bits=recipe.bits,
        )
        config = update_config(model, config)
    config["quantization_config"] = config["quantization"]
    return model, config
