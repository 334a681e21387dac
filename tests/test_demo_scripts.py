"""The demo's glue scripts on real TextWorld games: the held-out check and the report."""

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
    subprocess.run([*CLI, "eval", "--env", "textworld", "--tasks", "cooking", "--split", split, "--episodes", "2",
                    "--policy", "oracle", "--out", out, "--log", out.with_suffix(".jsonl")], check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def games(tmp_path_factory):
    """A teacher cache of two cooking train games, and oracle evals of two test and the two train games."""
    pytest.importorskip("textworld")
    tmp_path = tmp_path_factory.mktemp("demo")
    cache = tmp_path / "train-cache"
    subprocess.run([*CLI, "teach", "--teacher", "oracle", "--env", "textworld", "--tasks", "cooking", "--split", "train",
                    "--episodes", "2", "--out", cache], check=True, capture_output=True, timeout=600)
    return tmp_path, cache, oracle_eval(tmp_path, "test", "test"), oracle_eval(tmp_path, "train", "train")


def test_heldout_check_passes_test_games_and_refuses_training_games(games):
    tmp_path, cache, test, train = games
    script("check_heldout.py", "--train", cache, "--test", test.with_suffix(".jsonl"), "--json", tmp_path / "heldout.json")
    counts = json.loads((tmp_path / "heldout.json").read_text())
    assert counts["train_games"] == 2 and counts["test_games"] == 2 and counts["test_same_both"] == 0
    refused = script("check_heldout.py", "--train", cache, "--test", train.with_suffix(".jsonl"), ok=False)
    assert "is a training game" in refused.stderr


def test_report_writes_the_table_json_and_chart(games):
    tmp_path, _, test, train = games
    stages = tmp_path / "stages.tsv"
    stages.write_text("games\t12\t20\neval\t3\t4\n")
    out = tmp_path / "package"
    script("demo_report.py", "--out", out, "--variant", f"student_base={train}", "--variant", f"oracle={test}",
           "--teacher", test, "--stages", stages, "--wall-clock", "15", "--seeds", "0")
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == {"student_base", "oracle", "teacher"}
    oracle = results["variants"]["oracle"]
    assert oracle["success_rate"] == 1.0 and oracle["episodes"] == 2 and oracle["tokens_per_step"] is None  # no model: no tokens
    assert oracle["mean_steps"] == 5.0  # the cooking walkthrough
    assert results["stages"] == {"games": {"seconds": 12.0, "cpu_seconds": 20.0}, "eval": {"seconds": 3.0, "cpu_seconds": 4.0}}
    assert results["wall_clock_seconds"] == 15.0 and results["seeds"] == [0]
    table = (out / "results.md").read_text()
    assert "| oracle | 100% (2/2) |" in table and "| eval | 3 | 4 |" in table
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
