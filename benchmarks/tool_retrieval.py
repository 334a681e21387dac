"""Tool retrieval on BFCL's multi-turn entries: does offering each user turn only its top-k functions
keep the functions the ground truth calls, and how many prompt tokens does it save?

Each entry is played with its ground truth (runtime/tool_retrieval.py's `replay`: a new user turn
after each text reply, the functions the environment offers then, a miss_func entry's withheld one
from the turn that adds it); turns whose ground truth calls nothing are left out. Turn recall: the
share of turns whose calls all fall in a scorer's top k of that turn alone; episode recall: in the
union of the top k of the turns so far, what `eval --tool-k K` offers (ToolPicker). Scorers:
  bm25   runtime/tool_retrieval.py: the name split on `_`, the description and the parameter names
  embed  the model's own embedding (runtime/embed.py: mean-pooled final hidden states, cosine), on
         --embed-entries entries per category and split (slow on a CPU)
  co-use bm25's top k and their companions (envs/bfcl.py's `companions`: the functions the train split's
         ground truth calls in the same turn as one in at least half its turns, 3 at least: the
         prerequisites no request names, `startEngine` wants `pressBrakePedal`, `mv` a `cd`), what
         `--tool-k` offers on BFCL; learned on train, so train's rows are in-sample
  all    every function offered (the ground truth itself calls a withheld one once: miss_func_49)
Then the tools block's prompt tokens (with the tools minus without, each tokenizer's own rendering
through runtime/tools.py) at the first turn and the last, all functions vs bm25's and co-use's.

    python benchmarks/tool_retrieval.py --json benchmarks/results/tool_retrieval.json
"""

import argparse
import statistics
from pathlib import Path

import mlx.core as mx
from common import versions, write_json
from mlx_lm.utils import load_tokenizer

from duomem_mlx.envs import make_env
from duomem_mlx.envs.base import TaskSpec
from duomem_mlx.envs.bfcl import CATEGORIES, companions, split_indices
from duomem_mlx.runtime.embed import embed
from duomem_mlx.runtime.models import load
from duomem_mlx.runtime.prompt import encode, render
from duomem_mlx.runtime.tool_retrieval import ToolPicker, Turn, replay, tool_words, top_k
from duomem_mlx.runtime.tools import Tools

MODELS = Path.home() / ".cache/duomem-mlx/models"
SMOLLM2, QWEN_CODER = MODELS / "smollm2-135m-instruct-float32", MODELS / "qwen2.5-coder-0.5b-instruct-float32"
KS = (4, 6, 8, 12)
SPLITS = ("train", "dev", "test")


def specs(split: str, limit: int | None = None) -> list[TaskSpec]:
    """A split's entries, the first `limit` of each category's."""
    return [TaskSpec("bfcl", c, i, split) for c in CATEGORIES for i in split_indices(split)[c][:limit]]


class Embedder:
    """runtime/embed.py's vectors, each text embedded once."""

    def __init__(self, path: Path):
        self.model, self.tokenizer = load(str(path))
        self.vectors: dict[str, mx.array] = {}

    def top_k(self, query: str, tools: list[dict], k: int) -> list[dict]:
        texts = [" ".join(tool_words(t)) for t in tools]
        new = list(dict.fromkeys(t for t in [query, *texts] if t not in self.vectors))
        if new:
            self.vectors.update(zip(new, embed(self.model, self.tokenizer, new)))
        scores = (mx.stack([self.vectors[t] for t in texts]) @ self.vectors[query]).tolist()
        return [tools[i] for i in sorted(range(len(tools)), key=lambda i: -scores[i])[:k]]


def every_tool(query: str, tools: list[dict], k: int) -> list[dict]:
    return tools


def replays(env, scorer, companions: dict, split: str, k: int, limit: int | None = None) -> list[list[Turn]]:
    return [replay(env, spec, ToolPicker(k, scorer, companions)) for spec in specs(split, limit)]


def recall(episodes: list[list[Turn]]) -> dict:
    """Turn and episode recall over the turns that call something."""
    turns = [t for episode in episodes for t in episode if t.called]
    return {
        "turns": len(turns),
        "turn_recall": round(sum(t.called <= t.top for t in turns) / len(turns), 4),
        "episode_recall": round(sum(t.called <= {d["name"] for d in t.offered} for t in turns) / len(turns), 4),
        "mean_offered": round(statistics.mean(len(t.offered) for t in turns), 2),
    }


def block_tokens(tokenizer, tools: list[dict]) -> int:
    """The prompt tokens the tools add, in the family's format (the template's, or the system text)."""
    user = [{"role": "user", "content": "hi"}]
    with_tools = Tools(tokenizer, tools, True)
    bare = render(tokenizer, [Tools(tokenizer, [], True).system_message(), *user], True)
    full = render(tokenizer, [with_tools.system_message(), *user], True, tools=with_tools.template_tools)
    return len(encode(tokenizer, full)) - len(encode(tokenizer, bare))


def token_counts(tokenizer, episodes: list[list[Turn]]) -> dict:
    """Mean tools-block tokens at an episode's first turn and its last."""
    return {
        "first_turn": round(statistics.mean(block_tokens(tokenizer, e[0].offered) for e in episodes)),
        "last_turn": round(statistics.mean(block_tokens(tokenizer, e[-1].offered) for e in episodes)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed-entries", type=int, default=5, help="per category and split; 0: no embed scorer")
    parser.add_argument("--embedder", default=str(SMOLLM2), help="mlx-lm model directory (default: real SmolLM2)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    env, rows, played = make_env("bfcl"), [], {}
    scorers = [("all", every_tool, {}, None), ("bm25", top_k, {}, None), ("co-use", top_k, companions(), None)]
    if args.embed_entries:
        embedder = Embedder(Path(args.embedder))
        scorers += [("embed", embedder.top_k, {}, args.embed_entries), ("bm25", top_k, {}, args.embed_entries)]
    for name, scorer, together, limit in scorers:
        for split in SPLITS:
            for k in (0,) if name == "all" else KS:
                played[name, split, k, limit] = episodes = replays(env, scorer, together, split, k, limit)
                rows.append({"scorer": name, "split": split, "k": k, "entries_per_category": limit, **recall(episodes)})
                print(
                    f"{name:6} {split:5} k={k:<3} per-cat={limit or 'all':<4} turns={rows[-1]['turns']:<4} "
                    f"turn recall={rows[-1]['turn_recall']:.3f} episode recall={rows[-1]['episode_recall']:.3f} "
                    f"offered={rows[-1]['mean_offered']}",
                    flush=True,
                )
    tokens = {}
    for path in (SMOLLM2, QWEN_CODER):
        tokenizer, tokens[path.name] = load_tokenizer(path), {}
        for name, k in [("all", 0), *(("bm25", k) for k in KS), *(("co-use", k) for k in KS)]:
            episodes = [e for split in SPLITS for e in played[name, split, k, None]]
            counts = tokens[path.name][f"{name} k={k}"] = token_counts(tokenizer, episodes)
            print(
                f"{path.name} tools block, {name} k={k}: first turn {counts['first_turn']}, last {counts['last_turn']}"
            )
    write_json(args.json, {"versions": versions(), "recall": rows, "tools_block_tokens": tokens})


if __name__ == "__main__":
    main()
