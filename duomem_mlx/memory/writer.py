"""Procedural memories from successful episodes: rule-based workflow induction, or an LLM writer."""

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from itertools import accumulate, takewhile

from duomem_mlx.envs.base import Episode
from duomem_mlx.envs.calls import Call, parse_call
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.episodes import read_episodes
from duomem_mlx.formats.memories import KINDS, Memory, memory_id, merge_duplicates
from duomem_mlx.progress import Progress
from duomem_mlx.runtime.models import load

PREPOSITIONS = {
    "from",
    "with",
    "on",
    "in",
    "into",
    "to",
    "at",
    "onto",
    "up",
    "down",
    "under",
    "inside",
    "using",
    "off",
    "for",
    "out",
}
ARTICLES = {"the", "a", "an"}
DIRECTIONS = {"north", "south", "east", "west", "northeast", "northwest", "southeast", "southwest"}
PLACEHOLDERS = "XYZPQRTUVKLM"  # no W/N/E/S: they read like directions
MAX_STEPS = 40
SIMILAR = 0.9  # workflows of one task type this alike (difflib ratio over steps) are merged
ECHO_WORDS = 8  # prompt words that open a reply line mid-way and still count as an echo of the prompt
STEP_WINDOW = 4  # words between an action's verb and its object in a memory ("take the red apple")
DROPPED = ("empty", "echo only", "no episode step")  # why a model writer's reply gives no memory
GIST_CHARS = 80  # of each observation in a trajectory memory: where the agent was, not all it read
VALUE_CHARS = 24  # of a call's argument or a JSON result's value in a memory: a tweet's or a file's text is cut
RESULT_KEYS = 8  # of a JSON result's keys in a trajectory memory
# BFCL's tool docs name the API they belong to: "This tool belongs to the travel system, which ..."
API_OWNER = re.compile(r"belongs to (?:the )?([^.,]+)")

# Actions only, no observations: a 135M instruct model echoes a long trajectory back, while it
# turns a short list of actions into numbered steps (measured on SmolLM2-135M-Instruct).
WRITER_PROMPT = """An agent solved this task {setting}.
Task: {task}
Its actions, in order: {actions}
Write the procedure for tasks like this as numbered steps, one short line each."""


def successful(episodes: list[Episode]) -> list[Episode]:
    good = [e for e in episodes if e.success and e.steps]
    if not good:
        raise DuomemError(
            f"none of the {len(episodes)} episodes succeeded; memories are written from successful episodes only"
        )
    return good


def action_parts(action: str) -> list[tuple[str, bool]]:
    """An action as (text, is_object) parts: the verb and prepositions, and the object phrases between them."""
    words = action.strip().lower().split()
    parts, phrase = [(" ".join(words[:1]), False)], []
    for word in words[1:]:
        if word in PREPOSITIONS:
            if phrase:
                parts.append((" ".join(phrase), True))
            parts.append((word, False))
            phrase = []
        else:
            phrase.append(word)
    if phrase:
        parts.append((" ".join(phrase), True))
    return parts


def object_core(phrase: str) -> str:
    """The object a phrase names: articles and ALFWorld-style instance numbers ("apple 1") dropped."""
    words = [w for w in phrase.split() if w not in ARTICLES]
    while words and words[-1].isdigit():
        words.pop()
    return " ".join(words)


def named_objects(actions: list[str]) -> set[str]:
    return {object_core(text) for action in actions for text, is_object in action_parts(action) if is_object}


def object_roles(action_lists: list[list[str]]) -> tuple[set[str], set[str]]:
    """(varying, constant) objects of a task type's episodes: what some but not all of them name
    (cooking's ingredient), and what all of them name (its cookbook). One episode: neither.
    Directions vary only where the episodes go more than one way (one way, taken or not, is a route)."""
    named = [named_objects(actions) for actions in action_lists]
    if len(named) < 2:
        return set(), set()
    everything, constant = set.union(*named), set.intersection(*named)
    fixed = DIRECTIONS if len(everything & DIRECTIONS) < 2 else set()
    return everything - constant - fixed, constant


def generalise(
    actions: list[str], task_description: str, varying: set[str] = frozenset(), constant: set[str] = frozenset()
) -> tuple[list[str], list[str]]:
    """Replace the objects actions name by X, Y, ... where they vary across the task type's
    episodes, or the task description names them and they are not `constant` (named by every
    episode of the type: part of the procedure); a direction only where it varies (the way to
    the coin differs from game to game, "go east" of a fixed route stays).
    Returns the steps and the placeholders used, in order of first use."""
    described = task_description.lower()
    names: dict[str, str] = {}

    def placeholder(phrase: str) -> str:
        core = object_core(phrase)
        if not core or (core in DIRECTIONS and core not in varying) or core in constant:
            return phrase
        if core not in varying and not re.search(rf"(?<!\w){re.escape(core)}(?!\w)", described):
            return phrase
        if core not in names:
            names[core] = PLACEHOLDERS[len(names)] if len(names) < len(PLACEHOLDERS) else f"X{len(names) + 1}"
        return names[core]

    steps = [" ".join(placeholder(text) if is_object else text for text, is_object in action_parts(a)) for a in actions]
    return steps, list(names.values())


def compress(steps: list[str]) -> list[str]:
    """Collapse repeated consecutive steps ("wait (x3)") and cap the length."""
    out: list[list] = []
    for step in steps:
        if out and out[-1][0] == step:
            out[-1][1] += 1
        else:
            out.append([step, 1])
    text = [s if n == 1 else f"{s} (x{n})" for s, n in out]
    if len(text) > MAX_STEPS:
        text = text[:MAX_STEPS] + [f"... ({len(text) - MAX_STEPS} more steps)"]
    return text


def workflow_text(task_type: str, steps: list[str], placeholders: list[str]) -> str:
    legend = f" ({', '.join(placeholders)}: the objects of each task)" if placeholders else ""
    return f"Workflow for {task_type}{legend}: " + ", ".join(steps) + "."


def rule_memories(episodes: list[Episode]) -> list[Memory]:
    """One workflow per distinct (near-identical merged) successful action sequence per task type
    (and, for tool episodes, per set of APIs their tools belong to)."""
    by_task: dict[tuple, list[Episode]] = {}
    for episode in successful(episodes):
        by_task.setdefault((episode.task, api_set(episode)), []).append(episode)
    return [memory for group in by_task.values() for memory in task_memories(group)]


def task_memories(episodes: list[Episode]) -> list[Memory]:
    if any(map(calls_of, episodes)):
        generalised, render, label = call_procedures(episodes), procedure_text, task_label(episodes[0])
    else:
        generalised, render, label = action_workflows(episodes), workflow_text, episodes[0].task
    kept: list[tuple[list[str], Memory]] = []
    for episode, (steps, placeholders) in zip(episodes, generalised):
        steps = compress(steps)
        twin = next((m for s, m in kept if SequenceMatcher(None, s, steps).ratio() >= SIMILAR), None)
        if twin:
            twin.source.append(episode.id)
            continue
        kept.append((steps, episode_memory(episode, render(label, steps, placeholders))))
    return [m for _, m in kept]


def action_workflows(episodes: list[Episode]) -> list[tuple[list[str], list[str]]]:
    varying, constant = object_roles([[s.action for s in e.steps] for e in episodes])
    return [generalise([s.action for s in e.steps], e.task_description, varying, constant) for e in episodes]


def api_set(episode: Episode) -> tuple[str, ...]:
    """The APIs the episode's tools say they belong to; () for a text game or tools that do not say."""
    owners = (API_OWNER.search(tool.get("description", "")) for tool in episode.tools or [])
    return tuple(sorted({m.group(1).strip() for m in owners if m}))


def task_label(episode: Episode) -> str:
    apis = api_set(episode)
    return f"{episode.task} task" + (" with the " + " and the ".join(apis) if apis else "")


def calls_of(episode: Episode) -> list[Call | None]:
    """Each action parsed as a call, None for a text reply; [] when none is a call (a text game)."""
    calls = [parse_call(s.action) for s in episode.steps]
    return calls if any(calls) else []


def user_words(episode: Episode, calls: list[Call | None]) -> str:
    """What the user said: the task, and the turns that answer the agent's text replies."""
    said = [step.observation for step, call in zip(episode.steps[1:], calls) if call is None]
    return " ".join([episode.task_description, *said]).lower()


def said_in(value, said: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        return False
    return re.search(rf"(?<!\w){re.escape(str(value).lower())}(?!\w)", said) is not None


def argument_values(calls: list[Call | None]) -> dict[tuple[str, str], set[str]]:
    """Per (function, argument name), the values an episode passed (as Python source)."""
    values: dict[tuple[str, str], set[str]] = {}
    for call in filter(None, calls):
        for name, value in arguments(call):
            values.setdefault((call.name, name), set()).add(repr(value))
    return values


def arguments(call: Call) -> list[tuple[str, object]]:
    """(name, value) of each argument; a positional one is named by its place (arg1, arg2, ...)."""
    return [(f"arg{i}", v) for i, v in enumerate(call.args, 1)] + list(call.kwargs.items())


def argument_roles(call_lists: list[list[Call | None]]) -> tuple[set, set]:
    """(varying, constant) arguments, as (function, name), of a task type's episodes: those passed
    more than one value, and those every episode passes one same value. One episode: neither."""
    passed = [argument_values(calls) for calls in call_lists]
    if len(passed) < 2:
        return set(), set()
    seen = {key: [values[key] for values in passed if key in values] for key in set().union(*passed)}
    varying = {key for key, sets in seen.items() if len(set().union(*sets)) > 1}
    constant = {key for key, sets in seen.items() if len(sets) == len(passed) and key not in varying}
    return varying, constant


def call_procedures(episodes: list[Episode]) -> list[tuple[list[str], list[str]]]:
    call_lists = [calls_of(e) or [None] * len(e.steps) for e in episodes]
    varying, constant = argument_roles(call_lists)
    return [generalise_calls(e, calls, varying, constant) for e, calls in zip(episodes, call_lists)]


def generalise_calls(
    episode: Episode, calls: list[Call | None], varying: set, constant: set
) -> tuple[list[str], list[str]]:
    """The episode's calls with argument values as placeholders where they vary across the task
    type's episodes, or the user said them and they are not constant (as `generalise` does for a
    text game's objects); long values cut; text replies as they are. A value the user said keeps
    one placeholder wherever it is passed (<day>, another day <day2>); one the user did not say
    (an id a result gave) is named by its argument alone. Returns the steps and the placeholders."""
    said, names, used = user_words(episode, calls), {}, []

    def shown(function: str, name: str, value) -> str:
        key = (function, name)
        if key in constant or (key not in varying and not said_in(value, said)):
            return short(value)
        if said_in(value, said):
            placeholder = names.get(repr(value)) or names.setdefault(repr(value), fresh(name, set(used)))
        else:  # never one a said value holds
            placeholder = fresh(name, set(names.values()))
        used.append(placeholder)
        return placeholder

    steps = [call_text(c, shown) if c else s.action for s, c in zip(episode.steps, calls)]
    return steps, list(dict.fromkeys(used))


def fresh(name: str, taken: set[str]) -> str:
    """<name>, or <name2>, <name3>, ... where that is taken."""
    placeholder, n = f"<{name}>", 2
    while placeholder in taken:
        placeholder, n = f"<{name}{n}>", n + 1
    return placeholder


def short(value) -> str:
    """A value as Python source, a long one cut: what is passed, not a tweet's whole text; a
    list, tuple, set or dict keeps its brackets and the first items that fit, each cut."""
    text = repr(value)
    if len(text) <= VALUE_CHARS:
        return text
    if isinstance(value, str):
        return repr(value[: VALUE_CHARS - 5] + "...")
    if isinstance(value, dict):
        return "{" + ", ".join(fitting([f"{short(k)}: {short(v)}" for k, v in value.items()])) + "}"
    if isinstance(value, (list, tuple, set)):
        return text[0] + ", ".join(fitting([short(v) for v in value])) + text[-1]
    return text[: VALUE_CHARS - 3] + "..."


def fitting(items: list[str]) -> list[str]:
    """The first items (at least one) whose text fits VALUE_CHARS, then "..." for the rest."""
    lengths = list(accumulate(len(item) + 2 for item in items))
    n = max(1, sum(1 for length in lengths if length <= VALUE_CHARS))
    return items[:n] + (["..."] if n < len(items) else [])


def call_text(call: Call, shown) -> str:
    """The call in Python syntax, each argument's value as `shown(function, name, value)` writes it."""
    parts = [
        (f"{name}=" if name in call.kwargs else "") + shown(call.name, name, value) for name, value in arguments(call)
    ]
    return f"{call.name}({', '.join(parts)})"


def procedure_text(task_type: str, steps: list[str], placeholders: list[str]) -> str:
    legend = f" ({', '.join(placeholders)}: the values of each task)" if placeholders else ""
    return f"To do a {task_type}{legend}: " + " ".join(f"{i}. {s}" for i, s in enumerate(steps, 1))


def episode_memory(episode: Episode, text: str, kind: str = "script", id_text: str | None = None) -> Memory:
    first = episode.steps[0].observation if episode.steps else ""
    return Memory(
        memory_id(id_text or text),
        episode.task,
        text,
        [episode.id],
        episode.task_description.strip(),
        kind,
        first.strip(),
    )


def gist(observation: str) -> str:
    """Its start and its end (where the agent is; the exits, what just happened), whole words."""
    text = " ".join(observation.split())
    if len(text) <= GIST_CHARS:
        return text
    half = GIST_CHARS // 2
    return text[:half].rsplit(" ", 1)[0] + " ... " + text[-half:].split(" ", 1)[-1]


def trajectory_text(episode: Episode) -> str:
    """A solved episode, compact: the task, then each action and the gist of what it led to. An
    action then its result, not an observation then the action taken on it: the first observation
    often comes back unchanged ("look around"), and two lines opening alike sent a reader round
    in a loop; after an action, the line holding it says what comes next."""
    steps = episode.steps[:MAX_STEPS]
    results = [result_gist(s.observation) for s in episode.steps[1 : len(steps) + 1]] + ["done"]
    lines = [f"{i}. {compact(s.action)} -> {result}" for i, (s, result) in enumerate(zip(steps, results), 1)]
    more = [f"... ({len(episode.steps) - MAX_STEPS} more steps)"] if len(episode.steps) > MAX_STEPS else []
    task = " ".join(episode.task_description.split())
    return "\n".join([f"Solved example of {episode.task}: {task}", *lines, *more])


def compact(action: str) -> str:
    """A call as parsed, its long values cut; any other action as it is."""
    call = parse_call(action)
    return call_text(call, lambda _function, _name, value: short(value)) if call else action


def result_gist(observation: str) -> str:
    """A JSON object's or list's gist (its keys and short values); any other observation's start and end."""
    try:
        data = json.loads(observation)
    except (json.JSONDecodeError, RecursionError):
        return gist(observation)
    return json_gist(data) if isinstance(data, (dict, list)) else gist(observation)


def json_gist(data, nested: bool = False) -> str:
    """{key: value, ...} of the first RESULT_KEYS keys, a nested object by its keys, a list by its length."""
    if isinstance(data, list):
        return f"[{len(data)} items]"
    if not isinstance(data, dict):
        return short(data)
    keys = list(data)[:RESULT_KEYS]
    items = keys if nested else [f"{k}: {json_gist(data[k], nested=True)}" for k in keys]
    more = [f"+{len(data) - len(keys)} more"] if len(data) > len(keys) else []
    return "{" + ", ".join(map(str, items + more)) + "}"


def of_kind(scripts: list[Memory], episodes: list[Episode], kind: str) -> list[Memory]:
    """Scripts as they are, or one memory per successful episode: its trajectory, or the script
    written from it then the trajectory (MemP's kinds). Identical ones merge."""
    if kind not in KINDS:
        raise DuomemError(f"unknown memory kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "script":
        return scripts
    script_of = {source: m.text for m in scripts for source in m.source}
    out = []
    for episode in successful(episodes):
        if kind == "both" and episode.id not in script_of:
            continue  # its writer's reply was dropped
        trajectory = trajectory_text(episode)
        out.append(
            episode_memory(
                episode, trajectory if kind == "trajectory" else f"{script_of[episode.id]}\n{trajectory}", kind
            )
        )
    return merge_duplicates(out)


def writer_content(episode: Episode) -> str:
    """What a model writer is asked about one episode."""
    return WRITER_PROMPT.format(
        setting="by calling tools" if episode.tools else "in a text game",
        task=episode.task_description.strip(),
        actions="; ".join(s.action for s in episode.steps),
    )


def writer_prompt(tokenizer, episode: Episode) -> str:
    content = writer_content(episode)
    if not getattr(tokenizer, "chat_template", None):
        return content + "\n\nMemory:\n"
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)


def strip_echo(reply: str, prompt: str) -> str:
    """The reply without the prompt it repeats at its start: runs of the prompt's words (case
    aside) from one of its line starts, each ending a reply line or ECHO_WORDS long, so an
    echo with other line breaks, or cut off, goes too."""
    words = prompt.lower().split()
    starts = set(accumulate((len(line.split()) for line in prompt.splitlines()), initial=0))
    while True:
        spans = [m.span() for m in re.finditer(r"\S+", reply)]
        ours = [reply[a:b].lower() for a, b in spans]
        n = max(sum(1 for _ in takewhile(lambda pair: pair[0] == pair[1], zip(ours, words[s:]))) for s in starts)
        if not n:
            return reply.strip()
        end = spans[n - 1][1]
        if n < ECHO_WORDS and n < len(spans) and "\n" not in reply[end : spans[n][0]]:
            return reply.strip()
        reply = reply[end:]


def step_words(text: str) -> list[str]:
    """Lowercase words without articles and numbers; a placeholder (X, Y, ...) becomes "*", any object."""
    words = ["*" if len(w) == 1 and w in PLACEHOLDERS else w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    return [w for w in words if w not in ARTICLES]


def names_a_step(text: str, actions: list[str]) -> bool:
    """Whether the text holds an action: its verb, then one of its objects (or a placeholder)
    within STEP_WINDOW words, so "take the red apple" holds "take apple 1". One-word actions
    (look, wait, inventory) never count: any text can hold those words. A call counts where the
    text names its function (book_flight)."""
    called = {call.name for call in map(parse_call, actions) if call}
    if any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) for name in called):
        return True
    words = step_words(text)
    for action in actions:
        (verb, _), *parts = action_parts(action)
        objects = {w for phrase, is_object in parts if is_object for w in step_words(phrase)}
        for i, word in enumerate(words):
            if objects and word == verb and any(w in objects or w == "*" for w in words[i + 1 : i + 1 + STEP_WINDOW]):
                return True
    return False


def vet_reply(reply: str, episode: Episode) -> tuple[str, str | None]:
    """The memory a writer's reply holds (no think block, no echoed prompt, 8 lines at most)
    and why it is dropped (one of DROPPED), None when it is kept. Never reworded."""
    text = re.sub(r"<think>.*?(</think>|$)", "", reply, flags=re.S).strip()
    if not text:
        return "", "empty"
    lines = strip_echo(text, writer_content(episode)).splitlines()[:8]
    text = "\n".join(line.rstrip() for line in lines).strip()
    if not text:
        return "", "echo only"
    if not names_a_step(text, [s.action for s in episode.steps]):
        return text, "no episode step"
    return text, None


@dataclass
class Written:
    """A writer's memories, and why the replies that gave none were dropped."""

    memories: list[Memory]
    attempted: int  # successful episodes asked for a memory
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{self.dropped[r]} {r}" for r in DROPPED if self.dropped[r])
        return f"dropped {self.dropped.total()} of {self.attempted} replies" + (f" ({reasons})" if reasons else "")


def written_by(episodes: list[Episode], reply) -> Written:
    """One memory per successful episode from `reply(episode)` (a model's raw text), vetted."""
    good = successful(episodes)
    written = Written([], len(good))
    for episode in Progress(good, desc="write", unit="episode"):
        text, dropped = vet_reply(reply(episode), episode)
        if dropped:
            written.dropped[dropped] += 1
        else:
            written.memories.append(episode_memory(episode, text, id_text=episode.task + text))
    return written


def model_memories(episodes: list[Episode], model, tokenizer, max_tokens: int = 160) -> Written:
    """Ask a model (teacher, or the student for the "student-generated memory" baseline) to
    write one memory per successful episode; greedy decoding."""
    from mlx_lm import generate  # noqa: PLC0415 (mlx-lm, transformers: 2 s that `memory write --writer rules` skips)

    return written_by(
        episodes, lambda e: generate(model, tokenizer, writer_prompt(tokenizer, e), max_tokens=max_tokens)
    )


def first_per_task(episodes: list[Episode], n: int | None) -> list[Episode]:
    """The first n successful episodes of each task type (all of them when n is None)."""
    if n is None:
        return episodes
    taken = Counter()
    kept = []
    for episode in successful(episodes):
        taken[episode.task] += 1
        if taken[episode.task] <= n:
            kept.append(episode)
    return kept


def write(
    episodes_path: str, writer: str, max_tokens: int = 160, per_task: int | None = None, kind: str = "script"
) -> Written:
    """`rules` or `model:PATH` over an episode log (the first `per_task` successes of each task
    type, when given), of a memory kind (KINDS; a trajectory needs no writer); unique ids."""
    episodes = first_per_task(read_episodes(episodes_path), per_task)
    if kind == "trajectory":
        written = Written([], len(successful(episodes)))
    elif writer == "rules":
        written = Written(rule_memories(episodes), len(successful(episodes)))
    elif writer.startswith("model:"):
        model, tokenizer = load(writer[len("model:") :])
        written = model_memories(episodes, model, tokenizer, max_tokens)
        if not written.memories:
            raise DuomemError(
                f"{writer} wrote no usable memory: {written.summary()}; "
                "use a stronger (instruction-tuned) model or --writer rules"
            )
    else:
        raise DuomemError(f"unknown --writer {writer}; use rules or model:PATH")
    written.memories = merge_duplicates(of_kind(written.memories, episodes, kind))
    return written
