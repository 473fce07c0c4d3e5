#!/usr/bin/env python
"""Preference data from real model outputs: the Self-Instruct predictions of plain and aligned GPT-3 models.

    python scripts/self_instruct_preferences.py ../shared/data/self_instruct/predictions --output_dir data/self_instruct_prefs

PREDICTIONS_DIR holds one `<model>.jsonl` per model, 252 rows each, in the same order (the 252
user-oriented instructions of Self-Instruct; fields `instruction`, `input`, `response`, `target`).
For every instruction, the responses of `--models` (best first) become one row:
    2 models   {"prompt", "chosen", "rejected"}            (default: text-davinci-003 over davinci)
    K models   {"prompt", "responses": [best, ..., worst]}  (a ranking: C(K,2) pairs per prompt)
The order is an assumption, not a human label: the Self-Instruct paper's human evaluation ranks
text-davinci-003 > -002 > -001 > davinci (the plain LM, which mostly rambles on or repeats the input).

Instructions are split by a seeded shuffle into train and test (`--test_prompts`, default 52 of 252),
so no test instruction is ever trained on. Every response is cut at `--max_response_chars` characters
(at a word boundary, counted and printed): davinci keeps generating to the API's token limit (3,800
characters on average), far beyond what a small model trains on. The same cut applies to every model,
so the cut alone does not reveal which is which. `demonstrations.jsonl` holds the human-written
reference answers of the train instructions as prompt/completion rows (for `alignkit rm
--normalize_dataset`, or SFT).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def prompt_of(row: dict) -> str:
    extra = (row.get("input") or "").strip()
    return row["instruction"].strip() + (f"\n\n{extra}" if extra else "")


def clip(text: str, limit: int) -> tuple[str, bool]:
    text = text.strip()
    if len(text) <= limit:
        return text, False
    cut = text[:limit]
    return (cut[: cut.rfind(" ")] if " " in cut else cut).rstrip(), True


def build(predictions: Path, models: list[str], test_prompts: int, max_chars: int, seed: int) -> tuple[list, list, list, dict]:
    outputs = {}
    for model in models:
        path = predictions / f"{model}.jsonl"
        if not path.exists():
            available = sorted(p.stem for p in predictions.glob("*.jsonl"))
            raise SystemExit(f"{path}: no such file; models available: {available}")
        outputs[model] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    count = len(outputs[models[0]])
    for model, rows in outputs.items():
        if len(rows) != count or any(prompt_of(a) != prompt_of(b) for a, b in zip(rows, outputs[models[0]])):
            raise SystemExit(f"{model}.jsonl does not list the same instructions in the same order as {models[0]}.jsonl")
    instructions = sorted({r["instruction"].strip() for r in outputs[models[0]]})
    random.Random(seed).shuffle(instructions)
    test = set(instructions[:test_prompts])  # split by instruction: a repeated instruction stays on one side
    train_rows, test_rows, demos, clipped = [], [], [], {m: 0 for m in models}
    for i in range(count):
        first = outputs[models[0]][i]
        responses = []
        for model in models:
            text, was_cut = clip(outputs[model][i]["response"], max_chars)
            clipped[model] += was_cut
            responses.append(text)
        if any(not r for r in responses) or len(set(responses)) < len(responses):
            continue  # an empty or duplicate response compares nothing
        row = {"prompt": prompt_of(first), "chosen": responses[0], "rejected": responses[1]} if len(models) == 2 else {"prompt": prompt_of(first), "responses": responses}
        held_out = first["instruction"].strip() in test
        (test_rows if held_out else train_rows).append(row)
        if not held_out and first.get("target", "").strip():
            demos.append({"prompt": prompt_of(first), "completion": first["target"].strip()})
    return train_rows, test_rows, demos, clipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("predictions_dir", type=Path, help="e.g. ../shared/data/self_instruct/predictions")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--models", default="text-davinci-003,davinci", help="comma-separated, best first")
    parser.add_argument("--test_prompts", type=int, default=52)
    parser.add_argument("--max_response_chars", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(models) < 2:
        raise SystemExit("--models needs at least two models, best first")
    train_rows, test_rows, demos, clipped = build(args.predictions_dir, models, args.test_prompts, args.max_response_chars, args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("test", test_rows), ("demonstrations", demos)):
        with open(args.output_dir / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"{len(train_rows)} train and {len(test_rows)} test prompts, {len(demos)} demonstrations -> {args.output_dir}")
    print("responses cut at --max_response_chars: " + ", ".join(f"{m} {n}" for m, n in clipped.items()))


if __name__ == "__main__":
    main()
