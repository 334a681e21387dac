"""Environments behind one protocol (envs.base.Env): ScienceWorld, TextWorld, ALFWorld, TextWorldExpress."""

from ..errors import DuomemError

NAMES = ("scienceworld", "textworld", "alfworld", "twx")


def make_env(name: str, game_params: str | None = None, **options):
    """`game_params` is --game-params: TextWorldExpress's only ("numLocations=2" for every game
    that takes the key, or "coin:numLocations=2;twc:numItemsToPutAway=3" game by game)."""
    if game_params and name != "twx":
        raise DuomemError(f"--game-params is for --env twx (TextWorldExpress) only, not {name}")
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
        from .twx import TextWorldExpress, game_params_option

        return TextWorldExpress(game_params_option(game_params), **options)
    raise DuomemError(f"unknown environment {name!r}; use one of {', '.join(NAMES)}")
