"""Environments behind one protocol (envs.base.Env): ScienceWorld, TextWorld, ALFWorld."""

from ..errors import DuomemError

NAMES = ("scienceworld", "textworld", "alfworld")


def make_env(name: str, **options):
    if name == "scienceworld":
        from .scienceworld import ScienceWorld

        return ScienceWorld(**options)
    if name == "textworld":
        from .textworld import TextWorld

        return TextWorld(**options)
    if name == "alfworld":
        from .alfworld import ALFWorld

        return ALFWorld(**options)
    raise DuomemError(f"unknown environment {name!r}; use one of {', '.join(NAMES)}")
