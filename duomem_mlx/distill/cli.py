"""`duomem-mlx distill`."""

import click

from duomem_mlx.config import config_option, csv_list
from duomem_mlx.runtime.options import FILTERS, PolicyOptions


@click.command("distill")
@click.option("--student", required=True, help="Student: mlx-lm model directory or Hub repo id.")
@click.option("--cache", required=True, type=click.Path(), help="Teacher cache written by `duomem-mlx teach`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Adapters directory to write.")
@click.option(
    "--memory-bank",
    type=click.Path(),
    help="Prepend the memories the student retrieves from this bank (built for the student).",
)
@click.option(
    "--memory-k",
    type=click.IntRange(0),
    default=PolicyOptions.memory_k,
    show_default=True,
    help="Memories per prompt, as at run time.",
)
@click.option(
    "--memory-filter",
    type=click.Choice(FILTERS),
    default=PolicyOptions.memory_filter,
    show_default=True,
    help="task: retrieve only memories of the episode's task type (pass the same to eval); none: by similarity alone.",
)
@click.option(
    "--kd",
    type=click.Choice(["on", "off"]),
    default="on",
    show_default=True,
    help="off: CE on the cached text re-tokenized by the student.",
)
@click.option("--iters", type=click.IntRange(1), default=100, show_default=True, help="Optimizer steps.")
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="Episodes per step (global, over all processes).",
)
@click.option(
    "--adapter",
    type=click.Choice(["lora", "dora", "full"]),
    default="lora",
    show_default=True,
    help="full: fine-tune the weights (mlx-lm's fine_tune_type full).",
)
@click.option("--rank", type=click.IntRange(1), default=8, show_default=True, help="LoRA rank.")
@click.option(
    "--scale", type=float, default=20.0, show_default=True, help="LoRA scale (mlx-lm's lora_parameters.scale)."
)
@click.option(
    "--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True, help="LoRA dropout."
)
@click.option(
    "--num-layers",
    type=int,
    default=16,
    show_default=True,
    help="Last blocks to adapt; -1: all (with --adapter full: every weight, embeddings too).",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Loss = alpha * CE + (1 - alpha) * T^2 * KD.",
)
@click.option(
    "--temperature", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True, help="KD temperature T."
)
@click.option("--kd-loss", type=click.Choice(["forward", "reverse", "jsd"]), default="forward", show_default=True)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.1,
    show_default=True,
    help="Episodes held out for validation.",
)
@click.option(
    "--max-seq-length",
    type=click.IntRange(64),
    default=4096,
    show_default=True,
    help="Longer episodes drop their oldest whole turns.",
)
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True)
@click.option(
    "--warmup", type=click.IntRange(0), help="Warmup steps before the cosine decay (default: iters/10, at most 100)."
)
@click.option(
    "--tasks", callback=csv_list, help="Comma-separated task types to train on (default: every one in the cache)."
)
@click.option(
    "--only-success/--all",
    default=True,
    show_default=True,
    help="Train on successful episodes only, or on all kept ones.",
)
@click.option(
    "--steps-per-report", type=click.IntRange(1), default=10, show_default=True, help="Steps per metrics.jsonl line."
)
@click.option(
    "--steps-per-eval", type=click.IntRange(1), default=50, show_default=True, help="Steps between validations."
)
@click.option("--save-every", type=click.IntRange(1), default=50, show_default=True, help="Steps between checkpoints.")
@click.option("--grad-checkpoint", is_flag=True, help="Recompute activations in the backward pass (less memory).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out (after a kill or Ctrl-C).")
@click.option("--force", is_flag=True, help="Overwrite a run in --out.")
@click.option("--seed", type=int, default=0, show_default=True)
@config_option
def distill(**kwargs):
    """Train the student from a teacher cache: LoRA on the teacher's actions (CE) and its cached
    top-k distributions (KD), with the memories the student retrieves in front of each prompt.

    Writes OUT/adapters.safetensors + adapter_config.json (`mlx_lm.load(STUDENT,
    adapter_path=OUT)` loads them), duomem.json, metrics.jsonl, loss.png and, with
    --memory-bank, OUT/memory/ (the bank in the adapted student's space, which `eval` and
    `chat` use by default). Data-parallel: run the same command under `mlx.launch`.

    \b
    Examples:
      duomem-mlx distill --student runs/student --cache runs/cache --memory-bank runs/bank --iters 200 --out runs/adapters
      duomem-mlx distill --student runs/student --cache runs/oracle-cache --kd off --adapter full --num-layers -1 \\
          --learning-rate 1e-3 --iters 300 --out runs/pretrained
      mlx.launch --backend ring -n 2 -- duomem-mlx distill --student runs/student --cache runs/cache --out runs/adapters
      duomem-mlx distill -c distill.yaml --resume
    """  # noqa: E501 (examples: one command a line, as it is copied)
    import mlx.core as mx  # noqa: PLC0415 (CLI start-up without the stage)

    from duomem_mlx.distill.train import DistillArgs  # noqa: PLC0415 (CLI start-up without the stage)
    from duomem_mlx.distill.train import distill as run  # noqa: PLC0415 (CLI start-up without the stage)

    summary = run(DistillArgs(**kwargs))
    if mx.distributed.init().rank() == 0:
        final, data = summary["final"], summary["data"]
        val = f"  val loss {final['val_loss']:.3f}  top-1 {final['val_top1']:.1%}" if "val_loss" in final else ""
        click.echo(
            f"trained {summary['trainable_parameters']:,} parameters for {summary['iters']} steps "
            f"on {data['train']} episodes ({data['val']} held out) in {summary['seconds']:.1f}s: "
            f"loss {final.get('train_loss', float('nan')):.3f}{val}"
        )
        click.echo(f"wrote {kwargs['out']}")
