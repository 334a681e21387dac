"""The model policy: an mlx-lm model playing an environment through a Session, reading
memories retrieved from a bank in front of its prompt."""

from dataclasses import replace
from pathlib import Path

from duomem_mlx.envs.base import StepResult, TaskSpec, episode_id, offered_tools
from duomem_mlx.envs.calls import parse_call
from duomem_mlx.envs.policies import OraclePolicy, RandomPolicy
from duomem_mlx.errors import DuomemError
from duomem_mlx.memory.bank import game_of
from duomem_mlx.runtime import retrieval
from duomem_mlx.runtime.decode import DecodeOptions
from duomem_mlx.runtime.prefix_store import PrefixStore
from duomem_mlx.runtime.prompt import encode, prefix_messages, system_message
from duomem_mlx.runtime.session import ReencodingSession, Session
from duomem_mlx.runtime.tools import Tools

CALL_TOKENS = 160  # a call's budget: BFCL's string arguments (a tweet, a file's text) run long


class ModelPolicy:
    def __init__(
        self,
        model,
        tokenizer,
        bank=None,
        memory_k: int = 3,
        decode: str = "constrained",
        max_context: int = 4096,
        temperature: float = 0.0,
        reencode: bool = False,
        thinking: bool = False,
        memory_filter: str = "none",
        embedder=None,
        prefix_cache: str | None = None,
    ):
        self.model, self.tokenizer, self.bank, self.memory_k = model, tokenizer, bank, memory_k
        self.memory_filter = memory_filter
        self.embedder = embedder or model  # the bare model where `model` wraps it (a teacher's top-k recorder)
        self.options = DecodeOptions(mode=decode, temperature=temperature)
        if reencode:
            self.session = ReencodingSession(model, tokenizer, max_context, self.options, thinking=thinking)
        else:  # the system prompt's KV state is kept for the next episodes that share it (on disk: prefix_cache)
            store = PrefixStore(model, tokenizer, prefix_cache)
            self.session = Session(model, tokenizer, max_context, self.options, thinking=thinking, prefix_store=store)
        self.env = self.tools = None
        self.memories: list = []  # those of the episode being played

    @classmethod
    def from_options(
        cls,
        path,
        adapter_path=None,
        memory_bank=None,
        memory_k=3,
        decode="constrained",
        max_context=4096,
        seed=0,
        temperature=0.0,
        thinking=False,
        memory_filter="none",
        prefix_cache=None,
    ):
        import mlx.core as mx

        from duomem_mlx.runtime.models import load, resolve

        source = resolve(path)  # a Hub id's snapshot, its memory/ included
        model, tokenizer = load(source, adapter_path)
        memory_bank = memory_bank or default_bank(source, adapter_path)
        bank = load_bank(memory_bank, model, tokenizer) if memory_bank else None
        mx.random.seed(seed)
        return cls(
            model,
            tokenizer,
            bank,
            memory_k,
            decode,
            max_context,
            temperature,
            thinking=thinking,
            memory_filter=memory_filter,
            prefix_cache=prefix_cache,
        )

    def retrieve(
        self, query: str, task_type: str | None = None, observation: str = "", exclude_games=frozenset()
    ) -> list:
        return retrieval.retrieve(
            self.bank,
            self.embedder,
            self.tokenizer,
            query,
            task_type,
            self.memory_k,
            self.memory_filter,
            observation,
            exclude_games,
        )

    def start(self, env, spec: TaskSpec, task_description: str, first: StepResult):
        # a memory written from this very game would hand over its solution (a train-split game
        # the teacher replays); no held-out game has one
        self.env = env
        self.begin(task_description, first.observation, spec.task, {game_of(episode_id(spec))}, *offered_tools(env))

    def begin(
        self,
        task_description: str,
        observation: str,
        task_type: str | None = None,
        exclude_games=frozenset(),
        tools: list[dict] | None = None,
        text_replies: bool = False,
    ):
        """Start an episode from its task text and first observation alone (no environment objects).
        With `tools` (JSON-schema function docs) every action is a call of one of them (or, with
        `text_replies`, a line of text), rendered and decoded as runtime/tools.py says."""
        self.memories = self.retrieve(task_description, task_type, observation, exclude_games)
        self.session.reset_stats()
        self.tools = Tools(self.tokenizer, list(tools), text_replies) if tools else None
        self.session.options = (
            self.options
            if not self.tools
            else replace(
                self.options,
                max_tokens=max(self.options.max_tokens, CALL_TOKENS),
                single_line=not self.tools.format.in_template,
            )
        )  # a templated call spans lines
        prefix = prefix_messages(task_description, observation, self.memory_texts)
        prefix[0] = self.system()
        self.session.start(prefix, self.tools)
        self.acted, self.called = False, False

    def system(self) -> dict:
        return self.tools.system_message(self.memory_texts) if self.tools else system_message(self.memory_texts)

    def act(self, state: StepResult) -> str:
        if self.acted:
            message = {"role": "user", "content": state.observation.strip()}
            self.session.append([self.tools.result_message(state.observation, self.called) if self.tools else message])
            offered = offered_tools(self.env)[0] if self.tools else None
            if offered is not None and offered != self.tools.specs:
                self.tools = replace(self.tools, specs=offered)
                self.session.set_tools(self.tools)
                self.session.messages[0] = self.system()
        self.acted = True
        action = self.session.generate(None if self.tools else state.admissible)
        self.called = bool(self.tools) and parse_call(action) is not None
        return action

    def stats(self) -> dict:
        return {
            **self.session.stats(),
            "memories": self.memory_ids,
            "memory_tokens": memory_tokens(self.tokenizer, self.memory_texts),
        }

    @property
    def memory_ids(self) -> list[str]:
        return [m.id for m in self.memories]

    @property
    def memory_texts(self) -> list[str]:
        return [m.text for m in self.memories]


def memory_tokens(tokenizer, memories: list[str]) -> int:
    """The tokens memories add to the prompt (prefilled once an episode; every step attends to them)."""
    if not memories:
        return 0
    return len(encode(tokenizer, system_message(memories)["content"])) - len(
        encode(tokenizer, system_message()["content"])
    )


def default_bank(path: str, adapter_path: str | None) -> str | None:
    """The bank that belongs to the model as loaded: the one `distill` rebuilt for these
    adapters, else the one a converted package carries (never the base's under adapters)."""
    home = Path(adapter_path or path) / "memory"
    return str(home) if (home / "bank.json").is_file() else None


def load_bank(path, model, tokenizer):
    from duomem_mlx.memory.bank import MemoryBank

    bank = MemoryBank.load(path)
    bank.check_embedder(model, tokenizer)
    return bank


def make_policy(spec: str, seed: int = 0, **model_options):
    """`oracle`, `random` or `model:PATH` (model_options go to ModelPolicy.from_options)."""
    if spec == "oracle":
        return OraclePolicy()
    if spec == "random":
        return RandomPolicy(seed)
    if spec.startswith("model:") and spec[6:]:
        return ModelPolicy.from_options(spec[6:], seed=seed, **model_options)
    raise DuomemError(f"unknown policy {spec!r}; use oracle, random or model:PATH")
