"""BFCL's multi-turn benchmark (Berkeley Function Calling Leaderboard, `bfcl-eval`): four
categories of 200 entries (base, miss_func, miss_param, long_context) against executable
Python backends of eight APIs (file system, messages, tickets, trading, travel, vehicle,
Twitter, math), scored by BFCL's own checker.

An episode is an entry. Each step the agent's action is one call, `cd(folder='document')` (or
JSON, envs/calls.py), or a text reply, which ends the user's turn. A call is parsed into a tool
name and literal arguments, dispatched by name to the method of the API object that offers
it, and answered with its result; anything else is a text reply. At each turn's end BFCL's
`multi_turn_checker` compares the states and results of the calls so far with the ground
truth's: a failed turn ends the episode, every turn passed wins it (BFCL's accuracy), the
score is the share of turns passed. Model output is never evaluated as code: BFCL's executor
runs call strings with `eval`, so only calls of the API objects' methods, written back from
their parsed literals (`Call.text`), ever reach the checker.

A miss_func entry withholds a tool's doc until a turn that says it has been added (BFCL's own
words). A call may run any public method of the entry's API objects, offered or withheld, as
in BFCL's executor (miss_func_49's ground truth calls `tail` two turns before it is offered). Splits are by entry, held
out by content: an entry's split follows a hash of its first user turn (the four categories
reuse the same first turns), and no dev or test entry's first turn is a turn of a train entry."""

import copy
import hashlib
import importlib
import inspect
import json
import random
import uuid
from collections import Counter
from functools import cache
from types import SimpleNamespace

from duomem_mlx.envs.base import EnvCrashed, StepResult, TaskSpec, check_tasks, number_repeats
from duomem_mlx.envs.calls import Call, parse_call
from duomem_mlx.envs.scienceworld import sample
from duomem_mlx.errors import DuomemError

VERSION = "2026.3.23"
INSTALL = f"pip install --no-deps bfcl-eval=={VERSION} (`make setup` does it; --no-deps: its own pins clash)"
CATEGORIES = ("base", "miss_func", "miss_param", "long_context")
SPLITS = {"train": range(0, 6), "dev": range(6, 8), "test": range(8, 10)}  # tenths of the first-turn hash
OBSERVATION_CHARS = 1500  # a tool result longer than this is cut (long_context's listings run to many KB)
END_OF_TURN = "Done."  # the oracle's text reply once a turn's calls are made
ADDED_TOOLS = "I have updated some more functions you can choose from: {tools}. What about now?"


@cache
def bfcl() -> SimpleNamespace:
    """BFCL's modules and data paths, imported on first use; a missing install says how to get it."""
    try:
        # bfcl-eval is optional (installed with --no-deps by `make setup`)
        from bfcl_eval.constants import eval_config  # noqa: PLC0415
        from bfcl_eval.constants import executable_backend_config as backends  # noqa: PLC0415
        from bfcl_eval.constants.category_mapping import VERSION_PREFIX  # noqa: PLC0415
        from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker, multi_turn_utils  # noqa: PLC0415
    except ImportError as e:
        raise DuomemError(f"--env bfcl needs BFCL's data and checker ({e.name} is missing): {INSTALL}")
    return SimpleNamespace(
        backends=backends,
        checker=multi_turn_checker,
        executor=multi_turn_utils,
        data=eval_config.PROMPT_PATH,
        answers=eval_config.POSSIBLE_ANSWER_PATH,
        docs=eval_config.MULTI_TURN_FUNC_DOC_PATH,
        prefix=VERSION_PREFIX,
    )


@cache
def load_category(category: str) -> tuple[list[dict], dict[str, list]]:
    """(entries, ground truth by id) of one category, from the wheel's data files."""
    b = bfcl()
    name = f"{b.prefix}_multi_turn_{category}.json"
    entries = [json.loads(line) for line in (b.data / name).read_text().splitlines()]
    return entries, {a["id"]: a["ground_truth"] for a in map(json.loads, (b.answers / name).read_text().splitlines())}


@cache
def func_docs(api_class: str) -> tuple[dict, ...]:
    b = bfcl()
    text = (b.docs / b.backends.MULTI_TURN_FUNC_DOC_FILE_MAPPING[api_class]).read_text()
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def user_turns(entry: dict) -> list[str]:
    return [" ".join(m["content"].split()) for turn in entry["question"] for m in turn if m["role"] == "user"]


def split_of(first_turn: str) -> str:
    tenth = int(hashlib.sha1(first_turn.encode()).hexdigest()[:8], 16) % 10
    return next(split for split, tenths in SPLITS.items() if tenth in tenths)


@cache
def split_indices(split: str) -> dict[str, list[int]]:
    """Each category's entry indices in the split (entry ids end with the index)."""
    entries = {c: load_category(c)[0] for c in CATEGORIES}
    train = [e for es in entries.values() for e in es if split_of(user_turns(e)[0]) == "train"]
    train_turns = {t for e in train for t in user_turns(e)}
    return {
        c: [
            i
            for i, e in enumerate(es)
            if split_of(user_turns(e)[0]) == split and (split == "train" or user_turns(e)[0] not in train_turns)
        ]
        for c, es in entries.items()
    }


@cache
def companions(share: float = 0.5, least: int = 3) -> dict[str, list[str]]:
    """For each function, the others the train split's ground truth calls in the same turn in at least
    `share` of its turns (and `least` turns): the prerequisites no request names (`startEngine` wants
    `pressBrakePedal`, `mv` a `cd`), which tool retrieval offers along with it (--tool-k)."""
    alone, together = Counter(), Counter()
    for category in CATEGORIES:
        entries, truth = load_category(category)
        for i in split_indices("train")[category]:
            for turn in truth[entries[i]["id"]]:
                called = {parse_call(call).name for call in turn}
                alone.update(called)
                together.update((f, g) for f in called for g in called if f != g)
    pairs = sorted((f, g) for (f, g), n in together.items() if n >= least and n / alone[f] >= share)
    return {f: [g for h, g in pairs if h == f] for f in dict.fromkeys(f for f, _ in pairs)}


def signature(doc: dict) -> str:
    """`name(required, optional=default)`: the tools in a line each, compact."""
    parameters = doc.get("parameters", {})
    required = parameters.get("required", [])
    names = [
        p if p in required else f"{p}={spec.get('default', None)!r}"
        for p, spec in parameters.get("properties", {}).items()
    ]
    return f"{doc['name']}({', '.join(names)})"


def result_text(result) -> str:
    """A call's result as BFCL's executor writes it (multi_turn_utils), cut to OBSERVATION_CHARS."""
    if isinstance(result, dict):
        try:
            result = json.dumps(result)
        except (TypeError, ValueError):
            result = str(result)
    text = result if isinstance(result, str) else str(result)
    cut = len(text) - OBSERVATION_CHARS
    return text if cut <= 0 else f"{text[:OBSERVATION_CHARS]}... ({cut} more chars)"


class BFCLMultiTurn:
    name = "bfcl"
    default_max_steps = 40  # the longest gold path: 37 steps (a long_context entry)
    text_replies = True  # a line of text is an action too: it ends the user's turn

    def __init__(self):
        bfcl()
        self.entry: dict = {}
        self.calls: list[list[list[str]]] = []  # per turn, per step, the calls as the checker reads them

    def task_names(self) -> list[str]:
        return list(CATEGORIES)

    def task_specs(self, tasks, split, episodes, seed) -> list[TaskSpec]:
        check_tasks(tasks, CATEGORIES, "BFCL category")
        indices, rng = split_indices(check_split(split)), random.Random(seed)
        if tasks:
            drawn = [(t, i) for t in tasks for i in sample(rng, indices[t], episodes)]
            return number_repeats([TaskSpec(self.name, t, i, split) for t, i in drawn])
        names = [CATEGORIES[i % len(CATEGORIES)] for i in range(episodes)]  # no category named: alternate the four
        drawn = {c: iter(sample(rng, indices[c], names.count(c))) for c in CATEGORIES}
        return number_repeats([TaskSpec(self.name, c, next(drawn[c]), split) for c in names])

    def reset(self, spec: TaskSpec) -> tuple[str, StepResult]:
        if spec.task not in CATEGORIES:
            raise DuomemError(f"unknown BFCL category {spec.task}; valid: {', '.join(CATEGORIES)}")
        if spec.variation not in split_indices(check_split(spec.split))[spec.task]:
            raise DuomemError(f"BFCL entry multi_turn_{spec.task}_{spec.variation} is not in the {spec.split} split")
        entries, answers = load_category(spec.task)
        self.entry = entries[spec.variation]
        self.truth = answers[self.entry["id"]]
        self.apis = {name: self.backend(name) for name in self.entry["involved_classes"]}
        held = {name for names in self.entry.get("missed_function", {}).values() for name in names}
        self.offered = {doc["name"]: doc for api in self.apis for doc in func_docs(api) if doc["name"] not in held}
        # what a call may run: as BFCL's executor, every public method of the entry's API objects
        self.methods = {
            name: method
            for api in self.apis.values()
            for name, method in inspect.getmembers(api, inspect.ismethod)
            if not name.startswith("_")
        }
        self.turn, self.calls = 0, [[]]
        tools = "\n".join(map(signature, self.offered.values()))
        return self.entry["question"][0][0]["content"], self.state(f"Tools:\n{tools}")

    def backend(self, api_class: str):
        """A fresh API object in the entry's initial state, made as BFCL's executor makes it."""
        backends = bfcl().backends
        try:
            module = importlib.import_module(backends.CLASS_FILE_PATH_MAPPING[api_class])
        except ImportError as e:  # MathAPI imports mpmath
            raise DuomemError(f"BFCL's {api_class} needs {e.name}: pip install {e.name} (in duomem-mlx[envs])")
        api = getattr(module, api_class)()
        if api_class not in backends.STATELESS_CLASSES:
            config = copy.deepcopy(self.entry["initial_config"].get(api_class, {}))
            api._load_scenario(config, long_context=self.category == "long_context")
        return api

    @property
    def category(self) -> str:
        return self.entry["id"].removeprefix("multi_turn_").rsplit("_", 1)[0]

    def step(self, action: str) -> StepResult:
        call = parse_call(action)
        if call is None:
            return self.end_turn()
        if call.name not in self.methods:
            return self.state(f"Error during execution: no tool named {call.name!r}")
        self.calls[-1].append([call.text])
        return self.state(result_text(self.execute(call)))

    def execute(self, call: Call):
        try:
            return self.methods[call.name](*copy.deepcopy(call.args), **copy.deepcopy(call.kwargs))
        except Exception as e:  # the API's own errors, and wrong arguments, as BFCL's executor reports them
            return f"Error during execution: {e}"

    def end_turn(self) -> StepResult:
        if not self.check():
            return self.state("", done=True)
        self.turn += 1
        if self.turn == len(self.truth):
            return self.state("", done=True, won=True)
        self.calls.append([])
        added = self.entry.get("missed_function", {}).get(str(self.turn))
        if added:
            self.offered.update({d["name"]: d for api in self.apis for d in func_docs(api) if d["name"] in added})
            return self.state(ADDED_TOOLS.format(tools=", ".join(signature(self.offered[name]) for name in added)))
        return self.state("\n".join(m["content"] for m in self.entry["question"][self.turn]))

    def check(self) -> bool:
        """BFCL's checker on the turns so far. It keeps the API objects it builds in its module's
        globals under the model name: a fresh name each time, removed afterwards."""
        b = bfcl()
        model = f"duomem_{uuid.uuid4().hex}"
        try:
            truth = self.truth[: self.turn + 1]
            result = b.checker.multi_turn_checker(self.calls, truth, self.entry, self.category, model)
        except AssertionError as e:
            raise EnvCrashed(f"BFCL's checker failed on {self.entry['id']}: {e}")
        finally:
            for key in [k for k in vars(b.executor) if k.startswith(model)]:
                del vars(b.executor)[key]
        return result["valid"]

    def state(self, observation: str, done: bool = False, won: bool = False) -> StepResult:
        score = 1.0 if won else self.turn / max(len(self.truth), 1)
        return StepResult(observation, [], 0.0, score, done, won)

    def expert_actions(self) -> list[str]:
        """The ground truth's calls, each turn's followed by a text reply that ends it."""
        return [action for turn in self.truth for action in [*(parse_call(c).text for c in turn), END_OF_TURN]]

    def tools(self) -> list[dict]:
        """BFCL's function docs of the tools offered now."""
        return list(self.offered.values())

    def tool_companions(self) -> dict[str, list[str]]:
        return companions()

    def close(self) -> None:
        pass


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DuomemError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split
