"""Procedural memories from successful episodes: rule-based workflow induction, or an LLM writer."""

import re
from difflib import SequenceMatcher
from pathlib import Path

from tqdm import tqdm

from ..envs.base import Episode
from ..errors import DuomemError
from ..io import read_jsonl, require
from .bank import Memory, memory_id, merge_duplicates

PREPOSITIONS = {"from", "with", "on", "in", "into", "to", "at", "onto", "up", "down", "under", "inside", "using", "off", "for", "out"}
ARTICLES = {"the", "a", "an"}
DIRECTIONS = {"north", "south", "east", "west", "northeast", "northwest", "southeast", "southwest"}
PLACEHOLDERS = "XYZPQRTUVKLM"  # no W/N/E/S: they read like directions
MAX_STEPS = 40
SIMILAR = 0.9  # workflows of one task type this alike (difflib ratio over steps) are merged

WRITER_PROMPT = """Below is a successful trajectory of an agent in a text environment.
Write a short procedural memory (at most 5 lines) that would help an agent solve similar tasks:
the general steps in order, with specific object names replaced by their roles. Reply with the memory only.

Task: {task}

Trajectory:
{trajectory}"""


def read_episodes(path: str | Path) -> list[Episode]:
    path = Path(path)
    if not path.is_file():
        raise DuomemError(f"episode log {path} does not exist; write one with `duomem-mlx eval ... --log FILE` or `duomem-mlx teach`")
    return read_jsonl(path, parse_episode, "not an episode record: fix or delete that line")


def parse_episode(data, _where=None) -> Episode:
    episode = Episode.from_json(data)
    require(all(isinstance(s.action, str) and isinstance(s.observation, str) for s in episode.steps), "steps need text observation and action")
    require(isinstance(episode.task, str) and isinstance(episode.task_description, str), "task and task_description must be text")
    return episode


def successful(episodes: list[Episode]) -> list[Episode]:
    good = [e for e in episodes if e.success and e.steps]
    if not good:
        raise DuomemError(f"none of the {len(episodes)} episodes succeeded; memories are written from successful episodes only")
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
    (cooking's ingredient), and what all of them name (its cookbook). One episode: neither."""
    named = [named_objects(actions) for actions in action_lists]
    if len(named) < 2:
        return set(), set()
    constant = set.intersection(*named)
    return set.union(*named) - constant, constant


def generalise(actions: list[str], task_description: str, varying: set[str] = frozenset(), constant: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Replace the objects actions name by X, Y, ... where they vary across the task type's
    episodes, or the task description names them and they are not `constant` (named by every
    episode of the type: part of the procedure); directions stay.
    Returns the steps and the placeholders used, in order of first use."""
    described = task_description.lower()
    names: dict[str, str] = {}

    def placeholder(phrase: str) -> str:
        core = object_core(phrase)
        if not core or core in DIRECTIONS or core in constant:
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
    """One workflow per distinct (near-identical merged) successful action sequence per task type."""
    by_task: dict[str, list[Episode]] = {}
    for episode in successful(episodes):
        by_task.setdefault(episode.task, []).append(episode)
    return [memory for group in by_task.values() for memory in task_memories(group)]


def task_memories(episodes: list[Episode]) -> list[Memory]:
    varying, constant = object_roles([[s.action for s in e.steps] for e in episodes])
    kept: list[tuple[list[str], Memory]] = []
    for episode in episodes:
        steps, placeholders = generalise([s.action for s in episode.steps], episode.task_description, varying, constant)
        steps = compress(steps)
        twin = next((m for s, m in kept if SequenceMatcher(None, s, steps).ratio() >= SIMILAR), None)
        if twin:
            twin.source.append(episode.id)
            continue
        text = workflow_text(episode.task, steps, placeholders)
        kept.append((steps, Memory(memory_id(text), episode.task, text, [episode.id])))
    return [m for _, m in kept]


def trajectory_text(episode: Episode, max_observation: int = 200) -> str:
    lines = []
    for i, step in enumerate(episode.steps, 1):
        observation = " ".join(step.observation.split())
        if len(observation) > max_observation:
            observation = observation[:max_observation] + "..."
        lines.append(f"{i}. Observation: {observation}\n   Action: {step.action}")
    return "\n".join(lines)


def writer_prompt(tokenizer, episode: Episode) -> str:
    content = WRITER_PROMPT.format(task=episode.task_description.strip(), trajectory=trajectory_text(episode))
    if not getattr(tokenizer, "chat_template", None):
        return content + "\n\nMemory:\n"
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)


def clean_reply(text: str) -> str:
    text = re.sub(r"<think>.*?(</think>|$)", "", text, flags=re.S)
    return "\n".join(line.rstrip() for line in text.strip().splitlines()[:8]).strip()


def model_memories(episodes: list[Episode], model, tokenizer, max_tokens: int = 160) -> list[Memory]:
    """Ask a model (teacher, or the student for the "student-generated memory" baseline) to
    write one memory per successful episode; greedy decoding. Empty replies are dropped."""
    from mlx_lm import generate

    memories = []
    for episode in tqdm(successful(episodes), desc="write", unit="episode", disable=None):
        reply = clean_reply(generate(model, tokenizer, writer_prompt(tokenizer, episode), max_tokens=max_tokens))
        if reply:
            memories.append(Memory(memory_id(episode.task + reply), episode.task, reply, [episode.id]))
    return memories


def write(episodes_path: str, writer: str, max_tokens: int = 160) -> list[Memory]:
    """`rules` or `model:PATH` over an episode log; returns memories with unique ids."""
    episodes = read_episodes(episodes_path)
    if writer == "rules":
        memories = rule_memories(episodes)
    elif writer.startswith("model:"):
        from ..models import load

        model, tokenizer = load(writer[len("model:") :])
        memories = model_memories(episodes, model, tokenizer, max_tokens)
        if not memories:
            raise DuomemError(f"{writer} wrote only empty replies; use a stronger (instruction-tuned) model or --writer rules")
    else:
        raise DuomemError(f"unknown --writer {writer}; use rules or model:PATH")
    return merge_duplicates(memories)
