"""Thin click layer: parse, call one stage function, print. Heavy imports stay inside commands."""

import click

from . import __version__
from .config import config_option, csv_list, game_params_option
from .envs import ENV_HELP
from .errors import DuomemError
from .memory.retrieval import FILTERS

SPLITS = click.Choice(["train", "dev", "test"])


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
@click.option("--arch", type=click.Choice(["qwen3", "llama", "gemma3_text", "lfm2"]), default="qwen3", show_default=True,
              help="gemma3_text: sliding-window layers (RotatingKVCache); lfm2: conv layers (ArraysCache).")
@click.option("--template", type=click.Choice(["qwen3", "llama3", "gemma", "chatml"]),
              help="Chat template and special tokens (default: the family's own: qwen3, llama3, gemma, chatml for lfm2).")
@click.option("--layers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--hidden", type=click.IntRange(32, 8192), default=64, show_default=True)
@click.option("--vocab-size", type=click.IntRange(300, 200_000), default=2048, show_default=True,
              help="Rows of the embedding and head. The tokenizer, trained on the built-in corpus, has at most "
                   "~2,057 tokens; more rows pad the head as real families do (Qwen3: 151,936).")
@click.option("--sliding-window", type=click.IntRange(4), default=32, show_default=True, help="gemma3_text only.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokenizer-from", type=click.Path(exists=True, file_okay=False), help="Copy this model's tokenizer (teacher and student then share a vocabulary).")
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
    from .io import check_destination
    from .models import make_tiny_model, tokenizer_fingerprint
    from transformers import PreTrainedTokenizerFast

    check_destination(out, option="OUT")
    if template and tokenizer_from:
        raise click.UsageError("--template and --tokenizer-from exclude each other (the copied tokenizer brings its template)")
    path = make_tiny_model(out, arch, layers, hidden, vocab_size, seed, tokenizer_from, template, sliding_window)
    fingerprint = tokenizer_fingerprint(PreTrainedTokenizerFast.from_pretrained(str(path)))
    click.echo(f"wrote {arch} ({layers} layers, hidden {hidden}) to {path}  tokenizer {fingerprint[:12]}")


@cli.command("eval")
@click.option("--env", "env_name", required=True, help=ENV_HELP)
@click.option("--tasks", callback=csv_list, help="Comma-separated task names (default: all).")
@click.option("--split", type=SPLITS, default="dev", show_default=True)
@click.option("--episodes", type=click.IntRange(1), default=3, show_default=True, help="Per named task; in all otherwise.")
@click.option("--policy", default="oracle", show_default=True, help="oracle | random | model:PATH")
@click.option("--adapter-path", type=click.Path(exists=True, file_okay=False), help="LoRA adapters for model:PATH.")
@click.option("--memory", "memory_bank", type=click.Path(), help="Memory bank the model reads (model:PATH only; default: ADAPTERS/memory, else PATH/memory, if present).")
@click.option("--memory-k", type=click.IntRange(0), default=3, show_default=True)
@click.option("--memory-filter", type=click.Choice(FILTERS), default="none", show_default=True,
              help="task: retrieve only memories of the episode's task type (use what distill used); none: by similarity alone.")
@click.option("--decode", type=click.Choice(["free", "constrained"]), default="constrained", show_default=True)
@click.option("--max-context", type=click.IntRange(256), default=4096, show_default=True, help="Tokens kept; oldest whole turns drop first.")
@click.option("--max-steps", type=click.IntRange(1), help="Per episode (default: 100 ScienceWorld, 50 TextWorld/ALFWorld).")
@game_params_option
@click.option("--thinking", is_flag=True, help="enable_thinking=True for templates that know it (Qwen3); off by default, as teach and distill render.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="results.json")
@click.option("--log", type=click.Path(dir_okay=False), help="Write one JSON line per episode.")
@config_option
def eval_command(**kwargs):
    """Play episodes with a policy and report success rate and score per task.

    \b
    Examples:
      duomem-mlx eval --env scienceworld --tasks boil,melt --split dev --episodes 2 --policy oracle --out r.json
      duomem-mlx eval --env textworld --episodes 10 --policy random --out r.json --log ep.jsonl
      duomem-mlx eval --env textworld --episodes 5 --policy model:runs/student --memory runs/bank --out r.json
      duomem-mlx eval --env twx --tasks coin,twc --game-params numLocations=2 --policy oracle --out r.json
    """
    from .eval import run_eval

    run_eval(**kwargs)


@cli.command("chat")
@click.option("--model", required=True, help="Student: mlx-lm model directory, converted/<name>, or Hub repo id.")
@click.option("--adapter-path", type=click.Path(exists=True, file_okay=False), help="LoRA adapters to apply.")
@click.option("--memory", "memory_bank", type=click.Path(), help="Memory bank to retrieve from (default: ADAPTERS/memory, else MODEL/memory, if present).")
@click.option("--memory-k", type=click.IntRange(0), default=3, show_default=True)
@click.option("--memory-filter", type=click.Choice(FILTERS), default="none", show_default=True,
              help="task: retrieve only memories of the episode's task type (--env only: a typed request has none); none: by similarity alone.")
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True, help="Per reply.")
@click.option("--max-context", type=click.IntRange(256), default=4096, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--env", "env_name", help="Watch the model play an episode of this environment instead: " + ENV_HELP)
@click.option("--tasks", callback=csv_list, help="Task for --env (default: the first).")
@click.option("--split", type=SPLITS, default="dev", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), default=30, show_default=True)
@game_params_option
@click.option("--step", is_flag=True, help="With --env: wait for Enter before each action.")
@click.option("--thinking", is_flag=True, help="enable_thinking=True for templates that know it (Qwen3); off by default.")
@config_option
def chat_command(model, adapter_path, memory_bank, memory_k, memory_filter, max_tokens, max_context, temperature,
                 env_name, tasks, split, seed, max_steps, game_params, step, thinking):
    """Talk to a student (streaming), with the memories it retrieves shown; or watch it play.

    In the REPL: /memory, /reset, /stats, /quit. Ctrl-C stops a reply, Ctrl-D (EOF) exits.
    Piped stdin works: one request per line.

    \b
    Examples:
      duomem-mlx chat --model converted/student-4bit
      echo "how do I boil water?" | duomem-mlx chat --model runs/student --memory runs/bank
      duomem-mlx chat --model runs/student --env textworld --step
    """
    from .agent.loop import ModelPolicy
    from .chat import run_chat, watch_episode

    decode = "constrained" if env_name else "free"
    policy = ModelPolicy.from_options(model, adapter_path, memory_bank, memory_k, decode, max_context, seed, temperature, thinking,
                                      memory_filter)
    if env_name:
        watch_episode(policy, env_name, tasks, split, seed, max_steps, step, game_params)
    else:
        run_chat(policy, max_tokens, max_context, temperature)


from .memory.cli import memory  # noqa: E402  (click group; its commands import lazily)

cli.add_command(memory)

from .teacher.cli import cache_group, teach  # noqa: E402

cli.add_command(teach)
cli.add_command(cache_group)

from .distill.cli import distill  # noqa: E402

cli.add_command(distill)

from .convert.cli import convert, export_gguf_command  # noqa: E402

cli.add_command(convert)
cli.add_command(export_gguf_command)

from .deploy.cli import bench, quantize, upload  # noqa: E402

cli.add_command(quantize)
cli.add_command(bench)
cli.add_command(upload)


def main():
    from .blas import reexec_with_openblas

    reexec_with_openblas()
    cli(prog_name="duomem-mlx")
