"""Memory bank, retrieval, writers and the `memory` CLI, on real tiny models and real TextWorld games."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner

from duomem_mlx.cli import cli
from duomem_mlx.envs.base import Episode, Step
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.bank import FORMAT, MemoryBank
from duomem_mlx.formats.episodes import read_episodes
from duomem_mlx.formats.memories import Memory, read_memories, write_memories
from duomem_mlx.memory.writer import (
    GIST_CHARS,
    first_per_task,
    generalise,
    gist,
    model_memories,
    of_kind,
    rule_memories,
    vet_reply,
    writer_content,
    writer_prompt,
)
from duomem_mlx.runtime.embed import build, embed
from duomem_mlx.runtime.models import load
from duomem_mlx.runtime.retrieval import accuracy, retrieve

MEMORIES = [
    {
        "id": "heat-1",
        "task_type": "heat",
        "text": "To heat X: go to the microwave, open it, put X inside, close it, wait.",
    },
    {"id": "heat-2", "task_type": "heat", "text": "To warm a drink: pour it into a mug and use the stove."},
    {
        "id": "cool-1",
        "task_type": "cool",
        "text": "To cool X: take X, go to the fridge, open the fridge, put X in the fridge.",
    },
    {"id": "cool-2", "task_type": "cool", "text": "Frozen things melt when left on the counter for a while."},
    {
        "id": "key-1",
        "task_type": "tw-simple",
        "text": "Workflow: open X, take Y from X, unlock Z with Y, open Z, go east.",
    },
    {"id": "any-1", "task_type": "", "text": "Look around before acting; examine objects you do not know."},
]


@pytest.fixture(scope="module")
def student(tiny_model):
    return load(str(tiny_model))


@pytest.fixture(scope="module")
def bank(student, tiny_model):
    return build(MEMORIES, *student, embedder=str(tiny_model))


def run(*args):
    result = CliRunner().invoke(cli, ["memory", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def error_of(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_retrieval_returns_closest_and_filters(bank, student):
    model, tokenizer = student
    for memory in MEMORIES:
        found = retrieve(bank, model, tokenizer, memory["text"], k=3)
        assert found[0].id == memory["id"]
    hits = bank.search(embed(model, tokenizer, [MEMORIES[0]["text"]])[0], k=10, task_type="cool")
    assert [m.task_type for m, _ in hits] == ["cool", "cool"]
    assert hits[0][1] >= hits[1][1]
    assert bank.search(embed(model, tokenizer, [MEMORIES[0]["text"]])[0], 3, "unknown-task") == []
    vector = np.array(bank.keys[2].astype(mx.float32))
    assert bank.search(vector, 1)[0][0].id == "cool-1" and bank.search(vector, 1)[0][1] == pytest.approx(1, abs=1e-3)


def test_retrieval_is_by_similarity_alone_unless_filtered_by_task(bank, student):
    cool = MEMORIES[2]["text"]  # asked by a heat episode: the cool memory is the closest
    assert retrieve(bank, *student, cool, "heat", k=1)[0].id == "cool-1"
    filtered = retrieve(bank, *student, cool, "heat", k=3, memory_filter="task")
    assert [m.task_type for m in filtered] == ["heat", "heat"]
    assert (
        retrieve(bank, *student, cool, "boil", k=1, memory_filter="task")[0].id == "cool-1"
    )  # no boil memories: all of them
    assert retrieve(None, *student, cool, k=3) == [] and retrieve(bank, *student, cool, k=0) == []
    with pytest.raises(DuomemError, match="unknown memory filter"):
        retrieve(bank, *student, cool, k=1, memory_filter="type")


def test_retrieval_accuracy_is_the_share_of_top_1_memories_of_the_true_type(bank, student, tmp_path):
    queries = [
        (MEMORIES[0]["text"], "heat"),
        (MEMORIES[2]["text"], "cool"),
        (MEMORIES[4]["text"], "heat"),
        (MEMORIES[3]["text"], "cool"),
    ]
    assert accuracy(bank, *student, [(text, "", task) for text, task in queries]) == 0.75
    assert (
        accuracy(bank, *student, [(MEMORIES[2]["text"], "", "heat")]) == 0.0
    )  # the filter never helps: similarity alone
    with pytest.raises(DuomemError, match="no queries"):
        accuracy(bank, *student, [])
    log = tmp_path / "episodes.jsonl"
    log.write_text(
        "".join(
            json.dumps(episode(f"e{i}", task, text, ["look"]).to_json()) + "\n"
            for i, (text, task) in enumerate(queries)
        )
    )
    path = bank.save(tmp_path / "bank")
    result = run("search", path, "--accuracy-on", log)
    assert result.exit_code == 0 and result.output == "top-1 task type accuracy 75.0% over 4 episodes\n", result.output
    assert run("search", path, "--accuracy-on", log, "--json", tmp_path / "r.json").exit_code == 0
    assert json.loads((tmp_path / "r.json").read_text()) | {"by": None} == {
        "accuracy": 0.75,
        "episodes": 4,
        "per_task": {"cool": 1.0, "heat": 0.5},
        "by": None,
    }
    assert "pass it with --accuracy-on" in error_of(run("search", path, "heat", "--json", tmp_path / "q.json"))
    assert "exactly one of QUERY or --accuracy-on" in error_of(run("search", path))
    assert "exactly one of QUERY or --accuracy-on" in error_of(run("search", path, "heat", "--accuracy-on", log))


def test_batched_embedding_equals_one_by_one(student):
    texts = [m["text"] for m in MEMORIES]
    batched = embed(*student, texts, batch_size=4)
    single = mx.concatenate([embed(*student, [t]) for t in texts])
    assert mx.allclose(batched, single, atol=1e-5).item()
    assert mx.allclose(mx.linalg.norm(batched, axis=-1), mx.ones(len(texts)), atol=1e-5).item()


def test_save_load_round_trip(bank, student, tmp_path):
    bank.save(tmp_path / "bank")
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == ["bank.json", "keys.safetensors", "memories.jsonl"]
    loaded = MemoryBank.load(tmp_path / "bank")
    assert loaded.memories == bank.memories and loaded.info == bank.info
    assert loaded.keys.dtype == mx.float16 and mx.array_equal(loaded.keys, bank.keys).item()
    assert loaded.info["format"] == FORMAT and loaded.info["count"] == len(MEMORIES) and loaded.dim == 64
    loaded.check_embedder(*student)
    assert retrieve(loaded, *student, MEMORIES[4]["text"], k=1)[0].id == "key-1"


def test_other_embedder_is_refused(bank, tiny_teacher, tiny_model, tmp_path):
    teacher = load(str(tiny_teacher))
    with pytest.raises(DuomemError, match="another embedder"):
        bank.check_embedder(*teacher)
    with pytest.raises(DuomemError, match="another embedder"):
        retrieve(bank, *teacher, "heat the apple", k=1)
    bank.save(tmp_path / "bank")
    assert "another embedder" in error_of(run("search", tmp_path / "bank", "heat", "--embedder", tiny_teacher))
    # same architecture and tokenizer, other weights: still refused
    other = shutil.copytree(tiny_model, tmp_path / "other")
    weights = mx.load(str(other / "model.safetensors"))
    weights = {k: v * 1.01 if "layers.1.mlp" in k else v for k, v in weights.items()}
    mx.save_safetensors(str(other / "model.safetensors"), weights)
    with pytest.raises(DuomemError, match="another embedder"):
        bank.check_embedder(*load(str(other)))


def test_thousand_memories_at_hidden_2048_under_5mb(tmp_path):
    memories = [
        Memory(
            f"mem-{i:04d}",
            f"task-{i % 30}",
            "Workflow for boil: "
            + ", ".join(["go to kitchen", "pick up X", "move X to stove", "activate stove", "wait"] * 3),
            [f"ep/{i}"],
        )
        for i in range(1000)
    ]
    keys = mx.random.normal((1000, 2048))
    keys = (keys / mx.linalg.norm(keys, axis=-1, keepdims=True)).astype(mx.float16)
    bank = MemoryBank(
        memories,
        keys,
        {"format": FORMAT, "embedder": "x", "adapter_path": None, "fingerprint": "0" * 64, "dim": 2048, "count": 1000},
    )
    path = bank.save(tmp_path / "bank")
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 5_000_000, size
    loaded = MemoryBank.load(path)
    assert loaded.search(np.array(keys[123].astype(mx.float32)), 1)[0][0].id == "mem-0123"


def test_bad_memory_files_name_the_line(tmp_path, tiny_model):
    good = json.dumps(MEMORIES[0])
    cases = {
        "json.jsonl": [good, "", "{not json"],
        "notext.jsonl": [good, json.dumps({"id": "x", "task_type": "heat"})],
        "dup.jsonl": [good, good],
        "list.jsonl": ["[1, 2]"],
    }
    expected = {"json.jsonl": "line 3", "notext.jsonl": "line 2", "dup.jsonl": "line 2", "list.jsonl": "line 1"}
    for name, lines in cases.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        with pytest.raises(DuomemError, match=expected[name]):
            read_memories(tmp_path / name)
        assert expected[name] in error_of(
            run("build", "--memories", tmp_path / name, "--embedder", tiny_model, "--out", tmp_path / "b")
        )
    assert "does not exist" in error_of(
        run("build", "--memories", tmp_path / "none.jsonl", "--embedder", tiny_model, "--out", tmp_path / "b")
    )
    (tmp_path / "ok.jsonl").write_text(good + "\n")
    assert "does not exist" in error_of(
        run("build", "--memories", tmp_path / "ok.jsonl", "--embedder", tmp_path / "no-model", "--out", tmp_path / "b")
    )


def test_missing_or_corrupt_bank(bank, tmp_path):
    assert "no memory bank" in error_of(run("show", tmp_path / "nowhere"))
    path = bank.save(tmp_path / "bank")
    (path / "keys.safetensors").unlink()
    assert "missing keys.safetensors" in error_of(run("show", path))
    (path / "keys.safetensors").write_bytes(b"garbage, not safetensors")
    assert "corrupt" in error_of(run("show", path))
    bank.save(path)
    for text in ("{", json.dumps({"format": FORMAT})):
        (path / "bank.json").write_text(text)
        assert "corrupt" in error_of(run("show", path))
    bank.save(path)
    with open(path / "memories.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more memory than keys"}) + "\n")
    assert "corrupt" in error_of(run("show", path))


def episode(eid, task, description, actions, success=True):
    return Episode(
        eid,
        "textworld",
        task,
        0,
        description,
        success,
        1.0 if success else 0.0,
        [Step(f"obs {i}", a, [a]) for i, a in enumerate(actions)],
    )


def test_rules_writer_generalises_and_merges():
    steps, names = generalise(
        ["take apple 1 from countertop 2", "go east", "heat apple 1 with microwave 1", "look"],
        "Heat some apple and put it in the fridge.",
    )
    assert steps == ["take X from countertop 2", "go east", "heat X with microwave 1", "look"] and names == ["X"]
    episodes = [
        episode(
            "a",
            "tw",
            "Take the red key from the chest, unlock the door.",
            ["open chest", "take red key from chest", "unlock door with red key", "go east"],
        ),
        episode(
            "b",
            "tw",
            "Get the blue card from the box and unlock the gate.",
            ["open box", "take blue card from box", "unlock gate with blue card", "go east"],
        ),
        episode("c", "tw", "Get the blue card from the box and unlock the gate.", ["wait", "wait", "wait", "open box"]),
        episode(
            "d",
            "other",
            "Take the red key from the chest, unlock the door.",
            ["open chest", "take red key from chest", "unlock door with red key", "go east"],
        ),
        episode("e", "tw", "Eat the apple.", ["eat apple"], success=False),
    ]
    memories = rule_memories(episodes)
    assert [(m.task_type, m.source) for m in memories] == [("tw", ["a", "b"]), ("tw", ["c"]), ("other", ["d"])]
    assert (
        memories[0].text
        == "Workflow for tw (X, Y, Z: the objects of each task): open X, take Y from X, unlock Z with Y, go east."
    )
    assert "wait (x3)" in memories[1].text
    assert len({m.id for m in memories}) == 3
    assert [m.task for m in memories] == [
        episodes[0].task_description,
        episodes[2].task_description,
        episodes[3].task_description,
    ]
    with pytest.raises(DuomemError, match="none of the 1 episodes succeeded"):
        rule_memories(episodes[-1:])
    assert [e.id for e in first_per_task(episodes, 1)] == ["a", "d"] and first_per_task(episodes, None) == episodes


def test_rules_writer_generalises_what_varies_and_keeps_what_is_constant():
    hungry = "You are hungry! Check the cookbook in the kitchen for the recipe."
    episodes = [
        episode(
            "a",
            "cooking",
            hungry,
            ["inventory", "examine cookbook", "take red apple from fridge", "prepare meal", "eat meal"],
        ),
        episode(
            "b",
            "cooking",
            hungry,
            ["inventory", "examine cookbook", "take carrot from counter", "prepare meal", "eat meal"],
        ),
        episode(
            "c",
            "cooking",
            hungry,
            ["inventory", "examine cookbook", "take red apple 1 from fridge", "prepare meal", "eat meal"],
        ),
    ]
    [memory] = rule_memories(episodes)
    assert (
        memory.text == "Workflow for cooking (X, Y: the objects of each task): "
        "inventory, examine cookbook, take X from Y, prepare meal, eat meal."
    )
    assert memory.source == ["a", "b", "c"]
    [alone] = rule_memories(episodes[:1])  # one episode: nothing is seen to vary
    assert "take red apple from fridge" in alone.text
    find = "Take the coin that is located in the office, and put it into the box."
    roads = [
        episode(
            f"m{i}", "mapreader", find, ["read map", f"move {there}", "take coin", f"move {back}", "put coin in box"]
        )
        for i, (there, back) in enumerate([("north", "south"), ("east", "west"), ("west", "east")])
    ]
    [route] = rule_memories(roads)  # where the coin lies varies: the way there is the task's, the procedure is one
    assert (
        route.text == "Workflow for mapreader (X, Y: the objects of each task): "
        "read map, move X, take coin, move Y, put coin in box."
    )


def play_textworld(tmp_path, seed) -> Episode:
    import textworld  # noqa: PLC0415 (optional: the [textworld] extra; the test skips without it)

    game = tmp_path / f"game{seed}.z8"
    tw_make = Path(sys.executable).parent / "tw-make"
    subprocess.run(
        [
            str(tw_make),
            "tw-simple",
            "--rewards",
            "dense",
            "--goal",
            "detailed",
            "--seed",
            str(seed),
            "--output",
            str(game),
            "-f",
            "--silent",
        ],
        check=True,
    )
    env = textworld.start(
        str(game), textworld.EnvInfos(admissible_commands=True, won=True, objective=True, extras=["walkthrough"])
    )
    state = env.reset()
    played = Episode(f"textworld/tw-simple/{seed}/0", "textworld", "tw-simple", seed, state.objective, False, 0.0)
    for action in state["extra.walkthrough"]:
        played.steps.append(Step(state.feedback, action, list(state.admissible_commands)))
        state, played.score, _ = env.step(action)
    played.success = bool(state.won)
    env.close()
    return played


@pytest.fixture(scope="module")
def textworld_log(tmp_path_factory, need_env):
    need_env("textworld")
    tmp_path = tmp_path_factory.mktemp("textworld")
    episodes = [play_textworld(tmp_path, seed) for seed in (1, 3)]
    log = tmp_path / "episodes.jsonl"
    log.write_text("".join(json.dumps(e.to_json()) + "\n" for e in episodes))
    return log


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rules_writer_and_cli_on_real_textworld_games(textworld_log, tiny_model, tmp_path):
    episodes = read_episodes(textworld_log)
    assert all(e.success for e in episodes)
    result = run("write", "--episodes", textworld_log, "--writer", "rules", "--out", tmp_path / "memories.jsonl")
    assert result.exit_code == 0, result.output
    memories = read_memories(tmp_path / "memories.jsonl")
    assert len(memories) == 2 and {m.task_type for m in memories} == {"tw-simple"}
    for memory, played in zip(memories, episodes):
        assert memory.source == [played.id]
        # both games have the old key, wooden door and stove (kept); the container and food differ
        assert "open X, take old key from X, unlock wooden door with old key, open wooden door, go east" in memory.text
        for entity in ("chest drawer", "antique trunk"):
            assert entity not in memory.text

    result = run(
        "build", "--memories", tmp_path / "memories.jsonl", "--embedder", tiny_model, "--out", tmp_path / "bank"
    )
    assert result.exit_code == 0 and "wrote 2 memories (dim 64" in result.output, result.output
    result = run("search", tmp_path / "bank", memories[1].text, "-k", "1")
    assert result.exit_code == 0 and memories[1].id in result.output, result.output
    result = run("search", tmp_path / "bank", memories[1].text, "-k", "2", "--task-type", "nothing")
    assert result.exit_code == 0 and result.output == ""
    result = run("show", tmp_path / "bank")
    assert (
        result.exit_code == 0
        and "tw-simple: 2" in result.output
        and f"{memories[0].id}  [tw-simple, script]" in result.output
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_memory_kinds_on_real_textworld_games_trajectories_and_both(textworld_log, tmp_path):
    """MemP's kinds: a trajectory keeps each step (the action, then the gist of what it led to), in order;
    both is the rule writer's script, then that trajectory; each memory records its kind and first observation."""
    episodes = read_episodes(textworld_log)
    scripts = {m.source[0]: m for m in rule_memories(episodes)}
    for kind in ("trajectory", "both"):
        assert (
            run("write", "--episodes", textworld_log, "--kind", kind, "--out", tmp_path / f"{kind}.jsonl").exit_code
            == 0
        )
        memories = read_memories(tmp_path / f"{kind}.jsonl")
        assert [m.source for m in memories] == [[e.id] for e in episodes] and {m.kind for m in memories} == {kind}
        for memory, played in zip(memories, episodes):
            lines = memory.text.splitlines()
            if kind == "both":
                assert lines.pop(0) == scripts[played.id].text
            assert lines[0].startswith(f"Solved example of tw-simple: {' '.join(played.task_description.split())[:40]}")
            results = [gist(s.observation) for s in played.steps[1:]] + ["done"]
            assert lines[1:] == [
                f"{i}. {s.action} -> {result}" for i, (s, result) in enumerate(zip(played.steps, results), 1)
            ]
            assert (
                memory.observation == played.steps[0].observation.strip()
                and memory.task == played.task_description.strip()
            )
    long = " ".join(f"word{i}" for i in range(100)) + " To the North you see the pantry."
    assert (
        len(gist(long)) <= GIST_CHARS + 5 and gist(long).startswith("word0 ") and gist(long).endswith("see the pantry.")
    )
    assert gist("You take the coin.") == "You take the coin."
    assert of_kind(list(scripts.values()), episodes, "script") == list(scripts.values())
    with pytest.raises(DuomemError, match="unknown memory kind"):
        of_kind([], episodes, "story")
    assert "unknown kind" in error_of(
        run("build", "--memories", write_bad_kind(tmp_path), "--embedder", "x", "--out", tmp_path / "b")
    )


def write_bad_kind(tmp_path) -> Path:
    path = tmp_path / "bad-kind.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "do it", "kind": "story"}) + "\n")
    return path


def test_keys_with_the_first_observation_tell_games_of_one_task_apart(student, tmp_path):
    """Every coin game has one task text; the first observation says where the agent starts and where the exits lead."""
    task = "Your task is to search the environment and find the coin."
    starts = {
        "north": "You are in the kitchen. You see a stove. To the North you see the pantry.",
        "west": "You are in the garage. You see a bicycle and a toolbox. To the West you see the driveway.",
    }
    memories = [
        Memory(f"coin-{way}", "coin", f"move {way}, take coin", [f"twx/coin/{i}/0"], task, "trajectory", seen)
        for i, (way, seen) in enumerate(starts.items())
    ]
    by_task, by_game = build(memories, *student), build(memories, *student, key="task+observation")
    assert by_game.info["key"] == "task+observation" and by_task.key == "task"
    assert mx.allclose(by_task.keys[0], by_task.keys[1], atol=1e-3).item()  # one task text: the games look alike
    for way, seen in starts.items():
        assert retrieve(by_game, *student, task, k=1, observation=seen)[0].id == f"coin-{way}"
    loaded = MemoryBank.load(by_game.save(tmp_path / "bank"))
    assert loaded.key == "task+observation" and read_memories(tmp_path / "bank" / "memories.jsonl") == memories
    assert retrieve(loaded, *student, task, k=1, observation=starts["west"])[0].id == "coin-west"
    # a memory written from the game being played never comes back, whoever played it (another repeat too)
    assert [
        m.id for m in retrieve(loaded, *student, task, k=2, observation=starts["west"], exclude_games={"twx/coin/1"})
    ] == ["coin-north"]
    assert retrieve(loaded, *student, task, k=2, exclude_games={"twx/coin/0", "twx/coin/1"}) == []
    induced = build([Memory("coin-any", "coin", "move X, take coin", ["twx/coin/0/0", "twx/coin/5/0"], task)], *student)
    assert [m.id for m in retrieve(induced, *student, task, k=1, exclude_games={"twx/coin/0"})] == [
        "coin-any"
    ]  # not this game's alone
    unsourced = build([Memory("coin-rule", "coin", "take the coin", [], task)], *student)
    assert [m.id for m in retrieve(unsourced, *student, task, k=1, exclude_games={"twx/coin/0"})] == ["coin-rule"]
    with pytest.raises(DuomemError, match="unknown key"):
        build(memories, *student, key="everything")


HEAT = episode(
    "ep/1", "heat", "Heat the apple.", ["take apple 1 from countertop 2", "heat apple 1 with microwave 1", "look"]
)


def test_model_writer_strips_an_echoed_prompt_and_drops_replies_without_a_step():
    prompt = writer_content(HEAT)
    instruction = prompt.split("\nTask:")[0]
    good = "Go to the countertop and take the apple.\nHeat the apple with the microwave."
    assert vet_reply(good, HEAT) == (good, None)  # kept word for word
    assert vet_reply(instruction + "\n\n" + good, HEAT) == (good, None)
    assert vet_reply(" ".join(prompt.split()[:30]) + " take X, heat X with Y", HEAT) == (
        "take X, heat X with Y",
        None,
    )  # echo in one line
    assert vet_reply("<think>\nhm</think>\n\n  Take the apple.\n  Heat the apple.  \n", HEAT) == (
        "Take the apple.\n  Heat the apple.",
        None,
    )
    # what SmolLM2-135M-Instruct wrote: the instruction, then no step of the episode
    smol = instruction + "\nThe code: ```# This is a code that can be used to create a game."
    assert vet_reply(smol, HEAT) == (
        "The code: ```# This is a code that can be used to create a game.",
        "no episode step",
    )
    assert vet_reply(prompt, HEAT) == ("", "echo only")  # the trajectory's actions echoed do not count
    assert vet_reply("Look around, then look again.", HEAT)[1] == "no episode step"  # one-word actions never count
    assert (
        vet_reply("Take the microwave home.", HEAT)[1] == "no episode step"
    )  # a verb of it, not with an object of that action
    assert vet_reply(" \n<think>only thoughts</think>", HEAT) == ("", "empty")


def test_model_writer_says_what_it_dropped_and_the_counts_add_up(tiny_model, tmp_path, monkeypatch):
    played = [
        copy.deepcopy(HEAT),
        episode("ep/2", "heat", "Heat the egg.", ["take egg", "heat egg with stove"]),
        episode("ep/3", "cool", "Cool the milk.", ["take milk", "cool milk with fridge"]),
        episode("ep/4", "heat", "x", ["a"], False),
    ]
    played[0].steps[0].observation = "You are in a kitchen. " * 50
    model, tokenizer = load(str(tiny_model))
    prompt = writer_prompt(tokenizer, played[0])
    assert "Heat the apple." in prompt and "take apple 1 from countertop 2; heat apple 1 with microwave 1" in prompt
    assert "kitchen" not in prompt  # actions only: a small writer echoes long observations back
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(e.to_json()) + "\n" for e in played))
    # a random-init model writes nothing usable: each of the 3 successful episodes' replies dropped, and said so
    written = model_memories(played, model, tokenizer, max_tokens=8)
    assert written.memories == [] and written.attempted == 3 and sum(written.dropped.values()) == 3
    error = error_of(
        run(
            "write",
            "--episodes",
            log,
            "--writer",
            f"model:{tiny_model}",
            "--max-tokens",
            "8",
            "--out",
            tmp_path / "m.jsonl",
        )
    )
    assert f"wrote no usable memory: {written.summary()}" in error and not (tmp_path / "m.jsonl").exists()
    # the same run with the replies of a weak instruct model: one echo, one that names no step, one kept
    replies = {
        "Heat the apple.": writer_content(played[0]),
        "Heat the egg.": "The code: ```# a game",
        "Cool the milk.": "Task: Cool the milk.\n1. take the milk\n2. cool it with the fridge",
    }

    monkeypatch.setattr(
        mlx_lm,
        "generate",
        lambda m, t, prompt, max_tokens: next(r for task, r in replies.items() if f"Task: {task}" in prompt),
    )
    result = run("write", "--episodes", log, "--writer", f"model:{tiny_model}", "--out", tmp_path / "m.jsonl")
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("; dropped 2 of 3 replies (1 echo only, 1 no episode step)"), result.output
    [memory] = read_memories(tmp_path / "m.jsonl")
    assert (
        memory.text == "1. take the milk\n2. cool it with the fridge"
        and memory.source == ["ep/3"]
        and memory.task_type == "cool"
    )
    result = run(
        "write",
        "--episodes",
        log,
        "--writer",
        f"model:{tiny_model}",
        "--per-task",
        "1",
        "--out",
        tmp_path / "m.jsonl",
        "--force",
    )
    assert result.output.strip().endswith("; dropped 1 of 2 replies (1 echo only)"), result.output  # ep/2 never asked
    assert "does not exist" in error_of(
        run("write", "--episodes", log, "--writer", f"model:{tmp_path}/none", "--out", tmp_path / "n.jsonl")
    )
    assert "unknown --writer" in error_of(
        run("write", "--episodes", log, "--writer", "magic", "--out", tmp_path / "n.jsonl")
    )
    log.write_text(json.dumps(played[0].to_json()) + "\n" + "{}\n")
    assert "line 2" in error_of(run("write", "--episodes", log, "--out", tmp_path / "n.jsonl"))


def test_memories_written_for_a_task_are_keyed_by_its_text(student):
    """A query is a task text: a memory that records its task is found by it, whatever its workflow says."""
    tasks = {
        "heat": "Heat some egg and put it in the garbage can.",
        "cool": "Cool some bread and put it on the table.",
        "coin": "Your task is to search the environment and find the coin.",
    }
    memories = [
        Memory(f"m-{t}", t, f"Workflow for {t}: look, take X, go east, put X in Y.", [], text)
        for t, text in tasks.items()
    ]
    keyed = build(memories, *student)
    unkeyed = build([Memory(m.id, m.task_type, m.text) for m in memories], *student)
    for task_type, text in tasks.items():
        assert retrieve(keyed, *student, text, k=1)[0].task_type == task_type
    assert mx.allclose(keyed.keys[0], embed(*student, [tasks["heat"]])[0].astype(mx.float16), atol=1e-3).item()
    assert not mx.allclose(keyed.keys[0], unkeyed.keys[0], atol=1e-3).item()


def test_write_memories_round_trip(tmp_path):
    memories = [
        Memory("a", "heat", "text one", ["e1"]),
        Memory("b", "", "text two", [], "Heat some egg.", "both", "You are in a kitchen."),
    ]
    write_memories(tmp_path / "m.jsonl", memories)
    assert read_memories(tmp_path / "m.jsonl") == memories
