"""Distillation: sparse losses, data from a real teacher cache, training, resume, distributed, CLI."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.utils import save_model

from duomem_mlx.cli import cli
from duomem_mlx.distill.data import build_dataset
from duomem_mlx.distill.losses import distill_loss, log1mexp, sparse_kd
from duomem_mlx.envs.base import Episode, StepResult, TaskSpec
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.bank import MemoryBank
from duomem_mlx.formats.episodes import game_of
from duomem_mlx.formats.memories import Memory
from duomem_mlx.formats.teacher_cache import load_shard, read_cache_episodes, read_cache_records
from duomem_mlx.memory.writer import of_kind
from duomem_mlx.runtime import retrieval
from duomem_mlx.runtime.embed import build
from duomem_mlx.runtime.models import load, make_tiny_model
from duomem_mlx.runtime.options import PolicyOptions
from duomem_mlx.runtime.policy import ModelPolicy, load_bank
from duomem_mlx.runtime.prompt import episode_messages, tokenize_with_mask
from duomem_mlx.runtime.retrieval import accuracy


def dense(teacher_logits, student_logits, temperature, kind):
    t = teacher_logits / temperature
    t = t - mx.logsumexp(t, axis=-1, keepdims=True)
    s = student_logits / temperature
    s = s - mx.logsumexp(s, axis=-1, keepdims=True)
    p, q = mx.exp(t), mx.exp(s)
    if kind == "forward":
        return (p * (t - s)).sum(-1)
    if kind == "reverse":
        return (q * (s - t)).sum(-1)
    m = mx.log(0.5 * (p + q))
    return 0.5 * ((p * (t - m)).sum(-1) + (q * (s - m)).sum(-1))


def teacher_rows(teacher_logits, k):
    logprobs = teacher_logits - mx.logsumexp(teacher_logits, axis=-1, keepdims=True)
    ids = mx.argsort(-logprobs, axis=-1)[..., :k]
    return ids.astype(mx.int32), mx.take_along_axis(logprobs, ids, axis=-1)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kd_equals_dense_kl_at_k_equal_vocab(kind, temperature):
    mx.random.seed(0)
    vocab = 50
    teacher, student = mx.random.normal((6, vocab)) * 3, mx.random.normal((6, vocab)) * 3
    ids, lps = teacher_rows(teacher, vocab)
    sparse = sparse_kd(student, ids, lps, temperature, kind)
    assert np.allclose(np.array(sparse), np.array(dense(teacher, student, temperature, kind)), atol=1e-4)
    # with k < vocab the tail bucket keeps a proper distribution: KD is 0 iff student == teacher
    ids, lps = teacher_rows(teacher, 5)
    assert np.allclose(np.array(sparse_kd(teacher, ids, lps, 1.0, kind)), 0, atol=1e-5)
    assert (np.array(sparse_kd(student, ids, lps, 1.0, kind)) > 1e-3).all()


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_distill_loss_gradient_matches_finite_differences(kind):
    mx.random.seed(1)
    vocab, k = 12, 4
    logits = mx.random.normal((1, 3, vocab))
    ids, lps = teacher_rows(mx.random.normal((1, 3, vocab)) * 2, k)
    ids = mx.concatenate([ids[:, :2], mx.full((1, 1, k), -1, mx.int32)], axis=1)  # last row unaligned: CE only
    targets, mask = mx.array([[1, 5, 7]]), mx.array([[1.0, 1.0, 1.0]])

    def f(x):
        return distill_loss(x, targets, mask, ids, lps, alpha=0.3, temperature=2.0, kind=kind)[0]

    grad = np.array(mx.grad(f)(logits)).reshape(-1)
    base, eps = np.array(logits).reshape(-1), 1e-2
    for i in range(0, base.size, 5):
        up, down = base.copy(), base.copy()
        up[i] += eps
        down[i] -= eps
        numeric = (f(mx.array(up.reshape(logits.shape))).item() - f(mx.array(down.reshape(logits.shape))).item()) / (
            2 * eps
        )
        assert math.isclose(grad[i], numeric, rel_tol=2e-2, abs_tol=2e-3), (i, grad[i], numeric)


def test_the_tail_bucket_s_gradient_stays_finite_next_to_zero():
    """A confident student's top-k mass rounds to 1 in float32 (x = log of it ~ -1e-9): the
    discarded branch of log1mexp made the gradient NaN there (seen at lr 5e-4, step 7)."""
    x = mx.array([-1e-9, -1e-7, -0.1, -1.0, -20.0])
    grad = np.array(mx.grad(lambda v: log1mexp(v).sum())(x))
    assert np.isfinite(grad).all() and np.isfinite(np.array(log1mexp(x))).all()
    assert np.allclose(grad[2:], [-np.exp(v) / -np.expm1(v) for v in (-0.1, -1.0, -20.0)], rtol=1e-4)


def test_unaligned_rows_get_ce_only_and_kd_off_is_ce():
    mx.random.seed(2)
    logits, targets, mask = mx.random.normal((1, 2, 9)), mx.array([[3, 4]]), mx.array([[1.0, 1.0]])
    none = mx.full((1, 2, 3), -1, mx.int32)
    loss, ce, kd, rows = distill_loss(logits, targets, mask, none, mx.zeros((1, 2, 3)), alpha=0.2)
    assert rows.item() == 0 and kd.item() == 0 and math.isclose(loss.item(), ce.item(), rel_tol=1e-6)
    assert math.isclose(distill_loss(logits, targets, mask)[0].item(), ce.item(), rel_tol=1e-6)


# ---- data, training and the CLI on real tiny models and a real teacher cache ----


MEMORIES = [
    Memory("m1", "simple", "to open a locked door: take the key, unlock the door with the key, open it"),
    Memory("m2", "simple", "look at the room first, then go to the exits one by one"),
    Memory("m3", "cooking", "read the cookbook, take the ingredients, prepare the meal, eat it"),
]


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert (result.exit_code == 0) == ok, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module")
def oracle_cache(tmp_path_factory, need_env):
    need_env("textworld")
    out = tmp_path_factory.mktemp("distill") / "oracle"
    run("teach", "--teacher", "oracle", "--env", "textworld", "--tasks", "simple", "--episodes", 4, "--out", out)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_model, oracle_cache):
    """A tiny llama with the student's tokenizer, pretrained by `distill --kd off --adapter full`
    on the oracle's episodes (as the demo does) and saved as a plain mlx-lm model."""
    root = tmp_path_factory.mktemp("distill")
    raw = make_tiny_model(root / "raw", "llama", 2, 64, seed=3, tokenizer_from=tiny_model)
    run(
        "distill",
        "--student",
        raw,
        "--cache",
        oracle_cache,
        "--out",
        root / "full",
        "--kd",
        "off",
        "--adapter",
        "full",
        "--num-layers",
        -1,
        "--iters",
        40,
        "--batch-size",
        2,
        "--learning-rate",
        3e-3,
        "--val-fraction",
        0,
    )
    model, _ = load(str(raw), str(root / "full"))
    out = root / "teacher"
    shutil.copytree(raw, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_model(out, model)
    return out


@pytest.fixture(scope="module")
def kd_cache(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("distill") / "cache"
    run(
        "teach",
        "--teacher",
        f"mlx:{teacher}",
        "--env",
        "textworld",
        "--tasks",
        "simple",
        "--episodes",
        4,
        "--max-steps",
        6,
        "--keep",
        "all",
        "--top-k",
        16,
        "--out",
        out,
    )
    return out


@pytest.fixture(scope="module")
def bank(tmp_path_factory, tiny_model):
    model, tokenizer = load(str(tiny_model))
    return build(MEMORIES, model, tokenizer, embedder=str(tiny_model)).save(tmp_path_factory.mktemp("distill") / "bank")


def distill(student, cache, out, *extra, ok=True):
    return run(
        "distill",
        "--student",
        student,
        "--cache",
        cache,
        "--out",
        out,
        "--all",
        "--batch-size",
        2,
        "--learning-rate",
        3e-3,
        "--warmup",
        0,
        *extra,
        ok=ok,
    )


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_data_is_the_run_time_layout_with_the_students_own_retrieval(kd_cache, tiny_model, bank):
    model, tokenizer = load(str(tiny_model))

    policy = ModelPolicy(
        model, tokenizer, load_bank(str(bank), model, tokenizer), PolicyOptions(memory_k=2, memory_filter="task")
    )
    data = build_dataset(
        kd_cache, tokenizer, kd=True, retrieve=policy.retrieve, only_success=False, val_fraction=0.3, progress=False
    )
    records = {r["id"]: r for r in read_cache_records(kd_cache)}
    assert len(data.train) + len(data.val) == len(records) and len(data.val) == 1
    assert not {e.id for e in data.train} & {e.id for e in data.val}  # split by episode
    for example in data.train + data.val:
        record = records[example.id]
        memories = policy.retrieve(record["task_description"], record["task"])
        assert len(memories) == 2 and all(m.task_type == "simple" for m in memories)
        ids, mask = tokenize_with_mask(
            tokenizer, episode_messages(Episode.from_json(record), [m.text for m in memories])
        )
        assert example.tokens.tolist() == ids and example.mask.tolist() == mask
        shard = load_shard(kd_cache, record)
        assert np.array_equal(example.topk_ids, shard["topk_ids"]) and np.array_equal(
            example.tokens[example.mask == 1], shard["input_ids"][shard["loss_mask"] == 1]
        )
    # too long: the oldest whole turns go, the last action and its rows stay
    longest = max(data.train + data.val, key=len)
    short = build_dataset(
        kd_cache,
        tokenizer,
        kd=True,
        only_success=False,
        val_fraction=0,
        max_seq_length=len(longest) - 150,
        progress=False,
    )
    cut = next(e for e in short.train if e.id == longest.id)
    full = load_shard(kd_cache, records[longest.id])
    n = int(cut.mask.sum())
    assert len(cut) <= len(longest) - 150 and 0 < n < full["loss_mask"].sum()
    assert np.array_equal(cut.topk_ids, full["topk_ids"][-n:])
    assert np.array_equal(cut.tokens[cut.mask == 1], full["input_ids"][full["loss_mask"] == 1][-n:])
    task = " ".join(records[longest.id]["task_description"].split())
    assert " ".join(tokenizer.decode(cut.tokens.tolist()).split()).count(task) == 1  # the prefix stays


def test_training_prompts_never_hold_a_memory_of_their_own_game(oracle_cache, tiny_model):
    """A trajectory memory of the episode being trained on would teach copying its answer; every other one is in."""
    model, tokenizer = load(str(tiny_model))
    episodes = read_cache_episodes(oracle_cache)
    memories = of_kind([], episodes, "trajectory")
    assert len(memories) == len(episodes) >= 3
    policy = ModelPolicy(
        model,
        tokenizer,
        build(memories, model, tokenizer, key="task+observation"),
        PolicyOptions(memory_k=len(memories)),
    )
    data = build_dataset(oracle_cache, tokenizer, kd=False, retrieve=policy.retrieve, val_fraction=0, progress=False)
    assert data.counts["memories_retrieved"] == len(episodes) * (len(memories) - 1)
    for example in data.train:
        prompt = tokenizer.decode(example.tokens.tolist())
        shown = {m.source[0] for m in memories if m.text in prompt}
        assert shown == {e.id for e in episodes} - {example.id} and game_of(example.id) not in {
            game_of(s) for s in shown
        }


def test_kd_training_lowers_val_loss_raises_agreement_and_loads_in_mlx_lm(kd_cache, tiny_model, tmp_path):
    out = tmp_path / "adapters"
    output = distill(
        tiny_model,
        kd_cache,
        out,
        "--iters",
        30,
        "--steps-per-eval",
        10,
        "--steps-per-report",
        5,
        "--val-fraction",
        0.34,
    )
    assert "top-1" in output
    rows = [r for r in metrics(out) if "val_loss" in r]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and rows[-1]["val_top1"] > rows[0]["val_top1"]
    summary = json.loads((out / "duomem.json").read_text())
    assert summary["world_size"] == 1 and summary["data"]["val"] == 1 and summary["losses"]["kd"] == "on"
    # only adapter parameters are trained, and plain mlx-lm loads them
    weights = mx.load(str(out / "adapters.safetensors"))
    assert weights and all(k.endswith((".lora_a", ".lora_b")) for k in weights)
    assert sum(v.size for v in weights.values()) == summary["trainable_parameters"]

    base, tokenizer = mlx_lm.load(str(tiny_model))
    adapted, _ = mlx_lm.load(str(tiny_model), adapter_path=str(out))
    probe = mx.array([tokenizer.encode("go north")])
    assert not mx.allclose(base(probe), adapted(probe)).item()
    # what the adapters change: plain mlx-lm, from the prompt of the teacher's first action, now begins it as the
    # teacher did
    messages = episode_messages(read_cache_episodes(kd_cache)[0])
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    first = messages[2]["content"].split()[:1]
    said = [mlx_lm.generate(m, tokenizer, prompt, max_tokens=4).split()[:1] for m in (base, adapted)]
    assert said[0] != first and said[1] == first, (said, first)
    assert (out / "loss.png").stat().st_size > 0
    run("distill", "--student", tiny_model, "--cache", kd_cache, "--out", out, ok=False)  # finished: refused


def cli_command(*args):
    return [sys.executable, "-m", "duomem_mlx", *map(str, args)]


def train_args(student, cache, out, iters):
    return (
        "distill",
        "--student",
        student,
        "--cache",
        cache,
        "--out",
        out,
        "--all",
        "--batch-size",
        2,
        "--iters",
        iters,
        "--learning-rate",
        3e-3,
        "--warmup",
        0,
        "--steps-per-report",
        1,
        "--val-fraction",
        0,
    )


def test_kill_9_and_resume_reach_the_same_losses(kd_cache, tiny_model, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        cli_command(*train_args(tiny_model, kd_cache, straight, 40), "--save-every", 4), check=True, capture_output=True
    )
    proc = subprocess.Popen(
        cli_command(*train_args(tiny_model, kd_cache, killed, 40), "--save-every", 4),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = killed / "checkpoint" / "state.json"
    while proc.poll() is None and not (state.exists() and json.loads(state.read_text())["step"] >= 8):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at = json.loads(state.read_text())["step"]
    assert at < 40 and not (killed / "duomem.json").exists()
    again = subprocess.run(
        cli_command(*train_args(tiny_model, kd_cache, killed, 40), "--save-every", 4), capture_output=True, text=True
    )
    assert again.returncode != 0 and "--resume" in again.stderr  # an unfinished run is not overwritten silently
    subprocess.run(
        cli_command(*train_args(tiny_model, kd_cache, killed, 40), "--save-every", 4, "--resume"),
        check=True,
        capture_output=True,
    )
    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 41))
    assert np.allclose([r["train_loss"] for r in a], [r["train_loss"] for r in b], rtol=1e-5)
    changed = subprocess.run(
        cli_command(*train_args(tiny_model, kd_cache, killed, 40), "--resume", "--alpha", 0.9),
        capture_output=True,
        text=True,
    )
    assert changed.returncode != 0 and "finished" in changed.stderr


def test_two_processes_match_one(kd_cache, tiny_model, tmp_path):
    """`mlx.launch --backend ring -n 2` on loopback: each process trains half of every global batch."""
    launch = Path(sys.executable).with_name("mlx.launch")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(cli_command(*train_args(tiny_model, kd_cache, one, 6)), check=True, capture_output=True)
    result = subprocess.run(
        [str(launch), "--backend", "ring", "-n", "2", "--", *cli_command(*train_args(tiny_model, kd_cache, two, 6))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((two / "duomem.json").read_text())["world_size"] == 2
    a, b = metrics(one), metrics(two)
    assert len(a) == len(b) == 6
    assert np.allclose([r["train_loss"] for r in a], [r["train_loss"] for r in b], rtol=1e-3)


NAN_ON_RANK_1 = """import sys
from duomem_mlx.cli import main
from duomem_mlx.distill import train

real = train.batch_for


def batch_for(data, args, step, world):  # step 4's loss is NaN on the second process alone
    batch, tokens = real(data, args, step, world)
    return (*batch[:-2], batch[-2] * float("nan"), batch[-1]) if world.rank() == 1 and step == 3 else batch, tokens


train.batch_for = batch_for
sys.argv[0] = "duomem-mlx"
main()
"""


def test_a_non_finite_loss_on_one_process_stops_them_all(oracle_cache, tiny_model, tmp_path):
    """Every rank reduces the flag before raising: none waits forever in the gradient average."""
    script, out = tmp_path / "nan_on_rank_1.py", tmp_path / "out"
    script.write_text(NAN_ON_RANK_1)
    launch = Path(sys.executable).with_name("mlx.launch")
    args = (*train_args(tiny_model, oracle_cache, out, 6), "--kd", "off", "--save-every", 2)
    result = subprocess.run(
        [str(launch), "--backend", "ring", "-n", "2", "--", sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in result.stderr, result.stderr[-2000:]  # mlx.launch exits 0 whatever its processes do
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("Error: "))
    assert [e.split(" at step 4;")[0] for e in errors] == [
        "Error: the loss became nan",
        "Error: the loss became non-finite on 1 of 2 processes",
    ], result.stderr[-2000:]
    assert all("(step 2) is intact" in e for e in errors)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "0000002.adapters.safetensors",
        "0000002.optimizer.safetensors",
        "state.json",
    ]


def test_memory_bank_is_rebuilt_for_the_adapters_and_eval_uses_it(kd_cache, tiny_model, bank, tmp_path):
    out = tmp_path / "adapters"
    distill(tiny_model, kd_cache, out, "--iters", 3, "--memory-bank", bank, "--memory-k", 2, "--val-fraction", 0)
    summary = json.loads((out / "duomem.json").read_text())
    assert (
        summary["memory"]["mode"] == "other" and summary["data"]["memories_retrieved"] == 2 * summary["data"]["train"]
    )
    # no --memory: OUT/memory, no fingerprint error
    policy = ModelPolicy.from_options(str(tiny_model), PolicyOptions(adapter_path=str(out)))
    assert policy.bank is not None and len(policy.bank) == len(MEMORIES)
    assert sorted(m.id for m in policy.retrieve("open the locked door", "simple")) == [
        "m1",
        "m2",
        "m3",
    ]  # k = 3, any type
    policy.memory_filter = "task"
    assert sorted(m.id for m in policy.retrieve("open the locked door", "simple")) == ["m1", "m2"]

    with pytest.raises(DuomemError, match="another embedder"):
        # the base bank does not fit
        ModelPolicy.from_options(str(tiny_model), PolicyOptions(adapter_path=str(out), memory_bank=str(bank)))


def test_distill_and_the_agent_retrieve_through_one_function_with_the_same_arguments(
    oracle_cache, tiny_model, bank, tmp_path, monkeypatch
):
    calls, real = [], retrieval.retrieve

    def spy(
        bank,
        model,
        tokenizer,
        query,
        task_type=None,
        *,
        k,
        memory_filter="none",
        observation="",
        exclude_games=frozenset(),
    ):
        calls.append((query, task_type, k, memory_filter, observation, exclude_games))
        return real(
            bank,
            model,
            tokenizer,
            query,
            task_type,
            k=k,
            memory_filter=memory_filter,
            observation=observation,
            exclude_games=exclude_games,
        )

    monkeypatch.setattr(retrieval, "retrieve", spy)
    out = tmp_path / "adapters"
    distill(
        tiny_model,
        oracle_cache,
        out,
        "--kd",
        "off",
        "--iters",
        1,
        "--val-fraction",
        0,
        "--memory-bank",
        bank,
        "--memory-k",
        2,
        "--memory-filter",
        "task",
    )
    records = read_cache_records(oracle_cache)
    assert calls == [
        (r["task_description"], r["task"], 2, "task", r["steps"][0]["observation"], {r["id"].rsplit("/", 1)[0]})
        for r in records
    ]
    assert json.loads((out / "duomem.json").read_text())["memory"]["filter"] == "task"
    calls.clear()
    policy = ModelPolicy.from_options(
        str(tiny_model), PolicyOptions(adapter_path=str(out), memory_k=2, memory_filter="task")
    )
    first = Episode.from_json(records[0]).steps[0]
    policy.start(
        None,
        TaskSpec("textworld", records[0]["task"], 0),
        records[0]["task_description"],
        StepResult(first.observation, []),
    )
    assert calls == [
        (
            records[0]["task_description"],
            records[0]["task"],
            2,
            "task",
            first.observation,
            {f"textworld/{records[0]['task']}/0"},
        )
    ]


def test_retrieval_accuracy_on_a_teacher_cache(oracle_cache, tiny_model, bank):
    records = read_cache_records(oracle_cache)
    share = accuracy(
        MemoryBank.load(bank), *load(str(tiny_model)), [(r["task_description"], "", r["task"]) for r in records]
    )
    output = run("memory", "search", bank, "--accuracy-on", oracle_cache)
    assert output == f"top-1 task type accuracy {share:.1%} over {len(records)} episodes\n"


def test_oracle_cache_trains_with_kd_off_and_bad_inputs_say_how(oracle_cache, kd_cache, tiny_model, tmp_path):
    output = run("distill", "--student", tiny_model, "--cache", oracle_cache, "--out", tmp_path / "x", ok=False)
    assert "--kd off" in output and not (tmp_path / "x" / "adapters.safetensors").exists()
    out = tmp_path / "ce"
    distill(tiny_model, oracle_cache, out, "--kd", "off", "--iters", 4, "--val-fraction", 0.25)
    assert json.loads((out / "duomem.json").read_text())["data"]["train"] == 3
    assert "no manifest.json" in run(
        "distill", "--student", tiny_model, "--cache", tmp_path, "--out", tmp_path / "y", ok=False
    )
    other = make_tiny_model(tmp_path / "other", vocab_size=600)
    assert "--kd off" in run("distill", "--student", other, "--cache", kd_cache, "--out", tmp_path / "z", ok=False)
    config = tmp_path / "c.yaml"
    config.write_text("iters: 3\nlearning_rat: 0.1\n")
    assert "learning_rat" in run(
        "distill", "-c", config, "--student", tiny_model, "--cache", kd_cache, "--out", tmp_path / "w", ok=False
    )
    assert "--batch-size" in run(
        "distill",
        "--student",
        tiny_model,
        "--cache",
        oracle_cache,
        "--kd",
        "off",
        "--batch-size",
        8,
        "--out",
        tmp_path / "v",
        ok=False,
    )


def test_distill_into_a_log_file_prints_progress_lines(oracle_cache, tiny_model, tmp_path):
    log = tmp_path / "distill.log"
    env = {**os.environ, "DUOMEM_PROGRESS_SECONDS": "0"}
    with open(log, "w") as f:
        subprocess.run(
            cli_command(*train_args(tiny_model, oracle_cache, tmp_path / "out", 3), "--kd", "off"),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            check=True,
            timeout=300,
        )
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("distill: ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"], text
    assert all("loss=" in line and "step" in line for line in lines) and "\r" not in text
