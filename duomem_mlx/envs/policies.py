"""Baseline policies: `oracle` (gold path / walkthrough / ALFWorld's expert) and `random`."""

import random

from duomem_mlx.envs.base import StepResult

FALLBACK = "look"  # when a gold path runs out before the episode ends


class OraclePolicy:
    def start(self, env, spec, task_description, first):
        self.env = env
        self.plan = [] if getattr(env, "expert_replans", False) else list(env.expert_actions())
        self.taken = 0

    def act(self, state: StepResult) -> str:
        if getattr(self.env, "expert_replans", False):
            plan = self.env.expert_actions()
            return plan[0] if plan else FALLBACK
        self.taken += 1
        return self.plan[self.taken - 1] if self.taken <= len(self.plan) else FALLBACK


class RandomPolicy:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def start(self, env, spec, task_description, first):
        pass

    def act(self, state: StepResult) -> str:
        return self.rng.choice(state.admissible) if state.admissible else FALLBACK
