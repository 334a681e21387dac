"""Retrieval: the memories a model reads for a task, the one function the agent loop, chat and
`distill`'s training data call (so training and run time read the same memories), and how
often its top memory is of the query's own task type."""

from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.memories import query_text
from duomem_mlx.runtime.embed import embed
from duomem_mlx.runtime.options import FILTERS


def retrieve(
    bank,
    model,
    tokenizer,
    query: str,
    task_type: str | None = None,
    *,
    k: int,
    memory_filter: str = "none",
    observation: str = "",
    exclude_games: set[str] = frozenset(),
) -> list:
    """The k memories closest to the task `query` (with its first `observation` where the bank's
    keys hold one; top-k cosine in `model`'s space); with memory_filter "task", only those of
    `task_type`, unless the bank holds none of that type. Memories written from the games in
    `exclude_games` alone are left out (never the episode's own game's solution)."""
    if memory_filter not in FILTERS:
        raise DuomemError(f"unknown memory filter {memory_filter!r}; use one of {', '.join(FILTERS)}")
    if bank is None or k == 0:
        return []
    if getattr(bank, "checked", None) is not model:  # the fingerprint hashes the weights: once per model
        bank.check_embedder(model, tokenizer)
        bank.checked = model
    if memory_filter == "none" or not any(m.task_type == task_type for m in bank.memories):
        task_type = None
    vector = embed(model, tokenizer, [query_text(query, observation, bank.key)])[0]
    return [m for m, _ in bank.search(vector, k, task_type, exclude_games)]


def hits(bank, model, tokenizer, queries: list[tuple[str, str, str]]) -> list[bool]:
    """For each (task, first observation, true task type): is its top-1 memory, by similarity alone, of that type?"""
    if not queries:
        raise DuomemError("no queries to measure retrieval accuracy on")
    tops = [retrieve(bank, model, tokenizer, task, k=1, observation=observation) for task, observation, _ in queries]
    return [top[0].task_type == true for top, (*_, true) in zip(tops, queries)]


def accuracy(bank, model, tokenizer, queries: list[tuple[str, str, str]]) -> float:
    """The share of (task, first observation, true task type) whose top-1 memory, by similarity alone, has that type."""
    found = hits(bank, model, tokenizer, queries)
    return sum(found) / len(found)
