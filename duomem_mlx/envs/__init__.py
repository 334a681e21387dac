"""Environments behind one protocol (envs.base.Env): ScienceWorld, TextWorld, ALFWorld, TextWorldExpress."""

from ..errors import DuomemError

NAMES = ("scienceworld", "textworld", "alfworld", "twx")


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
    if name == "twx":
        from .twx import TextWorldExpress

        return TextWorldExpress(**options)
    raise DuomemError(f"unknown environment {name!r}; use one of {', '.join(NAMES)}")
