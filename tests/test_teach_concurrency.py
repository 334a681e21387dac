"""`teach --concurrency N` against a loopback OpenAI-compatible server with a fixed policy
(benchmarks/policy_server.py): the same cache bytes at any N, under faults, after a kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from duomem_mlx.cli import cli
from duomem_mlx.formats.teacher_cache import read_cache_records, verify
from duomem_mlx.teacher import openai_compat
from duomem_mlx.teacher.openai_compat import Pace, retry_after

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import policy_server  # noqa: E402

EPISODES = 8


@pytest.fixture(scope="module")
def gold(twx):
    return policy_server.gold_table(twx, twx.task_specs(None, "train", EPISODES, 0))


@pytest.fixture(scope="module")
def server(gold, tiny_model, tmp_path_factory):
    with policy_server.running(gold, tiny_model, tmp_path_factory.mktemp("server"), latency=0.02) as url:
        yield url


def teach(url: str, model, out, *args) -> list[str]:
    return [
        "teach",
        "--teacher",
        f"openai:{url}#{model}",
        "--env",
        "twx",
        "--episodes",
        str(EPISODES),
        "--top-k",
        "3",
        "--out",
        str(out),
        *args,
    ]


def run(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def reference(server, tiny_model, tmp_path_factory):
    """One episode at a time, no faults: the cache every other run must equal byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    run(teach(server, tiny_model, out))
    return out


def cache_bytes(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes() for p in [out / "episodes.jsonl", *sorted((out / "shards").iterdir())]
    }


def by_id(out: Path) -> dict[str, tuple[dict, bytes]]:
    """The kept episodes whatever their order: the line without its shard name, and the shard's bytes."""
    return {
        e["id"]: ({k: v for k, v in e.items() if k != "shard"}, (out / e["shard"]).read_bytes())
        for e in read_cache_records(out)
    }


@pytest.mark.env("twx")
def test_concurrency_writes_the_same_cache(reference, server, tiny_model, tmp_path):
    out = tmp_path / "n4"
    run(teach(server, tiny_model, out, "--concurrency", "4"))
    kept = read_cache_records(reference)
    assert len(kept) >= EPISODES - 1 and all(e["success"] and e["unaligned_rows"] == 0 for e in kept)
    assert cache_bytes(out) == cache_bytes(reference) and verify(out) == (len(kept), [])


@pytest.mark.env("twx")
def test_transient_faults_lose_nothing(reference, gold, tiny_model, tmp_path):
    """429 (Retry-After), 503 and dropped connections on 30% of requests: every request retried, the same cache."""
    with policy_server.running(gold, tiny_model, tmp_path, latency=0.02, faults=0.3) as url:
        run(teach(url, tiny_model, tmp_path / "cache", "--concurrency", "4"))
        counts = policy_server.stats(url)
    assert all(counts[f] > 0 for f in policy_server.FAULTS)
    assert (
        cache_bytes(tmp_path / "cache") == cache_bytes(reference)
        and not json.loads((tmp_path / "cache" / "manifest.json").read_text())["failed"]
    )


@pytest.mark.env("twx")
def test_a_request_that_keeps_failing_fails_its_episode_not_the_run(
    reference, gold, server, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setattr(openai_compat, "backoff", lambda attempt: 0.0)
    out = tmp_path / "cache"
    with policy_server.running(gold, tiny_model, tmp_path, latency=0.02, broken=2) as url:
        result = run(teach(url, tiny_model, out, "--concurrency", "4"))
    failed = json.loads((out / "manifest.json").read_text())["failed"]
    assert len(failed) == 2 and all("HTTP 503" in reason and "7 tries" in reason for reason in failed.values())
    assert "failed 2 episodes" in result.output and "--resume" in result.output
    assert not failed.keys() & {e["id"] for e in read_cache_records(out)} and verify(out)[1] == []
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with policy_server.running(gold, tiny_model, tmp_path, latency=0.02, port=port) as url:  # the server is back
        run(teach(url, tiny_model, out, "--concurrency", "4", "--resume"))
    assert by_id(out) == by_id(reference) and verify(out)[1] == []  # the two come last
    assert not json.loads((out / "manifest.json").read_text())["failed"]


@pytest.mark.env("twx")
def test_kill_with_episodes_in_flight_then_resume(reference, server, tiny_model, tmp_path):
    out = tmp_path / "cache"
    args = [sys.executable, "-m", "duomem_mlx", *teach(server, tiny_model, out, "--concurrency", "4")]
    proc = subprocess.Popen(
        args, env=dict(os.environ, DUOMEM_OPENBLAS="0"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and not (out / "episodes.jsonl").exists():
        time.sleep(0.01)
    killed = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed and len(read_cache_records(out, torn_ok=True)) < EPISODES
    run(teach(server, tiny_model, out, "--concurrency", "4", "--resume"))
    assert cache_bytes(out) == cache_bytes(reference) and verify(out)[1] == []


@pytest.mark.env("twx")
def test_mlx_teacher_refuses_concurrency(tiny_teacher, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "teach",
            "--teacher",
            f"mlx:{tiny_teacher}",
            "--env",
            "twx",
            "--concurrency",
            "2",
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert result.exit_code == 1 and "mlx_lm.server" in result.output and len(result.output.strip().splitlines()) == 1


def test_retry_after_and_pace():
    assert retry_after({"Retry-After": "2"}) == 2.0 and retry_after({"Retry-After": "3600"}) == 60.0
    assert retry_after({}) is None and retry_after({"Retry-After": "soon"}) is None
    assert (
        0 < retry_after({"Retry-After": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 5))}) <= 5
    )
    pace, start = Pace(50.0), time.monotonic()
    for _ in range(11):
        pace.wait()
    assert time.monotonic() - start >= 0.19  # 10 gaps of 20 ms
