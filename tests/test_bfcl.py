"""`--env bfcl`: BFCL's multi-turn entries played call by call against its own backends and
scored by its own checker; the oracle replays the ground truth; model output never runs as code."""

import ast
import json
import sys

import pytest
from click.testing import CliRunner

from duomem_mlx.cli import cli
from duomem_mlx.envs import bfcl as bfcl_module
from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import TaskSpec, play_episode
from duomem_mlx.envs.bfcl import CATEGORIES, END_OF_TURN, OBSERVATION_CHARS, load_category, split_indices, user_turns
from duomem_mlx.envs.policies import OraclePolicy
from duomem_mlx.errors import DuomemError

pytestmark = pytest.mark.env("bfcl")


@pytest.fixture(scope="module")
def env():
    return make_env("bfcl")


def spec(category: str, index: int) -> TaskSpec:
    split = next(s for s in ("train", "dev", "test") if index in split_indices(s)[category])
    return TaskSpec("bfcl", category, index, split)


def test_the_oracle_wins_every_entry_of_every_category(env):
    """All 800 entries (~4 s): BFCL's checker accepts every ground truth replayed call by call."""
    for category in CATEGORIES:
        entries, _ = load_category(category)
        lost = [i for i in range(len(entries)) if not play_episode(env, spec(category, i), OraclePolicy(), 60).success]
        assert (len(entries), lost) == (200, []), category


def test_eval_reports_accuracy_per_category(tmp_path):
    out = tmp_path / "r.json"
    args = ["eval", "--env", "bfcl", "--split", "test", "--episodes", 8, "--policy", "oracle", "--out", out]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert set(results["per_task"]) == set(CATEGORIES) and results["success_rate"] == 1.0
    assert all(row["episodes"] == 2 for row in results["per_task"].values())
    assert "miss_param" in result.output and "100.0%" in result.output


def test_splits_are_held_out_by_first_user_turn():
    splits = {s: split_indices(s) for s in ("train", "dev", "test")}
    for category in CATEGORIES:
        entries, _ = load_category(category)
        ids = [set(splits[s][category]) for s in splits]
        assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
        assert all(len(i) > 25 for i in ids) and sum(map(len, ids)) == 200
    train_turns = {t for c in CATEGORIES for i in splits["train"][c] for t in user_turns(load_category(c)[0][i])}
    held_out = [
        user_turns(load_category(c)[0][i])[0] for s in ("dev", "test") for c in CATEGORIES for i in splits[s][c]
    ]
    assert not train_turns & set(held_out)


def test_reset_refuses_an_entry_of_another_split(env):
    train = split_indices("train")["base"][0]
    with pytest.raises(DuomemError, match=f"multi_turn_base_{train} is not in the test split"):
        env.reset(TaskSpec("bfcl", "base", train, "test"))
    with pytest.raises(DuomemError, match="unknown BFCL category"):
        env.task_specs(["simple"], "test", 1, 0)


def test_a_wrong_call_fails_the_turn_and_the_score_counts_turns_passed(env):
    _, first = env.reset(spec("base", 0))  # turn 0: cd document, mkdir temp, mv final_report.pdf temp
    assert first.observation.startswith("Tools:\n") and "mkdir(dir_name)" in first.observation
    assert first.admissible == []
    gold = env.expert_actions()
    assert gold[:4] == [
        "cd(folder='document')",
        "mkdir(dir_name='temp')",
        "mv(source='final_report.pdf', destination='temp')",
        END_OF_TURN,
    ]
    for action in gold[:4]:
        state = env.step(action)
    assert not state.done and "grep" in state.observation and state.score == pytest.approx(1 / 4)  # the next user turn
    state = env.step("grep(file_name='final_report.pdf', pattern='budget analysis')")  # without cd temp: not found
    assert state.observation.startswith('{"error"')
    state = env.step(END_OF_TURN)
    assert state.done and not state.won and state.score == pytest.approx(1 / 4)


def test_miss_func_offers_the_withheld_tool_at_its_turn(env):
    env.reset(spec("miss_func", 0))  # `sort` comes back at turn 3, a turn with no user message
    assert "sort" not in {t["name"] for t in env.tools()}
    for action in env.expert_actions()[:8]:  # turns 0-2; turn 2 has no ground-truth call (no sort yet): "Done."
        state = env.step(action)
    assert state.observation.startswith("I have updated some more functions you can choose from: sort(file_name)")
    assert "sort" in {t["name"] for t in env.tools()}


def test_long_results_are_cut(env):
    env.reset(spec("long_context", 0))
    for action in env.expert_actions()[:6]:
        state = env.step(action)  # grep in long_context's padded report
    assert OBSERVATION_CHARS < len(state.observation) < OBSERVATION_CHARS + 40
    assert state.observation.endswith("more chars)")


def test_model_output_never_runs_as_code(env, tmp_path, monkeypatch):
    """Whatever the reply, nothing it holds runs: not parsed as a call it is a text reply; a call
    of no API method is answered with an error; code in a string argument stays a string. And
    BFCL's executor (which `eval`s call strings) only ever sees methods called with literals."""
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils  # noqa: PLC0415 (optional: bfcl-eval)

    evaluated = []

    def recording_eval(source, *scope):
        evaluated.append(source)
        return eval(source, *scope) if scope else eval(source, vars(multi_turn_utils))

    monkeypatch.setattr(multi_turn_utils, "eval", recording_eval, raising=False)
    pwned = [tmp_path / f"pwned{i}" for i in range(4)]
    env.reset(spec("base", 0))
    attacks = [
        f"cd(folder=__import__('os').system('touch {pwned[0]}'))",
        f"exec(\"open('{pwned[1]}', 'w')\")",
        f"eval(\"__import__('os').system('touch {pwned[2]}')\")",
        f"cd(folder=\"__import__('os').system('touch {pwned[3]}')\")",
    ]
    assert env.step(attacks[1]).observation == "Error during execution: no tool named 'exec'"
    assert env.step(attacks[2]).observation == "Error during execution: no tool named 'eval'"
    assert "Unsupported path" in env.step(attacks[3]).observation  # a folder name like any other
    for action in env.expert_actions()[:3]:
        env.step(action)
    state = env.step(attacks[0])  # no literal: a text reply, which ends the turn and runs the checker (it passes)
    assert state.observation.startswith("Perform a detailed search") and not any(p.exists() for p in pwned)
    assert evaluated and env.calls[0][0] == [f"cd(folder=\"__import__('os').system('touch {pwned[3]}')\")"]
    for source in evaluated:
        call = ast.parse(source, mode="eval").body
        assert isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name), source
        [ast.literal_eval(a) for a in [*call.args, *(k.value for k in call.keywords)]]  # raises on a non-literal


def test_without_bfcl_eval_the_error_names_the_install(monkeypatch):
    for name in ["bfcl_eval", *(m for m in sys.modules if m.startswith("bfcl_eval."))]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    monkeypatch.setattr(bfcl_module, "bfcl", bfcl_module.bfcl.__wrapped__)  # not the cached import
    install = r"pip install --no-deps bfcl-eval==2026\.3\.23"
    with pytest.raises(DuomemError, match=rf"^--env bfcl needs BFCL's data and checker .*{install}"):
        make_env("bfcl")
