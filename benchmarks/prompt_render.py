"""Host work per agent step to build the prompt's tokens, by chat template: the old layout
(render the whole chat twice per added message), a full render + tokenize (what a re-encoding
loop or `mlx_lm.server` does), and the Session's incremental `Rendered` (a window of the last
messages rendered, tokenized from the last added token). Same ~2.5k-token episode for all.

    python benchmarks/prompt_render.py --json benchmarks/results/prompt_render.json
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from agent_session import synthetic_episode

from duomem_mlx.runtime.decode import DecodeOptions
from duomem_mlx.runtime.models import TEMPLATES, load, make_tiny_model
from duomem_mlx.runtime.prompt import encode, prefix_messages, render
from duomem_mlx.runtime.session import Session


def old_segments(tokenizer, messages, n_new, thinking):
    """The previous Session: per added message, render the chat before and after it."""
    out = []
    for upto in range(len(messages) - n_new + 1, len(messages) + 1):
        before = render(tokenizer, messages[: upto - 1], False, thinking)
        after = render(tokenizer, messages[:upto], False, thinking)
        out += encode(tokenizer, after[len(before) :])
    gen = render(tokenizer, messages, True, thinking)
    return out + encode(tokenizer, gen[len(render(tokenizer, messages, False, thinking)) :])


def measure(model, tokenizer, steps, thinking):
    memories, task, observations, _ = synthetic_episode(steps)
    session = Session(model, tokenizer, 1 << 20, DecodeOptions(max_tokens=8), thinking=thinking)
    session.start(prefix_messages(task, observations[0], memories))
    times = {"old": [], "full": [], "incremental": []}
    session.prompt_ids()
    for i in range(steps):
        session.append(
            [
                {"role": "assistant", "content": f"take item {i} from table"},
                {"role": "user", "content": observations[i + 1]},
            ]
        )
        t0 = time.perf_counter()
        ids = session.prompt_ids()
        t1 = time.perf_counter()
        full = encode(tokenizer, render(tokenizer, session.messages, True, thinking))
        t2 = time.perf_counter()
        old_segments(tokenizer, session.messages, 2, thinking)
        t3 = time.perf_counter()
        assert ids == full, "incremental tokens differ from a full render"
        times["incremental"].append(t1 - t0)
        times["full"].append(t2 - t1)
        times["old"].append(t3 - t2)
    late = slice(steps - 10, steps)  # the last 10 steps: the chat is longest there
    ms = {k: statistics.mean(v[late]) * 1000 for k, v in times.items()}
    ms["incremental_first10"] = statistics.mean(times["incremental"][:10]) * 1000
    return len(full), ms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="~2.5k prompt tokens after 40 steps")
    parser.add_argument("--json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    rows = []
    print("ms per step over the last 10 steps (incr@10: incremental over the first 10, a short chat)")
    print(
        f"{'template':10}{'tokens':>8}{'old ms':>9}{'full ms':>9}{'incr ms':>9}{'incr@10':>9}"
        f"{'old/incr':>10}{'full/incr':>10}"
    )
    for template in TEMPLATES:
        model, tokenizer = load(str(make_tiny_model(root / template, template=template)))
        tokens, ms = measure(model, tokenizer, args.steps, thinking=False)
        rows.append(
            {
                "template": template,
                "prompt_tokens": tokens,
                **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
                "old_over_incremental": round(ms["old"] / ms["incremental"], 2),
                "full_over_incremental": round(ms["full"] / ms["incremental"], 2),
            }
        )
        r = rows[-1]
        print(
            f"{template:10}{tokens:8d}{ms['old']:9.2f}{ms['full']:9.2f}{ms['incremental']:9.2f}{ms['incremental_first10']:9.2f}"
            f"{r['old_over_incremental']:9.1f}x{r['full_over_incremental']:9.1f}x"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
