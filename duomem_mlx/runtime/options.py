"""What a model policy is loaded and played with (runtime/policy.py's ModelPolicy): one frozen
dataclass whose defaults are the only ones eval, chat, distill and the Python API have. Light
(no mlx), so the commands read their click defaults from it when the CLI starts."""

from dataclasses import dataclass, fields

FILTERS = ("none", "task")  # none: by similarity alone; task: only memories of the episode's task type


@dataclass(frozen=True)
class PolicyOptions:
    adapter_path: str | None = None  # LoRA adapters applied to the model
    memory_bank: str | None = None  # None: ADAPTERS/memory, else MODEL/memory, if present
    memory_k: int = 3  # memories in front of the prompt
    memory_filter: str = "none"  # one of FILTERS
    decode: str = "constrained"  # or "free"
    max_context: int = 4096  # tokens kept; the oldest whole turns drop first
    temperature: float = 0.0
    thinking: bool = False  # enable_thinking=True for templates that know it (Qwen3)
    reencode: bool = False  # re-encode the whole prompt each step instead of extending the KV cache
    seed: int = 0
    prefix_cache: str | None = None  # a directory keeping system prompts' KV states for later runs
    tool_k: int = 0  # functions offered per user turn, picked by its words (and those picked before); 0: all

    @classmethod
    def pop_from(cls, kwargs: dict) -> "PolicyOptions":
        """The options among a command's keyword arguments, taken out of them."""
        return cls(**{f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs})
