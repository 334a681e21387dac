"""The demo's table: results.json, results.md and a bar chart from `duomem-mlx eval` outputs.

    python scripts/demo_report.py --out converted/demo \\
        --variant student_base=runs/eval/base.json \\
        --variant duomem=runs/eval/duomem.json,adapters=runs/duomem,memory=runs/duomem/memory \\
        --teacher runs/eval/teacher.json [--bench runs/bench.json] [--stages runs/stages.tsv] \\
        [--student runs/student] [--retrieval runs/retrieval.json]

A variant is NAME=EVAL_JSON[,adapters=DIR][,memory=BANK][,log=EVAL_LOG]; the log defaults to
EVAL_JSON with .jsonl and gives tokens per step. Trainable parameters come from the adapters'
duomem.json, memory size is the bank's bytes on disk."""

import argparse
import json
from pathlib import Path

PAPER = {"student_base": 4.3, "student_memory": None, "student_lora": None, "duomem": 77.9, "teacher": 87.1}


def dir_bytes(path: str | None) -> int:
    if not path or not Path(path).exists():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def trainable(adapters: str | None) -> int:
    if not adapters:
        return 0
    meta = json.loads((Path(adapters) / "duomem.json").read_text())
    return int(meta.get("trainable_parameters", 0))


def variant(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition("=")
    path, *options = rest.split(",")
    options = dict(o.split("=", 1) for o in options)
    result = json.loads(Path(path).read_text())
    log = Path(options.get("log", Path(path).with_suffix(".jsonl")))
    episodes = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    steps = sum(len(e["steps"]) for e in episodes)
    tokens = sum(e["stats"].get("prefill_tokens", 0) + e["stats"].get("decode_tokens", 0) for e in episodes)
    n = len(result["episodes"])
    return name, {
        "success_rate": result["success_rate"],
        "mean_score": round(result["mean_score"], 3),
        "episodes": n,
        "successes": sum(e["success"] for e in result["episodes"]),
        "trainable_params": trainable(options.get("adapters")),
        "memory_bytes": dir_bytes(options.get("memory")),
        "seconds_per_episode": round(sum(e["seconds"] for e in result["episodes"]) / max(n, 1), 3),
        "tokens_per_step": round(tokens / steps, 1) if tokens else None,  # None: a policy without a model
        "mean_steps": round(steps / len(episodes), 2) if episodes else None,
        "per_task": {task: row["success_rate"] for task, row in sorted(result.get("per_task", {}).items())},
    }


def student_info(path: str | None) -> dict | None:
    if not path:
        return None
    config = json.loads((Path(path) / "config.json").read_text())
    return {"model": str(path), "hidden_size": config.get("hidden_size"), "num_hidden_layers": config.get("num_hidden_layers")}


def per_task_table(variants: dict) -> str:
    tasks = sorted({t for v in variants.values() for t in v["per_task"]})
    rows = ["| variant | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, v in variants.items():
        rows.append(f"| {name} | " + " | ".join(f"{v['per_task'][t]:.0%}" if t in v["per_task"] else "-" for t in tasks) + " |")
    return "\n".join(rows)


def table(variants: dict) -> str:
    rows = ["| variant | success | score | trainable params | memory | s / episode | tokens / step | paper (ALFWorld) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        paper = PAPER.get(name)
        rows.append(f"| {name} | {v['success_rate']:.0%} ({v['successes']}/{v['episodes']}) | {v['mean_score']:.2f} | "
                    f"{v['trainable_params']:,} | {v['memory_bytes'] / 1e3:.1f} kB | {v['seconds_per_episode']:.2f} | "
                    f"{v['tokens_per_step'] or '-'} | {f'{paper}%' if paper is not None else '-'} |")
    return "\n".join(rows)


def plot(variants: dict, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(variants)
    panels = [("success on held-out games (%)", lambda v: 100 * v["success_rate"]),
              ("trainable parameters", lambda v: v["trainable_params"]),
              ("memory (kB)", lambda v: v["memory_bytes"] / 1e3),
              ("seconds per episode", lambda v: v["seconds_per_episode"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4))
    colors = ["#888" if n in ("teacher", "student_base") else "#3b7dd8" for n in names]
    for ax, (label, value) in zip(axes, panels):
        ax.bar(names, [value(variants[n]) for n in names], color=colors)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=40, labelsize=8)
    axes[0].set_ylim(0, 100)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", action="append", default=[], help="NAME=EVAL_JSON[,adapters=DIR][,memory=BANK][,log=LOG]")
    parser.add_argument("--teacher", required=True, help="EVAL_JSON[,memory=BANK] of the teacher")
    parser.add_argument("--bench", help="`duomem-mlx bench --json` output")
    parser.add_argument("--heldout", help="scripts/check_heldout.py --json output")
    parser.add_argument("--stages", help="tab-separated stage, wall seconds, CPU seconds")
    parser.add_argument("--student", help="the student model directory (its config.json)")
    parser.add_argument("--retrieval", help='JSON {"accuracy": share of held-out episodes whose top memory is of their task type, ...}')
    parser.add_argument("--title", default="DuoMem in miniature (held-out games)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--wall-clock", type=float)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = dict(map(variant, args.variant))
    _, teacher = variant("teacher=" + args.teacher)
    variants["teacher"] = teacher
    retrieval = json.loads(Path(args.retrieval).read_text()) if args.retrieval else {}
    stages = [line.split("\t") for line in Path(args.stages).read_text().splitlines()] if args.stages else []
    results = {
        "variants": variants, "teacher": teacher, "student": student_info(args.student),
        "retrieval_accuracy": retrieval.get("accuracy"), "retrieval": retrieval or None,
        "wall_clock_seconds": args.wall_clock, "seeds": [int(s) for s in args.seeds.split(",")],
        "stages": {name: {"seconds": float(wall), "cpu_seconds": float(cpu)} for name, wall, cpu in stages},
        "heldout": json.loads(Path(args.heldout).read_text()) if args.heldout else None,
        "bench": json.loads(Path(args.bench).read_text()) if args.bench else None,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"# {args.title}", "", table(variants), "", "Success per task type:", "", per_task_table(variants), ""]
    if retrieval:
        md += [f"Retrieval accuracy (top memory of the episode's own task type, by similarity alone): {retrieval['accuracy']:.0%}", ""]
    if stages:
        md += ["| stage | wall s | CPU s |", "|---|---|---|", *(f"| {name} | {float(w):.0f} | {float(c):.0f} |" for name, w, c in stages), ""]
    (out / "results.md").write_text("\n".join(md))
    plot(variants, out / "results.png", args.title)
    print(table(variants) + "\n\n" + per_task_table(variants))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")


if __name__ == "__main__":
    main()
