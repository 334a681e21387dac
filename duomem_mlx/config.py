"""`-c config.yaml` for every command: the file's keys become option defaults, flags override.

Keys are the options' long names as `--help` shows them (`env`, `memory`, `max-steps` or
`max_steps`); the Python parameter names behind them (`env_name`) are accepted too."""

import json
from pathlib import Path

import click
import yaml

from duomem_mlx.errors import DuomemError
from duomem_mlx.io import read_text

SCALARS = (str, int, float, bool)


def load_config(path: str | Path) -> dict:
    text = read_text(path, "fix the config file")
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise DuomemError(f"config {path} is not valid YAML/JSON ({e.__class__.__name__}); fix the file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DuomemError(f"config {path} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


SPLITS = click.Choice(["train", "dev", "test"])


def csv_list(_ctx, _param, value):
    """Click callback: "a,b" (a YAML list from -c arrives joined) -> ["a", "b"]; nothing -> None."""
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()] or None


def long_names(param: click.Parameter) -> list[str]:
    """The names a user knows: `--max-steps` -> max-steps; an argument's own name."""
    if isinstance(param, click.Argument):
        return [param.name]
    return [opt[2:] for opt in param.opts if opt.startswith("--")]


def option_keys(command: click.Command) -> dict[str, click.Parameter]:
    """Config key -> parameter: every long option name (dashes as underscores) and the parameter name."""
    keys = {}
    for param in command.params:
        if param.name != "config":
            keys.update({name.replace("-", "_"): param for name in [param.name, *long_names(param)]})
    return keys


def check_value(ctx, path, key: str, param: click.Parameter, value):
    """One line for a value of the wrong kind or type (click's own message, without its usage block)."""
    lists = param.multiple or param.nargs != 1 or param.callback is csv_list
    ok = (
        value is None
        or isinstance(value, SCALARS)
        or (lists and isinstance(value, list) and all(isinstance(v, SCALARS) for v in value))
    )
    if not ok:
        wanted = "a value or a list of values" if lists else "a single value"
        raise DuomemError(f"config {path}: {key} must be {wanted}, not {type(value).__name__} {value!r}")
    if value is None or param.callback is csv_list:
        return
    try:
        for v in value if isinstance(value, list) else [value]:
            param.type.convert(v, param, ctx)
    except click.BadParameter as e:
        raise DuomemError(f"config {path}: {key}: {e.message}")


def _apply_config(ctx: click.Context, _param, value):
    if not value:
        return
    data = load_config(value)
    keys = option_keys(ctx.command)
    unknown = sorted(set(data) - set(keys))
    if unknown:
        valid = sorted({name for p in keys.values() for name in long_names(p)})
        raise DuomemError(f"config {value}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    defaults = {}
    for key, v in data.items():
        param = keys[key]
        check_value(ctx, value, key, param, v)
        if param.callback is csv_list and isinstance(v, list):
            v = ",".join(map(str, v))  # click would pass str(list) on to the callback
        defaults[param.name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


config_option = click.option(
    "-c",
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    is_eager=True,
    expose_value=False,
    callback=_apply_config,
    help="YAML/JSON file with option values (command-line flags override it).",
)


game_params_option = click.option(
    "--game-params",
    help="TextWorldExpress game parameters over the small defaults: 'numLocations=2' for every game that takes "
    "the key, or 'coin:numLocations=2;twc:numItemsToPutAway=3' game by game.",
)
