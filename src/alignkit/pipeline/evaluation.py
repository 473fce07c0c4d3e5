"""The eval stage: base vs SFT vs PPO vs DPO on the held-out prompts (RUN/data/eval.jsonl).

Per model, from its greedy answers: task exact match, the gold judge's mean score, ROUGE-L against the reference,
win rate against SFT by the gold judge (both orders, `evaluate.winrate.win_rate`), mean response length in tokens;
KL to SFT per response from sampled responses (`evaluate.winrate.sequence_kl`, k1, nats); the refusal rate on the HHH
harmful probes; and the gold score of sampled answers at each of eval.temperatures (t = 0 is the greedy answer).
"""

from __future__ import annotations

import sys
from pathlib import Path

from alignkit import atomic
from alignkit.pipeline.recipe import Recipe
from alignkit.pipeline.stages import format_prompts, model_path, read_rows, write_rows


def model_dirs(recipe: Recipe, run: Path) -> dict[str, str]:
    """The models to compare, in order: those eval.models names that this recipe makes."""
    where = {"base": model_path(recipe, run), "sft": str(run / "sft"), "ppo": str(run / "ppo"), "dpo": str(run / "dpo")}
    return {name: where[name] for name in recipe.eval.models if name == "base" or name in recipe.stages}


def stage_eval(recipe: Recipe, run: Path, resume: bool) -> dict:
    import torch

    from alignkit.data.tasks import exact_match
    from alignkit.evaluate.hhh import is_refusal, load_probes
    from alignkit.evaluate.metrics import rouge_l_scores
    from alignkit.evaluate.winrate import pointwise_judge, sequence_kl, win_rate
    from alignkit.generation import SamplingParams, generate_text
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.pipeline.judges import load_gold

    spec, out = recipe.eval, run / "eval"
    rows = read_rows(run / "data" / "eval.jsonl")
    if not rows:
        raise ValueError("the eval stage has no prompts: set data.eval_per_task (builtin) or data.eval_file")
    prompts = [r["prompt"] for r in rows]
    references = [r.get("completion") for r in rows]
    gold = load_gold(recipe.gold_judge)
    extra = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r} - {"prompt"})}
    score = lambda responses: gold(prompts, responses, **extra)  # noqa: E731
    progress = sys.stderr.isatty()
    probes = [p["request"] for p in load_probes("harmful")[: spec.hhh_probes]] if spec.hhh_probes else []
    dirs = model_dirs(recipe, run)
    tokenizer = load_tokenizer(dirs.get("sft", next(iter(dirs.values()))))
    texts = format_prompts(tokenizer, prompts)
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    sft_model = load_causal_lm(dirs["sft"]) if "sft" in dirs else None
    greedy = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=0.0)

    answers, table, temperature_scores = {}, {}, {}
    for name, directory in dirs.items():
        model = sft_model if name == "sft" else load_causal_lm(directory)
        model.eval()
        answers[name] = generate_text(model, tokenizer, texts, greedy, 16, f"{name}: answers" if progress else "")
        gold_scores = score(answers[name])
        row = {
            "gold_score": sum(gold_scores) / len(gold_scores),
            "exact_match": (sum(exact_match(a, r) for a, r in zip(answers[name], references) if r is not None)
                            / max(sum(r is not None for r in references), 1)) if any(r is not None for r in references) else None,
            "rouge_l": (sum(rouge_l_scores([a for a, r in zip(answers[name], references) if r], [r for r in references if r]))
                        / max(sum(bool(r) for r in references), 1)) if any(references) else None,
            "response_tokens": sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers[name]) / len(prompts),
            "n": len(prompts),
        }
        if probes:
            replies = generate_text(model, tokenizer, format_prompts(tokenizer, probes), greedy, 16, f"{name}: probes" if progress else "")
            row["refusal_rate"] = sum(map(is_refusal, replies)) / len(replies)
        if sft_model is not None and name != "sft":
            kl = sequence_kl(model, sft_model, tokenizer, prompt_ids, spec.max_new_tokens, spec.kl_samples, 16, recipe.seed)
            row["kl_to_sft"] = kl["kl_k1"]
        elif name == "sft":
            row["kl_to_sft"] = 0.0
        if name in ("sft", "ppo", "dpo"):
            temperature_scores[name] = {}
            for t in spec.temperatures:
                sampled = answers[name] if t == 0 else generate_text(
                    model, tokenizer, texts, SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=t, seed=recipe.seed), 16,
                    f"{name}: t={t}" if progress else "")
                values = gold_scores if t == 0 else score(sampled)
                temperature_scores[name][str(t)] = sum(values) / len(values)
        table[name] = row
        if model is not sft_model:
            del model
        torch.manual_seed(recipe.seed)  # each model's sampling starts from the same state, whatever came before

    if "sft" in answers:
        judge = pointwise_judge(lambda _prompts, responses: score(responses))  # rows in eval.jsonl order, as `score` expects
        for name in answers:
            table[name]["win_rate_vs_sft"] = 0.5 if name == "sft" else win_rate(prompts, answers[name], answers["sft"], judge)["win_rate"]
    write_rows([{"prompt": p, "reference": r, **{name: answers[name][i] for name in answers}} for i, (p, r) in enumerate(zip(prompts, references))],
               out / "answers.jsonl")
    payload = {"models": table, "temperatures": temperature_scores, "n": len(prompts), "hhh_probes": len(probes)}
    atomic.write_json(out / "eval.json", payload)
    return {f"{name}/{key}": value for name, row in table.items() for key, value in row.items() if isinstance(value, (int, float))}
