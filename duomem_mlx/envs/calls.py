"""Function calls as actions: a model's reply parsed into a tool name and literal arguments.

Two spellings are read: Python call syntax, `add_event(day='tue', hour=9)` (BFCL's prompting
format; positional arguments too), and JSON, `{"name": "add_event", "arguments": {"day": "tue"}}`.
Nothing of the reply is ever evaluated: the Python form goes through `ast.parse` and each
argument through `ast.literal_eval` (strings, numbers, booleans, None, lists, tuples, dicts,
sets of those), so `cd(folder=__import__('os').system('...'))` is refused, not run. `Call.text`
writes a parsed call back as Python source made only of those literals."""

import ast
import json
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """Python call syntax of the parsed literals: what a checker that `eval`s calls may see."""
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})"


def parse_call(text: str) -> Call | None:
    """The call `text` spells, or None when it is not exactly one call with literal arguments
    (free text, several calls, an expression, a non-finite number)."""
    text = text.strip()
    if text.startswith("```") and text.endswith("```") and len(text) > 6:  # a fenced reply
        text = text[3:-3].strip().removeprefix("python").removeprefix("json").strip()
    call = json_call(text) if text.startswith("{") else python_call(text)
    return call if call is not None and all(map(finite, [*call.args, *call.kwargs.values()])) else None


def python_call(text: str) -> Call | None:
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Name):
        return None
    if any(isinstance(a, ast.Starred) for a in tree.args) or any(k.arg is None for k in tree.keywords):
        return None  # *args, **kwargs
    try:
        args = tuple(ast.literal_eval(a) for a in tree.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return Call(tree.func.id, args, kwargs)


def json_call(text: str) -> Call | None:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"].isidentifier():
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # OpenAI's tool_calls carry the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(arguments, dict) or not all(isinstance(k, str) and k.isidentifier() for k in arguments):
        return None
    return Call(data["name"], (), arguments)


def finite(value) -> bool:
    """No inf or nan anywhere: their repr is no literal."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, complex):
        return math.isfinite(value.real) and math.isfinite(value.imag)
    if isinstance(value, dict):
        return all(map(finite, [*value.keys(), *value.values()]))
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(map(finite, value))
    return True
