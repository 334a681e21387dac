"""Memories of tool episodes: the rule writer's procedures of calls (one per task type and API
set: function names in order, argument names, placeholders where values vary or the user said
them) and trajectories of calls and the gist of each result, from oracle episodes of the
calendar and of BFCL entries."""

import json
import re

import pytest
from click.testing import CliRunner

from duomem_mlx.cli import cli
from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import Episode, Step, TaskSpec, play_episode
from duomem_mlx.envs.calls import parse_call
from duomem_mlx.envs.policies import OraclePolicy
from duomem_mlx.memory.writer import gist, names_a_step, of_kind, result_gist, rule_memories, short, writer_content

CALENDAR = "duomem_mlx.envs.example_tools:Calendar"


def played(env_name: str, specs: list[TaskSpec]) -> list:
    env = make_env(env_name)
    episodes = [play_episode(env, spec, OraclePolicy(), 80) for spec in specs]
    assert all(e.success for e in episodes)
    return episodes


def calendar_episodes(tasks=("book", "cancel", "move"), n=3) -> list:
    return played(CALENDAR, make_env(CALENDAR).task_specs(list(tasks), "train", n, 0))


def procedure_steps(text: str) -> list[str]:
    """A procedure's numbered steps, each repeated as its "(xN)" says."""
    assert text.startswith("To do a ") and ": 1. " in text, text
    steps = re.split(r" \d+\. ", text.split(": 1. ", 1)[1])
    out = []
    for step in steps:
        repeated = re.fullmatch(r"(.*) \(x(\d+)\)", step)
        out += [repeated.group(1)] * int(repeated.group(2)) if repeated else [step]
    return out


def step_name(step: str) -> str:
    """A call step's function (parsed whole, placeholders read as values: no "(" torn from its
    name, no broken literal), or a text reply as it is."""
    if not re.match(r"\w+\(", step):
        return step
    call = parse_call(re.sub(r"<\w+>", "0", step))
    assert call is not None, step
    return call.name


def action_name(action: str) -> str:
    call = parse_call(action)
    return call.name if call else action


def assert_names_the_calls_in_order(memories, episodes):
    by_id = {e.id: e for e in episodes}
    for memory in memories:
        names = [step_name(step) for step in procedure_steps(memory.text)]
        for source in memory.source:
            assert names == [action_name(s.action) for s in by_id[source].steps], memory.text


def test_calendar_procedures_name_the_calls_in_order_with_placeholders_where_values_vary():
    episodes = calendar_episodes()
    memories = rule_memories(episodes)
    assert {m.task_type for m in memories} == {"book", "cancel", "move"}
    assert_names_the_calls_in_order(memories, episodes)
    text = {m.task_type: m.text for m in memories}
    # the day and title each task names vary; its first free hour was 9 in all three: constant
    assert text["book"] == (
        "To do a book task (<day>, <title>: the values of each task): "
        "1. list_events(day=<day>) 2. add_event(day=<day>, hour=9, title=<title>) 3. finish()"
    )
    # the day moved to gets its own placeholder; the id found by list_events is named by its argument
    assert text["move"] == (
        "To do a move task (<day>, <event_id>, <day2>, <hour>, <title>: the values of each task): "
        "1. list_events(day=<day>) 2. cancel_event(event_id=<event_id>) "
        "3. add_event(day=<day2>, hour=<hour>, title=<title>) 4. finish()"
    )
    assert "cancel_event(event_id=<event_id>) (x2)" in " ".join(m.text for m in memories if m.task_type == "cancel")


def test_one_episode_makes_placeholders_of_what_the_task_says_only():
    (episode,) = calendar_episodes(["book"], 1)
    (memory,) = rule_memories([episode])
    add = parse_call(episode.steps[1].action)
    assert str(add.kwargs["day"]) in episode.task_description and add.kwargs["hour"] == 9
    assert memory.text.endswith("2. add_event(day=<day>, hour=9, title=<title>) 3. finish()")


def test_a_value_the_user_did_not_say_never_shares_a_said_values_placeholder():
    def episode(day: str, to: str) -> Episode:
        actions = [f"list_events(day={day!r})", f"add_event(day={to!r}, hour=9, title='call')", "finish()"]
        steps = [Step("Tools: ...", a, []) for a in actions]
        return Episode(f"calendar/move/{day}/0", "calendar", "move", 0, f"Move the call on {day}.", True, 1.0, steps)

    (memory,) = rule_memories([episode("mon", "tue"), episode("wed", "fri")])
    assert memory.source == ["calendar/move/mon/0", "calendar/move/wed/0"]
    assert memory.text == (
        "To do a move task (<day>, <day2>: the values of each task): "
        "1. list_events(day=<day>) 2. add_event(day=<day2>, hour=9, title='call') 3. finish()"
    )


def test_calendar_trajectories_show_each_call_and_the_gist_of_its_json_result():
    episodes = calendar_episodes(["book", "move"], 2)
    for memory in of_kind(rule_memories(episodes), episodes, "trajectory"):
        (episode,) = [e for e in episodes if e.id in memory.source]
        head, *lines = memory.text.splitlines()
        assert head == f"Solved example of {episode.task}: {episode.task_description}"
        for i, (line, step) in enumerate(zip(lines, episode.steps, strict=True), 1):
            call, result = line.removeprefix(f"{i}. ").split(" -> ")
            assert parse_call(call) == parse_call(step.action)
            if step.action.startswith("add_event"):
                assert result == "{id: 7}"  # {"id": 7} gisted
            assert '"' not in result
        assert lines[-1].endswith("finish() -> done")


def test_memory_write_on_a_calendar_log_writes_procedures_then_trajectories(tmp_path):
    log, out = tmp_path / "eps.jsonl", tmp_path / "m.jsonl"
    args = ["eval", "--env", CALENDAR, "--split", "train", "--episodes", 6, "--policy", "oracle"]
    result = CliRunner().invoke(cli, [*args, "--log", log, "--out", tmp_path / "r.json"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["memory", "write", "--episodes", log, "--kind", "both", "--out", out])
    assert result.exit_code == 0, result.output
    memories = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(memories) == 6 and {m["kind"] for m in memories} == {"both"}
    for m in memories:
        procedure, trajectory = m["text"].split("\n", 1)
        assert procedure.startswith(f"To do a {m['task_type']} task") and "list_events(day=<day>)" in procedure
        assert trajectory.startswith(f"Solved example of {m['task_type']}: ") and "1. list_events(day='" in trajectory


def test_values_and_json_results_are_cut_to_their_gist():
    assert short("x" * 100) == repr("x" * 19 + "...")
    assert short(["#Travel", "#PlansChanged", "#Flights"]) == "['#Travel', ...]"
    assert short({"a": "b" * 40, "c": 1}) == "{'a': 'bbbbbbbbbbbbbbbbbbb...', ...}"
    blob = {"a": [1, 2, 3], "b": {"c": 1, "d": 2}, "e": "y" * 50} | {f"k{i}": i for i in range(9)}
    assert result_gist(json.dumps(blob)) == "{a: [3 items], b: {c, d}, e: 'yyyyyyyyyyyyyyyyyyy...', k0: 0, k1: 1, " + (
        "k2: 2, k3: 3, k4: 4, +4 more}"
    )
    room = "You are in the kitchen. " * 10
    assert result_gist(room) == gist(room) and result_gist("42") == "42" and result_gist("") == ""


def test_a_model_writer_reply_naming_a_called_function_names_a_step():
    actions = ["list_events(day='wed')", "add_event(day='wed', hour=9, title='lunch')"]
    assert names_a_step("1. Call add_event with the first free hour.", actions)
    assert not names_a_step("1. Add an event at the first free hour.", actions)


def test_a_model_writer_is_told_the_agent_called_tools_not_that_it_played_a_text_game():
    tool_episode = calendar_episodes(("book",), 1)[0]
    assert "solved this task by calling tools." in writer_content(tool_episode)
    text_episode = Episode("ep/1", "twx", "coin", 0, "Find the coin.", True, 1.0, [Step("You are in a room.", "look")])
    assert "solved this task in a text game." in writer_content(text_episode)


@pytest.mark.env("bfcl")
def test_bfcl_procedures_per_api_set_and_trajectories_with_result_gists():
    # three train entries of the vehicle API (base), one of the trading API with long results
    specs = [TaskSpec("bfcl", "base", i, "train") for i in (64, 82, 84)]
    episodes = played("bfcl", [*specs, TaskSpec("bfcl", "long_context", 100, "train")])
    memories = rule_memories(episodes)
    assert [m.task_type for m in memories] == ["base"] * 3 + ["long_context"]
    assert all(m.text.startswith("To do a base task with the vehicle control system") for m in memories[:3])
    assert memories[3].text.startswith("To do a long_context task with the trading system: 1. get_stock_info(")
    assert_names_the_calls_in_order(memories, episodes)  # text replies ("Done.") kept as they are
    text = {m.source[0]: m.text for m in memories}
    # the fuel amount differs between the entries that fill the tank; a long address is cut
    assert "fillFuelTank(fuelAmount=<fuelAmount>)" in text["bfcl/base/82/0"]
    assert "fillFuelTank(fuelAmount=<fuelAmount>)" in text["bfcl/base/84/0"]
    assert "set_navigation(destination='456 Oakwood Avenue,...')" in text["bfcl/base/82/0"]
    assert "lockDoors(unlock=False, door=['driver', 'passenger', ...])" in text["bfcl/base/64/0"]
    trajectory = of_kind(memories, episodes, "trajectory")[3].text.splitlines()
    assert trajectory[1].startswith("1. get_stock_info(symbol='NVDA') -> ") and len(trajectory[1]) < 160
    assert len(episodes[3].steps[1].observation) > 1000  # a 30 KB result, cut by the env, gisted here
    assert trajectory[3] == "3. fund_account(amount=2203.4) -> {status: 'Account funded succ...', new_balance: 12203.4}"
