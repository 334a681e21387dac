"""Environments from outside (`--env module.path:ClassName`, the `duomem_mlx.envs` entry points),
function-call actions, and the example calendar environment through the whole pipeline."""

import json

import pytest
from click.testing import CliRunner
from test_tool_calls import schema_errors

from duomem_mlx.cli import cli
from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import Episode, play_episode
from duomem_mlx.envs.calls import Call, parse_call
from duomem_mlx.envs.example_tools import TOOLS
from duomem_mlx.envs.policies import OraclePolicy, RandomPolicy
from duomem_mlx.errors import DuomemError

CALENDAR = "duomem_mlx.envs.example_tools:Calendar"


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert (result.exit_code == 0) == ok, result.output + repr(result.exception)
    return result.output


@pytest.mark.parametrize(
    "text,expected",
    [
        ("cd(folder='document')", Call("cd", (), {"folder": "document"})),
        ("  sort('final_report.pdf') ", Call("sort", ("final_report.pdf",), {})),
        ("add(a=[1, 2.5], b={'k': None}, c=True)", Call("add", (), {"a": [1, 2.5], "b": {"k": None}, "c": True})),
        ("neg(x=-3)", Call("neg", (), {"x": -3})),
        ('{"name": "cd", "arguments": {"folder": "tmp"}}', Call("cd", (), {"folder": "tmp"})),
        ('{"name": "cd", "arguments": "{\\"folder\\": \\"tmp\\"}"}', Call("cd", (), {"folder": "tmp"})),
        ("```python\nls()\n```", Call("ls")),
    ],
)
def test_calls_parse_to_literals_and_write_back(text, expected):
    call = parse_call(text)
    assert call == expected
    assert parse_call(call.text) == call


@pytest.mark.parametrize(
    "text",
    [
        "cd(folder=__import__('os').system('touch /tmp/pwned'))",
        "os.system('ls')",
        "cd(folder=x)",
        "cd(**{'folder': 'a'})",
        "cd(*['a'])",
        "f(x=1e999)",
        "a(); b()",
        "[cd(folder='a'), ls()]",
        "I moved the file.",
        "",
        "cd(folder='a'",
        '{"name": "__import__(\'os\')", "arguments": {}}',
        '{"name": "cd", "arguments": {"not an identifier": 1}}',
        "(lambda: 1)()",
        "f(x=[i for i in range(3)])",
        "f(x=" + "[" * 100_000 + "]" * 100_000 + ")",
        '{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
)
def test_anything_but_one_literal_call_is_not_a_call(text):
    assert parse_call(text) is None


def test_calendar_oracle_wins_every_task_and_random_does_not():
    env = make_env(CALENDAR)
    specs = env.task_specs(None, "test", 9, seed=0)
    assert [s.task for s in specs] == ["book", "cancel", "move"] * 3 and len({s.variation for s in specs}) == 9
    oracle = [play_episode(env, s, OraclePolicy(), env.default_max_steps) for s in specs]
    assert all(e.success and e.score == 1.0 for e in oracle)
    assert all(e.steps[-1].action == "finish()" and e.steps[0].action.startswith("list_events(") for e in oracle)
    assert all(step.action in step.admissible for e in oracle for step in e.steps)  # constrained decoding can play it
    random_play = [play_episode(env, s, RandomPolicy(seed=1), env.default_max_steps) for s in specs]
    assert sum(e.success for e in random_play) < 3


def test_calendar_answers_bad_calls_as_a_tool_would():
    env = make_env(CALENDAR)
    env.reset(env.task_specs(["book"], "dev", 1, seed=0)[0])
    assert env.step("book it please").observation.startswith("Error: not a call of list_events")
    assert env.step("add_event(day='mon')").observation.startswith("Error: ")  # missing arguments
    assert env.step("cancel_event(event_id=99)").observation == "Error: no event #99"
    done = env.step("finish()")
    assert done.done and not done.won


@pytest.mark.env("twx")
def test_a_class_by_module_path_plays_as_its_short_name(tmp_path):
    results = {}
    for env in ("twx", "duomem_mlx.envs.twx:TextWorldExpress"):
        out = tmp_path / f"{len(env)}.json"
        run(
            "eval",
            "--env",
            env,
            "--tasks",
            "coin,sorting",
            "--episodes",
            2,
            "--policy",
            "oracle",
            "--split",
            "test",
            "--game-params",
            "coin:numLocations=2",
            "--out",
            out,
        )
        results[env] = json.loads(out.read_text())
    same = [{k: e[k] for k in ("task", "variation", "success", "score", "steps")} for e in results["twx"]["episodes"]]
    assert same == [
        {k: e[k] for k in ("task", "variation", "success", "score", "steps")}
        for e in results["duomem_mlx.envs.twx:TextWorldExpress"]["episodes"]
    ]
    assert results["twx"]["success_rate"] == 1.0 and len(same) == 4


def one_line_error(*args) -> str:
    output = run(*args, ok=False)
    assert output.startswith("Error: ") and output.count("\n") == 1 and "Traceback" not in output, output
    return output


def test_bad_environments_end_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a user's module in the current directory is found, as `python -c 'import m'` would
    (tmp_path / "half_env.py").write_text("class HalfEnv:\n    name = 'half'\n    def reset(self, spec): pass\n")
    (tmp_path / "broken_env.py").write_text("import not_a_real_dependency_xyz\n")
    out = str(tmp_path / "r.json")
    cases = {
        "no_such_module_xyz:Env": "no module named 'no_such_module_xyz'",
        "duomem_mlx.envs.twx:NoSuchClass": "module duomem_mlx.envs.twx has no class 'NoSuchClass'",
        "half_env:HalfEnv": "HalfEnv lacks the Env protocol's method(s) task_names, task_specs, step, expert_actions, "
        "close",
        "broken_env:Env": "needs 'not_a_real_dependency_xyz', which is not installed",
        "minecraft": "unknown environment 'minecraft'; use one of scienceworld",
    }
    for env, message in cases.items():
        assert message in one_line_error("eval", "--env", env, "--policy", "oracle", "--out", out), env
    assert "takes none" in one_line_error("eval", "--env", CALENDAR, "--game-params", "numLocations=2", "--out", out)
    teach = ("teach", "--teacher", "oracle", "--env", "nope.nope:X", "--out", tmp_path / "c")
    assert "no module named" in one_line_error(*teach)
    assert not (tmp_path / "r.json").exists()


def test_an_entry_point_names_a_packaged_environment(tmp_path, monkeypatch):
    dist = tmp_path / "calendar_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: calendar-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[duomem_mlx.envs]\nmy-calendar = {CALENDAR}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = make_env("my-calendar")
    assert env.name == "calendar" and env.task_names() == ["book", "cancel", "move"]
    with pytest.raises(DuomemError, match="use one of .*bfcl, my-calendar"):
        make_env("calendr")


def test_calendar_through_teach_memory_distill_eval(tiny_model, tmp_path):
    cache, bank, adapters, out = (tmp_path / n for n in ("cache", "bank", "adapters", "results.json"))
    run("teach", "--teacher", "oracle", "--env", CALENDAR, "--episodes", 6, "--out", cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 6 and manifest["env"] == CALENDAR
    episodes = [json.loads(line) for line in (cache / "episodes.jsonl").read_text().splitlines()]
    assert all(e["success"] and e["steps"][-1]["action"] == "finish()" for e in episodes)
    run("memory", "build", "--cache", cache, "--embedder", tiny_model, "--out", bank)
    memories = [json.loads(line) for line in (bank / "memories.jsonl").read_text().splitlines()]
    assert {m["task_type"] for m in memories} == {"book", "cancel", "move"}
    run(
        "distill",
        "--student",
        tiny_model,
        "--cache",
        cache,
        "--out",
        adapters,
        "--kd",
        "off",
        "--iters",
        2,
        "--batch-size",
        2,
        "--val-fraction",
        0,
        "--memory-bank",
        bank,
    )
    run(
        "eval",
        "--env",
        CALENDAR,
        "--split",
        "test",
        "--episodes",
        3,
        "--max-steps",
        3,
        "--policy",
        f"model:{tiny_model}",
        "--adapter-path",
        adapters,
        "--out",
        out,
        "--log",
        tmp_path / "log.jsonl",
    )
    results = json.loads(out.read_text())
    assert set(results["per_task"]) == {"book", "cancel", "move"} and results["env"] == CALENDAR
    played = [Episode.from_json(json.loads(line)) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(e.memories for e in played)  # read from the bank distill rebuilt beside the adapters
    # the calendar offers tools: every action is a call its schema accepts (runtime/tools.py)
    assert all(not schema_errors(parse_call(s.action), TOOLS) for e in played for s in e.steps)
