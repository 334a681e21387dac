"""The demo's glue scripts on real TextWorldExpress games: the held-out check and the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "duomem_mlx"]


def script(name: str, *args, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    return result


def oracle_eval(tmp_path: Path, split: str, name: str) -> Path:
    out = tmp_path / f"{name}.json"
    subprocess.run([*CLI, "eval", "--env", "twx", "--tasks", "coin,peckingorder", "--split", split, "--episodes", "1",
                    "--policy", "oracle", "--out", out, "--log", out.with_suffix(".jsonl")], check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    """A teacher cache of two train games (coin, peckingorder), and oracle evals of two test and the two train games."""
    pytest.importorskip("textworld_express")
    tmp_path = tmp_path_factory.mktemp("demo")
    cache = tmp_path / "train-cache"
    subprocess.run([*CLI, "teach", "--teacher", "oracle", "--env", "twx", "--tasks", "coin,peckingorder", "--split", "train",
                    "--episodes", "1", "--out", cache], check=True, capture_output=True, timeout=600)
    return tmp_path, cache, oracle_eval(tmp_path, "test", "test"), oracle_eval(tmp_path, "train", "train")


def test_heldout_check_passes_test_games_and_refuses_training_games(games):
    tmp_path, cache, test, train = games
    script("check_heldout.py", "--train", cache, "--test", test.with_suffix(".jsonl"), "--json", tmp_path / "heldout.json")
    counts = json.loads((tmp_path / "heldout.json").read_text())
    assert counts["train_games"] == 2 and counts["test_games"] == 2 and counts["test_same_both"] == 0
    refused = script("check_heldout.py", "--train", cache, "--test", train.with_suffix(".jsonl"), ok=False)
    assert "is a training game" in refused.stderr


def test_heldout_check_refuses_a_test_game_with_a_training_game_s_content(games, tmp_path):
    _, cache, test, _ = games
    records = [json.loads(line) for line in test.with_suffix(".jsonl").read_text().splitlines()]
    trained = json.loads((cache / "episodes.jsonl").read_text().splitlines()[0])
    records[0] |= {"steps": trained["steps"], "variation": records[0]["variation"]}  # another seed, the same game
    log = tmp_path / "copied.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    refused = script("check_heldout.py", "--train", cache, "--test", log, ok=False)
    assert "repeats a training game's actions and first observation" in refused.stderr


def test_report_writes_the_table_json_and_chart(games, tiny_model):
    tmp_path, _, test, train = games
    retrieval = tmp_path / "retrieval.json"
    retrieval.write_text('{"accuracy": 0.95, "episodes": 20}')
    stages = tmp_path / "stages.tsv"
    stages.write_text("games\t12\t20\neval\t3\t4\n")
    out = tmp_path / "package"
    script("demo_report.py", "--out", out, "--variant", f"student_base={train}", "--variant", f"oracle={test}",
           "--teacher", test, "--stages", stages, "--wall-clock", "15", "--seeds", "0", "--student", tiny_model, "--retrieval", retrieval)
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == {"student_base", "oracle", "teacher"}
    oracle = results["variants"]["oracle"]
    assert oracle["success_rate"] == 1.0 and oracle["episodes"] == 2 and oracle["tokens_per_step"] is None  # no model: no tokens
    assert oracle["per_task"] == {"coin": 1.0, "peckingorder": 1.0}
    assert oracle["mean_steps"] == sum(len(json.loads(line)["steps"]) for line in test.with_suffix(".jsonl").read_text().splitlines()) / 2
    config = json.loads((tiny_model / "config.json").read_text())
    assert results["student"] == {"model": str(tiny_model), "hidden_size": config["hidden_size"], "num_hidden_layers": config["num_hidden_layers"]}
    assert results["retrieval_accuracy"] == 0.95
    assert results["stages"] == {"games": {"seconds": 12.0, "cpu_seconds": 20.0}, "eval": {"seconds": 3.0, "cpu_seconds": 4.0}}
    assert results["wall_clock_seconds"] == 15.0 and results["seeds"] == [0]
    table = (out / "results.md").read_text()
    assert "| oracle | 100% (2/2) |" in table and "| eval | 3 | 4 |" in table
    assert "| variant | coin | peckingorder |" in table and "| oracle | 100% | 100% |" in table and "Retrieval accuracy" in table
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
