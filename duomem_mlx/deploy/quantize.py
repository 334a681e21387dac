"""`duomem-mlx quantize`: fuse adapters into the student, quantize it with mlx-lm, optionally
calibrate the quantized scales/biases on the agent's own data (DWQ), rebuild the memory bank
in the final model's space and write a self-contained package (docs/design.md, "Converted package").

    converted/NAME/   config.json, model*.safetensors, tokenizer files   (plain mlx_lm.load)
                      memory/        bank rebuilt with this exact model
                      duomem.json    base, teacher, adapters, quantization, bytes, calibration, results
                      README.md      model card with Hub front matter and a results table
"""

import json
import time
from collections import Counter
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import urlsplit

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optimizers
import numpy as np
from huggingface_hub import ModelCard, ModelCardData
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import compute_bits_per_weight, dequantize_model, load, save
from mlx_lm.utils import quantize_model as mlx_quantize

from duomem_mlx.cpu.quant import dense_prefill_on_cpu
from duomem_mlx.deploy.bench import throughput
from duomem_mlx.deploy.recipes import RECIPES, chat_windows, pick, predicate, sensitivities, with_method
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats import manifest
from duomem_mlx.formats.adapters import check_adapters, read_summary
from duomem_mlx.formats.bank import recorded_key
from duomem_mlx.formats.memories import read_memories
from duomem_mlx.formats.teacher_cache import read_cache_episodes
from duomem_mlx.io import atomic_dir, atomic_file
from duomem_mlx.progress import Progress
from duomem_mlx.runtime.decode import DecodeOptions
from duomem_mlx.runtime.embed import rebuild_bank
from duomem_mlx.runtime.gpu_memory import warn_before_loading, wired_limit
from duomem_mlx.runtime.heads import logits_at
from duomem_mlx.runtime.models import check_group_size, default_corpus, default_dtype, resolve, weight_bytes
from duomem_mlx.runtime.prompt import episode_messages, tokenize_with_mask
from duomem_mlx.runtime.session import Session
from duomem_mlx.runtime.tools import episode_chat
from duomem_mlx.teacher.topk import masked_positions, topk_logprobs
from duomem_mlx.version import __version__

CPU_DECODE_TOKENS = 16
MARGIN = 1.0  # nats: calibration's hinge on the float student's choice over its runners-up
SENSITIVITY_EPISODES = 16  # of the cache, spread over it: mixed recipes' layer sensitivities (~10 s each on SmolLM2)
MODES = {"affine": (4, 8), "mxfp4": (4,)}
GROUP_SIZES = {"affine": (32, 64, 128), "mxfp4": (32,)}


def check_options(bits: int, group_size: int | None, mode: str, calibrate: str | None) -> None:
    if bits == 16:
        if calibrate:
            raise DuomemError(
                "--calibrate tunes quantized scales; it needs --bits 4 (a 16-bit package is not quantized)"
            )
        return
    if bits not in MODES.get(mode, ()):
        raise DuomemError(
            f"--mode {mode} does not support --bits {bits}; use "
            + "; ".join(f"--mode {m} with --bits {'|'.join(map(str, b))}" for m, b in MODES.items())
            + ", or --bits 16 for bf16"
        )
    if group_size is not None and group_size not in GROUP_SIZES[mode]:
        raise DuomemError(f"--mode {mode} needs --group-size {'|'.join(map(str, GROUP_SIZES[mode]))}, got {group_size}")
    if calibrate and (mode != "affine" or bits >= 8):
        raise DuomemError(
            "--calibrate tunes affine scales below 8 bits (8-bit is near lossless); use --bits 4 --mode affine"
        )


def load_student(source: str, adapters: str | None, model_path: str):
    """(model, tokenizer, config) of the model directory `source` (`model_path` as the user named
    it), with adapters fused and a quantized (QLoRA) base dequantized first."""
    warn_before_loading(source)
    try:
        model, tokenizer, config = load(source, return_config=True)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DuomemError(f"could not load model {model_path}: {reason}")
    if "quantization" in config:  # fusing into a quantized base re-quantizes the base and loses the adapters' effect
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if adapters:
        check_adapters(adapters)
        try:
            load_adapters(model, adapters)
        except (ValueError, KeyError, IndexError) as e:
            detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).strip())
            raise DuomemError(
                f"adapters {adapters} do not match base {model_path} ({detail}); pass the base they were trained on"
            )
        fused = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "fuse")]
        model.update_modules(tree_unflatten(fused))
    model.eval()
    return model, tokenizer, config


def cache_episodes(cache: str) -> list:
    """The recorded episodes of a teacher cache (prompts and actions as the agent sees them)."""
    episodes = [e for e in read_cache_episodes(cache) if e.steps]
    if not episodes:
        raise DuomemError(f"teacher cache {cache} has no episodes with steps; collect some with `duomem-mlx teach`")
    return episodes


def greedy_actions(
    model, tokenizer, episodes, max_context: int = 4096, memories: list[list[str]] | None = None
) -> list[str]:
    """The model's greedy action at every recorded step, the history being the recorded one
    (with `memories[i]` in front of episode i's prompt, as the agent that played it read them).

    The session is restarted with the recorded chat before each step, so its cache keeps the
    common prefix and feeds only what changed (the recorded action and the next observation)."""
    actions = []
    for episode, read in zip(episodes, memories or [()] * len(episodes)):
        messages = episode_messages(episode, read)
        constrained = all(step.admissible for step in episode.steps)
        session = Session(model, tokenizer, max_context, DecodeOptions(mode="constrained" if constrained else "free"))
        for i, step in enumerate(episode.steps):
            session.start(messages[:2])
            session.append(messages[2 : 2 + 2 * i])
            actions.append(session.generate(step.admissible if constrained else None))
    return actions


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def calibration_data(tokenizer, episodes, max_seq_length: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, action mask) of each episode's chat, cut to `max_seq_length` tokens."""
    chats = [episode_chat(tokenizer, e) for e in episodes]
    return [
        tuple(part[:max_seq_length] for part in tokenize_with_mask(tokenizer, messages, tools=tools))
        for messages, tools in chats
    ]


def unfreeze_scales(model) -> None:
    """Train the scales and biases of the affine quantized layers only, as mlx-lm's DWQ does."""
    model.freeze()

    def unfreeze(_, module):
        if getattr(module, "mode", None) == "affine" and getattr(module, "bits", 16) < 8:
            module.unfreeze(keys=["scales", "biases"], recurse=False)

    model.apply_to_modules(unfreeze)


@dataclass
class Targets:
    """What calibration needs of the unquantized student, taken before it is quantized (no copy of
    it is kept, as mlx-lm's DWQ precomputes its targets): its greedy action at every recorded
    step, and the chats replayed with those actions: (token ids, action-token rows) and, at each
    row, the token it took and its top-k tokens."""

    actions: list[str]
    data: list
    top: list
    k: int


def float_targets(model, tokenizer, episodes, max_seq_length: int, top_k: int = 32) -> Targets:
    actions = greedy_actions(model, tokenizer, episodes)
    chats = calibration_data(tokenizer, own_actions(episodes, actions), max_seq_length)
    data = [(ids, mx.array(masked_positions(mask))) for ids, mask in chats if sum(mask[1:])]
    k = min(top_k, model.args.vocab_size)
    top = []
    for ids, rows in data:
        top.append((mx.array(ids)[rows + 1][:, None], topk_logprobs(logits_at(model, mx.array(ids)[None], rows), k)[0]))
        mx.eval(top[-1])
    return Targets(actions, data, top, k)


def calibrate(
    q_model,
    targets: Targets,
    epochs: int,
    learning_rate: float,
    max_seq_length: int = 2048,
    seed: int = 0,
    on_epoch=None,
) -> dict:
    """DWQ scored on what the agent does: the quantized layers' scales and biases learn to keep
    the token the unquantized student took at every action token of the chats (its own greedy
    actions) ahead of the other tokens of its top-k by MARGIN nats (a hinge: a token already chosen by that margin costs
    nothing), one episode a step. KL to the student's whole distribution (the distill loss,
    mlx-lm's `dwq_quantize` over every token) spent the scales on tokens the agent never picks
    and lowered SmolLM2's action agreement (89% -> 82% after one epoch). As in `dwq_quantize`,
    Adam updates a float32 copy of the scales and the model computes in its own dtype (a bf16
    scale of 0.01 moves in steps of 6e-5: Adam's of ~1e-5 would round away). `on_epoch(epoch,
    mean_loss, q_model)` runs after each pass."""
    unfreeze_scales(q_model)
    params = tree_map(lambda p: p.astype(mx.float32), q_model.trainable_parameters())
    dtype = next(p.dtype for _, p in tree_flatten(q_model.trainable_parameters()))

    def loss(params, inputs, rows, target):
        q_model.update(tree_map(lambda p: p.astype(dtype), params))
        taken, top = target
        logits = logits_at(q_model, inputs, rows).astype(mx.float32)
        others = mx.where(top == taken, -mx.inf, mx.take_along_axis(logits, top, axis=-1))
        return nn.relu(MARGIN - mx.take_along_axis(logits, taken, axis=-1)[:, 0] + others.max(axis=-1)).mean()

    loss_and_grad = mx.value_and_grad(loss)
    optimizer = optimizers.Adam(learning_rate=learning_rate)
    order = np.random.default_rng(seed)
    data = targets.data
    curve = []
    q_model.train()
    bar = Progress(total=epochs * len(data), desc="calibrate", unit="episode")
    for epoch in range(epochs):
        losses = []
        for i in order.permutation(len(data)):
            (ids, rows), target = data[i], targets.top[i]
            value, grads = loss_and_grad(params, mx.array(ids)[None], rows, target)
            params = optimizer.apply_gradients(grads, params)
            mx.eval(value, params, optimizer.state)
            losses.append(value.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
        curve.append(round(float(np.mean(losses)), 5))
        q_model.update(tree_map(lambda p: p.astype(dtype), params))
        if on_epoch:
            on_epoch(epoch + 1, curve[-1], q_model)
    bar.close()
    q_model.eval()
    return {
        "episodes": len(data),
        "tokens": sum(len(ids) for ids, _ in data),
        "action_tokens": sum(rows.size for _, rows in data),
        "epochs": epochs,
        "max_seq_length": max_seq_length,
        "learning_rate": learning_rate,
        "top_k": targets.k,
        "margin": MARGIN,
        "loss_per_epoch": curve,
    }


def bank_source(memory: str | None, adapters: str | None, model_path: str) -> Path | None:
    """Where the memories come from: --memory (bank dir or memories.jsonl), else ADAPTERS/memory,
    else MODEL/memory (a package being re-quantized)."""
    if memory:
        path = Path(memory)
        if path.is_dir() and (path / "memories.jsonl").is_file():
            return path / "memories.jsonl"
        if path.is_file():
            return path
        raise DuomemError(f"--memory {memory} is neither a memory bank directory nor a memories.jsonl file")
    for candidate in (adapters, model_path):
        if candidate and (Path(candidate) / "memory" / "memories.jsonl").is_file():
            return Path(candidate) / "memory" / "memories.jsonl"
    return None


def model_bytes(package: Path) -> int:
    return sum(f.stat().st_size for f in package.glob("*.safetensors"))


def provenance(adapters: str | None, model_path: str) -> dict:
    """teacher/base recorded by distill (ADAPTERS/duomem.json) or an input package; {} where the
    first of them is damaged (the package is made all the same, without them)."""
    for candidate, read in ((adapters, read_summary), (model_path, manifest.read)):
        if candidate and manifest.path(candidate).is_file():
            try:
                return read(candidate)
            except DuomemError:
                return {}
    return {}


def base_license(model_path: str) -> str | None:
    """The base model's card's license, else the upstream one `convert --fetch` recorded in duomem.json."""
    readme = Path(model_path) / "README.md"
    if readme.is_file():
        try:
            return ModelCard.load(readme).data.license
        except Exception:  # a card without valid front matter just has no known license
            return None
    return (provenance(None, model_path).get("source") or {}).get("license")


def agent_chats(calibrate_cache: str | None, adapters: str | None) -> str | None:
    """The teacher cache a recipe measures the agent on: --calibrate, else the one the adapters were distilled from."""
    if calibrate_cache:
        return calibrate_cache
    recorded = provenance(adapters, "").get("cache") if adapters else None
    return recorded if recorded and (Path(recorded) / "manifest.json").is_file() else None


def package_dtype(bits: int) -> str:
    """What a package stores by default: bfloat16 on a GPU, as mlx-community ships; on a CPU float32
    unquantized (default_dtype) and float16 scales (a Mac computes with 16 bits, a CPU converts them at load)."""
    return default_dtype() if bits == 16 or mx.default_device() != mx.cpu else "float16"


@wired_limit()
def quantize_package(
    model: str,
    out: str,
    bits: int = 4,
    group_size: int | None = None,
    mode: str = "affine",
    adapters: str | None = None,
    memory: str | None = None,
    calibrate_cache: str | None = None,
    epochs: int = 4,
    learning_rate: float = 1e-5,
    force: bool = False,
    name: str | None = None,
    dtype: str | None = None,
    max_seq_length: int = 2048,
    on_epoch=None,
    recipe: str | None = None,
) -> Path:
    """bits 16: fused only, in `dtype`. Otherwise a recipe (recipes.py; by default the best measured
    one the data allows) quantizes in the source's dtype on a GPU, in float32 on a CPU, and the
    package stores its scales, biases and unquantized weights in `dtype` (default: package_dtype)."""
    check_options(bits, group_size, mode, calibrate_cache)
    out = Path(out)
    if out.exists() and not force:
        raise DuomemError(f"{out} already exists; pass --force to replace it or choose another --out")
    source = resolve(model)  # a Hub id's snapshot: its memory/, duomem.json and card are read as a local package's
    memories_file = bank_source(memory, adapters, source)
    chats = agent_chats(calibrate_cache, adapters) if bits < 16 and mode == "affine" else None
    chosen = pick(bits, recipe, chats is not None) if bits < 16 and mode == "affine" else None
    plan = RECIPES[chosen] if chosen else None
    if plan and group_size:
        plan = replace(plan, group_size=group_size)
    episodes = cache_episodes(chats) if plan and plan.needs_data else None
    student, tokenizer, config = load_student(source, adapters, model)
    dtype = dtype or package_dtype(bits)
    info = {
        "bits": bits,
        "group_size": (plan.group_size if plan else group_size or 32) if bits < 16 else None,
        "mode": mode if bits < 16 else None,
        "dtype": dtype,
        "recipe": chosen,
    }
    calibration, results = None, {}
    config["torch_dtype"] = dtype
    if bits == 16:
        student.set_dtype(getattr(mx, dtype))
    else:
        if mx.default_device() == mx.cpu:  # MLX's CPU emulates 16-bit floats, slowly; a GPU keeps the source's
            student.set_dtype(mx.float32)
        check_group_size(student, info["group_size"])
        dense_rate = cpu_decode_rate(student, tokenizer)
        if chosen:
            measuring = " or ".join(n for n, r in RECIPES.items() if r.needs_data)
            print(
                f"recipe {chosen}: {plan.summary}"
                + (f" (measured on {chats})" if episodes else "")
                + (
                    f"; it reads no chats, so {calibrate_cache} is unused (--recipe {measuring} measure them)"
                    if calibrate_cache and not episodes
                    else ""
                )
            )
        targets = float_targets(student, tokenizer, episodes, max_seq_length) if plan and plan.calibrate else None
        student, config, info["layers"] = quantize_with(
            student, config, tokenizer, plan, episodes, bits, mode, max_seq_length
        )
        quantized_rate = dense_rate and cpu_decode_rate(
            student, tokenizer
        )  # float32 scales, as a CPU loads the package
        as_stored(student, dtype)
        if targets is not None:
            calibration = run_calibration(
                student, tokenizer, episodes, targets, epochs, learning_rate, dtype, max_seq_length, on_epoch
            )
        if dense_rate:
            results["cpu_decode_tokens_per_s"] = {
                "float32": dense_rate,
                f"{chosen or f'{bits}-bit {mode}'}": quantized_rate,
            }
            say_fastest_on_cpu(results["cpu_decode_tokens_per_s"], "float32")
        student.set_dtype(getattr(mx, dtype))
    return write_package(
        out,
        source,
        student,
        tokenizer,
        config,
        memories_file,
        {
            "format": manifest.PACKAGE_FORMAT,
            "name": name or out.name,
            "base": model,
            "teacher": provenance(adapters, source).get("teacher"),
            "adapters": adapters and str(Path(adapters).resolve()),
            "quantization": info,
            "calibration": calibration,
            "license": base_license(source),
            "duomem_mlx": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "results": results,
        },
    )


def quantize_with(student, config, tokenizer, plan, episodes, bits: int, mode: str, max_seq_length: int):
    """(model, config, layers at each precision): the recipe's mixed precision measured on the
    agent's chats when it has one, else every layer alike."""
    if plan is None:  # mxfp4
        model, config = quantize_model(student, config, 32, bits, mode)
    elif plan.method != "rtn":
        print(f"{plan.method.upper()} on the chats of {len(episodes)} episode(s)")
        model, config = with_method(
            student,
            config,
            chat_windows([ids for ids, _ in calibration_data(tokenizer, episodes, max_seq_length)]),
            plan,
        )
        dense_prefill_on_cpu(model)
    else:
        sensitivity = None
        if plan.high:
            spread = episodes[:: max(1, len(episodes) // SENSITIVITY_EPISODES)][:SENSITIVITY_EPISODES]
            sequences = [
                (ids, mx.array(masked_positions(mask)))
                for ids, mask in calibration_data(tokenizer, spread, max_seq_length)
                if sum(mask[1:])
            ]
            print(f"measuring each layer's sensitivity on {len(sequences)} episode(s)")
            sensitivity = sensitivities(student, sequences, plan)
        model, config = quantize_model(
            student, config, plan.group_size, plan.bits, mode, predicate(student, plan, sensitivity)
        )
    layers = Counter(f"{m.bits}-bit g{m.group_size}" for _, m in model.named_modules() if hasattr(m, "bits"))
    return model, config, dict(layers)


def cpu_decode_rate(model, tokenizer) -> float | None:
    """Greedy decode tokens/s on a CPU (None on a GPU, where MLX's quantized kernels are the
    fast path). A few seconds on a 135M model."""
    if mx.default_device() != mx.cpu:
        return None

    prompt = tokenizer.encode(default_corpus())[:64]
    return round(max(throughput(model, prompt, CPU_DECODE_TOKENS)[1] for _ in range(2)), 2)


def say_fastest_on_cpu(rates: dict[str, float], dense: str) -> None:
    """Which precision decodes fastest on this CPU, and by how much (on a CPU MLX's quantized
    one-row product can be slower than a dense one)."""
    (fast, f), (slow, s) = sorted(rates.items(), key=lambda kv: -kv[1])
    hint = (
        (
            f"; for decoding speed on this CPU, `--bits 16 --dtype {dense}` "
            "(the quantized package is smaller, and on a Mac it is MLX's fast path)"
        )
        if fast == dense
        else ""
    )
    print(f"decoding on this CPU: {fast} {f:.1f} tokens/s, {slow} {s:.1f}: {fast} is {f / s:.2f}x as fast{hint}")


def quantize_model(model, config, group_size, bits, mode, quant_predicate=None):
    """mlx-lm's quantization; on a CPU the layers then run many rows dense, as a loaded package
    does (cpu_quant): calibration and its agreement checks feed whole episodes."""
    model, config = mlx_quantize(model, config, group_size, bits, mode=mode, quant_predicate=quant_predicate)
    dense_prefill_on_cpu(model)
    return model, config


def run_calibration(
    student, tokenizer, episodes, targets: Targets, epochs, learning_rate, dtype, max_seq_length, on_epoch=None
) -> dict:
    """Tuned and measured as the package computes (a CPU: float32, where 16-bit quantized matmuls
    are several times slower), with the scales rounded to `dtype` as the package stores them."""
    print(f"calibrating on {len(episodes)} recorded episode(s)")
    before = agreement(greedy_actions(student, tokenizer, episodes), targets.actions)
    result = calibrate(student, targets, epochs, learning_rate, max_seq_length=max_seq_length, on_epoch=on_epoch)
    as_stored(student, dtype)
    after = agreement(greedy_actions(student, tokenizer, episodes), targets.actions)
    steps = len(targets.actions)
    print(
        f"greedy-action agreement with the unquantized student on {steps} steps: {before:.1%} before, "
        f"{after:.1%} after calibration"
    )
    return {**result, "steps": steps, "agreement_before": round(before, 4), "agreement_after": round(after, 4)}


def own_actions(episodes, actions: list[str]) -> list:
    """The episodes with every step's action replaced by the float student's greedy one: the token
    prefixes its decisions are made at (a teacher's action leads elsewhere where the two differ)."""
    actions = iter(actions)
    return [replace(e, steps=[replace(step, action=next(actions)) for step in e.steps]) for e in episodes]


def as_stored(model, dtype: str) -> None:
    """Round the float weights (scales, biases, norms) to the package's dtype; a CPU computes on in
    float32, as it runs the package (cpu_quant), a GPU in the package's dtype."""
    model.set_dtype(getattr(mx, dtype))
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)


def write_package(out: Path, source: str, model, tokenizer, config, memories_file, meta: dict) -> Path:
    """Everything goes to a temp directory next to OUT, renamed into place once complete."""
    with atomic_dir(out, weight_bytes(model)) as tmp:
        save(tmp, source, model, tokenizer, config, donate_model=False)
        for stray in tmp.glob("*.py"):  # mlx-lm copies a source model's code; a package never runs any
            stray.unlink()
        meta["bytes"] = model_bytes(tmp)
        meta["bits_per_weight"] = round(float(compute_bits_per_weight(model)), 3)
        meta["memory"] = None
        if memories_file:  # embedded by the package as saved: the fingerprint eval / chat check
            memories, key = read_memories(memories_file), recorded_key(memories_file.parent)
            meta["memory"] = rebuild_bank(memories, str(tmp), tmp / "memory", str(out.resolve()), key) | {
                "source": str(memories_file)
            }
        manifest.write(tmp, meta)
        write_card(tmp)
    return out


def results_table(meta: dict) -> str:
    q = meta.get("quantization") or {}
    rows = [
        (
            "weights",
            (
                f"{q.get('bits')}-bit {q.get('mode')} (group {q.get('group_size')})"
                + (f", recipe {q['recipe']}" if q.get("recipe") else "")
            )
            if q.get("mode")
            else "bf16 (not quantized)",
        ),
        ("bits per weight", meta.get("bits_per_weight")),
        ("model bytes", f"{meta.get('bytes', 0) / 1e6:.1f} MB"),
        ("memories", (meta.get("memory") or {}).get("count", "none")),
    ]
    if meta.get("calibration"):
        c = meta["calibration"]
        rows.append(
            (
                "greedy-action agreement with the unquantized student",
                f"{c['agreement_before']:.1%} before, {c['agreement_after']:.1%} after calibration "
                f"({c['steps']} steps)",
            )
        )
    results = meta.get("results") or {}
    for key, value in (results.get("eval") or {}).items():
        rows.append((f"eval {key}", value))
    for key, value in (results.get("bench") or {}).items():
        rows.append((f"bench {key}", value))
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def write_card(package: Path, repo_id: str | None = None) -> None:
    """README.md with Hub front matter, usage for mlx-lm and duomem-mlx, and the results table."""
    meta = manifest.read(package, manifest.PACKAGE_FIX)
    base = meta.get("base") or ""
    data = ModelCardData(
        library_name="mlx",
        pipeline_tag="text-generation",
        license=meta.get("license"),
        base_model=base if not Path(base).exists() and "/" in base else None,
        tags=["mlx", "duomem", "agent", "distillation"]
        + (["quantized"] if (meta.get("quantization") or {}).get("mode") else []),
    )
    repo = repo_id or f"converted/{meta.get('name', package.name)}"
    adapters = "its distillation adapters fused into the weights" if meta.get("adapters") else "no adapters"
    memory = (
        "its memory bank rebuilt in this model's space (`memory/`, read automatically by duomem-mlx)"
        if meta.get("memory")
        else "no memory bank"
    )
    how, pip_line = duomem_install(direct_url())
    text = f"""
# {meta.get("name", package.name)}

A DuoMem student packaged by duomem-mlx {meta.get("duomem_mlx", "")}: base `{base}`, teacher
`{meta.get("teacher")}`, with {adapters} and {memory}.

## Use

With mlx-lm alone (the weights; the memories need duomem-mlx):

```bash
pip install mlx-lm
```

```python
from mlx_lm import load, generate

model, tokenizer = load("{repo}")
messages = [{{"role": "user", "content": "Task: boil water. You are in the kitchen."}}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
print(generate(model, tokenizer, prompt=prompt, max_tokens=32))
```

With duomem-mlx, which downloads `memory/` with the weights and retrieves from it ({how}):

```bash
{pip_line}duomem-mlx chat --model {repo}
duomem-mlx eval --env textworld --episodes 10 --policy model:{repo} --out results.json
```

## Results

{results_table(meta)}
"""
    with atomic_file(package / "README.md") as tmp:
        ModelCard(f"---\n{data.to_yaml()}\n---\n{text}").save(tmp)


def direct_url() -> dict:
    """pip's record of where this duomem-mlx was installed from (PEP 610 direct_url.json), or {}."""
    try:
        return json.loads(distribution("duomem-mlx").read_text("direct_url.json") or "{}")
    except (PackageNotFoundError, json.JSONDecodeError):
        return {}


def duomem_install(record: dict) -> tuple[str, str]:
    """(how, pip line) for the card's duomem-mlx, which is not on PyPI: the public git or archive URL
    pip installed it from, pinned; else (a local checkout) installing from its source."""
    url, vcs = record.get("url", ""), record.get("vcs_info")
    public = url.startswith("https://") and urlsplit(url).username is None
    if public and vcs and vcs.get("commit_id"):
        pinned = f"{vcs['vcs']}+{url}@{vcs['commit_id']}"
        return "installed from the source it was packaged with", f'pip install "duomem-mlx @ {pinned}"\n'
    if public and "archive_info" in record:
        return "installed from the archive it was packaged with", f'pip install "duomem-mlx @ {url}"\n'
    return f"not on PyPI: install it from its source, `pip install .` in a checkout of duomem-mlx {__version__}", ""
