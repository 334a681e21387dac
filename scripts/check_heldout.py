"""Check that held-out games are held out by content, not only by seed: no test game has both
the action sequence (the oracle's gold path) and the first observation (the world it opens on)
of a training game.

    python scripts/check_heldout.py --train CACHE [CACHE ...] --test EVAL_LOG [--json OUT]

Training games are the episodes of teacher caches (`duomem-mlx teach`), test games those of an
`eval --policy oracle --log` file; any env. Exits 1 naming the first test game that repeats a
training game."""

import argparse
import json
import sys
from pathlib import Path

from duomem_mlx.formats.teacher_cache import read_cache_records


def content(episode: dict) -> tuple[tuple, str]:
    """(actions, first observation) of an episode record."""
    steps = episode.get("steps") or [{}]
    return tuple(s.get("action") for s in steps), steps[0].get("observation", "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", nargs="+", required=True, help="teacher caches of the training games")
    parser.add_argument("--test", required=True, help="eval --log of the held-out games (oracle policy)")
    parser.add_argument("--json", help="write the counts here")
    args = parser.parse_args()
    train = {(e["task"], e["variation"]): content(e) for cache in args.train for e in read_cache_records(cache)}
    test = {(e["task"], e["variation"]): content(e) for e in map(json.loads, Path(args.test).read_text().splitlines())}
    paths, worlds, seen = {p for p, _ in train.values()}, {w for _, w in train.values()}, set(train.values())
    same_path = same_world = 0
    for game, (path, world) in sorted(test.items()):
        if game in train:
            sys.exit(f"Error: test game {game} is a training game")
        if (path, world) in seen:
            sys.exit(f"Error: test game {game} repeats a training game's actions and first observation")
        same_path += path in paths
        same_world += world in worlds
    counts = {
        "train_games": len(train),
        "test_games": len(test),
        "distinct_train_paths": len(paths),
        "test_same_path": same_path,
        "test_same_world": same_world,
        "test_same_both": 0,
    }
    print(
        f"held out by content: none of the {len(test)} test games repeats the actions and first observation of any "
        f"of the {len(train)} training games ({same_path} share an action sequence, {same_world} a first observation; "
        f"{len(paths)} distinct training action sequences)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=2) + "\n")


if __name__ == "__main__":
    main()
