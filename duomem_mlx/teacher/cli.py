"""`duomem-mlx teach` and `duomem-mlx cache info|verify`."""

import json

import click
from click.core import ParameterSource

from duomem_mlx.config import config_option, csv_list, game_params_option
from duomem_mlx.envs import ENV_HELP
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.memories import KINDS
from duomem_mlx.teacher.options import TeachOptions


@click.command("teach")
@click.option(
    "--teacher",
    help="mlx:<path-or-repo> | openai:<base-url>#<model> | oracle (an openai: key goes in OPENAI_API_KEY, never in "
    "the URL)",
)
@click.option("--env", "env_name", help=ENV_HELP)
@click.option(
    "--from-chats",
    type=click.Path(exists=True, dir_okay=False),
    help="Instead of playing: a JSONL of OpenAI-format conversations (messages with tool_calls and "
    "tool results, tools, success or reward), tokenized with --teacher-tokenizer (the student's).",
)
@click.option(
    "--skip-bad", is_flag=True, help="--from-chats: skip malformed records (counted) instead of stopping at the first."
)
@click.option("--tasks", callback=csv_list, help="Comma-separated task names (default: all).")
@click.option("--split", type=click.Choice(["train", "dev", "test"]), default=TeachOptions.split, show_default=True)
@click.option(
    "--episodes",
    type=click.IntRange(1),
    default=TeachOptions.episodes,
    show_default=True,
    help="Per named task; in all otherwise.",
)
@click.option(
    "--top-k",
    type=click.IntRange(0, 1024),
    default=TeachOptions.top_k,
    show_default=True,
    help="Teacher distribution entries per action token (openai: <= 20 on vLLM, <= 10 on mlx_lm.server; 0: none).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(0),
    default=TeachOptions.temperature,
    show_default=True,
    help="Sampling temperature of the teacher's actions (the cached top-k is always at temperature 1).",
)
@click.option("--keep", type=click.Choice(["success", "all"]), default=TeachOptions.keep, show_default=True)
@click.option(
    "--memory-writer", type=click.Choice(["rules", "teacher"]), default=TeachOptions.memory_writer, show_default=True
)
@click.option(
    "--memory-kind",
    type=click.Choice(KINDS),
    default=TeachOptions.memory_kind,
    show_default=True,
    help="Memories written from the kept episodes: script (a procedure), trajectory (the episode, compact) or both.",
)
@click.option(
    "--memory",
    "memory_bank",
    type=click.Path(),
    help="mlx: a memory bank the teacher reads while it plays (built with its own model).",
)
@click.option(
    "--memory-k",
    type=click.IntRange(0),
    default=TeachOptions.memory_k,
    show_default=True,
    help="Memories the teacher reads (with --memory).",
)
@click.option(
    "--max-steps", type=click.IntRange(1), help="Per episode (default: 100 ScienceWorld, 50 TextWorld/ALFWorld)."
)
@game_params_option
@click.option(
    "--teacher-tokenizer",
    help="Tokenizer of an openai: teacher (default: the served model when it is a local dir); for oracle and "
    "--from-chats, the student's, to store tokenized chats.",
)
@click.option(
    "--decode",
    type=click.Choice(["free", "constrained"]),
    default=TeachOptions.decode,
    show_default=True,
    help="mlx: teacher action decoding.",
)
@click.option("--max-context", type=click.IntRange(256), default=TeachOptions.max_context, show_default=True)
@click.option("--keep-admissible", is_flag=True, help="Store each step's admissible commands (large for ScienceWorld).")
@click.option("--seed", type=int, default=TeachOptions.seed, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Cache directory.")
@click.option(
    "--resume", is_flag=True, help="Continue a killed or shorter run; cached episodes are kept and not replayed."
)
@click.option("--force", is_flag=True, help="Overwrite an existing cache.")
@click.option(
    "--concurrency",
    type=click.IntRange(1),
    default=TeachOptions.concurrency,
    show_default=True,
    help="Episodes in flight at once, each with its own environment (openai: and oracle teachers); the cache is the "
    "same at any N.",
)
@click.option(
    "--max-rps",
    type=click.FloatRange(0, min_open=True),
    help="openai: at most this many requests a second (a shared endpoint's limit).",
)
@config_option
def teach(**kwargs):
    """Play episodes with a teacher (or read a big model's logged conversations, --from-chats:
    docs/chats.md) and cache what the student learns from: successful trajectories, the
    teacher's top-k token distributions, and procedural memories.

    \b
    Examples:
      duomem-mlx teach --teacher oracle --env textworld --episodes 20 --out runs/cache
      duomem-mlx teach --teacher mlx:runs/teacher --env scienceworld --tasks boil --top-k 20 --out runs/cache
      duomem-mlx teach --teacher mlx:runs/teacher --memory runs/teacher/memory --memory-kind both --env twx --out runs/cache
      duomem-mlx teach --teacher openai:http://gpu:8000/v1#Qwen/Qwen2.5-72B-Instruct \\
          --teacher-tokenizer Qwen/Qwen2.5-72B-Instruct --env textworld --episodes 50 --concurrency 32 --out runs/cache
      duomem-mlx teach --from-chats logs/agent.jsonl --teacher-tokenizer runs/student --out runs/cache
    """  # noqa: E501 (examples: one command a line, as it is copied)
    from duomem_mlx.teacher.collect import collect, collect_chats  # noqa: PLC0415 (CLI start-up without the stage)

    from_chats, skip_bad = kwargs.pop("from_chats"), kwargs.pop("skip_bad")
    if from_chats:
        refuse_playing_options(kwargs)
    else:
        for option, name in (("teacher", "--teacher"), ("env_name", "--env")):
            if not kwargs[option]:
                raise DuomemError(
                    f"missing {name}: teach plays with --teacher on --env, or reads --from-chats FILE.jsonl"
                )
    teacher, env_name, out = kwargs.pop("teacher"), kwargs.pop("env_name"), kwargs.pop("out")
    options = TeachOptions(**kwargs)
    if from_chats:
        summary = collect_chats(from_chats, out, options, skip_bad=skip_bad)
    else:
        summary = collect(teacher, env_name, out, options)
    print_info(summary)


CHAT_OPTIONS = ("out", "teacher_tokenizer", "keep", "memory_writer", "memory_kind", "force")


def refuse_playing_options(kwargs: dict) -> None:
    """--from-chats takes CHAT_OPTIONS only; one that only playing uses is refused, not ignored."""
    source = click.get_current_context().get_parameter_source
    given = [
        k
        for k in kwargs
        if k not in CHAT_OPTIONS and source(k) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    ]
    if given:
        names = ", ".join(
            "--" + ("env" if k == "env_name" else "memory" if k == "memory_bank" else k.replace("_", "-"))
            for k in given
        )
        raise DuomemError(f"--from-chats reads its episodes instead of playing them; drop {names}")


@click.group("cache")
def cache_group():
    """Inspect and check teacher caches written by `duomem-mlx teach`."""


@cache_group.command("info")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@config_option
def cache_info(cache, as_json):
    """Episodes, success rate per task, tokens, top-k, bytes per masked token, memories.

    \b
    Example:
      duomem-mlx cache info runs/cache
    """
    from duomem_mlx.formats.teacher_cache import info  # noqa: PLC0415 (CLI start-up without the stage)

    summary = info(cache)
    click.echo(json.dumps(summary, indent=1)) if as_json else print_info(summary)


@cache_group.command("verify")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@config_option
def cache_verify(cache):
    """Check every shard: readable, shapes and dtypes consistent with the manifest and mask.

    \b
    Example:
      duomem-mlx cache verify runs/cache
    """
    from duomem_mlx.formats.teacher_cache import verify  # noqa: PLC0415 (CLI start-up without the stage)

    checked, problems = verify(cache)
    for problem in problems[1:]:
        click.echo(problem, err=True)
    if problems:
        more = f" (+{len(problems) - 1} more above)" if len(problems) > 1 else ""
        raise DuomemError(
            f"{problems[0]}{more}; recollect with `duomem-mlx teach ... --resume` after deleting the bad shard's "
            "line, or --force"
        )
    click.echo(f"ok: {checked} shards")


def print_info(s: dict) -> None:
    lines = [
        f"teacher     {s['teacher']} ({s['backend']})  tokenizer {(s['tokenizer_fingerprint'] or '-')[:12]}",
        f"env         {s['env']}  {'complete' if s['complete'] else 'unfinished (--resume to continue)'}",
        f"episodes    {s['episodes']} kept of {s['played']} played, success {s['success_rate']:.0%}",
    ]
    if s["failed"]:
        lines.append(
            f"failed      {s['failed']} episodes the teacher server failed (not cached; --resume plays them again)"
        )
    lines += [
        f"  {task:<20} {t['episodes']:>5} episodes  success {t['success_rate']:.0%}" for task, t in s["tasks"].items()
    ]
    lines.append(f"tokens      {s['tokens']} ({s['masked_tokens']} masked)  top-k {s['top_k']}")
    if s["bytes_per_masked_token"]:
        lines.append(f"size        {s['shard_bytes']} shard bytes, {s['bytes_per_masked_token']:.1f} per masked token")
    if s["unaligned_rows"]:
        lines.append(
            f"warning     {s['unaligned_rows']} of {s['masked_tokens']} masked tokens have no teacher top-k: "
            "the server's tokens differ from the local tokenization of the actions (ids -1; KD skips them)"
        )
    lines.append(f"memories    {s['memories']}")
    click.echo("\n".join(lines))
