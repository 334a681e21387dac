"""`duomem-mlx eval` end to end, as a user runs it (subprocess, real environments)."""

import json
import subprocess
import sys

import pytest

from duomem_mlx.envs.base import Episode


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "duomem_mlx", *args], capture_output=True, text=True, timeout=timeout)


def assert_clean_failure(result, *phrases):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


@pytest.mark.env("textworld")
def test_eval_oracle_textworld_writes_results_and_log(tmp_path):
    out, log = tmp_path / "r" / "results.json", tmp_path / "episodes.jsonl"
    result = cli(
        "eval",
        "--env",
        "textworld",
        "--tasks",
        "simple",
        "--episodes",
        "2",
        "--policy",
        "oracle",
        "--out",
        str(out),
        "--log",
        str(log),
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert results["success_rate"] == 1.0 and results["mean_score"] == 1.0
    assert [set(e) >= {"task", "variation", "success", "score", "steps", "seconds"} for e in results["episodes"]] == [
        True,
        True,
    ]
    episodes = [Episode.from_json(json.loads(line)) for line in log.read_text().splitlines()]
    assert len(episodes) == 2 and all(e.steps and e.steps[0].observation and e.steps[0].admissible for e in episodes)
    assert "simple" in result.stdout and "100.0%" in result.stdout


@pytest.mark.env("twx")
def test_eval_game_params_change_the_games_and_are_recorded(tmp_path):
    def oracle(*params):
        out = tmp_path / f"{len(params)}.json"
        result = cli(
            "eval",
            "--env",
            "twx",
            "--tasks",
            "coin",
            "--split",
            "test",
            "--episodes",
            "8",
            "--policy",
            "oracle",
            *params,
            "--out",
            str(out),
        )
        assert result.returncode == 0, result.stderr
        return json.loads(out.read_text())

    one_room = oracle("--game-params", "coin:numLocations=1")
    assert one_room["game_params"] == "coin:numLocations=1" and one_room["success_rate"] == 1.0
    assert {e["steps"] for e in one_room["episodes"]} == {2}  # look around, take coin: nowhere else to go
    assert max(e["steps"] for e in oracle()["episodes"]) > 2  # the default three rooms
    assert_clean_failure(
        cli("eval", "--env", "twx", "--game-params", "coin:rooms=2", "--out", str(tmp_path / "x.json")),
        "coin takes no game param 'rooms'",
    )


@pytest.mark.env("textworld", "scienceworld")
def test_eval_model_policy_with_memories_on_real_episodes(tiny_model, tmp_path):
    memories = tmp_path / "memories.jsonl"
    memories.write_text(
        "\n".join(
            json.dumps(m)
            for m in [
                {
                    "id": "melt-1",
                    "task_type": "melt",
                    "text": "to melt a substance: focus on it, move it to a heater, heat it, wait",
                },
                {
                    "id": "tw-1",
                    "task_type": "simple",
                    "text": "open the containers, take the key, unlock the door, go through it",
                },
            ]
        )
        + "\n"
    )
    bank = tmp_path / "bank"
    assert (
        cli(
            "memory", "build", "--memories", str(memories), "--embedder", str(tiny_model), "--out", str(bank)
        ).returncode
        == 0
    )
    for env, task, expected in [("textworld", "simple", "tw-1"), ("scienceworld", "melt", "melt-1")]:
        out, log = tmp_path / f"{env}.json", tmp_path / f"{env}.jsonl"
        result = cli(
            "eval",
            "--env",
            env,
            "--tasks",
            task,
            "--episodes",
            "1",
            "--policy",
            f"model:{tiny_model}",
            "--memory",
            str(bank),
            "--memory-k",
            "1",
            "--memory-filter",
            "task",
            "--max-steps",
            "4",
            "--out",
            str(out),
            "--log",
            str(log),
        )
        assert result.returncode == 0, result.stderr
        episode = Episode.from_json(json.loads(log.read_text()))
        assert episode.memories == [expected]  # the task-type filter picked the right memory
        assert len(episode.steps) == 4 or episode.success
        assert all(step.action in step.admissible for step in episode.steps)  # constrained decoding
        assert len(episode.stats["step_seconds"]) == len(episode.steps)
        assert episode.stats["prefill_tokens"] < sum(episode.stats["prompt_tokens"])  # incremental


@pytest.mark.env("textworld")
def test_bad_inputs_fail_with_one_clear_line(tmp_path):
    assert_clean_failure(cli("eval", "--env", "minecraft", "--out", str(tmp_path / "r.json")), "minecraft")
    assert_clean_failure(cli("eval", "--env", "textworld", "--split", "val", "--out", str(tmp_path / "r.json")), "val")
    assert_clean_failure(
        cli("eval", "--env", "textworld", "--tasks", "nope", "--out", str(tmp_path / "r.json")), "valid: simple"
    )
    assert_clean_failure(cli("eval", "--env", "textworld", "--out", "/proc/duomem/r.json"), "--out")
    assert_clean_failure(
        cli("eval", "--env", "textworld", "--policy", "greedy", "--out", str(tmp_path / "r.json")),
        "oracle, random or model:PATH",
    )
    assert_clean_failure(
        cli("eval", "--env", "textworld", "--policy", "model:/no/such/model", "--out", str(tmp_path / "r.json")),
        "does not exist",
    )


def test_missing_java_names_the_fix(tmp_path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # no java on this PATH
    result = subprocess.run(
        [sys.executable, "-m", "duomem_mlx", "eval", "--env", "scienceworld", "--out", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert_clean_failure(result, "Java 11+", "JAVA_HOME")  # the hint, Debian's or Homebrew's


def test_missing_alfworld_names_the_fix(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "duomem_mlx", "eval", "--env", "alfworld", "--out", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "ALFWORLD_DATA": str(tmp_path)},
    )
    assert_clean_failure(result, "alfworld-download")
