"""The model policy: an mlx-lm model playing an environment through a Session, reading
memories retrieved from a bank in front of its prompt."""

from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from duomem_mlx.envs.base import StepResult, TaskSpec, episode_id, offered_tools
from duomem_mlx.envs.calls import parse_call
from duomem_mlx.envs.policies import OraclePolicy, RandomPolicy
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.bank import MemoryBank
from duomem_mlx.formats.episodes import game_of
from duomem_mlx.runtime import retrieval
from duomem_mlx.runtime.cost import dir_bytes, model_bytes
from duomem_mlx.runtime.decode import DecodeOptions
from duomem_mlx.runtime.models import load, resolve
from duomem_mlx.runtime.options import PolicyOptions
from duomem_mlx.runtime.prefix_store import PrefixStore
from duomem_mlx.runtime.prompt import encode, prefix_messages, system_message
from duomem_mlx.runtime.session import ReencodingSession, Session
from duomem_mlx.runtime.tool_retrieval import ToolPicker
from duomem_mlx.runtime.tools import Tools

CALL_TOKENS = 160  # a call's budget: BFCL's string arguments (a tweet, a file's text) run long


class ModelPolicy:
    def __init__(self, model, tokenizer, bank=None, options: PolicyOptions = PolicyOptions(), embedder=None):
        """`options`' loading fields (adapter_path, memory_bank, seed) are from_options'."""
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.memory_k, self.memory_filter = options.memory_k, options.memory_filter
        self.tool_k = options.tool_k
        self.embedder = embedder or model  # the bare model where `model` wraps it (a teacher's top-k recorder)
        self.options = DecodeOptions(mode=options.decode, temperature=options.temperature)
        if options.reencode:
            self.session = ReencodingSession(
                model, tokenizer, options.max_context, self.options, thinking=options.thinking
            )
        else:  # the system prompt's KV state is kept for the next episodes that share it (on disk: prefix_cache)
            store = PrefixStore(model, tokenizer, options.prefix_cache)
            self.session = Session(
                model, tokenizer, options.max_context, self.options, thinking=options.thinking, prefix_store=store
            )
        self.env = self.tools = self.picker = None
        self.companions: dict[str, list[str]] = {}  # the environment's: functions offered along with a picked one
        self.memories: list = []  # those of the episode being played
        self.disk_bytes = {"model_bytes": None, "bank_bytes": None}  # from_options knows the files
        self.tools_offered: list[int] = []  # functions offered at each step of the episode

    @classmethod
    def from_options(cls, path, options: PolicyOptions = PolicyOptions()):
        source = resolve(path)  # a Hub id's snapshot, its memory/ included
        model, tokenizer = load(source, options.adapter_path)
        memory_bank = options.memory_bank or default_bank(source, options.adapter_path)
        bank = load_bank(memory_bank, model, tokenizer) if memory_bank else None
        mx.random.seed(options.seed)
        policy = cls(model, tokenizer, bank, options)
        policy.disk_bytes = {
            "model_bytes": model_bytes(source, options.adapter_path),
            "bank_bytes": dir_bytes(memory_bank),
        }
        return policy

    def retrieve(
        self, query: str, task_type: str | None = None, observation: str = "", exclude_games=frozenset()
    ) -> list:
        return retrieval.retrieve(
            self.bank,
            self.embedder,
            self.tokenizer,
            query,
            task_type,
            k=self.memory_k,
            memory_filter=self.memory_filter,
            observation=observation,
            exclude_games=exclude_games,
        )

    def start(self, env, spec: TaskSpec, task_description: str, first: StepResult):
        # a memory written from this very game would hand over its solution (a train-split game
        # the teacher replays); no held-out game has one
        self.env = env
        self.companions = env.tool_companions() if hasattr(env, "tool_companions") else {}
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
        `text_replies`, a line of text), rendered and decoded as runtime/tools.py says; with tool_k,
        only those the task's words pick (runtime/tool_retrieval.py)."""
        self.memories = self.retrieve(task_description, task_type, observation, exclude_games)
        self.session.reset_stats()
        self.picker = ToolPicker(self.tool_k, companions=self.companions) if self.tool_k else None
        self.tools_offered = []
        self.tools = Tools(self.tokenizer, self.offer(list(tools), task_description), text_replies) if tools else None
        self.session.options = (
            self.options
            if not self.tools
            else replace(
                self.options,
                max_tokens=max(self.options.max_tokens, CALL_TOKENS),
                single_line=not self.tools.format.in_template,
            )
        )  # a templated call spans lines
        prefix = (self.tools.prefix_messages if self.tools else prefix_messages)(
            task_description, observation, self.memory_texts
        )
        self.session.start(prefix, self.tools)
        self.acted, self.called = False, False

    def system(self) -> dict:
        return self.tools.system_message() if self.tools else system_message(self.memory_texts)

    def act(self, state: StepResult) -> str:
        if self.acted:
            message = {"role": "user", "content": state.observation.strip()}
            self.session.append([self.tools.result_message(state.observation, self.called) if self.tools else message])
            offered = offered_tools(self.env)[0] if self.tools else None
            if offered is not None:  # after a text reply, the observation is the user's next turn
                offered = self.offer(offered, None if self.called else state.observation)
            if offered is not None and offered != self.tools.specs:
                self.tools = replace(self.tools, specs=offered)
                self.session.set_tools(self.tools)
                self.session.messages[0] = self.system()
        self.acted = True
        if self.tools:
            self.tools_offered.append(len(self.tools.specs))
        action = self.session.generate(None if self.tools else state.admissible)
        self.called = bool(self.tools) and parse_call(action) is not None
        return action

    @property
    def offered(self) -> list[dict] | None:
        """The function docs the model saw for its last action (with tool_k, fewer than the env offers)."""
        return self.tools.specs if self.tools else None

    def offer(self, offered: list[dict], query: str | None) -> list[dict]:
        """The functions to offer: all those offered, or with tool_k those picked for the user's turns so far
        (`query`: a new turn's message; None after a call, when the picks stay)."""
        return self.picker.pick(offered, query) if self.picker else offered

    def stats(self) -> dict:
        return {
            **self.session.stats(),
            "tools_offered": self.tools_offered,
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
    bank = MemoryBank.load(path)
    bank.check_embedder(model, tokenizer)
    return bank


def make_policy(spec: str, options: PolicyOptions = PolicyOptions()):
    """`oracle`, `random` (seeded with options.seed) or `model:PATH` (ModelPolicy.from_options)."""
    if spec == "oracle":
        return OraclePolicy()
    if spec == "random":
        return RandomPolicy(options.seed)
    if spec.startswith("model:") and spec[6:]:
        return ModelPolicy.from_options(spec[6:], options)
    raise DuomemError(f"unknown policy {spec!r}; use oracle, random or model:PATH")
