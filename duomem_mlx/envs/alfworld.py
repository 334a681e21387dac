"""ALFWorld (the paper's benchmark): household tasks as TextWorld games, over the `alfworld`
package and its data directory (ALFWORLD_DATA). The game data is a separate download."""

import os
import random
from pathlib import Path

from duomem_mlx.envs.base import StepResult, TaskSpec, check_tasks, parser_safe
from duomem_mlx.errors import DuomemError

TASK_TYPES = [
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
]
SPLIT_DIRS = {"train": "train", "dev": "valid_seen", "test": "valid_unseen"}  # test = the unseen eval split
GET_DATA = "pip install 'duomem-mlx[alfworld]' && alfworld-download (then set ALFWORLD_DATA if not ~/.cache/alfworld)"


def data_dir() -> Path:
    if os.environ.get("ALFWORLD_DATA"):
        return Path(os.environ["ALFWORLD_DATA"])
    from alfworld.info import ALFWORLD_DATA  # noqa: PLC0415 (optional: the [alfworld] extra)

    return Path(ALFWORLD_DATA)


def game_files(split: str) -> dict[str, list[Path]]:
    """Game files per task type; the trial folder names start with the task type."""
    root = data_dir() / "json_2.1.1" / SPLIT_DIRS[split]
    games = sorted(root.glob("*/*/game.tw-pddl"))
    if not games:
        raise DuomemError(f"no ALFWorld games under {root}; get the data: {GET_DATA}")
    by_type = {t: [] for t in TASK_TYPES}
    for game in games:
        by_type.setdefault(game.parent.parent.name.split("-")[0], []).append(game)
    return by_type


class ALFWorld:
    name = "alfworld"
    default_max_steps = 50
    expert_replans = True  # its expert plans from the current state, not once per episode

    def __init__(self):
        try:
            import alfworld  # noqa: F401, PLC0415 (optional: the [alfworld] extra)
            import textworld  # noqa: F401, PLC0415
        except ImportError:
            raise DuomemError(f"ALFWorld is not installed: {GET_DATA}")
        self.env = None
        self.state = None
        self.games: dict[str, dict[str, list[Path]]] = {}

    def task_names(self) -> list[str]:
        return list(TASK_TYPES)

    def split_games(self, split: str) -> dict[str, list[Path]]:
        if split not in self.games:
            self.games[split] = game_files(split)
        return self.games[split]

    def task_specs(self, tasks, split, episodes, seed) -> list[TaskSpec]:
        check_tasks(tasks, TASK_TYPES, "ALFWorld task")
        games = self.split_games(split)
        rng = random.Random(seed)
        if tasks:
            return [
                TaskSpec(self.name, t, i, split)
                for t in tasks
                for i in rng.sample(range(len(games[t])), min(episodes, len(games[t])))
            ]
        every = [(t, i) for t in TASK_TYPES for i in range(len(games[t]))]
        return [TaskSpec(self.name, t, i, split) for t, i in rng.sample(every, min(episodes, len(every)))]

    def reset(self, spec: TaskSpec) -> tuple[str, StepResult]:
        import textworld  # noqa: PLC0415 (optional: the [alfworld] extra)
        from alfworld.agents.environment.alfred_tw_env import (  # noqa: PLC0415
            AlfredDemangler,
            AlfredExpert,
            AlfredExpertType,
        )

        self.close()
        game = self.split_games(spec.split)[spec.task][spec.variation]
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile", "expert_plan"])
        wrappers = [AlfredDemangler(), AlfredExpert(AlfredExpertType.HANDCODED)]
        self.env = textworld.start(str(game), request_infos=infos, wrappers=wrappers)
        self.state = self.env.reset()
        text = self.state.feedback
        task = text.split("Your task is to:")[-1].strip()
        return task, self.result(self.state, done=False)

    def step(self, action: str) -> StepResult:
        self.state, _, done = self.env.step(parser_safe(action))
        return self.result(self.state, done)

    @staticmethod
    def result(state, done: bool) -> StepResult:
        won = bool(state["won"])
        return StepResult(state.feedback, list(state["admissible_commands"] or []), 0.0, float(won), done or won, won)

    def expert_actions(self) -> list[str]:
        """ALFWorld's expert replans from the current state: one next action at a time."""
        return list(self.state["extra.expert_plan"] or [])

    def close(self):
        if self.env is not None:
            self.env.close()
            self.env = None
