"""The Python API (duomem_mlx.load -> Agent): a TextWorldExpress game played through start/act/observe
with the env's own texts, plain-text episodes and chat with a bank built here, and its misuse errors."""

import subprocess
import sys

import pytest

import duomem_mlx
from duomem_mlx.envs.base import play_episode
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.memories import Memory
from duomem_mlx.runtime.embed import build
from duomem_mlx.runtime.models import load as load_model
from duomem_mlx.runtime.options import PolicyOptions
from duomem_mlx.runtime.policy import ModelPolicy

SMOLLM2 = "smollm2-135m-instruct"
MEMORIES = [
    Memory(
        "boil-1",
        "boil",
        "to boil water: fill a pot with water, put it on the stove, turn the stove on",
        task="boil water",
    ),
    Memory(
        "coin-1",
        "coin",
        "to find the coin: open every door, move through each room, look around, take coin",
        task="find the coin",
    ),
]


def make_bank(model_path, out):
    model, tokenizer = load_model(str(model_path))
    return build(MEMORIES, model, tokenizer, embedder=str(model_path)).save(out)


@pytest.fixture(scope="module")
def tiny_bank(tiny_model, tmp_path_factory):
    return make_bank(tiny_model, tmp_path_factory.mktemp("bank") / "tiny")


@pytest.fixture(scope="module")
def smollm2_agent(real_models, tmp_path_factory):
    bank = make_bank(real_models[SMOLLM2], tmp_path_factory.mktemp("bank") / "smollm2")
    return duomem_mlx.load(str(real_models[SMOLLM2]), memory_bank=str(bank), memory_k=1)


def play_with_api(agent, env, spec, max_steps):
    """The loop an app writes: the env's task text, observation and admissible actions in, the agent's actions out."""
    task, state = env.reset(spec)
    agent.start(task, state.observation, state.admissible)
    actions = []
    for _ in range(max_steps):
        action = agent.act()
        assert action in state.admissible
        actions.append(action)
        state = env.step(action)
        if state.done:
            break
        agent.observe(state.observation, state.admissible)
    return actions, state


@pytest.mark.parametrize("game", ["coin", "arithmetic"])
def test_api_plays_a_twx_game_as_the_env_loop_does(twx, tiny_model, tiny_bank, game):
    spec = twx.task_specs([game], "test", 1, seed=0)[0]
    agent = duomem_mlx.load(str(tiny_model), memory_bank=str(tiny_bank), memory_k=1)
    actions, state = play_with_api(agent, twx, spec, max_steps=12)
    assert state.done or len(actions) == 12
    assert [m.id for m in agent.memories] in (["boil-1"], ["coin-1"])

    policy = ModelPolicy.from_options(str(tiny_model), PolicyOptions(memory_bank=str(tiny_bank), memory_k=1))
    episode = play_episode(twx, spec, policy, max_steps=12)
    assert [step.action for step in episode.steps] == actions  # one start path: the API is the env loop
    assert episode.memories == [m.id for m in agent.memories]


def test_api_without_admissible_actions_writes_free_text(smollm2_agent):
    agent = smollm2_agent
    agent.start("boil water", "You are in the kitchen. There is a pot, a sink and a stove.")
    assert [m.id for m in agent.memories] == ["boil-1"]
    first = agent.act()
    assert first.strip() and "\n" not in first
    agent.observe("You take the pot.")
    second = agent.act()
    assert second.strip()
    turns = [m["content"] for m in agent.policy.session.messages[1:]]
    assert turns[1:] == [first, "You take the pot.", second]
    assert "to boil water: fill a pot" in agent.policy.session.messages[0]["content"]


def test_api_chat_answers_with_the_memories_it_used(smollm2_agent):
    # questions that are the memories' keys: which memory comes back is the wiring's doing, not the 135M's judgement
    pieces = []
    answer = smollm2_agent.chat("boil water", max_tokens=12, on_text=pieces.append)
    assert answer.text.strip() and [m.id for m in answer.memories] == ["boil-1"]
    assert "".join(pieces).strip() == answer.text  # streamed as it was decoded
    follow_up = smollm2_agent.chat("And then?", max_tokens=12, follow_up=True)
    assert follow_up.text.strip() and [m.id for m in follow_up.memories] == ["boil-1"]
    assert len(smollm2_agent.conversation.session.messages) == 5  # system, two questions, two answers
    other = smollm2_agent.chat("find the coin", max_tokens=12)
    assert [m.id for m in other.memories] == ["coin-1"]
    assert len(smollm2_agent.conversation.session.messages) == 3  # a new conversation


def test_api_misuse_is_a_clear_error(tiny_model):
    agent = duomem_mlx.load(str(tiny_model))
    with pytest.raises(DuomemError, match="before start"):
        agent.act()
    with pytest.raises(DuomemError, match="before start"):
        agent.observe("You see a door.")
    agent.start("Open the door.", "You see a door.", ["open door", "look"])
    with pytest.raises(DuomemError, match="call act"):
        agent.observe("The door opens.")
    assert agent.act() in ("open door", "look")
    with pytest.raises(DuomemError, match="call observe"):
        agent.act()
    constrained = duomem_mlx.load(str(tiny_model), decode="constrained")
    constrained.start("Open the door.", "You see a door.")
    with pytest.raises(DuomemError, match="needs the admissible actions"):
        constrained.act()
    with pytest.raises(DuomemError, match="unknown decode"):
        duomem_mlx.load(str(tiny_model), decode="beam")
    with pytest.raises(DuomemError, match="does not exist"):
        duomem_mlx.load(str(tiny_model) + "-missing")


def test_importing_the_package_leaves_mlx_unloaded():
    heavy = "('mlx', 'mlx_lm', 'transformers')"
    probe = f"import sys, duomem_mlx; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert callable(duomem_mlx.load) and "agent.act()" in duomem_mlx.__doc__
