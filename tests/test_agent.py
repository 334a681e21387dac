import random

import mlx.core as mx
import mlx_lm
import pytest
from cachecheck import assert_cache_holds
from mlx_lm.models.cache import trim_prompt_cache
from mlx_lm.utils import common_prefix_len

from duomem_mlx.envs.base import Episode, Step
from duomem_mlx.errors import DuomemError
from duomem_mlx.runtime.decode import DecodeOptions
from duomem_mlx.runtime.prompt import encode, episode_messages, prefix_messages, render, tokenize_with_mask
from duomem_mlx.runtime.session import ReencodingSession, Session

WORDS = "open close door to kitchen go north south take apple from table look inventory examine heat pot".split()


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return mlx_lm.load(str(tiny_model))


def play(session_class, model, tokenizer, mode, max_context, steps=10, temperature=0.0):
    rng = random.Random(7)
    session = session_class(
        model, tokenizer, max_context, DecodeOptions(mode=mode, max_tokens=12, temperature=temperature)
    )
    session.start(
        prefix_messages("boil water", "You are in the hallway. " * 15, ["to boil: take pot, fill it, heat it"])
    )
    actions, offered = [], []
    for i in range(steps):
        admissible = [" ".join(rng.sample(WORDS, rng.randint(1, 4))) for _ in range(8)]
        offered.append(admissible)
        actions.append(session.generate(admissible if mode == "constrained" else None))
        session.append([{"role": "user", "content": f"step {i}: " + " ".join(rng.sample(WORDS, 10))}])
    return actions, offered, session


@pytest.mark.parametrize("mode", ["constrained", "free"])
@pytest.mark.parametrize("max_context", [8192, 260])
def test_incremental_equals_reencoding(loaded, mode, max_context):
    model, tokenizer = loaded
    fast_actions, _, fast = play(Session, model, tokenizer, mode, max_context)
    naive_actions, _, naive = play(ReencodingSession, model, tokenizer, mode, max_context)
    assert fast_actions == naive_actions
    assert fast.messages == naive.messages
    assert fast.prefill_tokens < naive.prefill_tokens
    if max_context < 8192:  # the window rotated: old turns are gone, the prefix stayed
        assert len(fast.messages) < 2 + 2 * 10
        assert fast.messages[:2] == naive.messages[:2]
        assert max(fast.prompt_tokens) + fast.options.max_tokens <= max_context


@pytest.mark.parametrize("mode", ["constrained", "free"])
def test_cache_holds_exactly_the_fed_tokens(loaded, mode):
    """Across window rotations, every cached key equals a fresh forward pass over `fed`."""
    model, tokenizer = loaded
    _, _, session = play(Session, model, tokenizer, mode, 260, steps=8)
    assert_cache_holds(model, session)
    target = session.prompt_ids()  # may drop turns to fit the window
    assert target == encode(tokenizer, render(tokenizer, session.messages, add_generation_prompt=True))


def test_constrained_decoding_only_yields_admissible(loaded):
    model, tokenizer = loaded
    actions, offered, _ = play(Session, model, tokenizer, "constrained", 8192, steps=12, temperature=1.5)
    assert all(action in admissible for action, admissible in zip(actions, offered))


def test_empty_admissible_list_is_a_clear_error(loaded):
    model, tokenizer = loaded
    session = Session(model, tokenizer)
    session.start(prefix_messages("t", "o"))
    with pytest.raises(DuomemError, match="--decode free"):
        session.generate([])


def test_training_tokens_match_the_chat_and_mask_the_actions(loaded):
    _, tokenizer = loaded
    episode = Episode(
        "e",
        "textworld",
        "simple",
        0,
        "find the key",
        True,
        1.0,
        steps=[Step("You see a box.", "open box"), Step("It holds a key.", "take key")],
    )
    messages = episode_messages(episode)
    ids, mask = tokenize_with_mask(tokenizer, messages)  # layout per template: tests/test_families.py
    assert ids[: mask.index(1)] == encode(tokenizer, render(tokenizer, messages[:2], add_generation_prompt=True))
    masked = [t for t, m in zip(ids, mask) if m]
    eos = tokenizer.eos_token_id
    expected = encode(tokenizer, "open box") + [eos] + encode(tokenizer, "take key") + [eos]
    assert masked == expected


def test_session_logits_match_a_full_forward_pass(loaded):
    """After incremental steps, the next-token distribution equals one full forward pass."""
    model, tokenizer = loaded
    _, _, session = play(Session, model, tokenizer, "constrained", 8192, steps=3)
    target = session.prompt_ids()
    full = model(mx.array(target)[None])[0, -1]

    keep = min(common_prefix_len(session.fed, target), len(target) - 1)
    trim_prompt_cache(session.cache, len(session.fed) - keep)
    step = model(mx.array(target[keep:])[None], cache=session.cache)[0, -1]
    assert mx.allclose(full, step, atol=1e-4).item()


def test_the_task_is_written_once_whether_or_not_the_observation_repeats_it(loaded):
    """TextWorld's first observation opens with the task: no second copy ("Task: ...") in the
    prefix the agent, the teacher cache and distill all render."""
    _, tokenizer = loaded
    task = "You are hungry! Let's cook a delicious meal. Check the cookbook in the kitchen for the recipe."
    repeated = (
        "You are hungry! Let's cook a delicious meal.\nCheck the  cookbook in the kitchen for the recipe.\n\n"
        "-= Kitchen =-\nYou see a fridge."
    )
    for observation, task_line in ((repeated, False), ("-= Kitchen =-\nYou see a fridge.", True)):
        text = render(
            tokenizer, prefix_messages(task, observation, ["read the cookbook first"]), add_generation_prompt=True
        )
        assert (" ".join(text.split()).count(" ".join(task.split())), "Task: " in text) == (1, task_line)
        episode = Episode(
            "e", "textworld", "cooking", 0, task, True, 1.0, steps=[Step(observation, "examine cookbook")]
        )
        assert episode_messages(episode, ["read the cookbook first"])[:2] == prefix_messages(
            task, observation, ["read the cookbook first"]
        )
