"""Exact-match evaluation on prompt/completion rows (the built-in tasks, or any such file)."""

from __future__ import annotations

from collections import defaultdict

from alignkit.data.tasks import exact_match
from alignkit.data.tokenize import Formatting, prompt_text
from alignkit.generation import SamplingParams, generate_text


def exact_match_eval(model, tokenizer, rows: list[dict], fmt: Formatting, max_new_tokens: int = 24, batch_size: int = 16, progress: str = "") -> dict:
    """Greedy answers to each row's prompt, formatted exactly as in training; accuracy per task and overall."""
    prompts = [prompt_text(tokenizer, [{"role": "user", "content": r["prompt"]}], fmt) for r in rows]
    answers = generate_text(model, tokenizer, prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0), batch_size, progress)
    hits: dict[str, list[bool]] = defaultdict(list)
    predictions = []
    for row, answer in zip(rows, answers):
        correct = exact_match(answer, row["completion"])
        hits[row.get("task", "all")].append(correct)
        predictions.append({**row, "prediction": answer, "correct": correct})
    per_task = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    overall = sum(p["correct"] for p in predictions) / max(len(predictions), 1)
    return {"exact_match": overall, "per_task": per_task, "n": len(rows), "predictions": predictions}
