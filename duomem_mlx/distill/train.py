"""`duomem-mlx distill`: train the student from the teacher cache, on mlx-lm's tuner pieces
(LoRA / DoRA layers, schedules, gradient checkpointing, gradient averaging under
`mx.distributed`), with its own checkpoint (adapters + optimizer state + step; the RNG is a function of seed and
step) for --resume.

OUT/ holds mlx-lm's adapters.safetensors + adapter_config.json, duomem.json (written last: the
run is finished), metrics.jsonl, loss.png, checkpoint/ and, with a memory bank, memory/ (the
bank rebuilt in the adapted student's space)."""

import json
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers

from duomem_mlx.distill.data import Dataset, build_dataset, check_kd, collate, epoch_batches
from duomem_mlx.distill.losses import distill_loss
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.adapters import CONFIG, SUMMARY, WEIGHTS, finished, write_adapter_config, write_summary
from duomem_mlx.formats.fingerprints import tokenizer_fingerprint
from duomem_mlx.formats.teacher_cache import read_cache_memories, read_manifest
from duomem_mlx.io import atomic_file, write_atomic
from duomem_mlx.progress import Progress
from duomem_mlx.runtime import retrieval
from duomem_mlx.runtime.embed import rebuild_bank
from duomem_mlx.runtime.gpu_memory import warn_if_over, wired_limit
from duomem_mlx.runtime.heads import logits_at
from duomem_mlx.runtime.models import load
from duomem_mlx.runtime.options import PolicyOptions
from duomem_mlx.runtime.policy import load_bank

OUTPUTS = (
    WEIGHTS,
    CONFIG,
    SUMMARY,
    "metrics.jsonl",
    "loss.png",
    "checkpoint",
    "memory",
)
# Settings a resumed run must share with its checkpoint (grad_checkpoint and world size may change).
RESUME_SETTINGS = (
    "student",
    "cache",
    "memory_bank",
    "memory_k",
    "memory_filter",
    "kd",
    "iters",
    "batch_size",
    "adapter",
    "rank",
    "scale",
    "dropout",
    "num_layers",
    "alpha",
    "temperature",
    "kd_loss",
    "val_fraction",
    "max_seq_length",
    "seed",
    "learning_rate",
    "warmup",
    "only_success",
    "tasks",
)


@dataclass
class DistillArgs:
    student: str
    cache: str
    out: str
    memory_bank: str | None = None
    memory_k: int = PolicyOptions.memory_k  # the student trains reading what it reads at run time
    memory_filter: str = PolicyOptions.memory_filter
    kd: str = "on"
    iters: int = 100
    batch_size: int = 4
    adapter: str = "lora"
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = 16
    alpha: float = 0.5
    temperature: float = 1.0
    kd_loss: str = "forward"
    val_fraction: float = 0.1
    max_seq_length: int = 4096
    learning_rate: float = 1e-4
    warmup: int | None = None
    only_success: bool = True
    tasks: list[str] | None = None
    steps_per_report: int = 10
    steps_per_eval: int = 50
    save_every: int = 50
    grad_checkpoint: bool = False
    resume: bool = False
    force: bool = False
    seed: int = 0


def distill(args: DistillArgs) -> dict:
    world = mx.distributed.init()
    out = Path(args.out)
    check_out(args, out, world.rank())
    if args.batch_size % world.size():
        raise DuomemError(f"--batch-size {args.batch_size} must be a multiple of the {world.size()} processes")
    start = time.perf_counter()

    manifest = read_manifest(args.cache)
    model, tokenizer = load(args.student)
    kd = args.kd == "on"
    if kd:
        check_kd(manifest, args.cache, tokenizer_fingerprint(tokenizer))
    bank = retrieve = None
    if args.memory_bank:
        bank = load_bank(args.memory_bank, model, tokenizer)
        retrieve = partial(
            retrieval.retrieve, bank, model, tokenizer, k=args.memory_k, memory_filter=args.memory_filter
        )
    data = build_dataset(
        args.cache,
        tokenizer,
        kd,
        retrieve,
        args.only_success,
        args.val_fraction,
        args.max_seq_length,
        args.seed,
        progress=world.rank() == 0,
        tasks=args.tasks,
    )
    if len(data.train) < args.batch_size:
        raise DuomemError(
            f"only {len(data.train)} training episodes for --batch-size {args.batch_size}; "
            "pass a smaller --batch-size or --val-fraction, or cache more episodes"
        )
    mx.random.seed(args.seed)
    trainable = add_adapters(model, args)
    optimizer = optim.Adam(learning_rate=schedule(args))
    step = (
        load_checkpoint(out, args, model, optimizer)
        if args.resume and (out / "checkpoint" / "state.json").exists()
        else 0
    )
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    try:
        history = train(model, optimizer, data, args, world, step, out)
    except RuntimeError as e:
        if "memory" in str(e).lower() or "alloc" in str(e).lower():
            raise DuomemError(
                f"out of memory at --batch-size {args.batch_size}; pass a smaller --batch-size, "
                "a smaller --max-seq-length or --grad-checkpoint"
            )
        raise
    summary = {
        "student": args.student,
        "teacher": manifest.get("teacher"),
        "cache": str(Path(args.cache).resolve()),
        "memory": memory_mode(bank, args),
        "losses": {
            "kd": args.kd,
            "alpha": args.alpha if kd else 1.0,
            "temperature": args.temperature,
            "kd_loss": args.kd_loss if kd else None,
        },
        "iters": args.iters,
        "world_size": world.size(),
        "trainable_parameters": trainable,
        "data": data.counts,
        "final": history[-1] if history else {},
        "seconds": round(time.perf_counter() - start, 2),
        "settings": settings(args),
    }
    if world.rank() == 0:
        if bank is not None:
            local = Path(args.student).expanduser()
            embedder = str(local.resolve()) if local.exists() else args.student
            rebuild_bank(bank.memories, args.student, out / "memory", embedder, bank.key, adapters=out)
        plot(out)
        write_summary(out, summary)
    return summary


def settings(args: DistillArgs) -> dict:
    return {k: v for k, v in asdict(args).items() if k in RESUME_SETTINGS}


def check_out(args: DistillArgs, out: Path, rank: int) -> None:
    """Refuse to overwrite a run unless told; --force clears our files (rank 0 only)."""
    if args.resume and args.force:
        raise DuomemError("--resume and --force contradict each other; pass one")
    done = finished(out)
    started = (out / "checkpoint" / "state.json").exists() or (out / WEIGHTS).exists()
    if done and args.resume:
        raise DuomemError(f"{out} already holds a finished run; pass --force to train it again, or another --out")
    if (done or started) and not (args.resume or args.force):
        state = "finished" if done else "unfinished"
        raise DuomemError(
            f"{out} already holds a {state} distill run; pass --resume to continue it or --force to overwrite it"
        )
    if args.force and rank == 0:
        for name in OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)


def num_layers(model, args: DistillArgs) -> int:
    n = len(model.layers)
    return n if args.num_layers < 0 or args.num_layers > n else args.num_layers


def add_adapters(model, args: DistillArgs) -> int:
    """LoRA / DoRA layers on the last --num-layers blocks (QLoRA on a quantized student), or
    unfreeze them for full fine-tuning (with --num-layers -1: every parameter). Returns the
    number of trainable parameters."""
    model.freeze()
    n = num_layers(model, args)
    if args.adapter == "full":
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise DuomemError(
                "--adapter full cannot train a quantized student; use --adapter lora (QLoRA) or an unquantized model"
            )
        if args.num_layers < 0:
            model.unfreeze()
        else:
            for layer in model.layers[-n:]:
                layer.unfreeze()
    else:
        linear_to_lora_layers(model, n, lora_parameters(args), use_dora=args.adapter == "dora")
    return int(sum(v.size for _, v in tree_flatten(model.trainable_parameters())))


def lora_parameters(args: DistillArgs) -> dict:
    return {"rank": args.rank, "scale": args.scale, "dropout": args.dropout}


def schedule(args: DistillArgs):
    """Linear warmup, then cosine decay to a tenth of --learning-rate (mlx-lm's build_schedule)."""
    warmup = min(100, args.iters // 10) if args.warmup is None else args.warmup
    decay = max(1, args.iters - warmup)
    return build_schedule(
        {"name": "cosine_decay", "arguments": [args.learning_rate, decay, args.learning_rate / 10], "warmup": warmup}
    )


def adapter_config(model, args: DistillArgs) -> dict:
    """adapter_config.json as `mlx_lm.lora` writes it (what `mlx_lm.load(adapter_path=)` reads)."""
    config = {
        "model": args.student,
        "data": args.cache,
        "fine_tune_type": args.adapter,
        "num_layers": num_layers(model, args),
        "lora_parameters": None if args.adapter == "full" else lora_parameters(args),
        "batch_size": args.batch_size,
        "iters": args.iters,
        "learning_rate": args.learning_rate,
        "max_seq_length": args.max_seq_length,
        "grad_checkpoint": args.grad_checkpoint,
        "optimizer": "adam",
        "seed": args.seed,
        "adapter_path": args.out,
    }
    return dict(sorted(config.items()))


def save_safetensors(path: Path, arrays: dict) -> None:
    with atomic_file(path, sum(a.nbytes for a in arrays.values())) as tmp:
        mx.save_safetensors(str(tmp), arrays)


def save_checkpoint(out: Path, model, optimizer, args: DistillArgs, step: int) -> None:
    """Adapters and optimizer state under step-named files, then state.json (atomic) names
    them, then older ones go: a kill at any point leaves one whole checkpoint."""
    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    adapters = dict(tree_flatten(model.trainable_parameters()))
    save_safetensors(ckpt / f"{step:07d}.adapters.safetensors", adapters)
    save_safetensors(ckpt / f"{step:07d}.optimizer.safetensors", dict(tree_flatten(optimizer.state)))
    write_atomic(ckpt / "state.json", json.dumps({"step": step, "settings": settings(args)}, indent=1).encode())
    for old in ckpt.glob("*.safetensors"):
        if not old.name.startswith(f"{step:07d}."):
            old.unlink()
    save_safetensors(out / WEIGHTS, adapters)
    write_adapter_config(out, adapter_config(model, args))


def load_checkpoint(out: Path, args: DistillArgs, model, optimizer) -> int:
    """Restore adapters and optimizer state of the last checkpoint (the RNG is reseeded per step); its step."""
    ckpt = out / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    old, new = state["settings"], settings(args)
    changed = [k for k in RESUME_SETTINGS if old.get(k) != new.get(k)]
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise DuomemError(
            f"--resume with different settings than the checkpoint in {out} ({diff}); use the same flags or --force"
        )
    step = state["step"]
    model.load_weights(str(ckpt / f"{step:07d}.adapters.safetensors"), strict=False)
    saved = mx.load(str(ckpt / f"{step:07d}.optimizer.safetensors"))
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(saved.items()))
    mx.eval(model.parameters(), optimizer.state)
    return step


def batch_for(data: Dataset, args: DistillArgs, step: int, world) -> tuple:
    """This rank's share of global batch `step`, and the loss normaliser: the global batch's
    masked tokens over the world size, so the averaged gradients equal one process's."""
    epoch_len = len(data.train) // args.batch_size
    indices = epoch_batches(data.train, args.batch_size, args.seed, step // epoch_len)[step % epoch_len]
    examples = [data.train[i] for i in indices]
    norm = sum(float(e.mask[1:].sum()) for e in examples) / world.size()
    mine = examples[world.rank() :: world.size()]
    return tuple(mx.array(a) for a in collate(mine, data.top_k)) + (mx.array(norm),), sum(len(e) - 1 for e in mine)


def make_loss(args: DistillArgs, top_k: int):
    kind, alpha, temperature = args.kd_loss, args.alpha, args.temperature

    def loss(model, inputs, rows, targets, mask, *rest):
        *teacher, norm = rest
        logits = logits_at(model, inputs, rows)
        total, ce, kd, rows = distill_loss(logits, targets, mask, *(teacher or (None, None)), alpha, temperature, kind)
        return total / norm, mx.stack([total, ce, kd, rows, mask.sum()])  # one aux array: a tuple trips mx.compile

    return loss


def evaluate(model, data: Dataset, args: DistillArgs) -> dict:
    """Validation loss, CE, and top-1 agreement with the teacher's rows (with the targets under --kd off)."""
    model.eval()
    sums = np.zeros(4)
    agree = 0.0
    alpha = args.alpha if data.top_k else 1.0
    for start in range(0, len(data.val), args.batch_size):
        inputs, rows, targets, mask, *teacher = (
            mx.array(a) for a in collate(data.val[start : start + args.batch_size], data.top_k)
        )
        logits = logits_at(model, inputs, rows)
        parts = distill_loss(logits, targets, mask, *(teacher or (None, None)), alpha, args.temperature, args.kd_loss)
        parts = (*parts[:2], parts[3], mask.sum())
        reference, where = (teacher[0][..., 0], (teacher[0][..., 0] >= 0) * mask) if teacher else (targets, mask)
        hits = ((logits.argmax(-1) == reference) * where).sum()
        mx.eval(parts, hits)
        sums += [p.item() for p in parts]
        agree += hits.item()
    model.train()
    total, ce, rows, toks = sums
    return {"val_loss": total / toks, "val_ce": ce / toks, "val_top1": agree / (rows if data.top_k else toks)}


@wired_limit()
def train(model, optimizer, data: Dataset, args: DistillArgs, world, step: int, out: Path) -> list[dict]:
    rank0 = world.rank() == 0
    loss = make_loss(args, data.top_k)
    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(*batch):
        (_, parts), grad = loss_and_grad(model, *batch)
        optimizer.update(model, average_gradients(grad))
        return parts

    metrics_path = out / "metrics.jsonl"
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    history = [h for h in history if h["step"] <= step]
    if step == 0 and data.val:  # the starting point of the validation curve
        history.append({"step": 0} | evaluate(model, data, args))
    if rank0:
        write_atomic(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
    model.train()
    bar = Progress(total=args.iters, initial=step, desc="distill", unit="step", disable=not rank0)
    sums, seconds = np.zeros(6), 0.0
    warned = False
    try:
        while step < args.iters:
            batch, tokens = batch_for(data, args, step, world)
            tic = time.perf_counter()
            mx.random.seed(
                args.seed * 1_000_003 + step
            )  # the RNG (dropout) of a step is its own: resume draws the same
            parts = train_step(*batch)
            mx.eval(state, parts)
            seconds += time.perf_counter() - tic
            warned = warned or warn_if_over(
                mx.get_peak_memory(),
                f"training step {step + 1} ({tokens} tokens)",
                "pass a smaller --batch-size or --max-seq-length, or --grad-checkpoint",
            )
            local = np.array(parts.astype(mx.float32))
            check_finite(local[0], world, step + 1, out)
            sums += [*local, tokens]
            step += 1
            row = None
            if step % args.steps_per_report == 0 or step == args.iters:
                total, ce, kd, rows, masked, tokens = mx.distributed.all_sum(
                    mx.array(sums.astype(np.float32)), stream=mx.cpu
                ).tolist()
                row = {
                    "step": step,
                    "train_loss": total / masked,
                    "ce": ce / masked,
                    "kd": kd / rows if rows else None,
                    "tokens_per_s": tokens / seconds,
                    "peak_mb": mx.get_peak_memory() / 1e6,
                    "learning_rate": optimizer.learning_rate.item(),
                }
                sums, seconds = np.zeros(6), 0.0
            if data.val and (step % args.steps_per_eval == 0 or step == args.iters):
                row = (row or {"step": step}) | evaluate(model, data, args)
            if row:
                history.append(row)
                bar.set_postfix(
                    loss=f"{row.get('train_loss', row.get('val_loss')):.3f}",
                    tok_s=f"{row.get('tokens_per_s', 0):.0f}",
                    peak_mb=f"{mx.get_peak_memory() / 1e6:.0f}",
                )
                if rank0:
                    write_atomic(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
            if rank0 and (step % args.save_every == 0 or step == args.iters):
                save_checkpoint(out, model, optimizer, args, step)
            bar.update(1)
    except KeyboardInterrupt:
        if rank0:
            save_checkpoint(out, model, optimizer, args, int(optimizer.step.item()))
        raise DuomemError(
            f"interrupted at step {int(optimizer.step.item())}; checkpoint saved in {out}/checkpoint, "
            "continue with --resume"
        )
    finally:
        bar.close()
    return history


def check_finite(loss: float, world, step: int, out: Path) -> None:
    """Every rank learns whether any rank's loss is non-finite, and all stop together (one
    raising alone would leave the others waiting in the gradient average)."""
    bad = mx.distributed.all_sum(mx.array(float(not np.isfinite(loss))), stream=mx.cpu).item()
    if bad:
        value = loss if not np.isfinite(loss) else f"non-finite on {bad:.0f} of {world.size()} processes"
        raise DuomemError(
            f"the loss became {value} at step {step}; nothing of it was saved, the last good checkpoint "
            f"(step {last_saved(out)}) is intact: lower --learning-rate and pass --resume, or --force"
        )


def last_saved(out: Path) -> int:
    path = out / "checkpoint" / "state.json"
    return json.loads(path.read_text())["step"] if path.exists() else 0


def memory_mode(bank, args: DistillArgs) -> dict | None:
    """Which memories the student trained with: the teacher's (the cache's) or others (its own)."""
    if bank is None:
        return None

    teacher_ids = {m.id for m in read_cache_memories(args.cache)}
    mode = "teacher" if teacher_ids and all(m.id in teacher_ids for m in bank.memories) else "other"
    return {
        "bank": str(Path(args.memory_bank).resolve()),
        "mode": mode,
        "memories": len(bank),
        "k": args.memory_k,
        "filter": args.memory_filter,
    }


def plot(out: Path) -> None:
    """loss.png from metrics.jsonl when matplotlib is installed."""
    try:
        import matplotlib  # noqa: PLC0415 (optional: the [plot] extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 (after matplotlib.use)
    except ImportError:
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "val_loss"):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=key, marker="." if key == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    with atomic_file(out / "loss.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
