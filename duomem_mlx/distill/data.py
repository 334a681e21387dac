"""Training data from a teacher cache: each kept episode becomes one sequence in exactly the
layout the agent sees at run time (`runtime/prompt.py`), with the memories the student would
retrieve prepended, and the cached top-k rows mapped to its masked tokens in order."""

from dataclasses import dataclass, field

import numpy as np

from duomem_mlx.envs.base import Episode
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.episodes import game_of
from duomem_mlx.formats.teacher_cache import check_shard, load_shard, read_cache_records, read_manifest
from duomem_mlx.progress import Progress
from duomem_mlx.runtime.prompt import tokenize_with_mask
from duomem_mlx.runtime.tools import episode_chat

PAD_TO = 32  # batch widths are multiples of this, so the compiled step sees few shapes


@dataclass
class Example:
    id: str
    tokens: np.ndarray  # int32 [T]
    mask: np.ndarray  # uint8 [T]: 1 on the tokens the loss trains
    topk_ids: np.ndarray | None = None  # int32 [N, k], N = mask.sum(); -1: no teacher distribution
    topk_logprobs: np.ndarray | None = None  # float16 [N, k]

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Dataset:
    train: list[Example]
    val: list[Example]
    top_k: int  # 0: CE only
    counts: dict = field(default_factory=dict)


def check_kd(manifest: dict, cache, student_fingerprint: str) -> None:
    """KD needs top-k rows in the student's own vocabulary; say how to train without them."""
    if not manifest.get("top_k"):
        raise DuomemError(
            f"{cache} holds no teacher distributions (teacher {manifest.get('teacher')}, top-k 0); "
            "pass --kd off to train on its actions with cross-entropy only"
        )
    if manifest.get("tokenizer_fingerprint") != student_fingerprint:
        raise DuomemError(
            f"the student's tokenizer differs from the teacher's in {cache} (fingerprint "
            f"{str(manifest.get('tokenizer_fingerprint'))[:12]}), so its top-k rows cannot be matched; "
            "pass --kd off to train on the re-tokenized text with cross-entropy only"
        )


def drop_turns(messages: list[dict], n: int) -> list[dict]:
    """The chat without its n oldest exchanges (action + following observation) after the
    prefix, as the session's window drops them."""
    return messages[:2] + messages[2 + 2 * n :]


def fit(tokenizer, messages: list[dict], max_len: int, tools: list[dict] | None = None):
    """(ids, mask) of the chat (with the template's `tools`), oldest whole turns dropped until it fits;
    None if it never does."""

    def tokenize(chat):
        return tokenize_with_mask(tokenizer, chat, tools=tools)

    ids, mask = tokenize(messages)
    if len(ids) <= max_len:
        return ids, mask
    lo, hi = 1, (len(messages) - 3) // 2  # the fewest drops that fit lie in [lo, hi]
    if hi < 1 or len(tokenize(drop_turns(messages, hi))[0]) > max_len:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenize(drop_turns(messages, mid))[0]) <= max_len:
            hi = mid
        else:
            lo = mid + 1
    return tokenize(drop_turns(messages, lo))


def fit_episode(tokenizer, episode: Episode, memories: list[str], max_len: int):
    messages, tools = episode_chat(tokenizer, episode, memories)
    return fit(tokenizer, messages, max_len, tools)


def teacher_rows(cache, record: dict, manifest: dict, tokens: np.ndarray, mask: np.ndarray):
    """The cached rows of the student's masked tokens: the last N rows of the episode (older
    turns dropped lose theirs), after checking the masked token ids are the teacher's."""
    arrays = load_shard(cache, record)
    problems = check_shard(arrays, record, manifest.get("top_k", 0), manifest.get("vocab_size"))
    if problems:
        raise DuomemError(f"{cache}/{record['shard']}: {problems[0]}; run `duomem-mlx cache verify {cache}`")
    theirs = arrays["input_ids"][arrays["loss_mask"] == 1]
    ours = tokens[mask == 1]
    if len(ours) > len(theirs) or not np.array_equal(theirs[len(theirs) - len(ours) :], ours):
        raise DuomemError(
            f"episode {record['id']}: the student's action tokens differ from the cached teacher's "
            "(another tokenizer or chat template?); pass --kd off or recollect the cache with this student's tokenizer"
        )
    n = len(ours)
    return arrays["topk_ids"][len(theirs) - n :], arrays["topk_logprobs"][len(theirs) - n :]


def episode_memories(retrieve, record: dict) -> list:
    steps = record.get("steps") or [{}]
    return retrieve(
        record.get("task_description", ""),
        record.get("task"),
        observation=steps[0].get("observation", ""),
        exclude_games={game_of(record["id"])},
    )


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A held-out validation split by episode (never by token), fixed by the seed."""
    n_val = int(round(val_fraction * len(examples)))
    if val_fraction > 0 and len(examples) >= 2:
        n_val = min(max(1, n_val), len(examples) - 1)
    order = np.random.default_rng(seed).permutation(len(examples))
    val = set(order[:n_val].tolist())
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


def build_dataset(
    cache,
    tokenizer,
    kd: bool,
    retrieve=None,
    only_success: bool = True,
    val_fraction: float = 0.1,
    max_seq_length: int = 4096,
    seed: int = 0,
    progress: bool = True,
    tasks: list[str] | None = None,
) -> Dataset:
    """Examples of the kept episodes (of `tasks` only, when given). `retrieve(query, task_type, observation=,
    exclude_games=)` is the student's own retrieval (`memory.retrieval.retrieve`, as the agent calls it); its
    memories go in front of each prompt, never one written from the episode's own game (no test game hands the
    student its own solution: it must carry a similar game's over to this one)."""
    manifest = read_manifest(cache)
    records = read_cache_records(cache)
    if tasks:
        unknown = sorted(set(tasks) - {r.get("task") for r in records})
        if unknown:
            raise DuomemError(
                f"{cache} has no episodes of task(s) {', '.join(unknown)}; "
                f"it has {', '.join(sorted({str(r.get('task')) for r in records}))}"
            )
        records = [r for r in records if r.get("task") in tasks]
    kept = [r for r in records if r.get("steps") and (r.get("success") or not only_success)]
    if not kept:
        which = "successful " if only_success and records else ""
        raise DuomemError(
            f"{cache} has no {which}episodes to train on ({len(records)} cached)"
            + ("; pass --all to train on failed ones too" if which else "; collect some with `duomem-mlx teach`")
        )
    examples, too_long, memories_used = [], 0, 0
    for record in Progress(kept, desc="data", unit="episode", disable=not progress):
        memories = episode_memories(retrieve, record) if retrieve else []
        memories_used += len(memories)
        fitted = fit_episode(tokenizer, Episode.from_json(record), [m.text for m in memories], max_seq_length)
        if fitted is None:
            too_long += 1
            continue
        tokens, mask = np.array(fitted[0], np.int32), np.array(fitted[1], np.uint8)
        example = Example(record["id"], tokens, mask)
        if kd:
            if not record.get("shard"):
                raise DuomemError(f"episode {record['id']} in {cache} has no shard (text only); pass --kd off")
            example.topk_ids, example.topk_logprobs = teacher_rows(cache, record, manifest, tokens, mask)
        examples.append(example)
    if not examples:
        raise DuomemError(
            f"every episode of {cache} is longer than --max-seq-length {max_seq_length} even with only its "
            "last action; raise --max-seq-length"
        )
    train, val = split(examples, val_fraction, seed)
    rows = [e.topk_ids for e in examples if e.topk_ids is not None]
    counts = {
        "cached": len(records),
        "kept": len(kept),
        "too_long": too_long,
        "train": len(train),
        "val": len(val),
        "tokens": int(sum(len(e) for e in examples)),
        "masked_tokens": int(sum(e.mask.sum() for e in examples)),
        "unaligned_rows": int(sum((r[:, 0] < 0).sum() for r in rows)),
        "memories_retrieved": memories_used,
    }
    return Dataset(train, val, manifest.get("top_k", 0) if kd else 0, counts)


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of one epoch: the examples sorted by length, chunked, and the
    chunks shuffled; the len % batch_size left over are drawn at random each epoch."""
    rng = np.random.default_rng([seed, epoch])
    keep = np.sort(rng.permutation(len(examples))[: len(examples) - len(examples) % batch_size])
    order = sorted(keep.tolist(), key=lambda i: len(examples[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [chunks[i] for i in rng.permutation(len(chunks))]


def collate(examples: list[Example], top_k: int) -> tuple:
    """(inputs [B, W], rows [N], targets [N], mask [N][, topk_ids, topk_logprobs [N, k]]) numpy
    arrays: inputs right-padded, the rest gathered at the N scored positions of the flattened
    batch (the head is computed there only; N padded with mask-0 rows). Position p predicts
    token p + 1, so the teacher row of a masked token at t sits at p = t - 1."""
    width = PAD_TO * -(-(max(len(e) for e in examples) - 1) // PAD_TO)
    b = len(examples)
    tokens = np.zeros((b, width + 1), np.int32)
    mask = np.zeros((b, width), np.float32)
    ids = np.full((b, width, top_k), -1, np.int32) if top_k else None
    lps = np.zeros((b, width, top_k), np.float32) if top_k else None
    for j, e in enumerate(examples):
        tokens[j, : len(e)] = e.tokens
        mask[j, : len(e) - 1] = e.mask[1:]
        if top_k:
            positions = np.flatnonzero(e.mask) - 1
            ids[j, positions], lps[j, positions] = e.topk_ids, e.topk_logprobs
    scored = np.flatnonzero(mask.reshape(-1))
    rows = np.zeros(PAD_TO * -(-max(len(scored), 1) // PAD_TO), np.int32)
    rows[: len(scored)] = scored
    valid = np.arange(len(rows)) < len(scored)
    batch = (tokens[:, :-1], rows, tokens[:, 1:].reshape(-1)[rows], mask.reshape(-1)[rows] * valid)
    return batch + (ids.reshape(-1, top_k)[rows], lps.reshape(-1, top_k)[rows]) if top_k else batch
