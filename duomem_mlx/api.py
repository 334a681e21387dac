"""The Python API (`duomem_mlx.load` -> `Agent`; usage in the package docstring): a distilled agent
in your own program, fed the task text and observations of any environment, no environment object.
Every step goes through the paths the CLI uses (ModelPolicy.from_options / begin / act, chat.Chat),
and mlx / mlx-lm are imported by `load`, not by `import duomem_mlx`."""

from collections import namedtuple

from duomem_mlx.errors import DuomemError

DECODES = (None, "constrained", "free")


class Answer(namedtuple("Answer", "text memories")):
    """A chat answer and the memories (bank `Memory` objects: id, task_type, text) it was given.
    (A named tuple: `dataclasses` would cost `import duomem_mlx` 6 ms of its 8.)"""

    __slots__ = ()


def load(model: str, adapter_path: str | None = None, *, decode: str | None = None, **options) -> "Agent":
    """Load an agent: a package directory (its memory/ bank is read too) or a Hub id, or a model
    with `adapter_path` (LoRA adapters) and `memory_bank` (a bank directory from `memory build`).

    decode: None picks per step (constrained to the admissible actions when they are given, free
    text otherwise); "constrained" or "free" forces one.
    options: the fields of duomem_mlx.runtime.options.PolicyOptions, their defaults eval's and
    chat's (memory_bank, memory_k, memory_filter, max_context, temperature, thinking, seed).

        >>> agent = duomem_mlx.load("mlx-community/SmolLM2-135M-Instruct", memory_bank="runs/bank")
    """
    from duomem_mlx.runtime.options import PolicyOptions  # noqa: PLC0415 (import duomem_mlx stays light)
    from duomem_mlx.runtime.policy import ModelPolicy  # noqa: PLC0415 (import duomem_mlx stays light)

    if decode not in DECODES:
        raise DuomemError(f"unknown decode {decode!r}; use None (by step), 'constrained' or 'free'")
    settings = PolicyOptions(adapter_path=adapter_path, decode=decode or "constrained", **options)
    policy = ModelPolicy.from_options(model, settings)
    return Agent(policy, decode, settings.max_context, settings.temperature)


class Agent:
    """A loaded model with its memories: plays one episode at a time (`start`, then `act` and
    `observe` in turn) and answers questions (`chat`)."""

    def __init__(self, policy, decode: str | None, max_context: int, temperature: float):
        self.policy, self.decode = policy, decode
        self.max_context, self.temperature = max_context, temperature
        self.playing = False  # an episode has started
        self.state = None  # the observation (a StepResult) the next act() answers; None once answered
        self.conversation = None  # a chat.Chat, made on the first chat()

    @property
    def model(self):
        return self.policy.model

    @property
    def tokenizer(self):
        return self.policy.tokenizer

    @property
    def memories(self) -> list:
        """The memories of the episode being played (bank `Memory` objects), in the prompt's order."""
        return self.policy.memories

    def start(self, task: str, observation: str, admissible: list[str] | None = None, task_type: str | None = None):
        """Begin an episode: retrieve memories for the task and its first observation and put
        them in front of the prompt. `admissible`: the commands the environment accepts now
        (None: the model writes free text). `task_type` matters only with memory_filter="task".

            >>> agent.start("Cook the meal.", "You are in a kitchen. There is a stove here.")
        """
        from duomem_mlx.envs.base import StepResult  # noqa: PLC0415 (import duomem_mlx stays light)

        self.policy.begin(task, observation, task_type)
        self.playing = True
        self.state = StepResult(observation, list(admissible or []))

    def act(self) -> str:
        """The next action, answering the last observation (start's, then observe's).

        >>> agent.act()
        'open fridge'
        """
        if not self.playing:
            raise DuomemError("act() before start(): call start(task, observation) first")
        if self.state is None:
            raise DuomemError("act() answers an observation: call observe(...) with the environment's answer first")
        if self.decode == "constrained" and not self.state.admissible:
            raise DuomemError(
                "decode='constrained' needs the admissible actions: pass admissible= to start() and "
                "observe(), or load with decode=None"
            )
        self.policy.session.options.mode = self.decode or ("constrained" if self.state.admissible else "free")
        action = self.policy.act(self.state)
        self.state = None
        return action

    def observe(self, observation: str, admissible: list[str] | None = None):
        """Feed the environment's answer to the last action (and the commands it accepts now).

        >>> agent.observe("You open the fridge. It holds an egg.", ["take egg", "close fridge"])
        """
        from duomem_mlx.envs.base import StepResult  # noqa: PLC0415 (import duomem_mlx stays light)

        if not self.playing:
            raise DuomemError("observe() before start(): call start(task, observation) first")
        if self.state is not None:
            raise DuomemError("observe() answers an action: call act() first")
        self.state = StepResult(observation, list(admissible or []))

    def chat(self, question: str, max_tokens: int = 256, follow_up: bool = False, on_text=None) -> Answer:
        """Answer a question with the memories it retrieves; `follow_up=True` continues the last
        conversation (same memories) instead of starting a new one; `on_text(piece)` streams the answer.

            >>> answer = agent.chat("how do I boil water?", on_text=lambda piece: print(piece, end=""))
            >>> [m.id for m in answer.memories]
            ['boil-1']
        """
        from duomem_mlx.agent.chat import Chat  # noqa: PLC0415 (import duomem_mlx stays light)

        if self.conversation is None:
            self.conversation = Chat(self.policy, max_tokens, self.max_context, self.temperature)
        elif not follow_up:
            self.conversation.reset()
        self.conversation.session.options.max_tokens = max_tokens
        text = self.conversation.reply(question, on_text)
        return Answer(text, list(self.conversation.memories))
