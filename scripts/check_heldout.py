"""Check that held-out TextWorld games are held out by content, not only by seed: no test game
has both the walkthrough and the world (facts, with entity names) of a training game.

    python scripts/check_heldout.py --train CACHE [CACHE ...] --test EVAL_LOG [--json OUT]

Training games are the episodes of teacher caches (`duomem-mlx teach`), test games those of an
`eval --log` file. Exits 1 naming the first test game that repeats a training game."""

import argparse
import json
import sys
from pathlib import Path

from duomem_mlx.envs.textworld import game_path
from duomem_mlx.teacher.cache import read_episodes


def game_content(task: str, seed: int) -> tuple[tuple, frozenset]:
    """(walkthrough, world facts with entity names) of a generated game."""
    game = json.loads(game_path(task, seed).with_suffix(".json").read_text())
    names = {i: (info.get("name") or i) for i, info in game["infos"]}
    fact = lambda f: (f["name"], *(names.get(a["name"], a["name"]) for a in f["arguments"]))
    return tuple(game["metadata"]["walkthrough"]), frozenset(map(fact, game["world"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", nargs="+", required=True, help="teacher caches of the training games")
    parser.add_argument("--test", required=True, help="eval --log of the held-out games")
    parser.add_argument("--json", help="write the counts here")
    args = parser.parse_args()
    train = {(e["task"], e["variation"]) for cache in args.train for e in read_episodes(cache)}
    test = {(e["task"], e["variation"]) for e in map(json.loads, Path(args.test).read_text().splitlines())}
    seen = {game: game_content(*game) for game in sorted(train)}
    walkthroughs = {w for w, _ in seen.values()}
    worlds = {w for _, w in seen.values()}
    same_walkthrough = same_world = 0
    for game in sorted(test):
        if game in train:
            sys.exit(f"Error: test game {game} is a training game")
        walkthrough, world = game_content(*game)
        same_walkthrough += walkthrough in walkthroughs
        same_world += world in worlds
        if (walkthrough, world) in seen.values():
            sys.exit(f"Error: test game {game} repeats a training game's walkthrough and world")
    counts = {"train_games": len(train), "test_games": len(test), "distinct_train_walkthroughs": len(walkthroughs),
              "test_same_walkthrough": same_walkthrough, "test_same_world": same_world, "test_same_both": 0}
    print(f"held out by content: none of the {len(test)} test games repeats the walkthrough and world of any of the "
          f"{len(train)} training games ({same_walkthrough} share a walkthrough, {same_world} a world; "
          f"{len(walkthroughs)} distinct training walkthroughs)")
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=2) + "\n")


if __name__ == "__main__":
    main()
