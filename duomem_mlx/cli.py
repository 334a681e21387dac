"""Thin click layer: parse, call one stage function, print. Heavy imports stay inside commands."""

import click

from duomem_mlx.agent.cli import chat_command, eval_command
from duomem_mlx.config import config_option
from duomem_mlx.convert.cli import convert, export_gguf_command
from duomem_mlx.cpu.blas import reexec_with_openblas
from duomem_mlx.deploy.cli import bench, quantize, upload
from duomem_mlx.distill.cli import distill
from duomem_mlx.errors import DuomemError
from duomem_mlx.io import check_destination
from duomem_mlx.memory.cli import memory
from duomem_mlx.runtime.models import make_tiny_model
from duomem_mlx.teacher.cli import cache_group, teach
from duomem_mlx.version import __version__


class Group(click.Group):
    """The root group: a DuomemError raised anywhere below it (library code does not import
    click) becomes click's own one-line `Error: <message>` with exit code 1; this covers every
    command and subgroup added with `cli.add_command`."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DuomemError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="duomem-mlx")
def cli():
    """Distil a big agent model into a small, fast one on Apple Silicon (DuoMem).

    \b
    Pipeline:  teach -> memory build -> distill -> quantize -> eval | bench | chat | upload
    Start with `make demo`, or:
      duomem-mlx tiny-model runs/student
      duomem-mlx eval --env textworld --episodes 5 --policy oracle --out runs/oracle.json
    """


@cli.command("tiny-model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--arch",
    type=click.Choice(["qwen3", "llama", "gemma3_text", "lfm2"]),
    default="qwen3",
    show_default=True,
    help="gemma3_text: sliding-window layers (RotatingKVCache); lfm2: conv layers (ArraysCache).",
)
@click.option(
    "--template",
    type=click.Choice(["qwen3", "llama3", "gemma", "chatml"]),
    help="Chat template and special tokens (default: the family's own: qwen3, llama3, gemma, chatml for lfm2).",
)
@click.option("--layers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--hidden", type=click.IntRange(32, 8192), default=64, show_default=True)
@click.option(
    "--vocab-size",
    type=click.IntRange(300, 200_000),
    default=2048,
    show_default=True,
    help="Rows of the embedding and head. The tokenizer, trained on the built-in corpus, has at most "
    "~2,057 tokens; more rows pad the head as real families do (Qwen3: 151,936).",
)
@click.option("--sliding-window", type=click.IntRange(4), default=32, show_default=True, help="gemma3_text only.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--tokenizer-from",
    type=click.Path(exists=True, file_okay=False),
    help="Copy this model's tokenizer (teacher and student then share a vocabulary).",
)
@config_option
def tiny_model(out, arch, template, layers, hidden, vocab_size, sliding_window, seed, tokenizer_from):
    """Write a random-init mlx-lm model with a freshly trained BPE tokenizer to OUT.

    Works offline; `mlx_lm.load(OUT)` opens it. For tests, demos and pipeline dry runs.
    The tokenizer carries the family's chat template, special tokens and eos list
    (generation_config.json), written from the families' published templates.

    \b
    Example:
      duomem-mlx tiny-model runs/teacher --layers 4 --hidden 256
      duomem-mlx tiny-model runs/student --tokenizer-from runs/teacher
      duomem-mlx tiny-model runs/gemma --arch gemma3_text --sliding-window 16
      duomem-mlx tiny-model runs/llama-chatml --arch llama --template chatml
    """
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (~0.5 s: not at CLI start-up)

    from duomem_mlx.formats.fingerprints import tokenizer_fingerprint  # noqa: PLC0415 (mlx: not at CLI start-up)

    check_destination(out, option="OUT")
    if template and tokenizer_from:
        raise click.UsageError(
            "--template and --tokenizer-from exclude each other (the copied tokenizer brings its template)"
        )
    path = make_tiny_model(out, arch, layers, hidden, vocab_size, seed, tokenizer_from, template, sliding_window)
    fingerprint = tokenizer_fingerprint(PreTrainedTokenizerFast.from_pretrained(str(path)))
    click.echo(f"wrote {arch} ({layers} layers, hidden {hidden}) to {path}  tokenizer {fingerprint[:12]}")


for command in (
    teach,
    cache_group,
    memory,
    distill,
    convert,
    export_gguf_command,
    quantize,
    eval_command,
    bench,
    chat_command,
    upload,
):
    cli.add_command(command)


def main():
    reexec_with_openblas()
    cli(prog_name="duomem-mlx")
