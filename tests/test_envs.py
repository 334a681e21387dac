"""Real ScienceWorld (JVM) and TextWorld (generated games) behind the one protocol."""

import os
import signal

import pytest

from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import play_episode
from duomem_mlx.envs.policies import OraclePolicy, RandomPolicy
from duomem_mlx.errors import DuomemError

SCIENCEWORLD_TASKS = ["melt", "find-living-thing", "chemistry-mix-paint-secondary-color"]


def play_all(env, specs, policy, max_steps=100):
    return [play_episode(env, spec, policy, max_steps) for spec in specs]


def test_textworld_oracle_wins_and_random_does_not(textworld):
    specs = textworld.task_specs(["simple", "cooking"], "dev", 2, seed=0)
    assert {s.task for s in specs} == {"simple", "cooking"} and len(specs) == 4
    oracle = play_all(textworld, specs, OraclePolicy())
    assert all(e.success and e.score == 1.0 for e in oracle)
    assert all(step.action in step.admissible for e in oracle for step in e.steps)
    observations = [step.observation for e in oracle for step in e.steps]
    assert not any("$$" in o or "=-0/" in o or o != o.strip() for o in observations)  # no title art, no status bar
    random_runs = play_all(textworld, specs, RandomPolicy(seed=0), max_steps=30)
    assert sum(e.success for e in random_runs) <= 1


@pytest.mark.parametrize("action", ["\x00open box", "\x1b[0m\x01 take", "é" * 150 + "x" * 300, "a\u2028b\r\n"])
def test_any_model_text_is_a_safe_textworld_action(textworld, action):
    textworld.reset(textworld.task_specs(["simple"], "dev", 1, seed=0)[0])
    assert textworld.step(action).observation  # answered; a NUL used to hang the Z-machine


def test_textworld_splits_are_disjoint_and_seeded(textworld):
    train = {s.variation for s in textworld.task_specs(["simple"], "train", 20, seed=1)}
    dev = {s.variation for s in textworld.task_specs(["simple"], "dev", 20, seed=1)}
    assert not train & dev
    assert dev == {s.variation for s in textworld.task_specs(["simple"], "dev", 20, seed=1)}


def test_textworld_cooking_recipes_come_from_the_seed(textworld):
    """tw-cooking's recipe seed defaults to 0 (one walkthrough for every game); the env seeds it."""
    walkthroughs, objectives = set(), set()
    for spec in textworld.task_specs(["cooking", "simple-brief"], "dev", 2, seed=3):
        objective, _ = textworld.reset(spec)
        if spec.task == "cooking":
            walkthroughs.add(tuple(textworld.expert_actions()))
        else:
            objectives.add(objective)
    assert len(walkthroughs) == 2
    assert all(len(o.split()) < 20 for o in objectives)  # a brief goal, not the steps


def test_scienceworld_oracle_wins_and_random_does_not(scienceworld):
    assert len(scienceworld.task_names()) == 30
    specs = scienceworld.task_specs(SCIENCEWORLD_TASKS, "dev", 1, seed=0)
    oracle = play_all(scienceworld, specs, OraclePolicy(), max_steps=250)  # some gold paths exceed 100 steps
    assert [e.success for e in oracle] == [True] * len(specs), [(e.task, e.score) for e in oracle]
    random_runs = play_all(scienceworld, specs, RandomPolicy(seed=0), max_steps=40)
    assert not any(e.success for e in random_runs)


def test_scienceworld_splits_differ(scienceworld):
    train = set(scienceworld.variations("melt", "train"))
    test = set(scienceworld.variations("melt", "test"))
    assert train and test and not train & test


class KillJVMAfter(OraclePolicy):
    """An oracle that kills the ScienceWorld JVM after a few steps."""

    def __init__(self, steps):
        self.steps = steps

    def act(self, state):
        if self.taken == self.steps:
            os.kill(self.env.env._gateway.java_process.pid, signal.SIGKILL)
            self.env.env._gateway.java_process.wait()
        return super().act(state)


def test_a_dead_jvm_fails_the_episode_and_the_run_goes_on(scienceworld):
    spec = scienceworld.task_specs(["melt"], "dev", 1, seed=0)[0]
    crashed = play_episode(scienceworld, spec, KillJVMAfter(2), 250)
    assert not crashed.success and "JVM died" in crashed.error
    again = play_episode(scienceworld, spec, OraclePolicy(), 250)
    assert again.success and again.error is None


def test_unknown_tasks_are_clear_errors(scienceworld, textworld):
    with pytest.raises(DuomemError, match="valid: boil"):
        scienceworld.task_specs(["boill"], "dev", 1, 0)
    with pytest.raises(DuomemError, match="valid: simple, cooking"):
        textworld.task_specs(["nope"], "dev", 1, 0)
    with pytest.raises(DuomemError, match="unknown environment"):
        make_env("minecraft")


def test_alfworld_without_package_or_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    with pytest.raises(DuomemError, match="alfworld-download"):
        env = make_env("alfworld")
        env.task_specs(None, "test", 1, 0)
