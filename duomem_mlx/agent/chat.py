"""`duomem-mlx chat`: a REPL over the student with its memories, or a watched episode."""

import sys
import time

import click
import mlx.core as mx

from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import play_episode
from duomem_mlx.runtime.decode import DecodeOptions
from duomem_mlx.runtime.gpu_memory import wired_limit
from duomem_mlx.runtime.policy import ModelPolicy
from duomem_mlx.runtime.prompt import system_message
from duomem_mlx.runtime.session import Session

CHAT_SYSTEM = "You are a helpful assistant for procedural tasks. Answer concisely, step by step."
HELP = "/memory  memories in use · /reset  new conversation · /stats  speed and memory · /quit"


class Chat:
    def __init__(self, policy: ModelPolicy, max_tokens: int, max_context: int, temperature: float):
        self.policy = policy
        options = DecodeOptions(mode="free", temperature=temperature, max_tokens=max_tokens, single_line=False)
        self.session = Session(policy.model, policy.tokenizer, max_context, options, thinking=policy.session.thinking)
        self.reset()

    def reset(self):
        self.memories = None  # retrieved on the conversation's first request
        self.session.reset_stats()

    def recall(self, text: str) -> list:
        """Start the conversation with the memories its first request retrieves; returns them."""
        self.memories = self.policy.retrieve(text)
        self.session.start([system_message([m.text for m in self.memories], base=CHAT_SYSTEM)])
        return self.memories

    def reply(self, text: str, on_text=None) -> str:
        """The model's answer to `text`, next in this conversation (`on_text` gets it as it streams)."""
        if self.memories is None:
            self.recall(text)
        self.session.append([{"role": "user", "content": text}])
        return self.session.generate(on_text=on_text)

    def ask(self, text: str):
        """The REPL's turn: memories shown when retrieved, the answer streamed, Ctrl-C stops it."""
        if self.memories is None:
            for memory in self.recall(text):
                click.secho(f"[memory {memory.id}] {memory.text}", fg="cyan")
        try:
            self.reply(text, on_text=lambda piece: click.echo(piece, nl=False))
        except KeyboardInterrupt:
            self.session.messages.pop()
            click.echo("\n[stopped]")
            return
        click.echo()

    def stats(self) -> str:
        s = self.session
        seconds = sum(s.step_seconds)
        rate = s.decode_tokens / seconds if seconds else 0.0
        last = f"{s.step_seconds[-1]:.3f}s" if s.step_seconds else "-"
        return (
            f"prefill {s.prefill_tokens} tok · decoded {s.decode_tokens} tok · {rate:.1f} tok/s · "
            f"last reply {last} · context {len(s.fed)} tok · peak memory {mx.get_peak_memory() / 2**20:.1f} MB"
        )

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name = line.split()[0]
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.reset()
            click.echo("[new conversation]")
        elif name == "/stats":
            click.echo(self.stats())
        elif name == "/memory":
            shown = self.memories or []
            click.echo("\n".join(f"[memory {m.id}] {m.text}" for m in shown) or "[no memories in use]")
        else:
            click.echo(HELP)
        return True


@wired_limit()
def run_chat(policy: ModelPolicy, max_tokens: int, max_context: int, temperature: float):
    chat = Chat(policy, max_tokens, max_context, temperature)
    # Bytes that are not UTF-8 would reach the tokenizer as lone surrogates (a TypeError there): show them as U+FFFD.
    sys.stdin.reconfigure(errors="replace")
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"duomem-mlx chat · {HELP} · Ctrl-C stops a reply, Ctrl-D exits")
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return
            continue
        chat.ask(line)


class Narrated:
    """Wraps a policy to print each observation and action (and wait for Enter with --step)."""

    def __init__(self, policy, step: bool):
        self.policy, self.step = policy, step

    def start(self, env, spec, task_description, first):
        self.policy.start(env, spec, task_description, first)
        click.secho(f"Task: {task_description}", bold=True)
        for memory_id in self.policy.memory_ids:
            click.secho(f"[memory {memory_id}]", fg="cyan")

    def act(self, state):
        click.echo(state.observation.strip())
        if self.step:
            click.prompt("[Enter: next action]", default="", show_default=False, prompt_suffix="")
        start = time.perf_counter()
        action = self.policy.act(state)
        click.secho(f"> {action}   ({time.perf_counter() - start:.2f}s)", fg="green")
        return action

    def stats(self):
        return self.policy.stats()


def watch_episode(
    policy: ModelPolicy,
    env_name: str,
    tasks,
    split: str,
    seed: int,
    max_steps: int,
    step: bool,
    game_params: str | None = None,
):
    env = make_env(env_name, game_params)
    try:
        spec = env.task_specs(tasks, split, 1, seed)[0]
        with wired_limit():
            episode = play_episode(env, spec, Narrated(policy, step), max_steps)
    finally:
        env.close()
    verdict = "won" if episode.success else "not won"
    click.secho(
        f"{verdict} · score {episode.score:.2f} · {len(episode.steps)} steps · {episode.seconds:.1f}s", bold=True
    )
