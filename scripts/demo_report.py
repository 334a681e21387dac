"""The demo's table: results.json, results.md and a bar chart from `duomem-mlx eval` outputs.

    python scripts/demo_report.py --out converted/demo \\
        --variant student_base=runs/eval/base.json \\
        --variant duomem=runs/eval/duomem.json,adapters=runs/duomem,memory=runs/duomem/memory \\
        --teacher runs/eval/teacher.json [--bench runs/bench.json] [--stages runs/stages.tsv] \\
        [--student runs/student] [--retrieval runs/retrieval.json]

A variant is NAME=EVAL_JSON[,adapters=DIR][,memory=BANK][,log=EVAL_LOG]; the log defaults to
EVAL_JSON with .jsonl and gives tokens per step and the tokens memories add. Trainable parameters
come from the adapters' duomem.json, memory size is the bank's bytes on disk. Every row is compared
with `duomem` on the games both played (paired wins and losses, McNemar's exact p); success rates
carry a 95% Wilson interval. The cost table is eval's `cost` block (an eval from before it has only
its seconds), and `cost_vs_teacher` the teacher's seconds and FLOPs per task over each row's."""

import argparse
import json
import math
from pathlib import Path

# The paper's rows (Qwen3-4B student, Qwen2.5-72B teacher, ALFWorld unseen), as reported from its tables.
PAPER = {
    "student_base": 4.3,
    "student_selfmem": 55.0,
    "student_memory": 56.4,
    "lora_selfmem": 72.1,
    "duomem": 77.9,
    "teacher": 87.1,
}
ORDER = [
    "student_base",
    "student_selfmem",
    "student_memory",
    "student_lora",
    "lora_selfmem",
    "duomem",
    "duomem_4bit",
    "teacher",
]


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
    memory_tokens = [e["stats"]["memory_tokens"] for e in episodes if "memory_tokens" in e["stats"]]
    n = len(result["episodes"])
    successes = sum(e["success"] for e in result["episodes"])
    return name, {
        "success_rate": result["success_rate"],
        "interval95": wilson(successes, n),
        "mean_score": round(result["mean_score"], 3),
        "episodes": n,
        "successes": successes,
        "games": {game(e): bool(e["success"]) for e in result["episodes"]},
        "trainable_params": trainable(options.get("adapters")),
        "memory_bytes": dir_bytes(options.get("memory")),
        "seconds_per_episode": round(sum(e["seconds"] for e in result["episodes"]) / max(n, 1), 3),
        "tokens_per_step": round(tokens / steps, 1) if tokens else None,  # None: a policy without a model
        "mean_steps": round(steps / len(episodes), 2) if episodes else None,
        "memory_tokens_per_episode": round(sum(memory_tokens) / len(memory_tokens), 1) if memory_tokens else 0,
        "per_task": {task: row["success_rate"] for task, row in sorted(result.get("per_task", {}).items())},
        "cost": cost(result),
    }


def cost(result: dict) -> dict:
    """A row's cost per task from eval's `cost` block; None for what an older eval did not record."""
    c, episodes = result.get("cost") or {}, result["episodes"]
    steps, seconds = sum(e["steps"] for e in episodes), sum(e["seconds"] for e in episodes)
    return {
        "seconds_per_task": round(seconds / len(episodes), 3) if episodes else None,
        "seconds_per_step": round(seconds / steps, 4) if steps else None,
        "forward_flops_per_task": c.get("forward_flops_per_task"),
        "peak_memory_bytes": c.get("peak_memory_bytes"),
        "peak_rss_bytes": c.get("peak_rss_bytes"),
        "model_bytes": c.get("model_bytes"),
        "bank_bytes": c.get("bank_bytes"),
    }


def vs_teacher(variants: dict) -> dict:
    """How many times cheaper than the teacher each row is, per task: in wall seconds and in FLOPs."""
    teacher = variants["teacher"]["cost"]

    def ratio(row: dict, key: str) -> float | None:
        return round(teacher[key] / row[key], 2) if teacher[key] and row[key] else None

    return {
        name: {
            "seconds": ratio(v["cost"], "seconds_per_task"),
            "forward_flops": ratio(v["cost"], "forward_flops_per_task"),
        }
        for name, v in variants.items()
    }


def game(episode: dict) -> str:
    return f"{episode['task']}/{episode['variation']}"


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    if not n:
        return [0.0, 1.0]
    p = successes / n
    centre, half = (
        (p + z * z / (2 * n)) / (1 + z * z / n),
        z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n),
    )
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: discordant pairs as a fair coin."""
    n = b + c
    if not n:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


def paired(variants: dict, against: str = "duomem") -> dict:
    """Each row against `against` on the games both played: its wins, its losses, p."""
    if against not in variants:
        return {}
    ref = variants[against]["games"]
    out = {}
    for name, v in variants.items():
        shared = sorted(set(ref) & set(v["games"]))
        if name == against or not shared:
            continue
        wins = sum(ref[g] and not v["games"][g] for g in shared)
        losses = sum(v["games"][g] and not ref[g] for g in shared)
        out[name] = {
            "games": len(shared),
            f"{against}_wins": wins,
            f"{against}_losses": losses,
            "difference_points": round(100 * (wins - losses) / len(shared), 1),
            "mcnemar_p": round(mcnemar_exact(wins, losses), 4),
        }
    return out


def unseen_rate(v: dict, adapter_tasks: set[str]) -> float | None:
    """Success on the task types no adapter trained on, pooled over their games."""
    games = [ok for g, ok in v["games"].items() if g.split("/")[0] not in adapter_tasks]
    return round(sum(games) / len(games), 4) if games and adapter_tasks else None


def paired_table(pairs: dict) -> str:
    rows = [
        "| row vs duomem | games | duomem wins | duomem loses | difference | McNemar exact p |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in pairs.items():
        rows.append(
            f"| {name} | {p['games']} | {p['duomem_wins']} | {p['duomem_losses']} | {p['difference_points']:+.1f} pts "
            f"| {p['mcnemar_p']:.3f} |"
        )
    return "\n".join(rows)


def student_info(path: str | None) -> dict | None:
    if not path:
        return None
    config = json.loads((Path(path) / "config.json").read_text())
    return {
        "model": str(path),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
    }


def per_task_table(variants: dict) -> str:
    tasks = sorted({t for v in variants.values() for t in v["per_task"]})
    rows = ["| variant | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, v in variants.items():
        rows.append(
            f"| {name} | " + " | ".join(f"{v['per_task'][t]:.0%}" if t in v["per_task"] else "-" for t in tasks) + " |"
        )
    return "\n".join(rows)


def table(variants: dict) -> str:
    rows = [
        "| variant | success (95% CI) | unseen types | score | trainable params | memory | memory tokens / episode | s "
        "/ episode | tokens / step | paper (ALFWorld) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        paper = PAPER.get(name)
        low, high = v["interval95"]
        unseen = f"{v['unseen_types']:.0%}" if v.get("unseen_types") is not None else "-"
        rows.append(
            f"| {name} | {v['success_rate']:.0%} ({v['successes']}/{v['episodes']}; {low:.0%}-{high:.0%}) | {unseen} | "
            f"{v['mean_score']:.2f} | {v['trainable_params']:,} | {v['memory_bytes'] / 1e3:.1f} kB | "
            f"{v['memory_tokens_per_episode']:.0f} | {v['seconds_per_episode']:.2f} | "
            f"{v['tokens_per_step'] or '-'} | {f'{paper}%' if paper is not None else '-'} |"
        )
    return "\n".join(rows)


def cost_table(variants: dict, ratios: dict) -> str:
    rows = [
        "| variant | s / task | s / step | GFLOPs / task | peak MLX memory | model + bank | x cheaper than the teacher "
        "(time; FLOPs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        c, r = v["cost"], ratios[name]
        on_disk = None if c["model_bytes"] is None else c["model_bytes"] + c["bank_bytes"]
        cells = [
            shown(c["seconds_per_task"], "{:.2f}"),
            shown(c["seconds_per_step"], "{:.3f}"),
            shown(c["forward_flops_per_task"], "{:.3g}", 1e9),
            shown(c["peak_memory_bytes"], "{:,.0f} MB", 1e6),
            shown(on_disk, "{:,.1f} MB", 1e6),
            f"{shown(r['seconds'], '{:.2f}x')}; {shown(r['forward_flops'], '{:.2f}x')}",
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def shown(value, form: str, scale: float = 1) -> str:
    return "-" if value is None else form.format(value / scale)


def plot(variants: dict, path: Path, title: str):
    import matplotlib  # noqa: PLC0415 (optional: the [plot] extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after matplotlib.use)

    names = list(variants)
    panels = [
        ("success on held-out games (%)", lambda v: 100 * v["success_rate"]),
        ("trainable parameters", lambda v: v["trainable_params"]),
        ("memory (kB)", lambda v: v["memory_bytes"] / 1e3),
        ("seconds per episode", lambda v: v["seconds_per_episode"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4))
    colors = ["#888" if n in ("teacher", "student_base") else "#3b7dd8" for n in names]
    for i, (ax, (label, value)) in enumerate(zip(axes, panels)):
        heights = [value(variants[n]) for n in names]
        errors = None
        if i == 0:  # the 95% interval of each success rate
            errors = [
                [h - 100 * variants[n]["interval95"][0] for n, h in zip(names, heights)],
                [100 * variants[n]["interval95"][1] - h for n, h in zip(names, heights)],
            ]
        ax.bar(names, heights, color=colors, yerr=errors, capsize=3)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=40, labelsize=8)
    axes[0].set_ylim(0, 100)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--variant", action="append", default=[], help="NAME=EVAL_JSON[,adapters=DIR][,memory=BANK][,log=LOG]"
    )
    parser.add_argument("--teacher", required=True, help="EVAL_JSON[,memory=BANK] of the teacher")
    parser.add_argument("--bench", help="`duomem-mlx bench --json` output")
    parser.add_argument("--heldout", help="scripts/check_heldout.py --json output")
    parser.add_argument("--stages", help="tab-separated stage, wall seconds, CPU seconds")
    parser.add_argument("--student", help="the student model directory (its config.json)")
    parser.add_argument(
        "--retrieval", help='JSON {"accuracy": share of held-out episodes whose top memory is of their task type, ...}'
    )
    parser.add_argument(
        "--adapter-tasks", default="", help="comma-separated task types the adapters trained on (the rest: unseen)"
    )
    parser.add_argument("--title", default="DuoMem in miniature (held-out games)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--wall-clock", type=float)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = dict(map(variant, args.variant))
    _, teacher = variant("teacher=" + args.teacher)
    variants["teacher"] = teacher
    variants = {
        name: variants[name] for name in sorted(variants, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    }
    adapter_tasks = {t for t in args.adapter_tasks.split(",") if t}
    for v in variants.values():
        v["unseen_types"] = unseen_rate(v, adapter_tasks)
    pairs = paired(variants)
    ratios = vs_teacher(variants)
    base, top = variants.get("student_base"), variants.get("duomem")
    gap = teacher["success_rate"] - base["success_rate"] if base else 0
    gap_recovered = round((top["success_rate"] - base["success_rate"]) / gap, 3) if base and top and gap > 0 else None
    retrieval = json.loads(Path(args.retrieval).read_text()) if args.retrieval else {}
    stages = [line.split("\t") for line in Path(args.stages).read_text().splitlines()] if args.stages else []
    results = {
        "variants": variants,
        "teacher": teacher,
        "student": student_info(args.student),
        "paired": pairs,
        "cost_vs_teacher": ratios,
        "gap_recovered": gap_recovered,
        "adapter_tasks": sorted(adapter_tasks),
        "unseen_tasks": sorted({g.split("/")[0] for v in variants.values() for g in v["games"]} - adapter_tasks)
        if adapter_tasks
        else [],
        "retrieval_accuracy": retrieval.get("accuracy"),
        "retrieval": retrieval or None,
        "wall_clock_seconds": args.wall_clock,
        "seeds": [int(s) for s in args.seeds.split(",")],
        "stages": {name: {"seconds": float(wall), "cpu_seconds": float(cpu)} for name, wall, cpu in stages},
        "heldout": json.loads(Path(args.heldout).read_text()) if args.heldout else None,
        "bench": json.loads(Path(args.bench).read_text()) if args.bench else None,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"# {args.title}", "", table(variants), "", "Cost per task (one run):", "", cost_table(variants, ratios), ""]
    md += ["Success per task type:", "", per_task_table(variants), ""]
    if pairs:
        md += [
            "Paired on the same games (McNemar's exact test; p < 0.05 is an effect, anything else is not):",
            "",
            paired_table(pairs),
            "",
        ]
    if gap_recovered is not None:
        md += [
            f"Gap recovered, (duomem - student_base) / (teacher - student_base): {gap_recovered:.2f} (paper: 0.89)",
            "",
        ]
    if retrieval:
        md += [
            "Retrieval accuracy (top memory of the episode's own task type, by similarity alone): "
            f"{retrieval['accuracy']:.0%}",
            "",
        ]
    if stages:
        md += [
            "| stage | wall s | CPU s |",
            "|---|---|---|",
            *(f"| {name} | {float(w):.0f} | {float(c):.0f} |" for name, w, c in stages),
            "",
        ]
    (out / "results.md").write_text("\n".join(md))
    plot(variants, out / "results.png", args.title)
    print(
        table(variants)
        + "\n\n"
        + cost_table(variants, ratios)
        + "\n\n"
        + per_task_table(variants)
        + ("\n\n" + paired_table(pairs) if pairs else "")
    )
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")


if __name__ == "__main__":
    main()
