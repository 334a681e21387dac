"""The package's agent loop vs a ReAct loop over a real server a user would pick: `mlx_lm.server`
(`--peer mlx_lm`, on the same model directory) or llama.cpp's (`--peer llama_cpp`: the
OpenAI-compatible server of `llama-cpp-python[server]`, on the GGUF file the model was converted
from, or `--gguf`).

The peer runs on loopback with its default settings (prompt cache on: mlx-lm's LRU prompt cache,
llama.cpp's reuse of the longest common prefix of its context), as many threads as ours, and
gets one chat-completions request per step with the full history. Both sides play the same recorded
episode (a TextWorld or ScienceWorld oracle episode: its observations and admissible lists,
replayed), steps interleaved (alternating who goes first), after a warm-up.

Modes:
  equal-work  free greedy decoding of --reply-tokens tokens on both sides (the mechanism);
  agent       each side as in use: the peer decodes freely (stop at newline, max_tokens 48),
              ours with the package's defaults (constrained to the admissible commands).
A random-init model picks no real commands: --train-steps first fits the model briefly to
the recorded oracle trajectory (or pass --model a trained student). The system prompt (with a
~500-token memory block) is shared across episodes, as in an eval of a task type: both sides
reuse its KV cache (`--fresh-system-prompt`: neither can). `--vocab-rows 151936` pads a tiny
model's head to a real family's size, so each pass carries that head.

    python benchmarks/agent_vs_server.py --model M --mode agent --train-steps 60 --json out.json --plot out.png
    python benchmarks/agent_vs_server.py --model M-cooking --env textworld --task cooking --vocab-rows 151936 \
        --json out.json
    python benchmarks/agent_vs_server.py --model M --mode equal-work --steps 30 --repeats 3 --json out.json
    python benchmarks/agent_vs_server.py --model ~/.cache/duomem-mlx/models/smollm2-135m-instruct-float32 \
        --env twx --task cookingworld --train-steps 30 --peer llama_cpp --json out.json
"""

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from common import LlamaCppServer, MlxLmServer, model_config, versions, weight_bytes, write_json
from mlx.utils import tree_flatten
from mlx_lm.utils import save_model
from tqdm import tqdm

from duomem_mlx.convert.export import export_gguf, source_of
from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import play_episode
from duomem_mlx.envs.policies import OraclePolicy
from duomem_mlx.runtime.decode import DecodeOptions
from duomem_mlx.runtime.models import default_corpus, load
from duomem_mlx.runtime.prompt import episode_messages, prefix_messages, tokenize_with_mask
from duomem_mlx.runtime.session import Session


def record_episode(env_name: str, task: str | None, steps: int, seed: int):
    """An oracle episode of at least `steps` steps when the environment has one."""
    env = make_env(env_name)
    try:
        specs = env.task_specs([task] if task else None, "dev", 5, seed=seed)
        best = None
        for spec in specs:
            episode = play_episode(env, spec, OraclePolicy(), max_steps=steps)
            best = episode if best is None or len(episode.steps) > len(best.steps) else best
            if len(best.steps) >= steps:
                break
        return best
    finally:
        env.close()


def memory_block(seed: int = 0, words: int = 350) -> list[str]:
    rng = random.Random(seed)
    lines = [line for line in default_corpus().splitlines() if 20 < len(line) < 200]
    memories = []
    while sum(len(m.split()) for m in memories) < words:
        memories.append(" ".join(rng.sample(lines, 2)))
    return memories


def prefix(episode, memories, run: str, fresh_system: bool = False) -> list[dict]:
    """The episode's first messages, tagged with the run so that no side reuses a replayed
    episode's history: in the task message (the system prompt and its memories are shared
    across episodes, as in an eval of a task type), or with `fresh_system` in the system prompt."""
    messages = prefix_messages(episode.task_description, episode.steps[0].observation, memories)
    tagged = messages[0 if fresh_system else 1]
    tagged["content"] = f"Run {run}. " + tagged["content"]
    return messages


def train_briefly(model, tokenizer, messages: list[dict], steps: int, lr: float = 1e-3, layers: int | None = None):
    """Fit the model to one trajectory's actions (cross-entropy on the action tokens): all of it,
    or its last `layers` blocks (a 262k-row embedding makes a full fine-tune slow)."""
    ids, mask = tokenize_with_mask(tokenizer, messages)
    x, y, m = mx.array(ids[:-1])[None], mx.array(ids[1:])[None], mx.array(mask[1:], mx.float32)[None]

    def loss(model):
        return (nn.losses.cross_entropy(model(x), y) * m).sum() / m.sum()

    if layers:
        model.freeze()
        for block in model.layers[-layers:]:
            block.unfreeze()
    optimizer = optim.Adam(learning_rate=lr)
    step = nn.value_and_grad(model, loss)
    bar = tqdm(range(steps), desc="train on the oracle trajectory", disable=None)
    for _ in bar:
        value, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        bar.set_postfix(loss=f"{value.item():.3f}")
    model.unfreeze()


def save_trained(model, source: Path, out: Path) -> Path:
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    save_model(partial, model)
    config = json.loads((partial / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**config, "vocab_size": model.args.vocab_size}, indent=2) + "\n")
    partial.rename(out)
    return out


def pad_head(model, rows: int):
    """Zero rows appended to a tied vocabulary head up to `rows`, as real families pad theirs
    beyond the tokenizer (Qwen3: 151,936): each pass then carries a real family's head."""
    embed = model.model.embed_tokens
    if "lm_head" in model or not isinstance(embed, nn.Embedding) or rows <= embed.weight.shape[0]:
        raise SystemExit("Error: --vocab-rows needs a tied, unquantized head with fewer rows than asked")
    embed.weight = mx.concatenate(
        [embed.weight, mx.zeros((rows - embed.weight.shape[0], embed.weight.shape[1]), embed.weight.dtype)]
    )
    model.args.vocab_size = rows


def head_share(model) -> float:
    """The vocabulary head's part of the weights a decode pass reads."""
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens
    return head.weight.size / total


def peer_gguf(args, model_path: str, tmp: str) -> str:
    """The GGUF llama.cpp serves: --gguf as given, else the weights ours runs (trained, padded)
    exported with the metadata of the file --model was converted from."""
    if args.gguf:
        return args.gguf
    out = Path(tmp) / f"peer.{args.gguf_type}.gguf"
    export_gguf(model_path, out, args.gguf_source or source_of(args.model), args.gguf_type)
    return str(out)


def run_episode(peer, session, episode, memories, steps, mode, reply_tokens, run, record, fresh_system=False):
    """One episode on both sides, steps interleaved; appends per-step rows to `record`."""
    messages = prefix(episode, memories, run, fresh_system)
    session.start(prefix(episode, memories, run, fresh_system))
    peer_body = {"max_tokens": 48, "stop": ["\n"]} if mode == "agent" else {"max_tokens": reply_tokens}
    peer_action = None
    for i in range(steps):
        state = episode.steps[i]

        def peer_step():
            nonlocal peer_action
            if i:
                messages.extend(
                    [
                        {"role": "assistant", "content": peer_action},
                        {"role": "user", "content": state.observation.strip()},
                    ]
                )
            start = time.perf_counter()
            reply = peer.chat(messages, **peer_body)
            seconds = time.perf_counter() - start
            text = (reply["choices"][0]["message"]["content"] or "").strip()  # None: an empty reply
            peer_action = text.split("\n")[0].strip() if mode == "agent" else text
            usage = reply["usage"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")  # llama-cpp-python does not say
            return seconds, None if cached is None else usage["prompt_tokens"] - cached, usage["completion_tokens"]

        def our_step():
            before = (session.prefill_tokens, session.decode_tokens, session.decode_stats.forward_passes)
            start = time.perf_counter()
            if i:
                session.append([{"role": "user", "content": state.observation.strip()}])
            action = session.generate(state.admissible)
            seconds = time.perf_counter() - start
            return (
                action,
                seconds,
                session.prefill_tokens - before[0],
                session.decode_tokens - before[1],
                session.decode_stats.forward_passes - before[2],
            )

        if i % 2:
            ours = our_step()
            peer_row = peer_step()
        else:
            peer_row = peer_step()
            ours = our_step()
        if record is not None:
            record.append(
                {
                    "peer_ms": peer_row[0] * 1000,
                    "peer_prefill": peer_row[1],
                    "peer_decode": peer_row[2],
                    "ours_ms": ours[1] * 1000,
                    "ours_prefill": ours[2],
                    "ours_decode": ours[3],
                    "ours_passes": ours[4],
                    "same": peer_action == ours[0],
                    "peer_action": peer_action,
                    "ours_action": ours[0],
                    "peer_admissible": peer_action in (state.admissible or ()),
                }
            )


def mean_or_none(values: list) -> float | None:
    return None if None in values else round(statistics.fmean(values), 1)


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        "mean": round(statistics.fmean(ordered), 2),
    }


def plot(rows: list[dict], path: str, title: str, peer: str):
    import matplotlib  # noqa: PLC0415 (optional: the [plot] extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after matplotlib.use)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["peer_ms"] for r in rows], label=f"{peer} (prompt cache on)")
    ax.plot([r["ours_ms"] for r in rows], label="duomem-mlx Session")
    ax.set(xlabel="step (all repeats)", ylabel="ms per step", title=title)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local mlx-lm model directory")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--mode", choices=["equal-work", "agent"], default="agent")
    parser.add_argument("--peer", choices=["mlx_lm", "llama_cpp"], default="mlx_lm")
    parser.add_argument(
        "--gguf", help="llama_cpp: serve this GGUF file as it is (default: ours' weights exported, below)"
    )
    parser.add_argument(
        "--gguf-type",
        default="f32",
        choices=["f32", "f16", "q8_0", "q4_1", "q4_0"],
        help="llama_cpp: type of the matrices in the exported GGUF",
    )
    parser.add_argument(
        "--gguf-source",
        help="llama_cpp: the GGUF whose metadata the export copies (default: the one --model was converted from)",
    )
    parser.add_argument(
        "--no-repack",
        action="store_true",
        help="llama_cpp: no weight repacking or AMX buffers, as llama.cpp's --no-repack (0.3.36 built here "
        "segfaults on quantized files without it)",
    )
    parser.add_argument("--env", choices=["scienceworld", "textworld", "twx"], default="scienceworld")
    parser.add_argument("--task", help="task of the recorded episode (default: the env's first dev tasks)")
    parser.add_argument("--train-steps", type=int, default=0, help="first fit the model to the oracle trajectory")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of --train-steps")
    parser.add_argument(
        "--train-layers", type=int, help="--train-steps on the last N blocks only (default: the whole model)"
    )
    parser.add_argument(
        "--vocab-rows",
        type=int,
        help="pad the tied head with zero rows to this many, as real families pad theirs (Qwen3: 151936)",
    )
    parser.add_argument("--save-trained", help="keep the trained (padded) model here (pass it as --model next time)")
    parser.add_argument("--reply-tokens", type=int, default=8, help="equal-work: tokens per reply on both sides")
    parser.add_argument(
        "--fresh-system-prompt",
        action="store_true",
        help="tag each run's system prompt, so neither side reuses it (default: shared, as in an eval)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--plot", help="write a PNG of per-step latency")
    args = parser.parse_args()
    if args.save_trained and Path(args.save_trained).exists():
        raise SystemExit(f"Error: --save-trained {args.save_trained} exists; pass a new directory")

    episode = record_episode(args.env, args.task, args.steps, args.seed)
    steps = min(args.steps, len(episode.steps))
    memories = memory_block(args.seed)
    model, tokenizer = load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model
        if args.train_steps:
            trajectory = prefix(episode, memories, "0") + episode_messages(episode)[2:]
            train_briefly(model, tokenizer, trajectory, args.train_steps, args.lr, args.train_layers)
        if args.vocab_rows:
            pad_head(model, args.vocab_rows)
        if args.train_steps or args.vocab_rows:
            model_path = str(save_trained(model, Path(args.model), Path(args.save_trained or Path(tmp) / "trained")))
        options = (
            DecodeOptions()
            if args.mode == "agent"
            else DecodeOptions(mode="free", max_tokens=args.reply_tokens, single_line=False)
        )
        session = Session(model, tokenizer, 8192, options)
        served = {"model_config": model_config(model_path), "bytes_ours": weight_bytes(model_path)}
        peer = (
            MlxLmServer(model_path)
            if args.peer == "mlx_lm"
            else LlamaCppServer(peer_gguf(args, model_path, tmp), 8192, args.no_repack)
        )
        try:

            def play(n, run, rows):
                run_episode(
                    peer,
                    session,
                    episode,
                    memories,
                    n,
                    args.mode,
                    args.reply_tokens,
                    run,
                    rows,
                    args.fresh_system_prompt,
                )

            play(min(2, steps), "warm-up", None)
            rows: list[dict] = []
            for r in range(args.repeats):
                play(steps, str(r + 1), rows)
        finally:
            peer.close()
    result = report(rows, args, steps, model.args.vocab_size, head_share(model))
    result |= {
        "peer_server": peer.label,
        "peer_no_repack": args.no_repack if args.peer == "llama_cpp" else None,
        "model_config": served["model_config"],
        "bytes_of_weights": {"peer": peer.bytes, "ours": served["bytes_ours"]},
    }
    print_table(result)
    if args.plot:
        plot(rows, args.plot, f"{args.mode}: per-step latency, steps interleaved", peer.label)
    write_json(args.json, result)


def report(rows: list[dict], args, steps: int, model_rows: int, share: float) -> dict:
    n = len(rows)
    peer_ms, ours_ms = [r["peer_ms"] for r in rows], [r["ours_ms"] for r in rows]
    peer, ours = summary(peer_ms), summary(ours_ms)
    admissible = [r for r in rows if r["peer_admissible"]]
    return {
        "peer": args.peer,
        "mode": args.mode,
        "steps": steps,
        "repeats": args.repeats,
        "env": args.env,
        "model": args.model,
        "train_steps": args.train_steps,
        "vocab_rows": model_rows,
        "head_share_of_weights": round(share, 3),
        "system_prompt": "fresh per episode" if args.fresh_system_prompt else "shared across episodes",
        "peer_step_ms": peer,
        "ours_step_ms": ours,
        "speedup_mean": round(peer["mean"] / ours["mean"], 2),
        "speedup_p50": round(peer["p50"] / ours["p50"], 2),
        # the peer: at least one prefill pass, then one pass per generated token (mlx-lm feeds each
        # token before it yields it); ours: counted
        "forward_passes_per_action": {
            "peer": round(sum(1 + r["peer_decode"] for r in rows) / n, 2),
            "ours": round(sum(r["ours_passes"] for r in rows) / n, 2),
        },
        "prefill_tokens_per_step": {
            "peer": mean_or_none([r["peer_prefill"] for r in rows]),
            "ours": round(sum(r["ours_prefill"] for r in rows) / n, 1),
        },
        "decode_tokens_per_step": {
            "peer": round(sum(r["peer_decode"] for r in rows) / n, 1),
            "ours": round(sum(r["ours_decode"] for r in rows) / n, 1),
        },
        "same_actions": round(sum(r["same"] for r in rows) / n, 3),
        # ours is constrained to the admissible commands; the peer decodes freely
        "peer_admissible": round(sum(r["peer_admissible"] for r in rows) / n, 3),
        "same_actions_where_admissible": round(sum(r["same"] for r in admissible) / len(admissible), 3)
        if admissible
        else None,
        "actions": [[r["peer_action"], r["ours_action"]] for r in rows[:steps]],
        "step_ms": [[round(r["peer_ms"], 1), round(r["ours_ms"], 1)] for r in rows],  # peer, ours; all repeats
        **versions(),
    }


def print_table(result: dict):
    print(
        f"peer {result['peer_server']}, mode {result['mode']}, {result['steps']} steps x {result['repeats']}, system "
        f"prompt {result['system_prompt']}, "
        f"same actions {result['same_actions']} (peer admissible {result['peer_admissible']}); head "
        f"{result['vocab_rows']:,} rows, "
        f"{result['head_share_of_weights']:.0%} of the weights"
    )
    print(f"{'':26}{'peer':>10}{'ours':>10}")
    for key in ("p50", "p95", "mean"):
        print(f"{'ms per step ' + key:26}{result['peer_step_ms'][key]:10.1f}{result['ours_step_ms'][key]:10.1f}")
    for key in ("forward_passes_per_action", "prefill_tokens_per_step", "decode_tokens_per_step"):
        peer = "n/a" if result[key]["peer"] is None else f"{result[key]['peer']:.1f}"
        print(f"{key.replace('_', ' '):26}{peer:>10}{result[key]['ours']:10.1f}")
    print(
        f"speedup: mean {result['speedup_mean']}x, p50 {result['speedup_p50']}x (timings on a shared machine are noisy)"
    )


if __name__ == "__main__":
    main()
