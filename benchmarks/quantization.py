"""Quality and size after quantization: bf16, 8-bit, 4-bit and 4-bit calibrated packages of one
student, against the unquantized student in the same run.

Calibration uses a teacher cache of train-split episodes; greedy-action agreement is measured on
recorded dev-split episodes (other games, the recorded history at every step), after every
calibration epoch too (the curve); success rates come from playing dev episodes.

    python benchmarks/quantization.py --json benchmarks/results/quantization.json
    python benchmarks/quantization.py --model runs/student --adapters runs/adapters --episodes 10
    python benchmarks/quantization.py --model demo-out/duomem-f32 --env twx --tasks coin,simonsays,twc,arithmetic \
        --game-params 'coin:numLocations=2;twc:numItemsToPutAway=1' --group-size 32 --dtype float32
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import model_config, versions, write_json
from duomem_mlx.deploy.quantize import agreement, cache_episodes, greedy_actions, load_student, quantize_package
from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import play_episode
from duomem_mlx.eval import make_policy
from duomem_mlx.models import load, make_tiny_model


def teach(env: str, tasks: str | None, game_params: str | None, split: str, episodes: int, out: Path) -> str:
    options = (["--tasks", tasks] if tasks else []) + (["--game-params", game_params] if game_params else [])
    subprocess.run([sys.executable, "-m", "duomem_mlx", "teach", "--teacher", "oracle", "--env", env, *options, "--split", split,
                    "--episodes", str(episodes), "--keep-admissible", "--out", str(out)], check=True, capture_output=True)
    return str(out)


def success_rate(path: str, env_name: str, tasks: str | None, game_params: str | None, episodes: int, max_steps: int) -> float:
    env = make_env(env_name, game_params)
    try:
        policy = make_policy(f"model:{path}")
        played = [play_episode(env, spec, policy, max_steps) for spec in env.task_specs(tasks.split(",") if tasks else None, "dev", episodes, 0)]
    finally:
        env.close()
    return sum(e.success for e in played) / len(played)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="student (default: a 4-layer hidden-256 tiny model built here)")
    parser.add_argument("--adapters")
    parser.add_argument("--env", default="textworld")
    parser.add_argument("--tasks", help="comma-separated task types (default: all of the env's)")
    parser.add_argument("--game-params", help="twx: TextWorldExpress game parameters, as `eval --game-params`")
    parser.add_argument("--calibration-episodes", type=int, default=4)
    parser.add_argument("--agreement-episodes", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=3, help="dev episodes played per package for the success rate")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=4, help="calibration passes over its episodes")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="calibration learning rate")
    parser.add_argument("--dtype", default="bfloat16", help="of scales and unquantized weights (float32 is ~6x faster on a Linux CPU)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp())
    model_path = args.model or str(make_tiny_model(work / "student", layers=4, hidden=256))
    calibration_cache = teach(args.env, args.tasks, args.game_params, "train", args.calibration_episodes, work / "train-cache")
    recorded = cache_episodes(teach(args.env, args.tasks, args.game_params, "dev", args.agreement_episodes, work / "dev-cache"))

    student, tokenizer, _ = load_student(model_path, args.adapters)
    reference = greedy_actions(student, tokenizer, recorded)
    curve = []

    def on_epoch(epoch, loss, q_model):
        curve.append({"epoch": epoch, "loss": loss, "agreement": round(agreement(greedy_actions(q_model, tokenizer, recorded), reference), 4)})
        print(f"calibration epoch {epoch}: loss {loss:.4f}, agreement on the dev steps {curve[-1]['agreement']:.1%}")

    variants = {"bf16": dict(bits=16), "8bit": dict(bits=8), "4bit": dict(bits=4),
                "4bit_calibrated": dict(bits=4, calibrate_cache=calibration_cache, max_seq_length=args.max_seq_length,
                                        epochs=args.epochs, learning_rate=args.learning_rate, on_epoch=on_epoch)}
    rows = {}
    for name, options in variants.items():
        out = quantize_package(model_path, str(work / name), adapters=args.adapters, group_size=args.group_size,
                               dtype="bfloat16" if name == "bf16" else args.dtype, **options)
        meta = json.loads((out / "duomem.json").read_text())
        if name == "bf16":  # the size reference only
            rows[name] = {"bytes": meta["bytes"], "bits_per_weight": meta["bits_per_weight"], "agreement": None, "success_rate": None}
            continue
        actions = greedy_actions(*load(str(out)), recorded)
        rows[name] = {"bytes": meta["bytes"], "bits_per_weight": meta["bits_per_weight"],
                      "agreement": round(agreement(actions, reference), 4),
                      "success_rate": success_rate(str(out), args.env, args.tasks, args.game_params, args.episodes, args.max_steps) if args.episodes else None}
    unquantized = success_rate(model_path, args.env, args.tasks, args.game_params, args.episodes, args.max_steps) if args.episodes and not args.adapters else None
    if curve:
        rows["4bit_calibrated"]["curve"] = [{"epoch": 0, "loss": None, "agreement": rows["4bit"]["agreement"]}, *curve]
    for row in rows.values():
        row["bytes_ratio"] = round(row["bytes"] / rows["bf16"]["bytes"], 3)  # vs bf16
        row["success"] = row["success_rate"]

    print(f"{'package':18}{'MB':>9}{'x bf16':>8}{'bits/w':>8}{'agreement':>11}{'success':>9}")
    for name, row in rows.items():
        success = "-" if row["success_rate"] is None else f"{row['success_rate']:.0%}"
        agree = "-" if row["agreement"] is None else f"{row['agreement']:.1%}"
        print(f"{name:18}{row['bytes'] / 1e6:9.2f}{row['bytes_ratio']:8.3f}{row['bits_per_weight']:8.2f}{agree:>11}{success:>9}")
    steps = len(reference)
    print(f"agreement: greedy actions equal to the unquantized student's on {steps} recorded {args.env} dev steps"
          + (f"; unquantized success {unquantized:.0%}" if unquantized is not None else ""))
    if args.json:
        write_json(args.json, {"model": args.model or "tiny qwen3 (4 layers, hidden 256)", "model_config": model_config(model_path),
                               "env": args.env, "tasks": args.tasks, "game_params": args.game_params, "dtype": args.dtype, "steps": steps,
                               "group_size": args.group_size,
                               "success_episodes": args.episodes, "unquantized_success_rate": unquantized, "packages": rows,
                               **versions()})


if __name__ == "__main__":
    main()
