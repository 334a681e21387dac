"""Environments behind one protocol (envs.base.Env): the built-in ones by short name, a package's
through the `duomem_mlx.envs` entry-point group, any other as `module.path:ClassName`
(docs/environments.md). All three load the same way: import the module, check the class."""

import importlib
import inspect
import os
import sys
from importlib.metadata import entry_points

from duomem_mlx.errors import DuomemError

BUILTIN = {
    "scienceworld": "duomem_mlx.envs.scienceworld:ScienceWorld",
    "textworld": "duomem_mlx.envs.textworld:TextWorld",
    "alfworld": "duomem_mlx.envs.alfworld:ALFWorld",
    "twx": "duomem_mlx.envs.twx:TextWorldExpress",
    "bfcl": "duomem_mlx.envs.bfcl:BFCLMultiTurn",
}
NAMES = tuple(BUILTIN)
GROUP = "duomem_mlx.envs"
METHODS = ("task_names", "task_specs", "reset", "step", "expert_actions", "close")
ENV_HELP = (
    f"{' | '.join(NAMES)}, an entry point of group {GROUP}, or module.path:ClassName "
    "(your own environment: docs/environments.md)."
)


def make_env(name: str, game_params: str | None = None, **options):
    """`game_params` is --game-params, for environments whose constructor takes `game_params`
    (TextWorldExpress: "numLocations=2" for every game that takes the key, or
    "coin:numLocations=2;twc:numItemsToPutAway=3" game by game)."""
    env_class = load_env_class(name)
    if game_params:
        if "game_params" not in inspect.signature(env_class).parameters:
            raise DuomemError(f"--game-params: environment {name} takes none (its constructor has no game_params)")
        options["game_params"] = game_params
    env = env_class(**options)
    missing = [a for a in ("name", "default_max_steps") if not hasattr(env, a)]
    if missing:
        env.close()
        raise DuomemError(
            f"environment {name} has no attribute {', '.join(missing)}: the Env protocol needs both "
            "(docs/environments.md)"
        )
    return env


def load_env_class(name: str) -> type:
    """The class `name` stands for: a built-in, an entry point, or module.path:ClassName."""
    target = BUILTIN.get(name) or plugin_target(name) or (name if ":" in name else None)
    if target is None:
        plugins = sorted(ep.name for ep in entry_points(group=GROUP))
        known = ", ".join([*NAMES, *plugins])
        raise DuomemError(f"unknown environment {name!r}; use one of {known}, or module.path:ClassName for your own")
    module_name, _, class_name = target.partition(":")
    module = import_module(module_name, name, builtin=name in BUILTIN)
    env_class = getattr(module, class_name, None)
    if not inspect.isclass(env_class):
        raise DuomemError(f"--env {name}: module {module_name} has no class {class_name!r}")
    missing = [m for m in METHODS if not callable(getattr(env_class, m, None))]
    if missing:
        raise DuomemError(
            f"--env {name}: {class_name} lacks the Env protocol's method(s) {', '.join(missing)} (docs/environments.md)"
        )
    return env_class


def plugin_target(name: str) -> str | None:
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    return found[0].value if found else None


def import_module(module_name: str, name: str, builtin: bool):
    """The user's module, found as `python -c 'import module'` in the current directory would
    (a console script has no current directory on sys.path; it goes last, shadowing nothing)."""
    if not builtin and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name) and module_name[len(e.name) :][:1] in ("", "."):
            raise DuomemError(
                f"--env {name}: no module named {module_name!r} (run from the directory that holds it, "
                "or install its package)"
            )
        raise DuomemError(f"--env {name}: module {module_name} needs {e.name!r}, which is not installed")
    except SyntaxError as e:
        raise DuomemError(f"--env {name}: {e.filename}:{e.lineno}: {e.msg}")
