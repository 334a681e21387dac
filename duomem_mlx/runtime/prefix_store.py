"""KV states of the token prefixes episodes share (the system prompt: function docs, memories),
computed once and restored by the next episode that starts with the same tokens, so its first
step prefills only what follows.

In memory: an LRU of a few states (copies of the session's cache layers, as its own snapshots).
With a directory: each state also on disk as an mlx-lm prompt cache (`save_prompt_cache`:
safetensors, no pickle), `<model fingerprint>/<tokens>-<sha256 of the token ids>.safetensors`,
read back by a later run of the same model. A file that does not load, or whose metadata names
other tokens, another model or another cache layout, is skipped with a one-line warning."""

import copy
import hashlib
import sys
from array import array
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache, load_prompt_cache, make_prompt_cache, save_prompt_cache

from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.fingerprints import embedder_fingerprint
from duomem_mlx.io import atomic_file

KEEP = 4  # states held in memory
MAX_BYTES = 2 * 2**30  # and at most this much of them (the newest is kept whatever its size)
MIN_TOKENS = 64  # a shorter prefix costs less to prefill than to keep


def token_hash(tokens: list[int]) -> str:
    return hashlib.sha256(array("q", tokens).tobytes()).hexdigest()


def compact(cache: list) -> list:
    """A copy of `cache` that holds its tokens only: a KVCache cut back keeps its whole buffer."""
    copies = []
    for c in cache:
        if type(c) is KVCache and c.keys is not None:
            cut = [mx.contiguous(a[..., : c.offset, :]) for a in (c.keys, c.values)]
            mx.eval(cut)
            copies.append(KVCache.from_state((*cut, c.offset)))
        else:
            copies.append(copy.deepcopy(c))
    return copies


def nbytes(cache: list) -> int:
    total = 0
    for layer in cache:
        try:
            total += layer.nbytes
        except (NotImplementedError, AttributeError):
            pass
    return total


class PrefixStore:
    def __init__(self, model, tokenizer, directory: str | Path | None = None, keep: int = KEEP):
        self.model, self.tokenizer, self.keep = model, tokenizer, keep
        self.directory = Path(directory) if directory else None
        self.states: OrderedDict[tuple[int, str], list] = OrderedDict()  # (tokens, hash) -> cache layers
        self.on_disk: set[tuple[int, str]] | None = None  # the files' keys, listed once
        self.layout = [type(c).__name__ for c in make_prompt_cache(model)]
        self.warned: set[str] = set()

    def restore(self, tokens: list[int], longer_than: int) -> tuple[int, list] | None:
        """(n, a fresh copy of the state after tokens[:n]) for the longest stored prefix of
        `tokens` with longer_than < n < len(tokens), or None."""
        lengths = sorted({n for n, _ in self.states} | {n for n, _ in self.disk_keys()}, reverse=True)
        for n in lengths:
            if not longer_than < n < len(tokens):
                continue
            key = (n, token_hash(tokens[:n]))
            state = self.states.get(key)
            if state is None and key in self.disk_keys():
                state = self.load(key)
                if state is not None:
                    self.remember(key, state)
            if state is not None:
                self.states.move_to_end(key)
                return n, copy.deepcopy(state)
        return None

    def save(self, tokens: list[int], cache: list) -> None:
        """Keep the state of `cache`, which holds exactly `tokens` (a copy: the cache moves on)."""
        if len(tokens) < MIN_TOKENS:
            return
        key = (len(tokens), token_hash(tokens))
        if key in self.states:
            self.states.move_to_end(key)
            return
        state = compact(cache)
        self.remember(key, state)
        if self.directory and key not in self.disk_keys():
            self.write(key, state)

    def remember(self, key, state):
        self.states[key] = state
        while len(self.states) > 1 and (
            len(self.states) > self.keep or sum(map(nbytes, self.states.values())) > MAX_BYTES
        ):
            self.states.popitem(last=False)

    @cached_property
    def fingerprint(self) -> str:
        return embedder_fingerprint(self.model, self.tokenizer)

    @property
    def folder(self) -> Path:
        return self.directory / self.fingerprint[:16]

    def path(self, key) -> Path:
        return self.folder / f"{key[0]}-{key[1]}.safetensors"

    def disk_keys(self) -> set[tuple[int, str]]:
        if self.directory is None:
            return set()
        if self.on_disk is None:
            self.on_disk = set()
            for file in self.folder.glob("*-*.safetensors") if self.folder.is_dir() else []:
                n, _, digest = file.stem.partition("-")
                if n.isdigit() and len(digest) == 64:
                    self.on_disk.add((int(n), digest))
        return self.on_disk

    def metadata(self, key) -> dict[str, str]:
        return {"tokens": str(key[0]), "sha256": key[1], "model": self.fingerprint, "layout": ",".join(self.layout)}

    def load(self, key) -> list | None:
        path = self.path(key)
        try:
            cache, metadata = load_prompt_cache(str(path), return_metadata=True)
        except Exception as e:  # a torn or foreign file: mlx raises RuntimeError/ValueError/KeyError
            return self.skip(key, f"{path} does not load ({type(e).__name__}: {e})")
        if metadata != self.metadata(key) or [type(c).__name__ for c in cache] != self.layout:
            return self.skip(key, f"{path} holds another model's or prefix's state")
        return cache

    def skip(self, key, why: str) -> None:
        self.disk_keys().discard(key)
        if why not in self.warned:
            self.warned.add(why)
            print(f"warning: prefix state {why}; ignored (it is prefilled instead)", file=sys.stderr)
        return None

    def write(self, key, state: list) -> None:
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                save_prompt_cache(str(tmp), state, self.metadata(key))
        except (OSError, ValueError, DuomemError) as e:  # a full disk, a cache mlx-lm cannot serialize
            self.skip(key, f"not written to {path} ({e})")
            return
        self.disk_keys().add(key)
