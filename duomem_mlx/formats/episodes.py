"""The episode log (`eval --log`, read by `memory write --episodes` and `memory search
--accuracy-on`): one played Episode per line, in Episode.to_json's compact form."""

import json
from pathlib import Path
from typing import TextIO

from duomem_mlx.envs.base import Episode
from duomem_mlx.errors import DuomemError
from duomem_mlx.io import read_jsonl, require


def game_of(episode_id: str) -> str:
    """env/task/variation of an episode id (env/task/variation/repeat): the game, whoever played it."""
    return episode_id.rsplit("/", 1)[0] if episode_id.count("/") >= 3 else episode_id


def write_episode(log: TextIO, episode: Episode) -> None:
    """Append one episode to an open log, flushed: a killed run keeps the episodes it finished."""
    log.write(json.dumps(episode.to_json(compact=True), ensure_ascii=False) + "\n")
    log.flush()


def read_episodes(path: str | Path) -> list[Episode]:
    path = Path(path)
    if not path.is_file():
        raise DuomemError(
            f"episode log {path} does not exist; write one with `duomem-mlx eval ... --log FILE` or `duomem-mlx teach`"
        )
    return read_jsonl(path, parse_episode, "not an episode record: fix or delete that line")


def parse_episode(data, _where=None) -> Episode:
    episode = Episode.from_json(data)
    require(
        all(isinstance(s.action, str) and isinstance(s.observation, str) for s in episode.steps),
        "steps need text observation and action",
    )
    require(
        isinstance(episode.task, str) and isinstance(episode.task_description, str),
        "task and task_description must be text",
    )
    return episode
