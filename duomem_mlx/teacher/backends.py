"""Teacher backends, chosen by `--teacher`:

    mlx:<repo-or-path>            an mlx-lm model in-process; exact top-k recorded while it plays (topk.py)
    openai:<base-url>#<model>     an OpenAI-compatible server; top-k from top_logprobs (openai_compat.py)
    oracle                        the environment's gold path; no logits

Each teacher has a `policy` (plays episodes), `tokenizer` (or None), `vocab_size`, `top_k`,
`arrays(episode)` (the shard of one played episode) and `memories(episodes, writer)`.
"""

from pathlib import Path

import numpy as np

from ..agent.prompt import episode_messages, tokenize_with_mask
from ..errors import DuomemError


def make_teacher(spec: str, top_k: int = 20, temperature: float = 0.0, tokenizer: str | None = None,
                 decode: str = "constrained", max_context: int = 4096, seed: int = 0, max_tokens: int = 64):
    if spec == "oracle":
        return OracleTeacher(tokenizer)
    if spec.startswith("mlx:"):
        return MLXTeacher(spec[4:], top_k, temperature, decode, max_context, seed)
    if spec.startswith("openai:"):
        url, _, model = spec[7:].partition("#")
        if not url.startswith(("http://", "https://")) or not model:
            raise DuomemError(f"--teacher {spec}: expected openai:<base-url>#<model>, e.g. openai:http://127.0.0.1:8080/v1#mlx-community/Qwen3-4B-4bit")
        from .openai_compat import OpenAITeacher

        return OpenAITeacher(url, model, top_k, temperature, tokenizer, max_tokens)
    raise DuomemError(f"unknown --teacher {spec}; use mlx:<path-or-repo>, openai:<base-url>#<model> or oracle")


def shard_arrays(tokenizer, episode) -> dict[str, np.ndarray]:
    """input_ids / loss_mask of the chat the teacher saw while playing `episode`."""
    ids, mask = tokenize_with_mask(tokenizer, episode_messages(episode))
    return {"input_ids": np.array(ids, dtype=np.int32), "loss_mask": np.array(mask, dtype=np.uint8)}


def load_tokenizer(path: str):
    """An mlx-lm TokenizerWrapper from a local model dir, or a Hub repo (tokenizer files only)."""
    from mlx_lm.tokenizer_utils import load as load_wrapper

    local = Path(path).expanduser()
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(path, allow_patterns=["*.json", "*.jinja", "*.model", "*.txt"]))
        except Exception as e:  # offline, unknown repo, gated: all say the same thing to the user
            raise DuomemError(f"cannot get the teacher tokenizer {path} ({e.__class__.__name__}); pass --teacher-tokenizer LOCAL_DIR")
    if not (local / "tokenizer.json").exists() and not (local / "tokenizer_config.json").exists():
        raise DuomemError(f"{local} holds no tokenizer; pass --teacher-tokenizer with the served model's directory")
    return load_wrapper(local)


def teacher_memories(policy_memories, episodes, writer: str) -> list:
    from ..memory.writer import rule_memories

    if writer == "rules":
        return rule_memories(episodes)
    return policy_memories(episodes)


class OracleTeacher:
    """The environment's expert; with a tokenizer (the student's) shards hold the tokenized
    chats for cross-entropy, never top-k."""

    backend, top_k = "oracle", 0

    def __init__(self, tokenizer_path: str | None):
        from ..envs.policies import OraclePolicy

        self.spec = "oracle"
        self.policy = OraclePolicy()
        self.tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        self.vocab_size = len(self.tokenizer.get_vocab()) if self.tokenizer else None

    def arrays(self, episode):
        return shard_arrays(self.tokenizer, episode) if self.tokenizer else None

    def memories(self, episodes, writer: str) -> list:
        if writer != "rules":
            raise DuomemError("the oracle teacher writes no text; use --memory-writer rules")
        return teacher_memories(None, episodes, writer)


class MLXTeacher:
    """Plays through a TopKRecorder wrapped around the model, so the top-k rows come from the
    logits the teacher computed anyway while playing; only tokens it never fed (the tail of
    its last action) or fed in another context (turns dropped from a full window) are run
    through the model again."""

    backend = "mlx"

    def __init__(self, path: str, top_k: int, temperature: float, decode: str, max_context: int, seed: int):
        import mlx.core as mx

        from ..agent.loop import ModelPolicy
        from ..models import load
        from .topk import TopKRecorder

        self.spec, self.top_k = f"mlx:{path}", top_k
        self.model, self.tokenizer = load(path)
        self.vocab_size = self.model(mx.array([[0]])).shape[-1]
        mx.random.seed(seed)
        self.recorder = TopKRecorder(self.model, top_k, set(self.tokenizer.eos_token_ids)) if top_k else self.model
        self.policy = ModelPolicy(self.recorder, self.tokenizer, decode=decode, max_context=max_context, temperature=temperature)

    def arrays(self, episode):
        arrays = shard_arrays(self.tokenizer, episode)
        if self.top_k:
            arrays.update(self.recorder.rows_for(arrays["input_ids"], arrays["loss_mask"], self.policy.session.cache))
        return arrays

    def memories(self, episodes, writer: str) -> list:
        from ..memory.writer import model_memories

        return teacher_memories(lambda eps: model_memories(eps, self.model, self.tokenizer), episodes, writer)
