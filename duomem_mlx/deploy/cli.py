"""`duomem-mlx quantize | bench | upload`; stage modules are imported inside commands."""

from pathlib import Path

import click

from duomem_mlx.config import config_option
from duomem_mlx.envs import ENV_HELP
from duomem_mlx.formats import manifest


@click.command("quantize")
@click.option(
    "--model",
    required=True,
    help="The student: mlx-lm model directory or Hub repo id (a quantized QLoRA base is dequantized first).",
)
@click.option(
    "--adapters",
    type=click.Path(exists=True, file_okay=False),
    help="mlx-lm adapters to fuse (from `duomem-mlx distill`).",
)
@click.option(
    "--memory",
    help="Memory bank directory or memories.jsonl to rebuild in the package's space (default: ADAPTERS/memory or "
    "MODEL/memory).",
)
@click.option(
    "--bits",
    type=click.Choice(["4", "8", "16"]),
    default="4",
    show_default=True,
    help="16: fuse only, not quantized (--dtype).",
)
@click.option(
    "--recipe",
    help="How the bits are spent (default: affine4 for --bits 4, the best measured on the demo's student; "
    "affine8): affine8, affine4, affine4-g32, mixed4, mixed4-margin, gptq4, awq4 (benchmarks/quantization.py).",
)
@click.option(
    "--group-size",
    type=click.Choice(["32", "64", "128"]),
    help="Overrides the recipe's (64); must divide every layer's input size.",
)
@click.option("--mode", type=click.Choice(["affine", "mxfp4"]), default="affine", show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    help="Of unquantized weights and of the quantization scales as stored (default: bfloat16 on a GPU, "
    "as mlx-community ships; on a CPU, where MLX emulates bf16, float16 scales, converted to float32 "
    "at load, and float32 for --bits 16).",
)
@click.option(
    "--calibrate",
    "calibrate_cache",
    type=click.Path(exists=True, file_okay=False),
    help="Teacher cache whose chats the recipe measures (layer sensitivities, GPTQ, AWQ) and calibrates on "
    "(default: the one the adapters were distilled from).",
)
@click.option(
    "--epochs",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="Passes over the cache's episodes when calibrating.",
)
@click.option(
    "--learning-rate",
    type=click.FloatRange(0, min_open=True),
    default=1e-5,
    show_default=True,
    help="Calibration learning rate (Adam).",
)
@click.option(
    "--max-seq-length",
    type=click.IntRange(16),
    default=2048,
    show_default=True,
    help="Calibration: tokens kept per episode.",
)
@click.option(
    "--out", type=click.Path(file_okay=False), help="Package directory (default: converted/<model name>-<bits>bit)."
)
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@config_option
def quantize(
    model,
    adapters,
    memory,
    bits,
    recipe,
    group_size,
    mode,
    dtype,
    calibrate_cache,
    epochs,
    learning_rate,
    max_seq_length,
    out,
    force,
):
    """Fuse adapters, quantize and package the student in converted/NAME.

    The package loads with plain `mlx_lm.load`, carries its memory bank rebuilt in the
    quantized model's space, a duomem.json and a Hub model card.

    \b
    Examples:
      duomem-mlx quantize --model runs/student --adapters runs/adapters --bits 4 --out converted/student-4bit
      duomem-mlx quantize --model runs/student --adapters runs/adapters --bits 4 --recipe affine4
      duomem-mlx quantize --model runs/student --adapters runs/adapters --bits 4 --recipe gptq4 --calibrate runs/teacher-cache
      duomem-mlx quantize --model runs/teacher --bits 16 --out converted/teacher-bf16
    """  # noqa: E501 (examples: one command a line, as it is copied)
    from duomem_mlx.deploy.quantize import quantize_package  # noqa: PLC0415 (CLI start-up without the stage)

    bits = int(bits)
    out = out or str(Path("converted") / f"{Path(model.rstrip('/')).name}-{'bf16' if bits == 16 else f'{bits}bit'}")
    path = quantize_package(
        model,
        out,
        bits,
        group_size and int(group_size),
        mode,
        adapters,
        memory,
        calibrate_cache,
        epochs,
        learning_rate,
        force,
        dtype=dtype,
        max_seq_length=max_seq_length,
        recipe=recipe,
    )
    meta = manifest.read(path, manifest.PACKAGE_FIX)
    if not meta["memory"]:
        click.echo("note: no memory bank (pass --memory BANK); the package works without memories")
    click.echo(
        f"wrote {path}: {meta['bytes'] / 1e6:.2f} MB, {meta['bits_per_weight']} bits per weight"
        + (f", {meta['memory']['count']} memories" if meta["memory"] else "")
    )


@click.command("bench")
@click.argument("packages", nargs=-1, required=True)
@click.option("--env", "env_name", help="Play real episodes (default: a synthetic episode, offline): " + ENV_HELP)
@click.option("--episodes", type=click.IntRange(1), default=1, show_default=True, help="With --env.")
@click.option("--steps", type=click.IntRange(2), default=20, show_default=True, help="Steps of the synthetic episode.")
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Loads, episodes and throughput runs per package (medians).",
)
@click.option(
    "--max-tokens", type=click.IntRange(1), default=32, show_default=True, help="Tokens decoded per throughput run."
)
@click.option(
    "--time-limit",
    type=click.FloatRange(0, min_open=True),
    help="Seconds; stop there and write what was measured, marked partial.",
)
@click.option("--max-context", type=click.IntRange(256), default=4096, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), required=True, help="Results JSON.")
@click.option(
    "--plot", "plot_out", type=click.Path(dir_okay=False), help="PNG of the packages side by side (needs matplotlib)."
)
@click.option(
    "--save/--no-save", default=True, show_default=True, help="Store the figures in each package's duomem.json."
)
@config_option
def bench(
    packages, env_name, episodes, steps, repeats, max_tokens, time_limit, max_context, seed, json_out, plot_out, save
):
    """Measure load time, time to first action, tokens/s, step latency, memory and size.

    Several packages are measured side by side in one run (bf16 / 8-bit / 4-bit, teacher vs
    student); decode speed is also reported as a fraction of the memory-bandwidth roofline.
    The synthetic prefix grows with --steps: a slow model gets a small run with small --steps
    and --max-tokens. Ctrl-C, SIGTERM or --time-limit still write the JSON, marked partial.

    \b
    Examples:
      duomem-mlx bench converted/student-4bit --json runs/bench.json
      duomem-mlx bench converted/student-bf16 converted/student-8bit converted/student-4bit --json b.json --plot b.png
      duomem-mlx bench converted/student-4bit --env textworld --episodes 3 --json b.json
      duomem-mlx bench converted/big-4bit --steps 2 --repeats 1 --max-tokens 8 --time-limit 600 --json b.json
    """
    from duomem_mlx.deploy.bench import run_bench  # noqa: PLC0415 (CLI start-up without the stage)

    run_bench(
        list(packages),
        env_name,
        episodes,
        steps,
        repeats,
        max_tokens,
        max_context,
        seed,
        time_limit,
        json_out,
        plot_out,
        save,
    )


@click.command("upload")
@click.argument("package", type=click.Path(exists=True, file_okay=False))
@click.option("--repo", required=True, help="Hub repo id, USER/NAME.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--dry-run", is_flag=True, help="List the files and sizes that would go; no network.")
@click.option("--message", help="Commit message.")
@config_option
def upload(package, repo, private, dry_run, message):
    """Upload a converted package to the Hugging Face Hub in one commit.

    Only weights, config, tokenizer, memory/, duomem.json, the model card (its results table
    refreshed from duomem.json) and plots go; never caches, logs, dotfiles or code. The token
    comes from HF_TOKEN or `hf auth login` and is never printed.

    \b
    Examples:
      duomem-mlx upload converted/student-4bit --repo me/duomem-student-4bit --dry-run
      HF_TOKEN=hf_... duomem-mlx upload converted/student-4bit --repo me/duomem-student-4bit --private
    """
    from duomem_mlx.deploy.hub import upload as run_upload  # noqa: PLC0415 (CLI start-up without the stage)

    run_upload(package, repo, private, dry_run, message)
