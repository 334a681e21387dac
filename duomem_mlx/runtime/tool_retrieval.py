"""Tool retrieval (TinyAgent's idea): offer a model the functions a user's turn needs instead of all
an environment offers, so the function docs, most of a BFCL prompt, shrink several-fold.

Each function doc is scored against the user's message by BM25 over its words (the name split on
`_`, the description, the parameter names); measured on BFCL's ground truth in
benchmarks/tool_retrieval.py, where it beats the model's own embedding. The environment may name
each function's companions (BFCL's: those its train split calls in the same turn), offered along
with it: the prerequisites a request never names. A `ToolPicker` keeps the functions it picked
earlier in the episode (turns reuse them), so the offered set only grows and the prompt's tools
block changes only where new ones are appended."""

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from duomem_mlx.envs.calls import parse_call

WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")  # camelCase and snake_case split
K1, B = 1.2, 0.75  # BM25's usual constants


def words(text: str) -> list[str]:
    """Lower-case words (`lockDoors`: lock, door), a plural's `s` dropped (`files` matches `file`)."""
    found = (w.lower() for w in WORD.findall(text))
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in found]


def tool_words(tool: dict) -> list[str]:
    parameters = tool.get("parameters", {}).get("properties", {})
    return words(" ".join([tool["name"], tool.get("description", ""), *parameters]))


def bm25(query: str, tools: list[dict]) -> list[float]:
    """Each tool's BM25 score for the query, document frequencies counted over `tools` themselves."""
    docs = [Counter(tool_words(t)) for t in tools]
    if not docs:
        return []
    mean_len = sum(sum(d.values()) for d in docs) / len(docs) or 1.0
    df = Counter(w for d in docs for w in d)
    scores = []
    for doc in docs:
        length, score = sum(doc.values()), 0.0
        for w in set(words(query)):
            if w in doc:
                idf = math.log(1 + (len(docs) - df[w] + 0.5) / (df[w] + 0.5))
                score += idf * doc[w] * (K1 + 1) / (doc[w] + K1 * (1 - B + B * length / mean_len))
        scores.append(score)
    return scores


def top_k(query: str, tools: list[dict], k: int) -> list[dict]:
    """The k tools that score best for the query (ties in the order given)."""
    scores = bm25(query, tools)
    order = sorted(range(len(tools)), key=lambda i: -scores[i])
    return [tools[i] for i in order[:k]]


@dataclass
class ToolPicker:
    """An episode's offered functions: the top k of each user turn, added to those picked before."""

    k: int
    scorer: Callable[[str, list[dict], int], list[dict]] = top_k  # (query, tools, k) -> the k best
    companions: dict[str, list[str]] = field(default_factory=dict)  # offered along with a picked function
    picked: list[str] = field(default_factory=list)  # names, in the order first picked
    top: list[str] = field(default_factory=list)  # the last turn's own picks

    def pick(self, offered: list[dict], query: str | None) -> list[dict]:
        """What to offer now: those picked so far, then the top k for `query` (None: a tool's result,
        no new turn) and their companions, not among them; only tools in `offered` (an environment's
        withheld ones never)."""
        by_name = {t["name"]: t for t in offered}
        if query:
            top = {t["name"] for t in self.scorer(query, offered, self.k)}
            top |= {c for f in top for c in self.companions.get(f, ())}
            self.top = [name for name in by_name if name in top]  # in the order offered: the same picks, one prompt
            self.picked += [name for name in self.top if name not in self.picked]
        return [by_name[name] for name in self.picked if name in by_name]


@dataclass
class Turn:
    called: set[str]  # the functions the expert calls in the turn
    top: set[str]  # the turn's own top k
    offered: list[dict]  # what ToolPicker offers: the picks of the episode's turns so far


def replay(env, spec, picker: ToolPicker) -> list[Turn]:
    """An episode's user turns, its expert's actions played, as ModelPolicy picks (a new turn
    after each text reply; the first is the task): turn and episode recall against the expert."""
    query, _ = env.reset(spec)
    turns, called = [], set()
    for action in env.expert_actions():
        if query is not None:
            offered, query = picker.pick(env.tools(), query), None
        call = parse_call(action)
        if call is not None:
            called.add(call.name)
        state = env.step(action)
        if call is None or state.done:
            turns.append(Turn(called, set(picker.top), offered))
            query, called = state.observation, set()
        if state.done:
            break
    return turns
