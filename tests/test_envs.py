"""Real ScienceWorld (JVM) and TextWorld (generated games) behind the one protocol."""

import json
import os
import shutil
import signal
import sys

import pytest
from click.testing import CliRunner

from duomem_mlx.cli import cli
from duomem_mlx.envs import NAMES, jvm, make_env
from duomem_mlx.envs.base import play_episode
from duomem_mlx.envs.policies import OraclePolicy, RandomPolicy
from duomem_mlx.envs.twx import DEFAULT_PARAMS, game_params_option, resolve_params
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


@pytest.mark.parametrize("env_name,task,max_steps", [("scienceworld", "melt", 250), ("twx", "peckingorder", 50)])
def test_a_dead_jvm_fails_the_episode_and_the_run_goes_on(request, env_name, task, max_steps):
    env = request.getfixturevalue(env_name)
    spec = env.task_specs([task], "dev" if env_name == "scienceworld" else "test", 1, seed=0)[0]
    crashed = play_episode(env, spec, KillJVMAfter(2), max_steps)
    assert not crashed.success and "JVM died" in crashed.error
    again = play_episode(env, spec, OraclePolicy(), max_steps)
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


TWX_FOLD_OBJECTS = [
    "cookingworld",
    "twc",
    "arithmetic",
    "sorting",
    "simonsays",
    "peckingorder",
]  # objects drawn per fold


def test_twx_oracle_wins_every_game_and_random_does_not(twx):
    assert twx.task_names() == [
        "cookingworld",
        "twc",
        "coin",
        "mapreader",
        "arithmetic",
        "sorting",
        "simonsays",
        "peckingorder",
    ]
    specs = twx.task_specs(None, "test", 16, seed=0)  # no game named: the eight alternate
    assert sorted(s.task for s in specs) == sorted(twx.task_names() * 2)
    oracle = play_all(twx, specs, OraclePolicy(), max_steps=twx.default_max_steps)
    assert all(e.success and e.score == 1.0 and e.error is None for e in oracle), [
        (e.id, e.score, e.error) for e in oracle
    ]
    assert all(2 <= len(e.steps) <= 20 for e in oracle)  # small default game params
    assert all(
        step.action in step.admissible for e in oracle for step in e.steps
    )  # the gold action is always admissible
    assert all(step.admissible == sorted(step.admissible) for e in oracle for step in e.steps)
    assert all(e.task_description and step.observation == step.observation.strip() for e in oracle for step in e.steps)
    random_runs = play_all(twx, specs, RandomPolicy(seed=0), max_steps=10)
    assert sum(e.success for e in random_runs) <= 3  # coin in three rooms is the one random play can stumble on


def test_twx_folds_are_different_games(twx):
    train, test = (
        twx.task_specs(TWX_FOLD_OBJECTS, "train", 2, seed=1),
        twx.task_specs(TWX_FOLD_OBJECTS, "test", 2, seed=1),
    )
    assert {s.variation for s in train} <= set(range(1000)) and {s.variation for s in test} <= set(
        range(20_000, 21_000)
    )

    def games(specs):
        return {(twx.reset(s)[1].observation, tuple(twx.expert_actions())) for s in specs}

    assert not games(train) & games(test)
    same_seed = [twx.task_specs(["arithmetic"], split, 1, seed=0)[0] for split in ("train", "test")]
    same_seed[1].variation = same_seed[0].variation
    with pytest.raises(DuomemError, match="not a test seed"):  # coin and mapreader would replay the train game
        twx.reset(same_seed[1])


@pytest.mark.env("twx")
def test_twx_test_games_of_coin_in_two_rooms_are_not_train_games():
    env = make_env("twx", game_params="coin:numLocations=2")  # ~40 distinct games a fold: the folds overlap
    try:
        train = env.train_games("coin")
        assert 30 <= len(train) <= 60
        assert any(env.game("coin", s, "test") in train for s in range(20_000, 21_000))  # a plain draw may repeat one
        specs = env.task_specs(["coin"], "test", 20, seed=0)
        assert not {env.game("coin", s.variation, "test") for s in specs} & train
    finally:
        env.close()


def test_twx_skips_the_unwinnable_dev_peckingorder_games(twx):
    assert not twx.gold_wins("peckingorder", 10261, "dev")  # two cucumbers: the package's own gold path loses
    specs = twx.task_specs(["peckingorder"], "dev", 12, seed=0)
    assert all(e.success for e in play_all(twx, specs, OraclePolicy(), max_steps=20))


def test_twx_game_params_merge_key_by_key_and_bad_ones_are_clear():
    assert resolve_params(None) == DEFAULT_PARAMS
    per_game = resolve_params({"coin": "numLocations=5"})
    assert per_game["coin"] == "numLocations=5,numDistractorItems=2,includeDoors=0,limitInventorySize=0"
    assert {g: p for g, p in per_game.items() if g != "coin"} == {
        g: p for g, p in DEFAULT_PARAMS.items() if g != "coin"
    }
    everywhere = resolve_params("includeDoors=1")
    assert all("includeDoors=1" in everywhere[g] for g in ("cookingworld", "twc", "coin", "mapreader"))
    assert everywhere["arithmetic"] == "" and everywhere["simonsays"] == DEFAULT_PARAMS["simonsays"]
    for bad, message in [
        ({"coin": "numRooms=2"}, "coin takes no game param 'numRooms'"),
        ({"chess": ""}, "valid: cookingworld"),
        ("numRooms=2", "no TextWorldExpress game takes"),
        ("numLocations=two", "key=integer"),
        ({"sorting": "a=1"}, "it takes: none"),
    ]:
        with pytest.raises(DuomemError, match=message):
            resolve_params(bad)


def test_twx_game_params_option_names_games_or_keys():
    assert game_params_option(None) is None and game_params_option("numLocations=2") == "numLocations=2"
    assert game_params_option("coin:numLocations=2; twc:numItemsToPutAway=3;coin:includeDoors=0") == {
        "coin": "numLocations=2,includeDoors=0",
        "twc": "numItemsToPutAway=3",
    }
    with pytest.raises(DuomemError, match="game:key=value"):
        game_params_option("coin:numLocations=2;numLocations=3")
    with pytest.raises(DuomemError, match="--game-params: environment textworld takes none"):
        make_env("textworld", game_params="numLocations=2")


@pytest.mark.env("twx")
def test_twx_out_of_range_params_fail_at_start():
    with pytest.raises(DuomemError, match="rejects coin params .*numLocations=99"):
        make_env("twx", game_params={"coin": "numLocations=99"})


def test_twx_without_java_or_package_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "textworld_express", None)  # import fails
    with pytest.raises(DuomemError, match=r"not installed: pip install 'duomem-mlx\[twx\]'"):
        make_env("twx")
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no JDK anywhere
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(jvm, "_from_macos_java_home", lambda: None)
    with pytest.raises(DuomemError, match=r"TextWorldExpress needs Java 11\+ and none was found: "):
        make_env("twx")


@pytest.mark.parametrize("action", ["\x00take coin", "é" * 150 + "x" * 300, "help", ""])
def test_any_model_text_is_a_safe_twx_action(twx, action):
    twx.reset(twx.task_specs(["coin"], "dev", 1, seed=0)[0])
    state = twx.step(action)
    assert state.observation and state.admissible and not state.won


@pytest.mark.env("twx")
def test_twx_is_an_env_choice_everywhere_and_eval_runs_it(tmp_path):
    for path in (["eval"], ["chat"], ["teach"], ["bench"]):
        command = cli.get_command(None, path[0])
        env_option = next(p for p in command.params if p.name == "env_name")
        assert all(name in env_option.help for name in [*NAMES, "module.path:ClassName"]), path
    out = tmp_path / "results.json"
    result = CliRunner().invoke(
        cli, ["eval", "--env", "twx", "--policy", "oracle", "--split", "test", "--episodes", "8", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert results["success_rate"] == 1.0 and results["env"] == "twx" and results["max_steps"] == 50
    assert len(results["per_task"]) == 8
