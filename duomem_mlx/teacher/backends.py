"""Teacher backends, chosen by `--teacher`:

    mlx:<repo-or-path>            an mlx-lm model in-process; exact top-k recorded while it plays (topk.py)
    openai:<base-url>#<model>     an OpenAI-compatible server; top-k from top_logprobs (openai_compat.py)
    oracle                        the environment's gold path; no logits

Each teacher has a `policy` (plays episodes), `tokenizer` (or None), `vocab_size`, `top_k`,
`arrays(episode)` (the shard of one played episode) and `memories(episodes, writer)`; what
they share is in base.py.
"""

import mlx.core as mx

from duomem_mlx.envs.policies import OraclePolicy
from duomem_mlx.errors import DuomemError
from duomem_mlx.memory.writer import model_memories
from duomem_mlx.runtime.models import load
from duomem_mlx.runtime.options import PolicyOptions
from duomem_mlx.runtime.policy import ModelPolicy, load_bank
from duomem_mlx.teacher.base import load_tokenizer, redact, shard_arrays, teacher_memories
from duomem_mlx.teacher.openai_compat import OpenAITeacher, parse_spec
from duomem_mlx.teacher.options import TeachOptions
from duomem_mlx.teacher.topk import TopKRecorder


def make_teacher(spec: str, options: TeachOptions = TeachOptions(), max_tokens: int = 64):
    if options.memory_bank and not spec.startswith("mlx:"):
        raise DuomemError("--memory (a bank the teacher reads) works with an mlx: teacher only")
    if options.max_rps and not spec.startswith("openai:"):
        raise DuomemError("--max-rps limits the requests of an openai: teacher only")
    if spec == "oracle":
        return OracleTeacher(options.teacher_tokenizer)
    if spec.startswith("mlx:"):
        return MLXTeacher(spec[4:], options.top_k, options.policy())
    if spec.startswith("openai:"):
        return OpenAITeacher(
            *parse_spec(spec),
            options.top_k,
            options.temperature,
            options.teacher_tokenizer,
            max_tokens,
            options.max_rps,
        )
    raise DuomemError(f"unknown --teacher {redact(spec)}; use mlx:<path-or-repo>, openai:<base-url>#<model> or oracle")


class OracleTeacher:
    """The environment's expert; with a tokenizer (the student's) shards hold the tokenized
    chats for cross-entropy, never top-k."""

    backend, top_k = "oracle", 0

    def __init__(self, tokenizer_path: str | None):
        self.spec = "oracle"
        self.policy = OraclePolicy()
        self.tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        self.vocab_size = len(self.tokenizer.get_vocab()) if self.tokenizer else None

    def arrays(self, episode):
        return shard_arrays(self.tokenizer, episode) if self.tokenizer else None

    def memories(self, episodes, writer: str, kind: str = "script") -> list:
        if writer != "rules" and kind != "trajectory":
            raise DuomemError("the oracle teacher writes no text; use --memory-writer rules")
        return teacher_memories(None, episodes, writer, kind)


class MLXTeacher:
    """Plays through a TopKRecorder wrapped around the model, so the top-k rows come from the
    logits the teacher computed anyway while playing; only tokens it never fed (the tail of
    its last action) or fed in another context (turns dropped from a full window) are run
    through the model again."""

    backend = "mlx"

    def __init__(self, path: str, top_k: int, options: PolicyOptions):
        self.spec, self.top_k = f"mlx:{path}", top_k
        self.model, self.tokenizer = load(path)
        self.vocab_size = self.model(mx.array([[0]])).shape[-1]
        mx.random.seed(options.seed)
        self.recorder = TopKRecorder(self.model, top_k, set(self.tokenizer.eos_token_ids)) if top_k else self.model
        bank = load_bank(options.memory_bank, self.model, self.tokenizer) if options.memory_bank else None
        self.policy = ModelPolicy(self.recorder, self.tokenizer, bank, options, embedder=self.model)

    def arrays(self, episode):
        arrays = shard_arrays(self.tokenizer, episode, self.policy.memory_texts)
        if self.top_k:
            arrays.update(self.recorder.rows_for(arrays["input_ids"], arrays["loss_mask"], self.policy.session.cache))
        return arrays

    def memories(self, episodes, writer: str, kind: str = "script") -> list:
        return teacher_memories(lambda eps: model_memories(eps, self.model, self.tokenizer), episodes, writer, kind)
