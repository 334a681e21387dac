"""Every quantization recipe of one student side by side (duomem_mlx/deploy/recipes.py): bits per
weight, bytes against bf16, greedy-action agreement with the float student, success on the same
games, CPU decode tokens/s.

The float32 student plays the dev games first (`eval`, its package's bank, `--memory-k`): its
success, and its episodes, whose every step each recipe's package replays (the float student's
history and memories in front, its own greedy action compared). Then each package plays the same
games with its own rebuilt bank. Recipes that measure the agent's chats use `--calibrate` (a
teacher cache of train-split games: other games). Rows of another run on the same games and
student stay in `--json` (recipes can run as separate processes).

    python benchmarks/quantization.py --json benchmarks/results/quantization_tiny.json --episodes 1 --max-steps 6
    python benchmarks/quantization.py --model demo-out/student --adapters demo-out/lora-selfmem \\
        --memory demo-out/duomem-bank --calibrate demo-out/teacher-cache --env twx \\
        --tasks coin,mapreader,simonsays,twc \\
        --game-params 'coin:numLocations=2;mapreader:numLocations=2,maxDistanceApart=1;twc:numItemsToPutAway=1' \\
        --max-steps 12 --memory-k 2 --episodes 15 --json benchmarks/results/quantization_smollm2.json

QLoRA (`--qlora-base`, `--qlora-adapters`): the demo's adapters trained again, on the 4-bit base
instead of the float one, so they learn around its rounding (mlx-lm trains LoRA over quantized
layers); the student's own memories rebuilt in that base's space, as `distill` requires:

    duomem-mlx quantize --model demo-out/student --bits 4 --out q/base4
    duomem-mlx memory build --memories demo-out/self-memories.jsonl --embedder q/base4 --out q/self-bank4
    duomem-mlx distill --student q/base4 --cache demo-out/teacher-cache --memory-bank q/self-bank4 --memory-k 2 \\
        --adapter lora --rank 16 --num-layers 8 --alpha 0.5 --learning-rate 5e-4 --batch-size 4 --iters 48 \\
        --val-fraction 0 --out q/qlora
    python benchmarks/quantization.py ...as above... --qlora-base q/base4 --qlora-adapters q/qlora
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import model_config, versions, write_json

from duomem_mlx.agent.eval import run_eval
from duomem_mlx.deploy.quantize import agreement, bank_source, greedy_actions, quantize_package
from duomem_mlx.deploy.recipes import RECIPES
from duomem_mlx.envs.base import Episode
from duomem_mlx.formats.bank import recorded_key
from duomem_mlx.formats.memories import read_memories
from duomem_mlx.runtime.embed import rebuild_bank
from duomem_mlx.runtime.models import load, make_tiny_model
from duomem_mlx.runtime.options import PolicyOptions


def teach(args, out: Path) -> str:
    options = (["--tasks", args.tasks] if args.tasks else []) + (
        ["--game-params", args.game_params] if args.game_params else []
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "duomem_mlx",
            "teach",
            "--teacher",
            "oracle",
            "--env",
            args.env,
            *options,
            "--split",
            "train",
            "--episodes",
            "4",
            "--keep-admissible",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return str(out)


def play(args, package: Path, log: Path, adapters: str | None = None, bank: Path | None = None) -> float:
    """Success on the dev games, the package's own bank in front (as `eval` plays it)."""
    tasks = args.tasks.split(",") if args.tasks else None
    return run_eval(
        args.env,
        tasks,
        "dev",
        args.episodes,
        f"model:{package}",
        PolicyOptions(adapter_path=adapters, memory_bank=bank and str(bank), memory_k=args.memory_k),
        args.max_steps,
        str(log.with_suffix(".json")),
        str(log),
        game_params=args.game_params,
    )["success_rate"]


def qlora_row(args, work: Path, memories_file: Path | None, episodes, memories, reference) -> dict:
    """Adapters trained on the 4-bit base itself (QLoRA: `distill --student BASE4`), run on it unfused,
    the teacher's memories embedded by that pair."""
    base, adapters = Path(args.qlora_base), Path(args.qlora_adapters)
    bank = work / "qlora4-bank"
    if memories_file and not (bank / "bank.json").is_file():
        rebuild_bank(
            read_memories(memories_file),
            str(base),
            bank,
            str(base.resolve()),
            recorded_key(memories_file.parent),
            adapters=adapters,
        )
    model, tokenizer = load(str(base), str(adapters))
    meta = json.loads((base / "duomem.json").read_text())
    return {
        "bytes": meta["bytes"] + (adapters / "adapters.safetensors").stat().st_size,
        "bits_per_weight": meta["bits_per_weight"],
        "adapters": str(adapters.resolve()),
        "agreement": round(agreement(greedy_actions(model, tokenizer, episodes, memories=memories), reference), 4),
        "success_rate": play(args, base, work / "qlora4.jsonl", str(adapters), bank if memories_file else None),
    }


def replayed(package: Path, log: Path) -> tuple[list, list, list[str]]:
    """(episodes, the memories read in front of each, every step's action) of an eval log."""
    texts = {}
    if (package / "memory" / "memories.jsonl").is_file():
        texts = {
            m["id"]: m["text"]
            for m in map(json.loads, (package / "memory" / "memories.jsonl").read_text().splitlines())
        }
    played = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    played = [e for e in played if e["steps"]]
    return (
        [Episode.from_json(e) for e in played],
        [[texts[i] for i in e.get("memories") or []] for e in played],
        [s["action"] for e in played for s in e["steps"]],
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="student (default: a 4-layer hidden-256 tiny model built here)")
    parser.add_argument("--adapters")
    parser.add_argument(
        "--memory",
        help="memory bank (or memories.jsonl) every package reads, rebuilt in its space (default: ADAPTERS/memory)",
    )
    parser.add_argument(
        "--qlora-base",
        help="a 4-bit package of --model without adapters (`quantize --bits 4`) that --qlora-adapters trained on",
    )
    parser.add_argument(
        "--qlora-adapters",
        help="adapters `distill --student QLORA_BASE` trained, as --adapters were on --model: rows "
        "qlora4 (unfused, on the 4-bit base) and qlora4-fused (fused and re-quantized, as `quantize` ships them)",
    )
    parser.add_argument(
        "--calibrate", help="teacher cache the data-driven recipes measure (default: 4 oracle train games a type)"
    )
    parser.add_argument(
        "--recipes", default=",".join(RECIPES), help="comma-separated, of: " + ", ".join(RECIPES) + " ('' for none)"
    )
    parser.add_argument("--env", default="textworld")
    parser.add_argument("--tasks", help="comma-separated task types (default: all of the env's)")
    parser.add_argument("--game-params", help="twx: TextWorldExpress game parameters, as `eval --game-params`")
    parser.add_argument("--episodes", type=int, default=3, help="dev games a task type, played by every package")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--memory-k", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=4, help="calibration passes over the cache's episodes")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="calibration learning rate")
    parser.add_argument(
        "--work", help="keep packages and logs here (default: a temp directory); the float student's games are reused"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]  # none: only the QLoRA rows, beside those --json holds
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    if bool(args.qlora_base) != bool(args.qlora_adapters):
        parser.error("--qlora-base and --qlora-adapters go together")

    work = Path(args.work or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    model_path = args.model or str(make_tiny_model(work / "student", layers=4, hidden=256))
    cache = args.calibrate or teach(args, work / "train-cache")
    games = {
        "model": model_path,
        "adapters": args.adapters,
        "memory": args.memory,
        "env": args.env,
        "tasks": args.tasks,
        "game_params": args.game_params,
        "split": "dev",
        "episodes_per_task": args.episodes,
        "max_steps": args.max_steps,
        "memory_k": args.memory_k,
    }
    previous = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
    rows = previous.get("packages", {}) if all(previous.get(k) == v for k, v in games.items()) else {}

    def package(
        name: str, model: str = model_path, adapters: str | None = args.adapters, **options
    ) -> tuple[Path, dict]:
        out = work / name
        if not (out / "duomem.json").is_file():
            quantize_package(
                model,
                str(out),
                adapters=adapters,
                memory=args.memory,
                force=True,
                max_seq_length=args.max_seq_length,
                **options,
            )
        return out, json.loads((out / "duomem.json").read_text())

    bf16 = package("bf16", bits=16, dtype="bfloat16")[1]["bytes"]
    floats, meta = package("float32", bits=16, dtype="float32")
    if not (work / "float32.jsonl").is_file():
        play(args, floats, work / "float32.jsonl")
    episodes, memories, reference = replayed(floats, work / "float32.jsonl")
    rows["float32"] = {
        "bytes": meta["bytes"],
        "bits_per_weight": meta["bits_per_weight"],
        "agreement": 1.0,
        "success_rate": round(sum(e.success for e in episodes) / len(episodes), 4),
    }

    def save(name: str) -> None:
        print(f"{name}: {rows[name]}", flush=True)
        for row in rows.values():
            row["bytes_vs_bf16"] = round(row["bytes"] / bf16, 3)
        if args.json:
            write_json(
                args.json,
                {
                    **games,
                    "model_config": model_config(str(floats)),
                    "calibration_cache": cache,
                    "steps": len(reference),
                    "games": len(episodes),
                    "bf16_bytes": bf16,
                    "packages": rows,
                    **versions(),
                },
            )

    # (row, recipe, what it quantizes): the QLoRA adapters fused into their 4-bit base are re-quantized at that base's
    # recipe
    packages = [(name, name, {}) for name in recipes]
    if args.qlora_base:
        packages.append(("qlora4-fused", "affine4", dict(model=args.qlora_base, adapters=args.qlora_adapters)))
    for name, recipe, source in packages:
        curve = []

        def on_epoch(epoch, loss, q_model):
            curve.append(
                {
                    "epoch": epoch,
                    "loss": loss,
                    "agreement": round(
                        agreement(greedy_actions(q_model, tokenizer, episodes, memories=memories), reference), 4
                    ),
                }
            )
            print(
                f"{name} calibration epoch {epoch}: loss {loss:.4f}, agreement on the dev steps "
                f"{curve[-1]['agreement']:.1%}",
                flush=True,
            )

        tokenizer = load(str(floats))[1]
        out, meta = package(
            name,
            bits=RECIPES[recipe].bits,
            recipe=recipe,
            calibrate_cache=cache if RECIPES[recipe].needs_data else None,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            on_epoch=on_epoch,
            **source,
        )
        model, tokenizer = load(str(out))
        rate = meta["results"].get("cpu_decode_tokens_per_s") or {}
        rows[name] = {
            "bytes": meta["bytes"],
            "bits_per_weight": meta["bits_per_weight"],
            "layers": meta["quantization"].get("layers"),
            "agreement": round(agreement(greedy_actions(model, tokenizer, episodes, memories=memories), reference), 4),
            "decode_tokens_per_s": rate.get(recipe),
            "float32_decode_tokens_per_s": rate.get("float32"),
            "success_rate": play(args, out, work / f"{name}.jsonl"),
        }
        if meta.get("calibration"):
            c = meta["calibration"]
            rows[name]["calibration"] = {
                k: c[k]
                for k in (
                    "episodes",
                    "epochs",
                    "learning_rate",
                    "margin",
                    "loss_per_epoch",
                    "agreement_before",
                    "agreement_after",
                )
            }
            if curve:
                rows[name]["curve"] = curve
        save(name)
    if args.qlora_base:
        rows["qlora4"] = qlora_row(
            args, work, bank_source(args.memory, args.adapters, model_path), episodes, memories, reference
        )
        save("qlora4")

    print(f"{'package':15}{'MB':>9}{'x bf16':>8}{'bits/w':>8}{'agreement':>11}{'success':>9}{'tok/s':>7}")
    for name, row in rows.items():
        speed = row.get("decode_tokens_per_s")
        print(
            f"{name:15}{row['bytes'] / 1e6:9.2f}{row['bytes_vs_bf16']:8.3f}{row['bits_per_weight']:8.2f}"
            f"{row['agreement']:>11.1%}"
            f"{row['success_rate']:>9.1%}{'-' if speed is None else f'{speed:.1f}':>7}"
        )
    print(
        f"agreement: greedy actions equal to the float32 student's on its {len(reference)} steps of {len(episodes)} "
        f"{args.env} dev games"
    )


if __name__ == "__main__":
    main()
