"""`duomem-mlx eval` and `duomem-mlx chat`: the agent stage, a policy playing episodes or talking."""

import click

from duomem_mlx.config import SPLITS, config_option, csv_list, game_params_option
from duomem_mlx.envs import ENV_HELP
from duomem_mlx.runtime.options import FILTERS, PolicyOptions

tool_k_option = click.option(
    "--tool-k",
    type=click.IntRange(0),
    default=PolicyOptions.tool_k,
    show_default=True,
    help="Environments of tools: offer each user turn only the K functions its words pick (BM25) and those the "
    "env says go with them (BFCL: learned on train), plus those picked before. For long function docs (BFCL's: "
    "3-5k tokens), K=6 cuts them 3.5x but misses a needed function in 9% of turns (benchmarks/tool_retrieval.py). "
    "0: all.",
)


@click.command("eval")
@click.option("--env", "env_name", required=True, help=ENV_HELP)
@click.option("--tasks", callback=csv_list, help="Comma-separated task names (default: all).")
@click.option("--split", type=SPLITS, default="dev", show_default=True)
@click.option(
    "--episodes", type=click.IntRange(1), default=3, show_default=True, help="Per named task; in all otherwise."
)
@click.option("--policy", default="oracle", show_default=True, help="oracle | random | model:PATH")
@click.option("--adapter-path", type=click.Path(exists=True, file_okay=False), help="LoRA adapters for model:PATH.")
@click.option(
    "--memory",
    "memory_bank",
    type=click.Path(),
    help="Memory bank the model reads (model:PATH only; default: ADAPTERS/memory, else PATH/memory, if present).",
)
@click.option("--memory-k", type=click.IntRange(0), default=PolicyOptions.memory_k, show_default=True)
@click.option(
    "--memory-filter",
    type=click.Choice(FILTERS),
    default=PolicyOptions.memory_filter,
    show_default=True,
    help="task: retrieve only memories of the episode's task type (use what distill used); none: by similarity alone.",
)
@click.option("--decode", type=click.Choice(["free", "constrained"]), default=PolicyOptions.decode, show_default=True)
@click.option(
    "--max-context",
    type=click.IntRange(256),
    default=PolicyOptions.max_context,
    show_default=True,
    help="Tokens kept; oldest whole turns drop first.",
)
@click.option(
    "--max-steps", type=click.IntRange(1), help="Per episode (default: 100 ScienceWorld, 50 TextWorld/ALFWorld)."
)
@game_params_option
@click.option(
    "--thinking",
    is_flag=True,
    help="enable_thinking=True for templates that know it (Qwen3); off by default, as teach and distill render.",
)
@click.option(
    "--prefix-cache",
    type=click.Path(file_okay=False),
    help="model:PATH: keep the KV states of system prompts (tools, memories) here for later runs "
    "(in memory they are always reused across episodes).",
)
@tool_k_option
@click.option("--seed", type=int, default=PolicyOptions.seed, show_default=True)
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
    from duomem_mlx.agent.eval import run_eval  # noqa: PLC0415 (CLI start-up without the stage)

    options = PolicyOptions.pop_from(kwargs)
    run_eval(options=options, **kwargs)


@click.command("chat")
@click.option("--model", required=True, help="Student: mlx-lm model directory, converted/<name>, or Hub repo id.")
@click.option("--adapter-path", type=click.Path(exists=True, file_okay=False), help="LoRA adapters to apply.")
@click.option(
    "--memory",
    "memory_bank",
    type=click.Path(),
    help="Memory bank to retrieve from (default: ADAPTERS/memory, else MODEL/memory, if present).",
)
@click.option("--memory-k", type=click.IntRange(0), default=PolicyOptions.memory_k, show_default=True)
@click.option(
    "--memory-filter",
    type=click.Choice(FILTERS),
    default=PolicyOptions.memory_filter,
    show_default=True,
    help="task: retrieve only memories of the episode's task type (--env only: a typed request has none); none: by "
    "similarity alone.",
)
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True, help="Per reply.")
@click.option("--max-context", type=click.IntRange(256), default=PolicyOptions.max_context, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=PolicyOptions.temperature, show_default=True)
@click.option("--env", "env_name", help="Watch the model play an episode of this environment instead: " + ENV_HELP)
@click.option("--tasks", callback=csv_list, help="Task for --env (default: the first).")
@click.option("--split", type=SPLITS, default="dev", show_default=True)
@click.option("--seed", type=int, default=PolicyOptions.seed, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), default=30, show_default=True)
@game_params_option
@click.option("--step", is_flag=True, help="With --env: wait for Enter before each action.")
@tool_k_option
@click.option(
    "--thinking", is_flag=True, help="enable_thinking=True for templates that know it (Qwen3); off by default."
)
@config_option
def chat_command(model, max_tokens, env_name, tasks, split, max_steps, game_params, step, **options):
    """Talk to a student (streaming), with the memories it retrieves shown; or watch it play.

    In the REPL: /memory, /reset, /stats, /quit. Ctrl-C stops a reply, Ctrl-D (EOF) exits.
    Piped stdin works: one request per line.

    \b
    Examples:
      duomem-mlx chat --model converted/student-4bit
      echo "how do I boil water?" | duomem-mlx chat --model runs/student --memory runs/bank
      duomem-mlx chat --model runs/student --env textworld --step
    """
    from duomem_mlx.agent.chat import run_chat, watch_episode  # noqa: PLC0415 (CLI start-up without the stage)
    from duomem_mlx.runtime.policy import ModelPolicy  # noqa: PLC0415 (CLI start-up without the stage)

    options = PolicyOptions(decode="constrained" if env_name else "free", **options)
    policy = ModelPolicy.from_options(model, options)
    if env_name:
        watch_episode(policy, env_name, tasks, split, options.seed, max_steps, step, game_params)
    else:
        run_chat(policy, max_tokens, options.max_context, options.temperature)
