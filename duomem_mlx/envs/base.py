"""The one environment protocol every adapter speaks, the episode record, and the episode loop."""

import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

from duomem_mlx.errors import DuomemError


@dataclass
class TaskSpec:
    env: str
    task: str  # task type / name, e.g. "boil" or "tw-simple"
    variation: int  # ScienceWorld variation, TextWorld seed, ALFWorld game index
    split: str = "dev"
    repeat: int = 0  # the n-th play of this (task, variation) in one run: a split with fewer variations cycles


@dataclass
class StepResult:
    observation: str
    admissible: list[str]
    reward: float = 0.0
    score: float = 0.0  # progress in 0..1
    done: bool = False
    won: bool = False


@dataclass
class Step:
    observation: str  # what the agent saw before acting
    action: str
    admissible: list[str] | None = None


@dataclass
class Episode:
    """One played episode: the record eval logs and the teacher cache stores."""

    id: str
    env: str
    task: str
    variation: int
    task_description: str
    success: bool
    score: float
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    memories: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # policy-specific: token counts, latency
    # the function docs offered for the last action (None: actions are lines of text) and whether a
    # reply may be text instead of a call: what training renders the chat with (runtime/tools.py)
    tools: list[dict] | None = None
    text_replies: bool = False

    def to_json(self, compact: bool = False) -> dict:
        """compact (eval --log): ScienceWorld's admissible lists run to 20 KB a step and barely
        change, so each command is written once (`admissible_commands`), a step's list as
        indices into it, and a list equal to the step before's as `admissible_same`."""
        data = asdict(self)
        if self.tools is None:  # a text environment's record is as it always was
            del data["tools"], data["text_replies"]
        if compact:
            index: dict[str, int] = {}
            for before, step, out in zip([None, *self.steps], self.steps, data["steps"]):
                if step.admissible is not None and before is not None and step.admissible == before.admissible:
                    del out["admissible"]
                    out["admissible_same"] = True
                elif step.admissible is not None:
                    out["admissible"] = [index.setdefault(c, len(index)) for c in step.admissible]
            data["admissible_commands"] = list(index)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Episode":
        """Reads both forms of to_json."""
        commands, steps = data.get("admissible_commands"), []
        for s in data.get("steps", []):
            s = dict(s)
            if s.pop("admissible_same", False):
                s["admissible"] = list(steps[-1].admissible) if steps and steps[-1].admissible is not None else None
            elif commands is not None and s.get("admissible") is not None:
                s["admissible"] = [commands[i] for i in s["admissible"]]
            steps.append(Step(**s))
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "steps"}
        return cls(**known, steps=steps)


class Env(Protocol):
    name: str
    default_max_steps: int

    def task_names(self) -> list[str]: ...

    def task_specs(self, tasks: list[str] | None, split: str, episodes: int, seed: int) -> list[TaskSpec]:
        """The episodes to play: `episodes` per named task, or in all when no task is named."""

    def reset(self, spec: TaskSpec) -> tuple[str, StepResult]:
        """Start an episode: (task description, first observation)."""

    def step(self, action: str) -> StepResult: ...

    def expert_actions(self) -> list[str]:
        """The gold path / walkthrough / expert plan of the current episode."""

    def close(self) -> None: ...


class Policy(Protocol):
    def start(self, env: Env, spec: TaskSpec, task_description: str, first: StepResult) -> None: ...

    def act(self, state: StepResult) -> str: ...


def parser_safe(action: str, max_bytes: int = 190) -> str:
    """An action a game parser can take: printable, one line, bounded (a NUL byte hangs
    TextWorld's Z-machine; a model's free text can contain anything)."""
    text = " ".join("".join(c if c.isprintable() else " " for c in action).split())
    return text.encode()[:max_bytes].decode(errors="ignore")


def check_tasks(tasks, valid, what: str) -> None:
    """One line naming the first unknown task type (`what`: "TextWorld task", "BFCL category", ...)."""
    unknown = [t for t in tasks or [] if t not in valid]
    if unknown:
        raise DuomemError(f"unknown {what} {unknown[0]}; valid: {', '.join(valid)}")


def number_repeats(specs: list[TaskSpec]) -> list[TaskSpec]:
    """Give each repeat of a (task, variation) its index, so every episode id of a run is unique."""
    seen: dict[tuple, int] = {}
    for spec in specs:
        spec.repeat = seen.get((spec.task, spec.variation), 0)
        seen[spec.task, spec.variation] = spec.repeat + 1
    return specs


def episode_id(spec: TaskSpec) -> str:
    return f"{spec.env}/{spec.task}/{spec.variation}/{spec.repeat}"


def play_episode(env: Env, spec: TaskSpec, policy: Policy, max_steps: int) -> Episode:
    """Play one episode; an environment crash ends it as failed instead of ending the run."""
    start = time.perf_counter()
    episode = Episode(episode_id(spec), spec.env, spec.task, spec.variation, "", False, 0.0)
    try:
        episode.task_description, state = env.reset(spec)
        policy.start(env, spec, episode.task_description, state)
        for _ in range(max_steps):
            episode.tools, episode.text_replies = offered_tools(env)
            action = policy.act(state)
            episode.tools = getattr(policy, "offered", episode.tools)  # a policy may show its model fewer (--tool-k)
            episode.steps.append(Step(state.observation, action, list(state.admissible)))
            state = env.step(action)
            episode.score = state.score
            if state.done:
                break
        episode.success = state.won
    except EnvCrashed as e:
        episode.error = str(e)
    episode.seconds = time.perf_counter() - start
    episode.stats.update(getattr(policy, "stats", dict)())
    episode.memories = list(episode.stats.pop("memories", []))
    return episode


def offered_tools(env) -> tuple[list[dict] | None, bool]:
    """(the tools an environment offers now, whether it takes text replies); (None, False) for a text game."""
    tools = env.tools() if hasattr(env, "tools") else None
    return (list(tools) if tools else None), bool(tools) and getattr(env, "text_replies", False)


class EnvCrashed(RuntimeError):
    """The environment's backend died mid-episode (e.g. the ScienceWorld JVM)."""
