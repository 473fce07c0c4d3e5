"""`alignkit score`: a data file through a reward model. Each row gets its reward(s); for preference rows,
whether the model orders the responses as the labels do."""

from __future__ import annotations

from alignkit.data.formats import InvalidRows, write_jsonl
from alignkit.data.preferences import read_for_scoring
from alignkit.models import load_tokenizer
from alignkit.reward_model import load_reward_model, score_sequences, training_formatting


def pair_accuracy(rewards: list[float], pairs: list[tuple[int, int]]) -> float:
    """The fraction of (better, worse) pairs whose rewards are ordered the same way (ties count as wrong)."""
    return sum(rewards[b] > rewards[w] for b, w in pairs) / len(pairs)


def score_file(reward_model: str, dataset: str, output: str, split: str = "train", batch_size: int = 16,
               skip_invalid: bool = False, progress: bool = True) -> dict:
    """Write OUTPUT.jsonl: each input row plus `reward` (single responses), or `reward_chosen`,
    `reward_rejected`, `agrees` (pairs), or `rewards` [K] and `agrees` = fraction of its pairs ordered
    like the labels (rankings). Returns a summary (rows, mean reward, and accuracy for preferences)."""
    tokenizer = load_tokenizer(reward_model)
    rm, head_is_new = load_reward_model(reward_model)
    if head_is_new:
        raise ValueError(f"{reward_model} is not a reward model (it has no trained score head); train one with `alignkit rm`")
    invalid = InvalidRows(skip=skip_invalid)
    items = read_for_scoring(dataset, split, tokenizer, training_formatting(reward_model), invalid)
    flat = [s for item in items for s in item.sequences]
    rewards = score_sequences(rm, flat, tokenizer.pad_token_id, batch_size, progress)
    out, cursor, agreement = [], 0, []
    for item in items:
        mine, cursor = rewards[cursor : cursor + len(item.sequences)], cursor + len(item.sequences)
        if not item.pairs:
            out.append({**item.row, "reward": mine[0]})
        elif "chosen" in item.row:
            agreement.append(float(mine[0] > mine[1]))
            out.append({**item.row, "reward_chosen": mine[0], "reward_rejected": mine[1], "agrees": mine[0] > mine[1]})
        else:
            agreement.append(pair_accuracy(mine, item.pairs))
            out.append({**item.row, "rewards": mine, "agrees": agreement[-1]})
    write_jsonl(out, output)
    summary = {"rows": len(out), "responses": len(flat), "mean_reward": sum(rewards) / max(len(rewards), 1)}
    if agreement:
        summary["accuracy"] = sum(agreement) / len(agreement)
    if invalid.total:
        summary["invalid_skipped"] = dict(invalid.counts)
    return summary
