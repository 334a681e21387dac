"""TextWorld: games generated offline from a seed with TextWorld's challenge makers (what
`tw-make` runs), in-process, cached on disk, with walkthroughs.

Task types: `simple` (tw-simple, dense rewards, detailed goal: the steps are in the task text),
`simple-brief` (the same games' kind with a one-line goal) and `cooking` (tw-cooking, one
ingredient; the recipe is in a cookbook in the world, drawn from the game's seed).
Splits are disjoint seed ranges."""

import argparse
import os
import random
import re
import threading
import warnings
from pathlib import Path

from duomem_mlx.envs.base import StepResult, TaskSpec, check_tasks, parser_safe
from duomem_mlx.errors import DuomemError
from duomem_mlx.io import cache_root

CHALLENGES = {
    "simple": ["tw-simple", "--rewards", "dense", "--goal", "detailed"],
    "cooking": ["tw-cooking", "--recipe", "1", "--take", "1", "--go", "1"],
    "simple-brief": ["tw-simple", "--rewards", "dense", "--goal", "brief"],
}
SEEDED_RECIPE = {"tw-cooking"}  # tw-cooking draws its recipe from --recipe-seed (default 0: one recipe for all)
# jericho says generated games are "not fully supported"; TextWorld tracks score and wins itself
warnings.filterwarnings("ignore", message="Game .* is not fully supported")
STATUS_LINE = re.compile(r"\n>\s*-= .* =-[\d/]*\s*$")  # the prompt and "-= Room =-score/moves" bar
BANNER_LINE = re.compile(r"^[\s_|\\$/<>]*[_|$][\s_|\\$/<>]*$")  # the ASCII-art title
SPLIT_SEEDS = {"train": 0, "dev": 100_000, "test": 200_000}
SEEDS_PER_SPLIT = 100_000
# TextWorld parses a game (and generates one) with module-level tatsu parsers: one load at a time
# across the environments of `teach --concurrency` (their steps run side by side).
LOADING = threading.Lock()


def cache_dir() -> Path:
    return cache_root() / "textworld"


def game_path(task: str, seed: int) -> Path:
    """The game file for (task, seed), generated on first use; concurrent runs are safe."""
    path = cache_dir() / f"{task}-{seed}.z8"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{task}-{seed}-{os.getpid()}"
    try:
        make_game(CHALLENGES[task], seed, f"{tmp}.z8")
    except Exception as e:  # TextWorld's generator and Inform7 compiler raise anything
        raise DuomemError(f"TextWorld could not generate {task} seed {seed}: {e.__class__.__name__}: {e}")
    os.replace(f"{tmp}.json", path.with_suffix(".json"))
    os.replace(f"{tmp}.z8", path)
    for leftover in path.parent.glob(f"{tmp.name}.*"):
        leftover.unlink()
    return path


def make_game(argv: list[str], seed: int, output: str):
    """What `tw-make CHALLENGE ARGS --seed N --output FILE` does, without a new Python per game
    (its imports cost ~5 s of CPU a game)."""
    import textworld  # noqa: PLC0415 (optional: the [textworld] extra)
    import textworld.challenges  # noqa: PLC0415

    name, *args = argv
    _, make, add_arguments = textworld.challenges.CHALLENGES[name]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    if name in SEEDED_RECIPE:
        args += ["--recipe-seed", str(seed)]
    settings = vars(parser.parse_args(args))
    options = textworld.GameOptions()
    options.seeds = seed
    options.path = os.path.abspath(output)
    options.file_ext = ".z8"
    options.force_recompile = True
    textworld.generator.compile_game(make(settings=settings, options=options), options)


class TextWorld:
    name = "textworld"
    default_max_steps = 50

    def __init__(self):
        try:
            import textworld  # noqa: PLC0415 (optional: the [textworld] extra)
        except ImportError:
            raise DuomemError("TextWorld is not installed: pip install 'duomem-mlx[textworld]'")
        self.infos = textworld.EnvInfos(
            admissible_commands=True,
            won=True,
            lost=True,
            score=True,
            max_score=True,
            objective=True,
            extras=["walkthrough"],
        )
        self.env = None
        self.state = None

    def task_names(self) -> list[str]:
        return list(CHALLENGES)

    def task_specs(self, tasks, split, episodes, seed) -> list[TaskSpec]:
        check_tasks(tasks, CHALLENGES, "TextWorld task")
        rng = random.Random(seed)

        def seeds(n):
            return [SPLIT_SEEDS[split] + s for s in rng.sample(range(SEEDS_PER_SPLIT), n)]

        if tasks:
            return [TaskSpec(self.name, t, s, split) for t in tasks for s in seeds(episodes)]
        kinds = list(CHALLENGES)  # no task named: alternate the kinds
        return [TaskSpec(self.name, kinds[i % len(kinds)], s, split) for i, s in enumerate(seeds(episodes))]

    def reset(self, spec: TaskSpec) -> tuple[str, StepResult]:
        import textworld  # noqa: PLC0415 (optional: the [textworld] extra)

        self.close()
        with LOADING:
            self.env = textworld.start(str(game_path(spec.task, spec.variation)), request_infos=self.infos)
            self.state = self.env.reset()
        return self.state.objective.strip(), self.result(self.state, done=False)

    def step(self, action: str) -> StepResult:
        self.state, _, done = self.env.step(parser_safe(action))
        return self.result(self.state, done)

    @staticmethod
    def result(state, done: bool) -> StepResult:
        score = state.score / state.max_score if state.max_score else 0.0
        return StepResult(
            clean(state.feedback), list(state.admissible_commands or []), 0.0, score, done, bool(state.won)
        )

    def expert_actions(self) -> list[str]:
        return list(self.state["extra.walkthrough"])

    def close(self):
        if self.env is not None:
            self.env.close()
            self.env = None


def clean(feedback: str) -> str:
    """The game's text without the title art and status bar: fewer, more useful prompt tokens."""
    lines = [line for line in STATUS_LINE.sub("", feedback).splitlines() if not BANNER_LINE.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
