"""`-c config.yaml` for every command: the file's keys become option defaults, flags override."""

import json
from pathlib import Path

import click
import yaml

from .errors import DuomemError


def load_config(path: str | Path) -> dict:
    text = Path(path).read_text()
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise DuomemError(f"config {path} is not valid YAML/JSON ({e.__class__.__name__}); fix the file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DuomemError(f"config {path} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def csv_list(_ctx, _param, value):
    """Click callback: "a,b" (or a YAML list from -c) -> ["a", "b"]; nothing -> None."""
    if value is None or isinstance(value, (list, tuple)):
        return list(value) if value else None
    return [v.strip() for v in value.split(",") if v.strip()] or None


def _apply_config(ctx: click.Context, _param, value):
    if not value:
        return
    data = load_config(value)
    known = {p.name for p in ctx.command.params if p.name != "config"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DuomemError(
            f"config {value}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    ctx.default_map = {**(ctx.default_map or {}), **data}


config_option = click.option(
    "-c",
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    is_eager=True,
    expose_value=False,
    callback=_apply_config,
    help="YAML/JSON file with option values (command-line flags override it).",
)
