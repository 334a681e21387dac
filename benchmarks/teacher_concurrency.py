"""Episodes a second of `duomem-mlx teach --teacher openai:` at --concurrency 1, 4, 16 against a
loopback server that answers from a fixed policy after a fixed latency (policy_server.py: what a
remote GPU server looks like from here), the cache bytes compared across N; a run where the server
fails a share of requests (429 with Retry-After, 503, dropped connections); a kill -9 with 16 in
flight, then --resume; and a real mlx_lm.server serving a tiny model at N = 1 and 4.

Environments are started inside the timed runs (TextWorld's games are generated before, once, into
the cache every run reads).

    python benchmarks/teacher_concurrency.py --json benchmarks/results/teacher_concurrency.json
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import policy_server  # noqa: E402
from agent_vs_server import MlxLmServer  # noqa: E402
from common import versions, write_json  # noqa: E402

from duomem_mlx.envs import make_env  # noqa: E402
from duomem_mlx.formats.teacher_cache import read_cache_records, verify  # noqa: E402
from duomem_mlx.runtime.models import make_tiny_model  # noqa: E402
from duomem_mlx.teacher.collect import collect  # noqa: E402
from duomem_mlx.teacher.options import TeachOptions  # noqa: E402


def cache_bytes(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes() for p in [out / "episodes.jsonl", *sorted((out / "shards").glob("*"))]
    }


def teach(args, url: str, model: Path, out: Path, concurrency: int, **more) -> None:
    options = TeachOptions(tasks=args.tasks, episodes=args.episodes, top_k=args.top_k, concurrency=concurrency, **more)
    collect(f"openai:{url}#{model}", args.env, str(out), options)


def timed(args, url, model, out, concurrency, **more) -> dict:
    start = time.perf_counter()
    teach(args, url, model, out, concurrency, **more)
    seconds = time.perf_counter() - start
    checked, problems = verify(out)
    return {
        "concurrency": concurrency,
        "seconds": round(seconds, 2),
        "episodes_per_s": round(args.episodes / seconds, 3),
        "kept": len(read_cache_records(out)),
        "verify": problems or f"ok: {checked} shards",
    }


def latency_runs(args, url, model, tmp) -> list[dict]:
    runs = []
    for n in args.concurrency:
        runs.append(timed(args, url, model, tmp / f"n{n}", n))
        runs[-1]["same_cache_as_n1"] = cache_bytes(tmp / f"n{n}") == cache_bytes(tmp / f"n{args.concurrency[0]}")
        print(
            f"N={n:<3} {runs[-1]['seconds']:>7.1f} s  {runs[-1]['episodes_per_s']:>6.2f} episodes/s  same cache: "
            f"{runs[-1]['same_cache_as_n1']}",
            flush=True,
        )
    return runs


def fault_run(args, gold, model, tmp, reference: Path) -> dict:
    with policy_server.running(gold, model, tmp, latency=args.latency, faults=args.faults, seed=1) as url:
        run = timed(args, url, model, tmp / "faults", 16)
        injected = policy_server.stats(url)
    manifest_failed = json.loads((tmp / "faults" / "manifest.json").read_text())["failed"]
    return {
        **run,
        "fault_share": args.faults,
        "injected": injected,
        "failed_episodes": len(manifest_failed),
        "same_cache_as_n1": cache_bytes(tmp / "faults") == cache_bytes(reference),
    }


def kill_resume(args, url, model, tmp, reference: Path) -> dict:
    """kill -9 once two episodes are written (16 in flight), then --resume with 16."""
    out = tmp / "killed"
    cli = [
        "teach",
        "--teacher",
        f"openai:{url}#{model}",
        "--env",
        args.env,
        "--episodes",
        str(args.episodes),
        "--top-k",
        str(args.top_k),
        "--concurrency",
        "16",
        "--out",
        str(out),
    ] + (["--tasks", ",".join(args.tasks)] if args.tasks else [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "duomem_mlx", *cli], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    lines = out / "episodes.jsonl"
    while proc.poll() is None and not (lines.exists() and lines.read_bytes().count(b"\n") >= 2):
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(read_cache_records(out, torn_ok=True))
    teach(args, url, model, out, 16, resume=True)
    checked, problems = verify(out)
    return {
        "killed_mid_run": killed,
        "written_at_kill": written,
        "same_cache_as_n1": cache_bytes(out) == cache_bytes(reference),
        "verify": problems or f"ok: {checked} shards",
    }


def mlx_lm_server(args, model, tmp) -> list[dict]:
    """A real mlx_lm.server on loopback serving the tiny model (its batch generator takes concurrent requests)."""
    server, runs = MlxLmServer(str(model)), []
    try:
        small = argparse.Namespace(**{**vars(args), "episodes": args.mlx_episodes})
        for n in (1, 4):
            runs.append(
                timed(
                    small,
                    f"http://127.0.0.1:{server.port}/v1",
                    model,
                    tmp / f"mlx{n}",
                    n,
                    keep="all",
                    max_steps=args.mlx_steps,
                )
            )
            runs[-1]["same_cache_as_n1"] = cache_bytes(tmp / f"mlx{n}") == cache_bytes(tmp / "mlx1")
            print(
                f"mlx_lm.server N={n}: {runs[-1]['episodes_per_s']:.2f} episodes/s  same cache: "
                f"{runs[-1]['same_cache_as_n1']}",
                flush=True,
            )
        return runs
    finally:
        server.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="textworld", choices=["textworld", "twx"])
    parser.add_argument(
        "--tasks", type=lambda s: s.split(","), help="comma-separated (default: every kind, alternating)"
    )
    parser.add_argument("--episodes", type=int, default=48)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the policy server takes per request")
    parser.add_argument("--concurrency", type=lambda s: [int(n) for n in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--faults", type=float, default=0.2, help="share of requests the fault run fails")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--mlx-episodes", type=int, default=8, help="0: no mlx_lm.server run")
    parser.add_argument("--mlx-steps", type=int, default=8)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = make_tiny_model(tmp / "model", seed=0, template="chatml")
        env = make_env(args.env)
        start = time.perf_counter()
        gold = policy_server.gold_table(env, env.task_specs(args.tasks, "train", args.episodes, 0))
        env.close()
        print(f"{len(gold)} games ready in {time.perf_counter() - start:.1f} s", flush=True)
        reference = tmp / f"n{args.concurrency[0]}"
        with policy_server.running(gold, model, tmp, latency=args.latency) as url:
            runs = latency_runs(args, url, model, tmp)
            killed = kill_resume(args, url, model, tmp, reference)
        print(
            f"kill -9 at {killed['written_at_kill']} written, --resume: same cache {killed['same_cache_as_n1']}",
            flush=True,
        )
        faults = fault_run(args, gold, model, tmp, reference)
        print(
            f"faults {args.faults:.0%}: {faults['injected']}, same cache {faults['same_cache_as_n1']}, "
            f"{faults['verify']}",
            flush=True,
        )
        mlx = mlx_lm_server(args, model, tmp) if args.mlx_episodes else []
    rate = {r["concurrency"]: r["episodes_per_s"] for r in runs}
    result = {
        "env": args.env,
        "tasks": args.tasks,
        "episodes": args.episodes,
        "latency_s": args.latency,
        "top_k": args.top_k,
        "latency_server": runs,
        "speedup": {f"{n}_vs_{runs[0]['concurrency']}": round(rate[n] / rate[runs[0]["concurrency"]], 2) for n in rate},
        "faults": faults,
        "kill_resume": killed,
        "mlx_lm_server": mlx,
        **versions(),
    }
    print(f"\n{'N':>4}{'seconds':>10}{'episodes/s':>12}{'speedup':>9}{'same cache':>12}")
    for r in runs:
        print(
            f"{r['concurrency']:>4}{r['seconds']:>10.1f}{r['episodes_per_s']:>12.2f}"
            f"{rate[r['concurrency']] / rate[runs[0]['concurrency']]:>9.1f}{str(r['same_cache_as_n1']):>12}"
        )
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
