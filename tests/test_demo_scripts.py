"""The demo's glue scripts on real TextWorldExpress games: the held-out check and the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "duomem_mlx"]


def script(name: str, *args, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    return result


def oracle_eval(tmp_path: Path, split: str, name: str) -> Path:
    out = tmp_path / f"{name}.json"
    subprocess.run(
        [
            *CLI,
            "eval",
            "--env",
            "twx",
            "--tasks",
            "coin,peckingorder",
            "--split",
            split,
            "--episodes",
            "1",
            "--policy",
            "oracle",
            "--out",
            out,
            "--log",
            out.with_suffix(".jsonl"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


@pytest.fixture(scope="module")
def games(tmp_path_factory, need_env):
    """A teacher cache of two train games (coin, peckingorder), and oracle evals of two test and the two train games."""
    need_env("twx")
    tmp_path = tmp_path_factory.mktemp("demo")
    cache = tmp_path / "train-cache"
    subprocess.run(
        [
            *CLI,
            "teach",
            "--teacher",
            "oracle",
            "--env",
            "twx",
            "--tasks",
            "coin,peckingorder",
            "--split",
            "train",
            "--episodes",
            "1",
            "--out",
            cache,
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return tmp_path, cache, oracle_eval(tmp_path, "test", "test"), oracle_eval(tmp_path, "train", "train")


def test_heldout_check_passes_test_games_and_refuses_training_games(games):
    tmp_path, cache, test, train = games
    script(
        "check_heldout.py", "--train", cache, "--test", test.with_suffix(".jsonl"), "--json", tmp_path / "heldout.json"
    )
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
    script(
        "demo_report.py",
        "--out",
        out,
        "--variant",
        f"student_base={train}",
        "--variant",
        f"oracle={test}",
        "--teacher",
        test,
        "--stages",
        stages,
        "--wall-clock",
        "15",
        "--seeds",
        "0",
        "--student",
        tiny_model,
        "--retrieval",
        retrieval,
    )
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == {"student_base", "oracle", "teacher"}
    oracle = results["variants"]["oracle"]
    assert (
        oracle["success_rate"] == 1.0 and oracle["episodes"] == 2 and oracle["tokens_per_step"] is None
    )  # no model: no tokens
    assert oracle["per_task"] == {"coin": 1.0, "peckingorder": 1.0}
    assert (
        oracle["mean_steps"]
        == sum(len(json.loads(line)["steps"]) for line in test.with_suffix(".jsonl").read_text().splitlines()) / 2
    )
    config = json.loads((tiny_model / "config.json").read_text())
    assert results["student"] == {
        "model": str(tiny_model),
        "hidden_size": config["hidden_size"],
        "num_hidden_layers": config["num_hidden_layers"],
    }
    assert results["retrieval_accuracy"] == 0.95
    assert results["stages"] == {
        "games": {"seconds": 12.0, "cpu_seconds": 20.0},
        "eval": {"seconds": 3.0, "cpu_seconds": 4.0},
    }
    assert results["wall_clock_seconds"] == 15.0 and results["seeds"] == [0]
    table = (out / "results.md").read_text()
    assert "| oracle | 100% (2/2; 34%-100%) |" in table and "| eval | 3 | 4 |" in table
    assert (
        "| variant | coin | peckingorder |" in table
        and "| oracle | 100% | 100% |" in table
        and "Retrieval accuracy" in table
    )
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def eval_file(path: Path, wins: dict, seconds: float = 1.0, cost: dict | None = None) -> Path:
    """An eval JSON as `duomem-mlx eval` writes it (the fields the report reads), one episode a game; without
    `cost` as one from before eval wrote a cost block."""
    episodes = [
        {
            "task": g.split("/")[0],
            "variation": int(g.split("/")[1]),
            "success": ok,
            "score": float(ok),
            "steps": 3,
            "seconds": seconds,
            "error": None,
        }
        for g, ok in wins.items()
    ]
    per_task = {
        t: {
            "success_rate": sum(e["success"] for e in episodes if e["task"] == t)
            / sum(e["task"] == t for e in episodes)
        }
        for t in {e["task"] for e in episodes}
    }
    path.write_text(
        json.dumps(
            {
                "success_rate": sum(wins.values()) / len(wins),
                "mean_score": 0.5,
                "episodes": episodes,
                "per_task": per_task,
                **({"cost": cost} if cost else {}),
            }
        )
    )
    return path


def test_report_pairs_every_row_with_duomem_on_the_same_games(tmp_path):
    """Wins and losses on shared games, McNemar's exact p, the gap recovered and the types no adapter saw."""
    games = [f"coin/{i}" for i in range(10)] + [f"mapreader/{i}" for i in range(10)]
    duomem = {g: i < 15 for i, g in enumerate(games)}  # 15 of 20
    base = {g: i in (0, 1, 2, 3, 15) for i, g in enumerate(games)}  # 5 of 20: duomem wins 11, loses 1
    teacher = {g: i != 19 for i, g in enumerate(games)}
    out = tmp_path / "package"
    script(
        "demo_report.py",
        "--out",
        out,
        "--variant",
        f"student_base={eval_file(tmp_path / 'base.json', base)}",
        "--variant",
        f"duomem={eval_file(tmp_path / 'duomem.json', duomem)}",
        "--variant",
        f"duomem_4bit={eval_file(tmp_path / '4bit.json', {g: duomem[g] for g in games[:4]})}",
        "--teacher",
        eval_file(tmp_path / "teacher.json", teacher),
        "--adapter-tasks",
        "coin",
    )
    results = json.loads((out / "results.json").read_text())
    assert list(results["variants"]) == ["student_base", "duomem", "duomem_4bit", "teacher"]
    assert results["paired"]["student_base"] == {
        "games": 20,
        "duomem_wins": 11,
        "duomem_losses": 1,
        "difference_points": 50.0,
        "mcnemar_p": round(2 * 13 / 2**12, 4),
    }
    assert results["paired"]["duomem_4bit"] == {
        "games": 4,
        "duomem_wins": 0,
        "duomem_losses": 0,
        "difference_points": 0.0,
        "mcnemar_p": 1.0,
    }
    assert results["paired"]["teacher"]["duomem_losses"] == 4 and results["paired"]["teacher"]["duomem_wins"] == 0
    assert results["gap_recovered"] == round((0.75 - 0.25) / (0.95 - 0.25), 3)
    assert results["adapter_tasks"] == ["coin"] and results["unseen_tasks"] == ["mapreader"]
    assert (
        results["variants"]["duomem"]["unseen_types"] == 0.5
        and results["variants"]["student_base"]["unseen_types"] == 0.1
    )
    low, high = results["variants"]["duomem"]["interval95"]
    assert 0.5 < low < 0.75 < high < 0.95
    assert "| student_base | 20 | 11 | 1 | +50.0 pts | 0.006 |" in (out / "results.md").read_text()


def test_report_reads_each_row_s_cost_and_how_much_cheaper_than_the_teacher_it_is(tmp_path):
    games = {f"coin/{i}": i % 2 == 0 for i in range(4)}

    def cost(gflops: float, peak_mb: int, model_mb: int) -> dict:  # the fields of eval's cost block the report reads
        return {
            "forward_flops_per_task": gflops * 1e9,
            "peak_memory_bytes": peak_mb * 10**6,
            "peak_rss_bytes": 2 * peak_mb * 10**6,
            "model_bytes": model_mb * 10**6,
            "bank_bytes": 10**5,
        }

    out = tmp_path / "package"
    script(
        "demo_report.py",
        "--out",
        out,
        "--variant",
        f"student_base={eval_file(tmp_path / 'base.json', games)}",  # an eval from before the cost block
        "--variant",
        f"duomem={eval_file(tmp_path / 'duomem.json', games, 0.5, cost(0.8, 300, 200))}",
        "--teacher",
        eval_file(tmp_path / "teacher.json", games, 2.0, cost(8, 2000, 1000)),
    )
    results = json.loads((out / "results.json").read_text())
    assert results["cost_vs_teacher"] == {
        "student_base": {"seconds": 2.0, "forward_flops": None},
        "duomem": {"seconds": 4.0, "forward_flops": 10.0},
        "teacher": {"seconds": 1.0, "forward_flops": 1.0},
    }
    assert results["variants"]["duomem"]["cost"] == {
        "seconds_per_task": 0.5,
        "seconds_per_step": round(0.5 / 3, 4),
        **cost(0.8, 300, 200),
    }
    assert results["variants"]["student_base"]["cost"]["model_bytes"] is None
    table = (out / "results.md").read_text()
    assert "| duomem | 0.50 | 0.167 | 0.8 | 300 MB | 200.1 MB | 4.00x; 10.00x |" in table
    assert "| student_base | 1.00 | 0.333 | - | - | - | 2.00x; - |" in table
