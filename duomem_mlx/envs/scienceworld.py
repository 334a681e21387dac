"""ScienceWorld: 30 procedural science task types with train/dev/test variations and gold paths.

Runs a JVM (py4j). A JVM that dies mid-episode raises EnvCrashed; the next reset starts a new one."""

import random

from duomem_mlx.envs.base import EnvCrashed, StepResult, TaskSpec, number_repeats
from duomem_mlx.envs.jvm import JavaBacked, require_java
from duomem_mlx.errors import DuomemError

SIMPLIFICATION = "easy"  # teleport, open doors and containers, no electrical actions: the usual agent setting


class ScienceWorld(JavaBacked):
    name = "scienceworld"
    default_max_steps = 100

    def __init__(self, step_limit: int = 1000):  # our max_steps ends episodes; gold paths reach 178 steps
        require_java("ScienceWorld")
        try:
            from scienceworld import ScienceWorldEnv  # noqa: PLC0415 (optional: the [scienceworld] extra)
        except ImportError:
            raise DuomemError("ScienceWorld is not installed: pip install 'duomem-mlx[scienceworld]'")
        self._make = lambda: ScienceWorldEnv("", envStepLimit=step_limit)
        self.env = self._make()
        self._names = list(self.env.get_task_names())

    def task_names(self) -> list[str]:
        return self._names

    def variations(self, task: str, split: str) -> list[int]:
        self.env.load(task, 0, SIMPLIFICATION)
        getter = {
            "train": self.env.get_variations_train,
            "dev": self.env.get_variations_dev,
            "test": self.env.get_variations_test,
        }
        return list(getter[split]())

    def task_specs(self, tasks, split, episodes, seed) -> list[TaskSpec]:
        rng = random.Random(seed)
        unknown = [t for t in tasks or [] if t not in self._names]
        if unknown:
            raise DuomemError(
                f"unknown ScienceWorld task {unknown[0]}; valid: {', '.join(self._names[:6])}, ... (30 in all)"
            )
        if tasks:
            return number_repeats(
                [
                    TaskSpec(self.name, t, v, split)
                    for t in tasks
                    for v in sample(rng, self.variations(t, split), episodes)
                ]
            )
        picks = [rng.choice(self._names) for _ in range(episodes)]
        return number_repeats([TaskSpec(self.name, t, rng.choice(self.variations(t, split)), split) for t in picks])

    def reset(self, spec: TaskSpec) -> tuple[str, StepResult]:
        if not self.alive():
            self.restart()
        try:
            self.env.load(spec.task, spec.variation, SIMPLIFICATION, generateGoldPath=True)
            observation, info = self.env.reset()
            return self.env.get_task_description(), self.result(observation, info, done=False)
        except Exception as e:  # py4j errors when the JVM is gone
            raise self.crashed(e)

    def result(self, observation: str, info: dict, done: bool) -> StepResult:
        score = info.get("score", 0)
        return StepResult(
            observation, list(info.get("valid", [])), 0.0, max(score, 0) / 100, done, done and score >= 100
        )

    def expert_actions(self) -> list[str]:
        return list(self.env.get_gold_action_sequence())

    def crashed(self, error: Exception) -> EnvCrashed:
        if not self.alive():
            self.close()
            return EnvCrashed("the ScienceWorld JVM died; the episode counts as failed and the next one restarts it")
        return EnvCrashed(f"ScienceWorld failed ({error.__class__.__name__}: {str(error)[:200]})")


def sample(rng: random.Random, items: list[int], n: int) -> list[int]:
    """n distinct items, or with replacement when the split has fewer (number_repeats tells them apart)."""
    return rng.sample(items, n) if n <= len(items) else [rng.choice(items) for _ in range(n)]
