"""`duomem-mlx bench`: what a user feels, per package, measured side by side in one process.

Per package: load time, time to first action, prefill and decode tokens/s, per-step latency
(p50/p95), episode time, peak memory, bytes on disk, and the decode speed as a fraction of the
memory-bandwidth roofline (bandwidth / bytes read per decoded token). Without --env the agent
plays a synthetic episode (memory prefix, observations, admissible actions), so every figure
exists offline. Warm-up first, then `repeats` runs; medians."""

import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import click
import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import DuomemError

KEYS = ("load_seconds", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "step_latency_p50_ms",
        "step_latency_p95_ms", "episode_seconds", "peak_memory_mb", "model_bytes", "decode_roofline_fraction")


def synthetic_episode(steps: int, seed: int = 0):
    """(memories, task, observations, admissible sets) drawn from environment-like text."""
    from ..models import default_corpus

    rng = random.Random(seed)
    lines = [line for line in default_corpus().splitlines() if 20 < len(line) < 200]
    commands = sorted({line for line in lines if len(line.split()) <= 5})
    memories = [" ".join(rng.sample(lines, 4)) for _ in range(8)]
    observations = [" ".join(rng.sample(lines, 3)) for _ in range(steps + 1)]
    admissible = [rng.sample(commands, 12) for _ in range(steps)]
    return memories, "Your task is to boil water.", observations, admissible


def machine() -> dict:
    import mlx_lm

    chip = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        chip = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), chip)
    elif platform.system() == "Darwin":
        import subprocess

        chip = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout.strip() or chip
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"chip": chip, "cpus": os.cpu_count(), "memory_gb": round(memory / 2**30, 1), "os": platform.platform(),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "device": str(mx.default_device())}


def bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Achievable read bandwidth in bytes/s: the median time of a sum over a large array."""
    x = mx.random.uniform(shape=(megabytes * 2**20 // 4,))
    mx.eval(x)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        mx.eval(x.sum())
        times.append(time.perf_counter() - start)
    return x.nbytes / statistics.median(times[1:])


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def play_synthetic(model, tokenizer, steps: int, max_context: int, seed: int):
    """(step seconds, episode seconds, session) of one synthetic episode, constrained decoding."""
    from ..agent.decode import DecodeOptions
    from ..agent.prompt import prefix_messages
    from ..agent.session import Session

    memories, task, observations, admissible = synthetic_episode(steps, seed)
    session = Session(model, tokenizer, max_context, DecodeOptions(mode="constrained", max_tokens=16))
    start = time.perf_counter()
    session.start(prefix_messages(task, observations[0], memories))
    for i in range(steps):
        session.generate(admissible[i])
        session.append([{"role": "user", "content": observations[i + 1]}])
    return session.step_seconds, time.perf_counter() - start, session


def play_env(path: str, env_name: str, episodes: int, seed: int):
    """Real episodes through eval's loop: (step seconds of each episode, episode seconds)."""
    from ..envs import make_env
    from ..envs.base import play_episode
    from ..envs.policies import make_policy

    policy = make_policy(f"model:{path}", seed=seed)
    env = make_env(env_name)
    try:
        played = [play_episode(env, spec, policy, env.default_max_steps) for spec in env.task_specs(None, "dev", episodes, seed)]
    finally:
        env.close()
    return [e.stats.get("step_seconds", []) for e in played], [e.seconds for e in played]


def throughput(model, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) through mlx-lm's generate_step; EOS does not stop it."""
    from mlx_lm.generate import generate_step

    start = time.perf_counter()
    steps = generate_step(mx.array(prompt), model, max_tokens=decode_tokens + 1)
    next(steps)
    first = time.perf_counter()
    for _ in steps:
        pass
    end = time.perf_counter()
    return len(prompt) / (first - start), decode_tokens / (end - first)


def bytes_per_token(model, context: int) -> int:
    """Bytes a decoded token reads: every weight once (the embedding's one row aside, unless the
    head is tied to it) plus the KV cache at this context length."""
    params = dict(tree_flatten(model.parameters()))
    total = sum(p.nbytes for p in params.values())
    args = getattr(model, "args", None)
    if args is not None and not getattr(args, "tie_word_embeddings", True):
        total -= sum(p.nbytes for n, p in params.items() if "embed_tokens" in n)
    kv_heads = getattr(args, "num_key_value_heads", 0) or 0
    head_dim = getattr(args, "head_dim", None) or (args.hidden_size // args.num_attention_heads if args else 0)
    layers = len(getattr(model, "layers", []))
    return int(total + 2 * layers * kv_heads * head_dim * context * 2)


def bench_package(path: str, env_name: str | None = None, episodes: int = 1, steps: int = 20, repeats: int = 3,
                  max_context: int = 4096, seed: int = 0, bandwidth_bytes_s: float | None = None) -> dict:
    import mlx_lm

    from ..models import resolve

    source = resolve(path)
    mx.clear_cache()
    mx.reset_peak_memory()
    loads = []
    for _ in range(repeats):
        start = time.perf_counter()
        model, tokenizer = mlx_lm.load(source)
        mx.eval(model.parameters())
        loads.append(time.perf_counter() - start)
    play_synthetic(model, tokenizer, 2, max_context, seed + 1)  # warm-up
    if env_name:
        per_episode, episode_seconds = play_env(source, env_name, episodes, seed)
    else:
        runs = [play_synthetic(model, tokenizer, steps, max_context, seed) for _ in range(repeats)]
        per_episode, episode_seconds = [r[0] for r in runs], [r[1] for r in runs]
    if not any(per_episode):
        raise DuomemError(f"{path}: no step was played; use more --steps or another --env")
    prompt = play_synthetic(model, tokenizer, 1, max_context, seed)[2].fed[:512]
    rates = [throughput(model, prompt, 32) for _ in range(repeats)]
    decode = statistics.median(r[1] for r in rates)
    later_steps = [s for steps_ in per_episode for s in steps_[1:]] or [s for steps_ in per_episode for s in steps_]
    result = {
        "package": str(path),
        "load_seconds": statistics.median(loads),
        "ttft_ms": 1000 * statistics.median(s[0] for s in per_episode if s),
        "prefill_tokens_per_s": statistics.median(r[0] for r in rates),
        "decode_tokens_per_s": decode,
        "step_latency_p50_ms": 1000 * percentile(later_steps, 0.5),
        "step_latency_p95_ms": 1000 * percentile(later_steps, 0.95),
        "episode_seconds": statistics.median(episode_seconds),
        "peak_memory_mb": mx.get_peak_memory() / 2**20,
        "model_bytes": sum(f.stat().st_size for f in Path(source).glob("*.safetensors")),
        "bytes_per_decoded_token": bytes_per_token(model, len(prompt)),
        "episodes": len(per_episode),
        "steps": sum(map(len, per_episode)),
        "env": env_name or "synthetic",
    }
    if bandwidth_bytes_s:
        result["decode_roofline_fraction"] = decode / (bandwidth_bytes_s / result["bytes_per_decoded_token"])
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


def print_table(rows: list[dict]) -> None:
    names = [Path(r["package"]).name for r in rows]
    width = max(map(len, ["metric", *KEYS]))
    click.echo(f"{'metric':{width}}" + "".join(f"{n[:18]:>20}" for n in names))
    for key in KEYS:
        click.echo(f"{key:{width}}" + "".join(f"{r.get(key, float('nan')):>20.4g}" for r in rows))


def plot(rows: list[dict], out: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
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
    meta_path = Path(path) / "duomem.json"
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    meta.setdefault("results", {})["bench"] = {k: row[k] for k in KEYS if k in row}
    tmp = meta_path.with_name(".duomem.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(meta_path)


def run_bench(packages, env_name, episodes, steps, repeats, max_context, seed, json_out, plot_out, save) -> dict:
    from tqdm import tqdm

    bw = bandwidth()
    rows = [bench_package(p, env_name, episodes, steps, repeats, max_context, seed, bw)
            for p in tqdm(packages, desc="packages", unit="pkg", disable=None)]
    result = {"machine": {**machine(), "bandwidth_gb_s": round(bw / 1e9, 2)}, "packages": rows}
    print_table(rows)
    click.echo(f"memory bandwidth {bw / 1e9:.1f} GB/s on {result['machine']['chip']} ({result['machine']['device']})")
    if save:
        for p, row in zip(packages, rows):
            record(p, row)
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    if plot_out and not plot(rows, plot_out):
        click.echo("note: matplotlib is not installed; no plot written (pip install matplotlib)")
    click.echo(f"wrote {json_out}" + (f" and {plot_out}" if plot_out and Path(plot_out).exists() else ""))
    return result
