"""TextWorldExpress: eight procedural game types, each a different procedure (cooking, put-away,
coin, map reading, arithmetic, sorting, Simon says, pecking order), generated from a seed in
milliseconds by one JVM (py4j) that every reset reuses, with gold paths.

Splits are the package's folds. Most games draw their objects from a per-fold set, but coin and
mapreader make the same game from the same seed in every fold, so each split also keeps to the
package's own seed range (train 0-999, dev 10000-10999, test 20000-20999) and reset refuses a
seed from another split's range. The default game parameters are small (one to three rooms,
no doors); `game_params` changes them, key by key."""

import hashlib
import json
import random
from importlib.metadata import version

from duomem_mlx.envs.base import EnvCrashed, StepResult, TaskSpec, check_tasks, number_repeats
from duomem_mlx.envs.jvm import JavaBacked, require_java
from duomem_mlx.envs.scienceworld import sample
from duomem_mlx.errors import DuomemError
from duomem_mlx.io import cache_root, write_atomic

INSTALL = "pip install 'duomem-mlx[twx]' (or: pip install textworld-express)"
SPLIT_SEEDS = {"train": range(0, 1000), "dev": range(10_000, 11_000), "test": range(20_000, 21_000)}
# The keys each game accepts (GameGenerator.scala in textworld-express 1.1.0) and our defaults.
KNOWN_PARAMS = {
    "cookingworld": ("numLocations", "numIngredients", "numDistractorItems", "includeDoors", "limitInventorySize"),
    "twc": ("numLocations", "numItemsToPutAway", "includeDoors", "limitInventorySize"),
    "coin": ("numLocations", "numDistractorItems", "includeDoors", "limitInventorySize"),
    "mapreader": (
        "numLocations",
        "maxDistanceApart",
        "maxDistractorItemsPerLocation",
        "includeDoors",
        "limitInventorySize",
    ),
    "arithmetic": (),
    "sorting": (),
    "simonsays": ("gameLength", "numDistractors", "memorization"),
    "peckingorder": (),
}
GAMES = list(KNOWN_PARAMS)
# textworld-express 1.1.0 lists "cucumber" twice in peckingorder's dev objects: in 55 of its 1000
# dev seeds two cucumbers lie in the room, `take cucumber` takes the other one and the game is lost
# (its own gold path too). task_specs plays the gold path of such candidates and skips the losers.
CHECK_GOLD = {("peckingorder", "dev")}
# coin and mapreader draw no objects per fold: with few rooms the test range makes some of the
# train range's games again (coin in two rooms: 8 of its 32 distinct test games). Outside train,
# task_specs skips those, so held-out games are held out by content.
SAME_IN_EVERY_FOLD = {"coin", "mapreader"}
DEFAULT_PARAMS = {  # gold paths (100 seeds a split): cooking 7-13, twc 5-7, coin 2-17, mapreader 7-9, the rest 5-10
    "cookingworld": "numLocations=1,numIngredients=1,numDistractorItems=2,includeDoors=0,limitInventorySize=0",
    "twc": "numLocations=1,numItemsToPutAway=2,includeDoors=0,limitInventorySize=0",
    "coin": "numLocations=3,numDistractorItems=2,includeDoors=0,limitInventorySize=0",
    "mapreader": (
        "numLocations=3,maxDistanceApart=2,maxDistractorItemsPerLocation=1,includeDoors=0,limitInventorySize=0"
    ),
    "arithmetic": "",
    "sorting": "",
    "simonsays": "gameLength=5,numDistractors=3,memorization=0",
    "peckingorder": "",
}


def parse_params(text: str, where: str) -> dict[str, int]:
    """'key=1, other=0' as TextWorldExpress reads it (it ignores a malformed string silently)."""
    params = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, equals, value = (s.strip() for s in item.partition("="))
        try:
            params[key] = int(value)
        except ValueError:
            equals = ""
        if not key or not equals:
            raise DuomemError(
                f"bad TextWorldExpress game params {text!r} ({where}): "
                "write key=integer pairs, e.g. 'numLocations=2,includeDoors=0'"
            )
    return params


def game_params_option(text: str | None) -> str | dict[str, str] | None:
    """--game-params: "key=1,other=0" for every game that takes the keys, or "game:key=1;game2:key=2"."""
    if not text or ":" not in text:
        return text or None
    games = {}
    for item in filter(None, (p.strip() for p in text.split(";"))):
        game, colon, params = (s.strip() for s in item.partition(":"))
        if not colon:
            raise DuomemError(
                f"bad --game-params item {item!r}: write game:key=value[,key=value] items joined by ';', "
                "e.g. 'coin:numLocations=2;twc:numItemsToPutAway=3'"
            )
        games[game] = f"{games[game]},{params}" if game in games else params
    return games


def resolve_params(game_params: str | dict[str, str] | None) -> dict[str, str]:
    """Each game's parameter string: the defaults, with `game_params` merged in key by key. A dict
    names games ({"coin": "numLocations=5"}); a string goes to every game that knows its keys."""
    params = {game: parse_params(text, "default") for game, text in DEFAULT_PARAMS.items()}
    if isinstance(game_params, str):
        given = parse_params(game_params, "game_params")
        unknown = [k for k in given if not any(k in keys for keys in KNOWN_PARAMS.values())]
        if unknown:
            known = sorted({k for keys in KNOWN_PARAMS.values() for k in keys})
            raise DuomemError(f"no TextWorldExpress game takes {unknown[0]!r}; known: {', '.join(known)}")
        for game, keys in KNOWN_PARAMS.items():
            params[game].update({k: v for k, v in given.items() if k in keys})
    elif game_params:
        for game, text in game_params.items():
            if game not in KNOWN_PARAMS:
                raise DuomemError(f"unknown TextWorldExpress game {game!r} in game_params; valid: {', '.join(GAMES)}")
            given = parse_params(text, game)
            unknown = [k for k in given if k not in KNOWN_PARAMS[game]]
            if unknown:
                raise DuomemError(
                    f"{game} takes no game param {unknown[0]!r}; it takes: {', '.join(KNOWN_PARAMS[game]) or 'none'}"
                )
            params[game].update(given)
    return {game: ",".join(f"{k}={v}" for k, v in p.items()) for game, p in params.items()}


class TextWorldExpress(JavaBacked):
    name = "twx"
    default_max_steps = 50

    def __init__(self, game_params: str | dict[str, str] | None = None, step_limit: int = 1000):
        require_java("TextWorldExpress")  # our max_steps ends episodes; step_limit only backs it up
        try:
            from textworld_express import TextWorldExpressEnv  # noqa: PLC0415 (optional: the [twx] extra)
        except ImportError:
            raise DuomemError(f"TextWorldExpress is not installed: {INSTALL}")
        self.params = resolve_params(game_params_option(game_params) if isinstance(game_params, str) else game_params)
        self._make = lambda: TextWorldExpressEnv(envStepLimit=step_limit)
        self.env = self._make()
        self.gold: list[str] = []
        self._train_games: dict[str, set] = {}
        for game, params in self.params.items():  # the game's own range checks, now rather than mid-run
            try:
                self.env.load(game, params)
            except ValueError as e:
                self.close()
                raise DuomemError(f"TextWorldExpress rejects {game} params {params!r}: {str(e).strip()}")

    def task_names(self) -> list[str]:
        return list(GAMES)

    def task_specs(self, tasks, split, episodes, seed) -> list[TaskSpec]:
        check_tasks(tasks, GAMES, "TextWorldExpress game")
        rng = random.Random(seed)
        if tasks:
            return number_repeats(
                [TaskSpec(self.name, t, s, split) for t in tasks for s in self.seeds(rng, t, split, episodes)]
            )
        games = [GAMES[i % len(GAMES)] for i in range(episodes)]  # no game named: alternate the eight
        seeds = {g: iter(self.seeds(rng, g, split, games.count(g))) for g in GAMES}
        return number_repeats([TaskSpec(self.name, g, next(seeds[g]), split) for g in games])

    def seeds(self, rng: random.Random, task: str, split: str, n: int) -> list[int]:
        """n seeds of the split's range (distinct while it lasts), without the games that no one
        can win and, outside train, without the games that the train range also makes."""
        seeds = list(seed_range(split))
        if (task, split) not in CHECK_GOLD and (task not in SAME_IN_EVERY_FOLD or split == "train"):
            return sample(rng, seeds, n)
        rng.shuffle(seeds)
        good = []
        for s in seeds:
            if len(good) == n:
                return good
            if self.drawable(task, s, split):
                good.append(s)
        return [rng.choice(good) for _ in range(n)]

    def drawable(self, task: str, seed: int, split: str) -> bool:
        """Whether `seeds` may draw this game: its gold path wins (CHECK_GOLD), else the train
        range does not make it too."""
        if (task, split) in CHECK_GOLD:
            return self.gold_wins(task, seed, split)
        return self.game(task, seed, split) not in self.train_games(task)

    def game(self, task: str, seed: int, split: str) -> str:
        """What makes a game itself, hashed: its first observation and its gold path."""
        _, first = self.reset(TaskSpec(self.name, task, seed, split))
        return hashlib.sha1("\n".join([first.observation, *self.gold]).encode()).hexdigest()

    def train_games(self, task: str) -> set[str]:
        """Every game of the train range (coin's two rooms make only ~40: test seeds repeat some);
        ~6 s to generate, so kept on disk by package version and game params."""
        if task not in self._train_games:
            key = hashlib.sha1(f"{version('textworld-express')} {task} {self.params[task]}".encode()).hexdigest()[:16]
            path = cache_root() / "twx" / f"train-games-{task}-{key}.json"
            if path.is_file():
                games = set(json.loads(path.read_text()))
            else:
                games = {self.game(task, s, "train") for s in seed_range("train")}
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, json.dumps(sorted(games)))
            self._train_games[task] = games
        return self._train_games[task]

    def gold_wins(self, task: str, seed: int, split: str) -> bool:
        self.reset(TaskSpec(self.name, task, seed, split))
        for action in self.gold:
            state = self.step(action)
            if state.done:
                return state.won
        return False

    def reset(self, spec: TaskSpec) -> tuple[str, StepResult]:
        if spec.task not in GAMES:
            raise DuomemError(f"unknown TextWorldExpress game {spec.task}; valid: {', '.join(GAMES)}")
        seeds = seed_range(spec.split)
        if spec.variation not in seeds:
            raise DuomemError(
                f"TextWorldExpress seed {spec.variation} is not a {spec.split} seed ({seeds.start}-{seeds.stop - 1}); "
                "coin and mapreader would replay another split's games"
            )
        if not self.alive():
            self.restart()
        try:  # gameName and gameParams every time: load() also clears an error left by the last game
            observation, info = self.env.reset(
                seed=spec.variation,
                gameFold=spec.split,
                gameName=spec.task,
                gameParams=self.params[spec.task],
                generateGoldPath=True,
            )
            self.gold = list(self.env.getGoldActionSequence())
        except Exception as e:
            raise self.crashed(
                e, f"could not generate {spec.task} seed {spec.variation} ({self.params[spec.task] or 'no params'})"
            )
        if not self.gold:
            raise EnvCrashed(f"TextWorldExpress found no gold path for {spec.task} seed {spec.variation}")
        return info["taskDescription"].strip(), self.result(observation, info, done=False)

    @staticmethod
    def result(observation: str, info: dict, done: bool) -> StepResult:
        score = float(info.get("score", 0))  # -1 on a failed game (taskfailure)
        won = bool(info.get("tasksuccess")) or score >= 1.0
        text = "\n".join(line.rstrip() for line in observation.strip().splitlines())
        return StepResult(
            text, sorted(info.get("validActions", [])), 0.0, min(max(score, 0.0), 1.0), done, done and won
        )

    def expert_actions(self) -> list[str]:
        return list(self.gold)

    def crashed(self, error: Exception, doing: str = "failed") -> EnvCrashed:
        if not self.alive():
            self.close()
            return EnvCrashed(
                "the TextWorldExpress JVM died; the episode counts as failed and the next one restarts it"
            )
        java = getattr(error, "java_exception", None)  # py4j's Py4JJavaError: a Scala exception, the JVM lives on
        message = str(java.getMessage()) if java is not None else f"{error.__class__.__name__}: {error}"
        return EnvCrashed(f"TextWorldExpress {doing}: {message.strip()[:300]}")


def seed_range(split: str) -> range:
    if split not in SPLIT_SEEDS:
        raise DuomemError(f"unknown split {split!r}; use one of {', '.join(SPLIT_SEEDS)}")
    return SPLIT_SEEDS[split]
