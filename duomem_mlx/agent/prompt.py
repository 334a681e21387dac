"""Prompt layout shared by student, teacher and training data.

messages = [system (+ memories), user (task + first observation)]   <- the episode's prefix
           + [assistant action, user observation] * turns

Token ids are always built segment by segment: each message's rendered text is the
difference between the chat template rendered up to it and up to the one before. The
incremental session feeds exactly these segments, the teacher cache stores them, and for a
prefix-stable template their concatenation equals tokenizing the whole rendered chat.
"""

from ..errors import DuomemError

SYSTEM_PROMPT = (
    "You are an agent in a text environment. Reply with exactly one action, "
    "the next command to type, and nothing else."
)


def system_message(memories: list[str] = (), base: str = SYSTEM_PROMPT) -> dict:
    text = base
    if memories:
        text += "\n\nProcedural memories that may help:\n" + "\n".join(f"- {m}" for m in memories)
    return {"role": "system", "content": text}


def prefix_messages(task_description: str, first_observation: str, memories: list[str] = ()) -> list[dict]:
    task = f"Task: {task_description.strip()}\n\n{first_observation.strip()}"
    return [system_message(memories), {"role": "user", "content": task}]


def turn_messages(action: str, observation: str) -> list[dict]:
    return [{"role": "assistant", "content": action}, {"role": "user", "content": observation.strip()}]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DuomemError("the tokenizer has no chat template; use an instruct/chat model or add chat_template.jinja")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def segment(tokenizer, messages: list[dict], done: int, upto: int, add_generation_prompt: bool) -> list[int]:
    """Tokens of messages[done:upto], given messages[:done] were already fed."""
    before = render(tokenizer, messages[:done], add_generation_prompt=False) if done else ""
    after = render(tokenizer, messages[:upto], add_generation_prompt)
    if not after.startswith(before):
        raise DuomemError("the chat template is not prefix-stable (history renders differently later); use another model or template")
    return encode(tokenizer, after[len(before):])


def tokenize_with_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of a whole chat; the mask is 1 on each assistant action and the
    end-of-turn token that closes it, i.e. exactly what the agent generates."""
    ids, mask = [], []
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = segment(tokenizer, messages, done, i, add_generation_prompt=True)
        gen_prompt_text = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        reply = encode(tokenizer, full[len(gen_prompt_text):])
        answer = reply[: next((j + 1 for j, t in enumerate(reply) if t in eos), len(reply))]
        ids += context + reply
        mask += [0] * len(context) + [1] * len(answer) + [0] * (len(reply) - len(answer))
        done = i + 1
    if done < len(messages):
        tail = segment(tokenizer, messages, done, len(messages), add_generation_prompt=False)
        ids += tail
        mask += [0] * len(tail)
    return ids, mask


def episode_messages(episode, memories: list[str] = ()) -> list[dict]:
    """The chat an agent saw while playing `episode` (an envs.base.Episode), up to its last action."""
    steps = episode.steps
    if not steps:
        return []
    messages = prefix_messages(episode.task_description, steps[0].observation, memories)
    for step, following in zip(steps, steps[1:]):
        messages += turn_messages(step.action, following.observation)
    messages.append({"role": "assistant", "content": steps[-1].action})
    return messages
