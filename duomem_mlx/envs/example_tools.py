"""An example environment whose actions are function calls: a week's calendar behind four tools.

It is the template for your own (docs/environments.md); load it as any outside environment:
`--env duomem_mlx.envs.example_tools:Calendar`. Three task types, each a procedure of calls:
book (look at a day, add an event at its first free hour), cancel (every event of a day) and
move (an event to another day, same hour). The agent ends an episode with `finish()`; the
checker then compares the calendar with the goal. Every variation is a seeded random calendar;
the splits keep to their own seed ranges."""

import json
import random

from duomem_mlx.envs.base import StepResult, TaskSpec, check_tasks, number_repeats
from duomem_mlx.envs.calls import Call, parse_call
from duomem_mlx.errors import DuomemError

DAYS = ("mon", "tue", "wed", "thu", "fri")
HOURS = (9, 10, 11, 12)
TITLES = ("standup", "review", "lunch", "call")
TASKS = ("book", "cancel", "move")
SPLIT_SEEDS = {"train": range(0, 1000), "dev": range(1000, 2000), "test": range(2000, 3000)}
TOOLS = [
    {
        "name": "list_events",
        "description": "The events of a day, by hour.",
        "parameters": {
            "type": "object",
            "properties": {"day": {"type": "string", "enum": list(DAYS)}},
            "required": ["day"],
        },
    },
    {
        "name": "add_event",
        "description": "Add an event at a free hour; returns its id.",
        "parameters": {
            "type": "object",
            "properties": {
                "day": {"type": "string", "enum": list(DAYS)},
                "hour": {"type": "integer", "enum": list(HOURS)},
                "title": {"type": "string", "enum": list(TITLES)},
            },
            "required": ["day", "hour", "title"],
        },
    },
    {
        "name": "cancel_event",
        "description": "Remove an event by its id.",
        "parameters": {"type": "object", "properties": {"event_id": {"type": "integer"}}, "required": ["event_id"]},
    },
    {"name": "finish", "description": "Say the task is done.", "parameters": {"type": "object", "properties": {}}},
]


class Calendar:
    name = "calendar"
    default_max_steps = 12

    def __init__(self):
        self.events: dict[int, tuple[str, int, str]] = {}  # id -> (day, hour, title)
        self.goal: list = []
        self.gold: list[str] = []

    def task_names(self) -> list[str]:
        return list(TASKS)

    def task_specs(self, tasks, split, episodes, seed) -> list[TaskSpec]:
        check_tasks(tasks, TASKS, "calendar task")
        seeds = random.Random(seed).sample(seed_range(split), episodes * len(tasks or [None]))
        names = tasks or [TASKS[i % len(TASKS)] for i in range(episodes)]
        per_task = episodes if tasks else 1
        return number_repeats([TaskSpec(self.name, names[i // per_task], s, split) for i, s in enumerate(seeds)])

    def reset(self, spec: TaskSpec) -> tuple[str, StepResult]:
        if spec.task not in TASKS:
            raise DuomemError(f"unknown calendar task {spec.task}; valid: {', '.join(TASKS)}")
        if spec.variation not in seed_range(spec.split):
            raise DuomemError(f"calendar seed {spec.variation} is not a {spec.split} seed")
        rng = random.Random(spec.variation * len(TASKS) + TASKS.index(spec.task))
        slots = rng.sample([(d, h) for d in DAYS for h in HOURS], 6)
        self.events = {i + 1: (d, h, rng.choice(TITLES)) for i, (d, h) in enumerate(slots)}
        task, self.gold = getattr(self, f"plan_{spec.task}")(rng)
        self.goal = sorted(self.after(self.gold))
        tools = ", ".join(f"{t['name']}({', '.join(t['parameters']['properties'])})" for t in TOOLS)
        first = f"Tools: {tools}. Days: {', '.join(DAYS)}; hours {HOURS[0]}-{HOURS[-1]}."
        return task, self.state(first)

    def plan_book(self, rng) -> tuple[str, list[str]]:
        day = rng.choice([d for d in DAYS if self.free(d)])
        title = rng.choice(TITLES)
        add = call("add_event", day=day, hour=self.free(day)[0], title=title)
        return f"Book a {title} on {day} at its first free hour.", [call("list_events", day=day), add, call("finish")]

    def plan_cancel(self, rng) -> tuple[str, list[str]]:
        day = rng.choice(sorted({d for d, _, _ in self.events.values()}))
        ids = [i for i, (d, _, _) in sorted(self.events.items()) if d == day]
        cancels = [call("cancel_event", event_id=i) for i in ids]
        return f"Cancel every event on {day}.", [call("list_events", day=day), *cancels, call("finish")]

    def plan_move(self, rng) -> tuple[str, list[str]]:
        moves = [(i, to) for i, (d, h, _) in self.events.items() for to in DAYS if to != d and h in self.free(to)]
        i, to = rng.choice(sorted(moves))
        day, hour, title = self.events[i]
        return (
            f"Move the {title} at {hour} on {day} to {to}, same hour.",
            [
                call("list_events", day=day),
                call("cancel_event", event_id=i),
                call("add_event", day=to, hour=hour, title=title),
                call("finish"),
            ],
        )

    def free(self, day: str) -> list[int]:
        taken = {h for d, h, _ in self.events.values() if d == day}
        return [h for h in HOURS if h not in taken]

    def after(self, actions: list[str]) -> list:
        """The calendar the actions leave (the gold path on a copy: the goal state)."""
        saved = dict(self.events)
        for action in actions:
            self.run(parse_call(action))
        events, self.events = list(self.events.values()), saved
        return events

    def step(self, action: str) -> StepResult:
        parsed = parse_call(action)
        if parsed is None or parsed.name not in {t["name"] for t in TOOLS}:
            return self.state(f"Error: not a call of {', '.join(t['name'] for t in TOOLS)}: {action[:80]!r}")
        if parsed.name == "finish":
            won = sorted(self.events.values()) == self.goal
            text = "Done." if won else "Finished, but the calendar is not as asked."
            return StepResult(text, [], 0.0, float(won), True, won)
        return self.state(self.run(parsed))

    def run(self, parsed: Call) -> str:
        try:
            return getattr(self, f"tool_{parsed.name}")(*parsed.args, **parsed.kwargs)
        except TypeError as e:  # wrong arguments: a tool's error, as a real API would answer
            return f"Error: {e}"

    def tool_list_events(self, day):
        by_hour = sorted(self.events.items(), key=lambda e: e[1][1])
        return json.dumps({h: f"#{i} {t}" for i, (d, h, t) in by_hour if d == day})

    def tool_add_event(self, day, hour, title):
        if day not in DAYS or hour not in HOURS or title not in TITLES:
            return "Error: no such day, hour or title"
        if hour not in self.free(day):
            return f"Error: {day} {hour} is taken"
        event_id = max(self.events, default=0) + 1
        self.events[event_id] = (day, hour, title)
        return json.dumps({"id": event_id})

    def tool_cancel_event(self, event_id):
        return f"Cancelled #{event_id}." if self.events.pop(event_id, None) else f"Error: no event #{event_id}"

    def tool_finish(self):
        return ""

    def state(self, observation: str) -> StepResult:
        return StepResult(observation, self.admissible())

    def admissible(self) -> list[str]:
        """Every call that makes sense now: what constrained decoding chooses from."""
        adds = [call("add_event", day=d, hour=h, title=t) for d in DAYS for h in self.free(d) for t in TITLES]
        return (
            [call("list_events", day=d) for d in DAYS]
            + adds
            + [call("cancel_event", event_id=i) for i in sorted(self.events)]
            + [call("finish")]
        )

    def expert_actions(self) -> list[str]:
        return list(self.gold)

    def tools(self) -> list[dict]:
        return TOOLS

    def close(self) -> None:
        pass


def call(name: str, **kwargs) -> str:
    return Call(name, (), kwargs).text


def seed_range(split: str) -> range:
    if split not in SPLIT_SEEDS:
        raise DuomemError(f"unknown split {split!r}; use one of {', '.join(SPLIT_SEEDS)}")
    return SPLIT_SEEDS[split]
