"""What `teach` plays and caches with: one frozen dataclass, its defaults the command's. Light (no
mlx), so teacher/cli.py reads its click defaults from it when the CLI starts."""

from dataclasses import dataclass

from duomem_mlx.runtime.options import PolicyOptions


@dataclass(frozen=True)
class TeachOptions:
    tasks: list[str] | None = None  # None: all
    split: str = "train"
    episodes: int = 3  # per named task; in all otherwise
    top_k: int = 20  # teacher distribution entries per action token (0: none)
    temperature: float = PolicyOptions.temperature
    keep: str = "success"  # or "all"
    memory_writer: str = "rules"  # or "teacher"
    memory_kind: str = "script"  # runtime/retrieval.py's KINDS
    memory_bank: str | None = None  # a bank an mlx: teacher reads while it plays
    memory_k: int = 2  # with memory_bank; teach's own default, not eval's (PolicyOptions.memory_k)
    max_steps: int | None = None  # None: the environment's default
    game_params: str | None = None
    seed: int = PolicyOptions.seed
    teacher_tokenizer: str | None = None
    decode: str = PolicyOptions.decode
    max_context: int = PolicyOptions.max_context
    keep_admissible: bool = False
    resume: bool = False
    force: bool = False
    concurrency: int = 1  # episodes in flight at once
    max_rps: float | None = None  # openai: requests a second at most

    def policy(self) -> PolicyOptions:
        """What an mlx: teacher's ModelPolicy plays with."""
        return PolicyOptions(
            memory_bank=self.memory_bank,
            memory_k=self.memory_k,
            decode=self.decode,
            max_context=self.max_context,
            temperature=self.temperature,
            seed=self.seed,
        )
