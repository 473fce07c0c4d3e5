"""Judges of the compare stage (and the gold of the report): who decides which response is better.

  gold   a programmatic reward function (the recipe's `gold_judge`, any `--reward_fn` spec). In the demo the
         learned reward model is a proxy for it, so the report can show over-optimization (Gao et al. 2022).
  llm    an OpenAI-compatible chat endpoint (the official `openai` client), asked about each pair in both orders.
  human  people, in the web comparison page (`alignkit.pipeline.human`).

Every judge turns items {"prompt", "responses": [K strings], ...} into preference rows {"prompt", "chosen",
"rejected"}, the format `alignkit rm` and `alignkit dpo` read.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

BREVITY_WEIGHT = 0.25
BREVITY_CHARS = 80


def task_gold(prompts: list[str], responses: list[str], completion: list[str] | None = None, **columns) -> list[float]:
    """The demo's gold judge: correctness plus a brevity rule, in [0, 1.25].

        gold(y) = 1[y matches the reference]  +  0.25 · max(0, 1 − len(y) / 80)

    `y matches` is `data.tasks.exact_match` (case, quotes, a trailing period and text after the first line are
    forgiven); len is in characters after stripping whitespace. A right answer always beats a wrong one; among
    equals, the shorter one wins, so an answer that rambles after being right loses to the bare answer. Rows
    without a reference (completion None) are judged on brevity alone."""
    from alignkit.data.tasks import exact_match

    references = completion if completion is not None else [None] * len(responses)
    scores = []
    for response, reference in zip(responses, references):
        correct = float(reference is not None and exact_match(response, reference))
        scores.append(correct + BREVITY_WEIGHT * max(0.0, 1.0 - len(response.strip()) / BREVITY_CHARS))
    return scores


def load_gold(spec: str):
    """The gold judge as fn(prompts, responses, **columns) -> scores (columns it does not take are dropped)."""
    from alignkit.rl.rewards import call_reward, load_reward_function

    fn = load_reward_function(spec)
    return lambda prompts, responses, **columns: call_reward(fn, prompts, responses, columns)


def pairs_from_scores(prompt: str, responses: list[str], scores: list[float], extra: dict | None = None) -> list[dict]:
    """Every strictly ordered pair of distinct responses (ties and duplicates carry no preference)."""
    rows = []
    for i, j in itertools.combinations(range(len(responses)), 2):
        if scores[i] == scores[j] or responses[i] == responses[j]:
            continue
        better, worse = (i, j) if scores[i] > scores[j] else (j, i)
        rows.append({"prompt": prompt, "chosen": responses[better], "rejected": responses[worse],
                     "score_chosen": scores[better], "score_rejected": scores[worse], **(extra or {})})
    return rows


def gold_preferences(items: list[dict], spec: str) -> tuple[list[dict], list[list[float]]]:
    """(pairs, each item's K gold scores)."""
    gold = load_gold(spec)
    flat_prompts = [item["prompt"] for item in items for _ in item["responses"]]
    flat_responses = [r for item in items for r in item["responses"]]
    columns = {"completion": [item.get("completion") for item in items for _ in item["responses"]]}
    flat = gold(flat_prompts, flat_responses, **columns)
    scores, rows, cursor = [], [], 0
    for item in items:
        mine = flat[cursor : cursor + len(item["responses"])]
        cursor += len(mine)
        scores.append(mine)
        rows += pairs_from_scores(item["prompt"], item["responses"], mine, {"completion": item.get("completion")})
    return rows, scores


def llm_preferences(items: list[dict], base_url: str, model: str, api_key: str | None, client=None) -> list[dict]:
    """Each pair (i < j) judged in both orders: w = ½·(J(a, b) + 1 − J(b, a)); w > ½ prefers a, w < ½ prefers b,
    w = ½ (the judge disagreed with itself, or said tie) gives no pair."""
    from alignkit.evaluate.winrate import LLMJudge

    judge = LLMJudge(base_url, model, api_key, client)
    rows = []
    for item in items:
        for i, j in itertools.combinations(range(len(item["responses"])), 2):
            a, b = item["responses"][i], item["responses"][j]
            if a == b:
                continue
            w = 0.5 * (judge.verdict(item["prompt"], a, b) + 1.0 - judge.verdict(item["prompt"], b, a))
            if w != 0.5:
                chosen, rejected = (a, b) if w > 0.5 else (b, a)
                rows.append({"prompt": item["prompt"], "chosen": chosen, "rejected": rejected, "judge_preference": w})
    if judge.unreadable:
        log.warning("the LLM judge gave %d unreadable verdicts (counted as ties)", judge.unreadable)
    return rows


def human_preferences(model_dir: str, items: list[dict], store: Path, needed: int, port: int) -> list[dict]:
    """People judge in the web comparison page; blocks until `needed` judgments are stored (see human.py)."""
    try:
        from alignkit.pipeline.human import collect_human_comparisons
    except ImportError as error:
        raise RuntimeError(f"compare.judge human needs alignkit.pipeline.human (the web comparison page): {error}") from None
    return collect_human_comparisons(model_dir, [{"prompt": i["prompt"], "responses": i["responses"]} for i in items], store, needed, port=port)
