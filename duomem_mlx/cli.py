"""Thin click layer: parse, call one stage function, print. Heavy imports stay inside commands."""

import click

from . import __version__
from .config import config_option, csv_list

ENVS = click.Choice(["scienceworld", "textworld", "alfworld"])
SPLITS = click.Choice(["train", "dev", "test"])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="duomem-mlx")
def cli():
    """Distil a big agent model into a small, fast one on Apple Silicon (DuoMem).

    \b
    Pipeline:  teach -> memory build -> eval | chat -> quantize -> bench | upload   (distill: planned)
    Start with `make demo`, or:
      duomem-mlx tiny-model runs/student
      duomem-mlx eval --env textworld --episodes 5 --policy oracle --out runs/oracle.json
    """


@cli.command("tiny-model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(["qwen3", "llama"]), default="qwen3", show_default=True)
@click.option("--layers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--hidden", type=click.IntRange(32, 8192), default=64, show_default=True)
@click.option("--vocab-size", type=click.IntRange(300, 200_000), default=2048, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokenizer-from", type=click.Path(exists=True, file_okay=False), help="Copy this model's tokenizer (teacher and student then share a vocabulary).")
@config_option
def tiny_model(out, arch, layers, hidden, vocab_size, seed, tokenizer_from):
    """Write a random-init mlx-lm model with a freshly trained BPE tokenizer to OUT.

    Works offline; `mlx_lm.load(OUT)` opens it. For tests, demos and pipeline dry runs.

    \b
    Example:
      duomem-mlx tiny-model runs/teacher --layers 4 --hidden 256
      duomem-mlx tiny-model runs/student --tokenizer-from runs/teacher
    """
    from .models import make_tiny_model, tokenizer_fingerprint
    from transformers import PreTrainedTokenizerFast

    path = make_tiny_model(out, arch, layers, hidden, vocab_size, seed, tokenizer_from)
    fingerprint = tokenizer_fingerprint(PreTrainedTokenizerFast.from_pretrained(str(path)))
    click.echo(f"wrote {arch} ({layers} layers, hidden {hidden}) to {path}  tokenizer {fingerprint[:12]}")


@cli.command("eval")
@click.option("--env", "env_name", type=ENVS, required=True)
@click.option("--tasks", callback=csv_list, help="Comma-separated task names (default: all).")
@click.option("--split", type=SPLITS, default="dev", show_default=True)
@click.option("--episodes", type=click.IntRange(1), default=3, show_default=True, help="Per named task; in all otherwise.")
@click.option("--policy", default="oracle", show_default=True, help="oracle | random | model:PATH")
@click.option("--adapter-path", type=click.Path(exists=True, file_okay=False), help="LoRA adapters for model:PATH.")
@click.option("--memory", "memory_bank", type=click.Path(), help="Memory bank the model reads (model:PATH only).")
@click.option("--memory-k", type=click.IntRange(0), default=3, show_default=True)
@click.option("--decode", type=click.Choice(["free", "constrained"]), default="constrained", show_default=True)
@click.option("--max-context", type=click.IntRange(256), default=4096, show_default=True, help="Tokens kept; oldest whole turns drop first.")
@click.option("--max-steps", type=click.IntRange(1), help="Per episode (default: 100 ScienceWorld, 50 TextWorld/ALFWorld).")
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
    """
    from .eval import run_eval

    run_eval(**kwargs)


@cli.command("chat")
@click.option("--model", required=True, help="Student: mlx-lm model directory, converted/<name>, or Hub repo id.")
@click.option("--adapter-path", type=click.Path(exists=True, file_okay=False), help="LoRA adapters to apply.")
@click.option("--memory", "memory_bank", type=click.Path(), help="Memory bank to retrieve from (default: MODEL/memory if present).")
@click.option("--memory-k", type=click.IntRange(0), default=3, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True, help="Per reply.")
@click.option("--max-context", type=click.IntRange(256), default=4096, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--env", "env_name", type=ENVS, help="Watch the model play an episode of this environment instead.")
@click.option("--tasks", callback=csv_list, help="Task for --env (default: the first).")
@click.option("--split", type=SPLITS, default="dev", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), default=30, show_default=True)
@click.option("--step", is_flag=True, help="With --env: wait for Enter before each action.")
@config_option
def chat_command(model, adapter_path, memory_bank, memory_k, max_tokens, max_context, temperature,
                 env_name, tasks, split, seed, max_steps, step):
    """Talk to a student (streaming), with the memories it retrieves shown; or watch it play.

    In the REPL: /memory, /reset, /stats, /quit. Ctrl-C stops a reply, Ctrl-D (EOF) exits.
    Piped stdin works: one request per line.

    \b
    Examples:
      duomem-mlx chat --model converted/student-4bit
      echo "how do I boil water?" | duomem-mlx chat --model runs/student --memory runs/bank
      duomem-mlx chat --model runs/student --env textworld --step
    """
    from pathlib import Path

    from .agent.loop import ModelPolicy
    from .chat import run_chat, watch_episode

    if memory_bank is None and (Path(model) / "memory" / "bank.json").exists():
        memory_bank = str(Path(model) / "memory")
    decode = "constrained" if env_name else "free"
    policy = ModelPolicy.from_options(model, adapter_path, memory_bank, memory_k, decode, max_context, seed, temperature)
    if env_name:
        watch_episode(policy, env_name, tasks, split, seed, max_steps, step)
    else:
        run_chat(policy, max_tokens, max_context, temperature)


from .memory.cli import memory  # noqa: E402  (click group; its commands import lazily)

cli.add_command(memory)

from .teacher.cli import cache_group, teach  # noqa: E402

cli.add_command(teach)
cli.add_command(cache_group)

from .distill.cli import distill  # noqa: E402

cli.add_command(distill)

from .deploy.cli import bench, quantize, upload  # noqa: E402

cli.add_command(quantize)
cli.add_command(bench)
cli.add_command(upload)


def main():
    from .blas import reexec_with_openblas

    reexec_with_openblas()
    cli(prog_name="duomem-mlx")
