"""`duomem-mlx bench`: what a user feels, per package, measured side by side in one process.

Per package: load time, time to first action, prefill and decode tokens/s, per-step latency
(p50/p95), episode time, peak memory, bytes on disk, and the decode speed as a fraction of the
memory-bandwidth roofline (bandwidth / bytes read per decoded token). Without --env the agent
plays a synthetic episode (memory prefix, observations, admissible actions), so every figure
exists offline. Warm-up first, then `repeats` runs; medians. Cut short (Ctrl-C, SIGTERM,
--time-limit), it still writes what it measured, marked partial."""

import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from duomem_mlx.deploy.bandwidth import bandwidth
from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import play_episode
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats import manifest
from duomem_mlx.io import cache_root, check_destination, write_atomic
from duomem_mlx.progress import Progress
from duomem_mlx.runtime.decode import DecodeOptions
from duomem_mlx.runtime.gpu_memory import wired_limit
from duomem_mlx.runtime.models import default_corpus, load, resolve, size_of
from duomem_mlx.runtime.options import PolicyOptions
from duomem_mlx.runtime.policy import make_policy
from duomem_mlx.runtime.prompt import encode, prefix_messages, render
from duomem_mlx.runtime.session import Session

KEYS = (
    "load_seconds",
    "ttft_ms",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "step_latency_p50_ms",
    "step_latency_p95_ms",
    "episode_seconds",
    "peak_memory_mb",
    "model_bytes",
    "decode_roofline_fraction",
)
ENV_KEYS = ("episode_prefilled_tokens", "episode_restored_tokens")  # bench --env: real episodes' prompts


def synthetic_episode(steps: int, seed: int = 0, memories: int = 8):
    """(memories, task, observations, admissible sets) drawn from environment-like text."""
    rng = random.Random(seed)
    lines = [line for line in default_corpus().splitlines() if 20 < len(line) < 200]
    commands = sorted({line for line in lines if len(line.split()) <= 5})
    notes = [" ".join(rng.sample(lines, 4)) for _ in range(memories)]
    observations = [" ".join(rng.sample(lines, 3)) for _ in range(steps + 1)]
    admissible = [rng.sample(commands, 12) for _ in range(steps)]
    return notes, "Your task is to boil water.", observations, admissible


def machine() -> dict:
    chip = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        chip = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            chip,
        )
    elif platform.system() == "Darwin":
        chip = (
            subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip()
            or chip
        )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "chip": chip,
        "cpus": os.cpu_count(),
        "memory_gb": round(memory / 2**30, 1),
        "os": platform.platform(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "device": str(mx.default_device()),
    }


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def synthetic_prefix(tokenizer, memories: int, seed: int) -> list[int]:
    """The tokens of the synthetic episode's prefix (system, memories, task, first observation)."""
    notes, task, observations, _ = synthetic_episode(1, seed, memories)
    return encode(tokenizer, render(tokenizer, prefix_messages(task, observations[0], notes), True))


def play_synthetic(model, tokenizer, steps: int, max_context: int, seed: int, memories: int):
    """One synthetic episode, constrained decoding: yields the seconds of each step as it is played."""
    notes, task, observations, admissible = synthetic_episode(steps, seed, memories)
    session = Session(model, tokenizer, max_context, DecodeOptions(mode="constrained", max_tokens=16))
    session.start(prefix_messages(task, observations[0], notes))
    for i in range(steps):
        session.generate(admissible[i])
        session.append([{"role": "user", "content": observations[i + 1]}])
        yield session.step_seconds[-1]


def play_env(path: str, env_name: str, episodes: int, seed: int):
    """Real episodes through eval's loop: yields each as it ends (its stats: step seconds, tokens
    prefilled, tokens restored from a kept prefix state)."""
    policy = make_policy(f"model:{path}", PolicyOptions(seed=seed))
    env = make_env(env_name)
    try:
        for spec in env.task_specs(None, "dev", episodes, seed):
            episode = play_episode(env, spec, policy, env.default_max_steps)
            yield episode
    finally:
        env.close()


def throughput(model, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) through mlx-lm's generate_step; EOS does not stop it."""
    start = time.perf_counter()
    steps = generate_step(mx.array(prompt), model, max_tokens=decode_tokens + 1)
    next(steps)
    first = time.perf_counter()
    for _ in steps:
        pass
    end = time.perf_counter()
    return len(prompt) / (first - start), decode_tokens / (end - first)


HEADS = ("lm_head.", "output.", "embed_out.")  # mlx-lm's names of an output projection of its own


def bytes_per_token(model, context: int) -> int:
    """Bytes a decoded token reads: every weight once, plus the KV cache at this context length.
    An embedding the head is tied to is read whole, once, as the head; beside a head of its own,
    its lookup reads one row (not counted)."""
    params = dict(tree_flatten(model.parameters()))
    total = sum(p.nbytes for p in params.values())
    if any(n.startswith(HEADS) for n in params):
        total -= sum(p.nbytes for n, p in params.items() if "embed_tokens" in n)
    args = getattr(model, "args", None)
    kv_heads = getattr(args, "num_key_value_heads", 0) or 0
    head_dim = getattr(args, "head_dim", None) or (args.hidden_size // args.num_attention_heads if args else 0)
    layers = len(getattr(model, "layers", []))
    itemsize = max(
        p.dtype.size for p in params.values() if mx.issubdtype(p.dtype, mx.floating)
    )  # the activations' dtype
    return int(total + 2 * layers * kv_heads * head_dim * context * itemsize)


def roofline(decode_tokens_per_s: float, bytes_per_decoded_token: int, bandwidth_bytes_s: float) -> dict:
    """Decode speed as a fraction of what the memory bandwidth allows. Decode that reads faster
    than the probe (weights held in cache, a probe slowed by a busy machine) proves the probe low:
    its own rate is then the bound, so the fraction is 1 and `roofline_bound` says so."""
    read = decode_tokens_per_s * bytes_per_decoded_token
    bound = max(read, bandwidth_bytes_s)
    return {
        "decode_gb_s": read / 1e9,
        "decode_roofline_fraction": read / bound,
        "roofline_bound": "decode" if read > bandwidth_bytes_s else "probe",
    }


@dataclass
class Measured:
    """What bench has measured of one package so far: its row, whole or from a run cut short."""

    package: str
    env: str = "synthetic"
    loads: list = field(default_factory=list)
    episodes: list = field(default_factory=list)  # step seconds of each episode, filled as it plays
    episode_seconds: list = field(default_factory=list)  # of the episodes played to the end
    episode_tokens: list = field(default_factory=list)  # (prefilled, restored) of each real episode
    rates: list = field(default_factory=list)  # (prefill, decode) tokens/s of each throughput run
    model_bytes: int = 0
    bytes_per_token: int = 0
    model_config: dict = field(default_factory=dict)  # hidden_size, num_hidden_layers, vocab_size

    def row(self, bandwidth_bytes_s: float | None) -> dict:
        steps = [s for e in self.episodes for s in e]
        row = {"package": self.package, "model_config": self.model_config}
        if self.loads:
            row["load_seconds"] = statistics.median(self.loads)
        if steps:
            later = [s for e in self.episodes for s in e[1:]] or steps
            row |= {
                "ttft_ms": 1000 * statistics.median(e[0] for e in self.episodes if e),
                "step_latency_p50_ms": 1000 * percentile(later, 0.5),
                "step_latency_p95_ms": 1000 * percentile(later, 0.95),
            }
        if self.episode_seconds:
            row["episode_seconds"] = statistics.median(self.episode_seconds)
        if self.episode_tokens:
            row["episode_prefilled_tokens"] = statistics.mean(t[0] for t in self.episode_tokens)
            row["episode_restored_tokens"] = statistics.mean(t[1] for t in self.episode_tokens)
        if self.rates:
            row |= {
                "prefill_tokens_per_s": statistics.median(r[0] for r in self.rates),
                "decode_tokens_per_s": statistics.median(r[1] for r in self.rates),
            }
        row |= {
            "peak_memory_mb": mx.get_peak_memory() / 2**20,
            "model_bytes": self.model_bytes,
            "bytes_per_decoded_token": self.bytes_per_token,
        }
        if self.rates and bandwidth_bytes_s:
            row |= roofline(row["decode_tokens_per_s"], self.bytes_per_token, bandwidth_bytes_s)
        row |= {"episodes": sum(1 for e in self.episodes if e), "steps": len(steps), "env": self.env}
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


class TimeLimit(Exception):
    """--time-limit spent: the run stops where it is and writes what it measured."""


@wired_limit()
def bench_package(
    m: Measured,
    env_name: str | None,
    episodes: int,
    steps: int,
    repeats: int,
    max_tokens: int,
    max_context: int,
    seed: int,
    deadline: float,
) -> None:
    """Measure one package into `m`, a step at a time. The synthetic prefix (its memories) and the
    throughput prompt grow with `steps`, the decoded tokens with `max_tokens`; the warm-up is one
    step without memories: a slow model asked for a small run gets a small one."""
    source = resolve(m.package)
    memories = max(1, min(8, steps // 2))
    bar = Progress(
        total=repeats + 1 + (episodes if env_name else repeats * steps) + repeats,
        desc=Path(m.package).name,
        unit="step",
    )

    def done():
        bar.update()
        if time.monotonic() > deadline:
            raise TimeLimit

    try:
        mx.clear_cache()
        mx.reset_peak_memory()
        m.model_bytes = sum(f.stat().st_size for f in Path(source).glob("*.safetensors"))
        m.model_config = size_of(source)
        bar.set_postfix(phase="load")
        for _ in range(repeats):
            model = tokenizer = None  # the last load freed first: peak memory is one model's, as a user runs it
            start = time.perf_counter()
            model, tokenizer = load(source)
            mx.eval(model.parameters())
            m.loads.append(time.perf_counter() - start)
            done()
        prompt = synthetic_prefix(tokenizer, memories, seed)[:512]
        m.bytes_per_token = bytes_per_token(model, len(prompt))
        bar.set_postfix(phase="warm-up")
        for _ in play_synthetic(model, tokenizer, 1, max_context, seed + 1, memories=0):
            done()
        if not env_name:
            for r in range(repeats):
                bar.set_postfix(phase=f"episode {r + 1}/{repeats}")
                played, start = [], time.perf_counter()
                m.episodes.append(played)
                for seconds in play_synthetic(model, tokenizer, steps, max_context, seed, memories):
                    played.append(seconds)
                    done()
                m.episode_seconds.append(time.perf_counter() - start)
        for r in range(repeats):
            bar.set_postfix(phase=f"throughput {r + 1}/{repeats}")
            m.rates.append(throughput(model, prompt, max_tokens))
            done()
        if env_name:
            model = tokenizer = None  # eval's policy loads the package again, with its memory bank: one model at a time
            bar.set_postfix(phase="episodes")
            for episode in play_env(source, env_name, episodes, seed):
                m.episodes.append(episode.stats.get("step_seconds", []))
                m.episode_seconds.append(episode.seconds)
                m.episode_tokens.append((episode.stats["prefill_tokens"], episode.stats.get("restored_tokens", 0)))
                done()
        if not any(m.episodes):
            raise DuomemError(f"{m.package}: no step was played; use more --steps or another --env")
    finally:
        bar.close()


def print_table(rows: list[dict]) -> None:
    names = [Path(r["package"]).name for r in rows]
    width = max(map(len, ["metric", *KEYS]))
    print(f"{'metric':{width}}" + "".join(f"{n[:18]:>20}" for n in names))
    for key in KEYS + tuple(k for k in ENV_KEYS if any(k in r for r in rows)):
        print(f"{key:{width}}" + "".join(f"{r.get(key, float('nan')):>20.4g}" for r in rows))


def plot(rows: list[dict], out: str) -> bool:
    try:
        import matplotlib  # noqa: PLC0415 (optional: the [plot] extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 (after matplotlib.use)
    except ImportError:
        return False
    names = [Path(r["package"]).name for r in rows]
    keys = ["step_latency_p50_ms", "decode_tokens_per_s", "model_bytes", "decode_roofline_fraction"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for ax, key in zip(axes, keys):
        ax.bar(names, [r.get(key, 0) for r in rows], color="tab:blue")
        ax.set_title(key, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def record(path: str, row: dict) -> None:
    """Store the figures in the package's duomem.json (the model card's results table reads them)."""
    if not manifest.path(path).is_file():
        return
    meta = manifest.read(path, manifest.PACKAGE_FIX)
    meta["results"] = (meta.get("results") or {}) | {"bench": {k: row[k] for k in KEYS if k in row}}
    manifest.write(path, meta)


def measure(packages, env_name, episodes, steps, repeats, max_tokens, max_context, seed, time_limit) -> dict:
    """The results of every package. A run cut short (Ctrl-C, SIGTERM, the time limit) returns what
    it measured, marked partial: `stopped` says why and the package it cut is `partial`."""
    for path in packages:  # a bad path or id stops here, before the probe; a Hub id is downloaded here, untimed
        resolve(path)
    deadline = time.monotonic() + time_limit if time_limit else math.inf
    result = {"machine": machine(), "packages": []}
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl-C does
    try:
        probe = bandwidth()
        bw = probe["best"] * 1e9
        result["machine"] |= {"bandwidth_gb_s": probe["best"], "bandwidth_probe_gb_s": probe}
        for path in packages:
            m = Measured(path, env_name or "synthetic")
            try:
                bench_package(m, env_name, episodes, steps, repeats, max_tokens, max_context, seed, deadline)
            finally:
                result["packages"].append(m.row(bw))
    except (KeyboardInterrupt, TimeLimit) as e:
        result |= {"partial": True, "stopped": "time limit" if isinstance(e, TimeLimit) else "interrupted"}
        if result["packages"]:
            result["packages"][-1]["partial"] = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    return result


def run_bench(
    packages, env_name, episodes, steps, repeats, max_tokens, max_context, seed, time_limit, json_out, plot_out, save
) -> dict:
    check_destination(json_out, option="--json")
    result = measure(packages, env_name, episodes, steps, repeats, max_tokens, max_context, seed, time_limit)
    rows = result["packages"]
    print_table(rows)
    if "bandwidth_gb_s" in result["machine"]:
        kernels = ", ".join(
            f"{k} {v:.1f}" for k, v in result["machine"]["bandwidth_probe_gb_s"].items() if k not in ("best", "bytes")
        )
        print(
            f"memory bandwidth {result['machine']['bandwidth_gb_s']:.1f} GB/s on {result['machine']['chip']} "
            f"({result['machine']['device']}; the fastest of {kernels} GB/s; "
            f"cached in {cache_root() / 'bandwidth.json'})"
        )
    for row in rows:
        if row.get("roofline_bound") == "decode":
            print(
                f"note: {row['package']} decodes at {row['decode_gb_s']:.2f} GB/s, above the probe's: that rate is its "
                "roofline, fraction 1 (the probe read less: a busy machine, or weights held in cache)"
            )
    if save:
        for row in rows:
            if not row.get("partial"):
                record(row["package"], row)
    write_atomic(json_out, json.dumps(result, indent=2) + "\n")
    if plot_out and not plot(rows, plot_out):
        print("note: matplotlib is not installed; no plot written (pip install matplotlib)")
    print(f"wrote {json_out}" + (f" and {plot_out}" if plot_out and Path(plot_out).exists() else ""))
    where = f"{rows[-1]['package']} after {rows[-1]['steps']} steps" if rows else "before the first package"
    if result.get("stopped") == "interrupted":
        raise DuomemError(f"interrupted in {where}; what was measured is in {json_out}, marked partial")
    if result.get("stopped") == "time limit":
        print(f"note: --time-limit reached in {where}; {json_out} is marked partial")
    return result
