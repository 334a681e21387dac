"""What every teacher backend shares: the shard of a played episode, the teacher's tokenizer,
the memory writer choice, and URLs made safe to print."""

import re
import sys
from pathlib import Path

import numpy as np
from mlx_lm.tokenizer_utils import load as load_wrapper
from tqdm import tqdm

from duomem_mlx.errors import DuomemError
from duomem_mlx.memory.writer import of_kind, rule_memories
from duomem_mlx.runtime.models import hub_snapshot, is_repo_id
from duomem_mlx.runtime.prompt import tokenize_with_mask
from duomem_mlx.runtime.tools import episode_chat


def shard_arrays(tokenizer, episode, memories: list[str] = ()) -> dict[str, np.ndarray]:
    """input_ids / loss_mask of the chat the teacher saw while playing `episode` (with the memories it read)."""
    messages, tools = episode_chat(tokenizer, episode, memories)
    ids, mask = tokenize_with_mask(tokenizer, messages, tools=tools)
    return {"input_ids": np.array(ids, dtype=np.int32), "loss_mask": np.array(mask, dtype=np.uint8)}


def load_tokenizer(path: str):
    """An mlx-lm TokenizerWrapper from a local model dir, or a Hub repo (tokenizer files only)."""
    local = Path(path).expanduser()
    if not local.is_dir():
        if not is_repo_id(path):
            raise DuomemError(
                f"the teacher tokenizer {path} is neither a local directory nor a Hub repo id; "
                "pass --teacher-tokenizer LOCAL_DIR"
            )
        try:
            local = hub_snapshot(path, ["*.json", "*.jinja", "*.model", "*.txt"])
        except DuomemError as e:
            raise DuomemError(f"{e} (or pass --teacher-tokenizer LOCAL_DIR)")
    if not (local / "tokenizer.json").exists() and not (local / "tokenizer_config.json").exists():
        raise DuomemError(f"{local} holds no tokenizer; pass --teacher-tokenizer with the served model's directory")
    return load_wrapper(local)


def teacher_memories(policy_memories, episodes, writer: str, kind: str = "script") -> list:
    """Rule memories, or the teacher's own (`policy_memories`: a memory.writer.Written), saying
    what it dropped; of a memory kind (a trajectory needs no writer)."""
    if kind == "trajectory":
        return of_kind([], episodes, kind)
    if writer == "rules":
        return of_kind(rule_memories(episodes), episodes, kind)
    written = policy_memories(episodes)
    if written.dropped:
        tqdm.write(f"note: the teacher's memory writer {written.summary()}", file=sys.stderr)
    return of_kind(written.memories, episodes, kind)


def redact(spec: str) -> str:
    """`--teacher` text safe to print: whatever precedes the last '@' of the URL (user,
    password, even with '/' or '#' in it) becomes ***."""
    url = spec[: spec.rfind("#")] if "#" in spec else spec
    if "@" not in url:
        return spec
    start = re.match(r"(?:\w+:)?(?:[a-z][a-z0-9+.-]*://)?", spec, re.I).end()
    return spec[:start] + "***" + spec[url.rfind("@") :]
