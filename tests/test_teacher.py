"""Teacher backends and the teacher cache: real tiny models, a real mlx_lm.server on loopback."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from duomem_mlx.cli import cli
from duomem_mlx.envs.base import Episode, Step, StepResult
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats import teacher_cache as cache_mod
from duomem_mlx.formats.memories import Memory
from duomem_mlx.formats.teacher_cache import CacheWriter, read_cache_records, verify
from duomem_mlx.runtime.models import load
from duomem_mlx.teacher.base import shard_arrays
from duomem_mlx.teacher.openai_compat import OpenAITeacher
from duomem_mlx.teacher.topk import forward_topk

ROOMS = [f"You are in room {i}. There is a door to the north and a small key on a table." for i in range(6)]


def toy_episode(n: int = 6) -> Episode:
    steps = [Step(ROOMS[i], f"go north {i}" if i % 2 else "take key from table") for i in range(n)]
    return Episode(
        "textworld/tw-simple/0/0", "textworld", "tw-simple", 0, "Find the key and open the door.", True, 1.0, steps
    )


def direct_topk(model, input_ids, loss_mask):
    """Log-softmax of one plain full-sequence forward pass at the positions before masked tokens."""
    logits = model(mx.array(input_ids)[None])[0].astype(mx.float32)
    logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    return logprobs[np.flatnonzero(loss_mask) - 1]


def check_rows(reference, ids, logprobs, rows):
    """Stored rows equal the reference distribution: same top ids (up to fp16 ties), same values."""
    k = ids.shape[1]
    assert np.abs(np.take_along_axis(reference[rows], ids[rows], 1) - logprobs[rows].astype(np.float32)).max() < 2e-2
    best = -np.sort(-reference[rows], axis=1)[:, :k]
    assert np.abs(best - logprobs[rows].astype(np.float32)).max() < 2e-2
    assert np.all(np.diff(logprobs[rows].astype(np.float32), axis=1) <= 0)  # sorted, most likely first


def test_mlx_topk_equals_forward_pass(tiny_teacher):
    model, tokenizer = load(str(tiny_teacher))
    arrays = shard_arrays(tokenizer, toy_episode())
    top = forward_topk(model, arrays["input_ids"], arrays["loss_mask"], 8, chunk=64)  # several chunks
    n = int(arrays["loss_mask"].sum())
    assert top["topk_ids"].shape == (n, 8) and top["topk_ids"].dtype == np.int32
    assert top["topk_logprobs"].dtype == np.float16
    check_rows(
        direct_topk(model, arrays["input_ids"], arrays["loss_mask"]), top["topk_ids"], top["topk_logprobs"], slice(None)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_teacher):
    """A real mlx_lm.server serving the tiny teacher on loopback; killed at teardown."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lm.server",
            "--model",
            str(tiny_teacher),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None, "mlx_lm.server exited"
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("mlx_lm.server did not start within 60 s")
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait(timeout=10)


def play_openai(teacher: OpenAITeacher, n: int = 4) -> Episode:
    """Drive the openai policy through n observations, the way play_episode does."""
    episode = toy_episode(0)
    teacher.policy.start(None, None, episode.task_description, StepResult(ROOMS[0], []))
    for observation in ROOMS[:n]:
        episode.steps.append(Step(observation, teacher.policy.act(StepResult(observation, []))))
    return episode


def test_openai_topk_equals_forward_pass(server, tiny_teacher):
    model, _ = load(str(tiny_teacher))
    teacher = OpenAITeacher(server, str(tiny_teacher), 10, 1.0, None, 8)  # sampling: actions of several tokens
    episode = play_openai(teacher)
    arrays = teacher.arrays(episode)
    ids, logprobs = arrays["topk_ids"], arrays["topk_logprobs"]
    assert ids.shape == (int(arrays["loss_mask"].sum()), 10)
    rows = ids[:, 0] >= 0
    firsts = np.flatnonzero(np.diff(np.concatenate([[0], arrays["loss_mask"]])) == 1)
    assert rows.sum() >= len(firsts)  # the first token of every action is always exact
    assert np.all(ids[~rows] == -1) and np.all(logprobs[~rows] == 0)
    check_rows(direct_topk(model, arrays["input_ids"], arrays["loss_mask"]), ids, logprobs, rows)


@pytest.mark.env("textworld")
def test_openai_teach(server, tiny_teacher, tmp_path):
    out = tmp_path / "openai"
    args = teach(
        "--teacher",
        f"openai:{server}/v1#{tiny_teacher}",
        "--top-k",
        "5",
        "--temperature",
        "1",
        "--episodes",
        "1",
        "--keep",
        "all",
        "--out",
        str(out),
    )
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "openai" and manifest["counts"]["kept"] == 1 and verify(out) == (1, [])
    assert ("no teacher top-k" in result.output) == (manifest["counts"]["unaligned_rows"] > 0)


@pytest.mark.env("textworld")
def test_openai_bad_inputs(server, tiny_teacher):
    with pytest.raises(DuomemError, match="cannot reach the teacher server"):
        OpenAITeacher(f"http://127.0.0.1:{free_port()}/v1", str(tiny_teacher), 5, 0.0, None, 8)
    wrong = OpenAITeacher(server, "no-such/model", 5, 0.0, str(tiny_teacher), 8)
    with pytest.raises(DuomemError, match="check the model name"):
        play_openai(wrong, 1)
    too_many = OpenAITeacher(server, str(tiny_teacher), 20, 0.0, None, 8)
    with pytest.raises(DuomemError, match="lower --top-k"):
        play_openai(too_many, 1)
    result = CliRunner().invoke(cli, ["teach", "--teacher", "openai:127.0.0.1#m", "--env", "textworld", "--out", "x"])
    assert result.exit_code != 0 and "expected openai:<base-url>#<model>" in result.output


def write_cache(tmp_path, tiny_teacher, n=3, k=4) -> Path:
    model, tokenizer = load(str(tiny_teacher))
    out = tmp_path / "cache"
    writer = CacheWriter(
        out, {"teacher": "mlx:t", "backend": "mlx", "top_k": k, "env": "textworld", "vocab_size": 2048}
    )
    for i in range(n):
        episode = toy_episode(2 + i)
        episode.id = f"ep{i}"
        arrays = shard_arrays(tokenizer, episode)
        arrays.update(forward_topk(model, arrays["input_ids"], arrays["loss_mask"], k))
        writer.add(episode.to_json(), arrays)
    writer.finish([Memory("m1", "tw-simple", "take key, go north", ["ep0"])])
    return out


def test_cache_verify_info_and_bad_caches(tmp_path, tiny_teacher):
    out = write_cache(tmp_path, tiny_teacher)
    runner = CliRunner()
    result = runner.invoke(cli, ["cache", "verify", str(out)])
    assert result.exit_code == 0 and "ok: 3 shards" in result.output
    summary = json.loads(runner.invoke(cli, ["cache", "info", str(out), "--json"]).output)
    assert summary["episodes"] == 3 and summary["memories"] == 1 and summary["top_k"] == 4
    assert summary["bytes_per_masked_token"] > 6 * 4
    # a finished cache is not overwritten by accident
    with pytest.raises(DuomemError, match="--resume .* or --force"):
        CacheWriter(out, {"teacher": "mlx:t", "top_k": 4})
    with pytest.raises(DuomemError, match="different settings"):
        CacheWriter(out, {"teacher": "mlx:t", "backend": "mlx", "top_k": 8, "env": "textworld"}, resume=True)
    # a truncated shard: verify names it and exits non-zero on one line
    shard = out / "shards" / "00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    result = runner.invoke(cli, ["cache", "verify", str(out)])
    assert result.exit_code == 1 and "00001.safetensors: truncated" in result.output
    assert len(result.output.strip().splitlines()) == 1
    # another format version: one line naming the fix
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    result = runner.invoke(cli, ["cache", "info", str(out)])
    assert result.exit_code == 1 and "format version 99" in result.output and "--force" in result.output


def test_resume_after_torn_line(tmp_path, tiny_teacher):
    """A run killed mid-line: the torn line goes, its episode is played again, nothing doubles."""
    out = write_cache(tmp_path, tiny_teacher, n=2)
    with open(out / "episodes.jsonl", "ab") as f:
        f.write(b'{"id": "ep2", "env": "textw')
    writer = CacheWriter(out, {"teacher": "mlx:t", "backend": "mlx", "top_k": 4, "env": "textworld"}, resume=True)
    assert writer.done == {"ep0", "ep1"}
    assert [e["id"] for e in read_cache_records(out)] == ["ep0", "ep1"]
    assert verify(out) == (2, [])


def teach(*args) -> list[str]:
    return ["teach", "--env", "textworld", "--max-steps", "6", *args]


@pytest.mark.env("textworld")
def test_mlx_teach_cache_equals_forward_pass(tmp_path, tiny_teacher):
    """`teach` with an mlx: teacher on TextWorld: every cached row equals a plain forward pass."""
    out = tmp_path / "mlx"
    result = CliRunner().invoke(
        cli,
        teach(
            "--teacher", f"mlx:{tiny_teacher}", "--episodes", "2", "--keep", "all", "--top-k", "8", "--out", str(out)
        ),
    )
    assert result.exit_code == 0, result.output
    model, _ = load(str(tiny_teacher))
    episodes = read_cache_records(out)
    assert len(episodes) == 2 and verify(out) == (2, [])
    for episode in episodes:
        arrays = cache_mod.load_shard(out, episode)
        assert arrays["topk_ids"].shape == (episode["masked"], 8)
        check_rows(
            direct_topk(model, arrays["input_ids"], arrays["loss_mask"]),
            arrays["topk_ids"],
            arrays["topk_logprobs"],
            slice(None),
        )


@pytest.mark.env("textworld")
def test_mlx_teacher_reads_memories_and_its_shards_hold_them(tmp_path, tiny_teacher):
    """`teach --memory`: the teacher reads the oracle's trajectories (never its own game's) while it plays; the
    shard is the chat it saw, memories included, and its rows still equal a plain forward pass."""
    oracle, bank, out = tmp_path / "oracle", tmp_path / "bank", tmp_path / "mlx"
    runner = CliRunner()
    assert (
        runner.invoke(
            cli,
            teach(
                "--teacher",
                "oracle",
                "--episodes",
                "3",
                "--max-steps",
                "40",
                "--memory-kind",
                "trajectory",
                "--out",
                str(oracle),
            ),
        ).exit_code
        == 0
    )
    assert len(cache_mod.read_cache_memories(oracle)) == 3  # one a game: the teacher's two games are among them
    assert (
        runner.invoke(
            cli,
            [
                "memory",
                "build",
                "--cache",
                str(oracle),
                "--embedder",
                str(tiny_teacher),
                "--key",
                "task+observation",
                "--out",
                str(bank),
            ],
        ).exit_code
        == 0
    )
    result = runner.invoke(
        cli,
        teach(
            "--teacher",
            f"mlx:{tiny_teacher}",
            "--memory",
            str(bank),
            "--memory-k",
            "1",
            "--memory-kind",
            "both",
            "--episodes",
            "2",
            "--keep",
            "all",
            "--top-k",
            "8",
            "--out",
            str(out),
        ),
    )
    assert result.exit_code == 0, result.output
    model, tokenizer = load(str(tiny_teacher))
    memories = {m.id: m for m in cache_mod.read_cache_memories(oracle)}
    assert verify(out) == (2, []) and json.loads((out / "manifest.json").read_text())["memory_k"] == 1
    for episode in read_cache_records(out):
        [used] = episode["memories"]
        assert memories[used].source[0].rsplit("/", 1)[0] != episode["id"].rsplit("/", 1)[0]  # another game's
        arrays = cache_mod.load_shard(out, episode)
        assert memories[used].text in tokenizer.decode(arrays["input_ids"].tolist())
        check_rows(
            direct_topk(model, arrays["input_ids"], arrays["loss_mask"]),
            arrays["topk_ids"],
            arrays["topk_logprobs"],
            slice(None),
        )
    assert {m.kind for m in cache_mod.read_cache_memories(out)} <= {"both"}
    result = runner.invoke(cli, teach("--teacher", "oracle", "--memory", str(bank), "--out", str(tmp_path / "no")))
    assert result.exit_code == 1 and "mlx: teacher only" in result.output


@pytest.mark.env("textworld")
def test_oracle_cache_and_kill_resume(tmp_path, tiny_model):
    """kill -9 mid-run, then --resume: every episode exactly once; successes and memories."""
    out = tmp_path / "oracle"
    args = teach("--teacher", "oracle", "--teacher-tokenizer", str(tiny_model), "--episodes", "4", "--out", str(out))
    env = dict(os.environ, DUOMEM_OPENBLAS="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "duomem_mlx", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if (out / "episodes.jsonl").exists() and (out / "episodes.jsonl").read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = subprocess.run([sys.executable, "-m", "duomem_mlx", *args], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "--resume" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run(
        [sys.executable, "-m", "duomem_mlx", *args, "--resume"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    ids = [e["id"] for e in read_cache_records(out)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert killed and len(ids) == len(set(ids)) and len(ids) + len(manifest["dropped"]) == 4
    assert manifest["complete"] and manifest["counts"]["success"] == len(ids) > 0
    assert all(e["success"] for e in read_cache_records(out)) and verify(out) == (len(ids), [])
    memories = cache_mod.read_cache_memories(out)
    assert memories and all(m.text and m.source for m in memories)
    result = CliRunner().invoke(
        cli, ["memory", "build", "--cache", str(out), "--embedder", str(tiny_model), "--out", str(tmp_path / "bank")]
    )
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "bank" / "memories.jsonl").read_text().splitlines()) == len(memories)
