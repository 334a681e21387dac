"""How far the one-sequence training layout (`tokenize_with_mask`) is from the contexts the
agent really saw, for a template that rewrites past replies (Qwen3, thinking off): a teacher's
top-1 next token at every action token, per action in its exact context vs in the sequence.

Layouts: `history` (ours, `tokenize_with_mask`: the whole chat as the template renders it, so
each action but the last lacks the empty think block right before it) and `generated` (each
reply kept in the form it was generated in, think block included, observations appended:
each action's own turn is exact, earlier replies carry their think blocks).

    python benchmarks/training_layout.py --json benchmarks/results/training_layout.json
"""

import argparse
import json
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from agent_session import synthetic_episode
from mlx_lm.utils import common_prefix_len

from duomem_mlx.runtime.models import load, make_tiny_model
from duomem_mlx.runtime.prompt import encode, prefix_messages, render, tokenize_with_mask


def top1(model, ids, positions):
    logits = model(mx.array(ids)[None])[0]
    return np.array(mx.argmax(logits, axis=-1))[positions], np.array(logits.astype(mx.float32))[positions]


def episode_chat(steps):
    memories, task, observations, admissible = synthetic_episode(steps)
    messages = prefix_messages(task, observations[0], memories[:2])
    for i in range(steps):
        messages += [
            {"role": "assistant", "content": admissible[i][0]},
            {"role": "user", "content": observations[i + 1]},
        ]
    return messages[:-1]


def exact_rows(model, tokenizer, messages):
    """Per action: its generation prompt as the agent saw it, then the action; rows before each action token."""
    tops, logits = [], []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt_text = render(tokenizer, messages[:i], True)
            prompt = encode(tokenizer, prompt_text)
            reply = encode(tokenizer, render(tokenizer, messages[: i + 1], False)[len(prompt_text) :])
            action = reply[: reply.index(tokenizer.eos_token_id) + 1]
            top, logit = top1(model, prompt + action, np.arange(len(prompt) - 1, len(prompt) + len(action) - 1))
            tops.append(top)
            logits.append(logit)
    return np.concatenate(tops), np.concatenate(logits)


def generated_layout(tokenizer, messages):
    """Each action after its exact generation prompt; what follows a reply is taken from the
    next prompt after that reply's end of turn."""
    ids, mask = [], []
    eos = tokenizer.eos_token_id
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt_text = render(tokenizer, messages[:i], True)
        context = encode(tokenizer, prompt_text)
        if context[: len(ids)] == ids:
            new = context[len(ids) :]
        else:  # skip the rewritten previous reply: resume after its end of turn and newline
            end = context.index(eos, common_prefix_len(ids, context)) + 2
            new = context[end:]
        reply = encode(tokenizer, render(tokenizer, messages[: i + 1], False)[len(prompt_text) :])
        answer = reply[: reply.index(eos) + 1]
        ids += new + reply
        mask += [0] * len(new) + [1] * len(answer) + [0] * (len(reply) - len(answer))
    return ids, mask


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=3, help="tiny teachers (random init) to average over")
    parser.add_argument("--json")
    args = parser.parse_args()
    messages = episode_chat(args.steps)
    result = {"steps": args.steps, "template": "qwen3 (enable_thinking=False)", "rows": []}
    for seed in range(args.seeds):
        model, tokenizer = load(
            str(make_tiny_model(Path(tempfile.mkdtemp()) / "t", template="qwen3", layers=4, hidden=128, seed=seed))
        )
        exact, exact_logits = exact_rows(model, tokenizer, messages)
        row = {"seed": seed, "action_tokens": len(exact)}
        for name, (ids, mask) in {
            "generated": generated_layout(tokenizer, messages),
            "history": tokenize_with_mask(tokenizer, messages),
        }.items():
            positions = np.flatnonzero(mask) - 1
            top, logits = top1(model, ids, positions)
            assert len(top) == len(exact), (name, len(top), len(exact))
            row[f"{name}_top1_agreement"] = round(float((top == exact).mean()), 4)
            row[f"{name}_max_abs_logit_diff"] = round(float(np.abs(logits - exact_logits).max()), 4)
        result["rows"].append(row)
    for key in ("generated_top1_agreement", "history_top1_agreement"):
        result[key] = round(float(np.mean([r[key] for r in result["rows"]])), 4)
    print(
        f"{'seed':>5}{'tokens':>8}{'generated top-1':>17}{'history top-1':>15}"
        f"{'gen max|dlogit|':>17}{'hist max|dlogit|':>18}"
    )
    for r in result["rows"]:
        print(
            f"{r['seed']:5d}{r['action_tokens']:8d}{r['generated_top1_agreement']:17.3f}{r['history_top1_agreement']:15.3f}"
            f"{r['generated_max_abs_logit_diff']:17.3f}{r['history_max_abs_logit_diff']:18.3f}"
        )
    print(
        f"mean top-1 agreement with the agent's own contexts: generated {result['generated_top1_agreement']:.3f}, "
        f"history {result['history_top1_agreement']:.3f}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
