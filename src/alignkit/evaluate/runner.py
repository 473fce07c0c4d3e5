"""`alignkit eval`: every (task, shots) unit scored, one record per (task, shots, metric), written as it goes.

A unit's k-shot items use one exemplar set (the seeded first k of the pool, see `Suite.exemplars`), so a run is
deterministic given the seed: greedy generation, fixed exemplars, fixed example order. With `resume`, units
already in OUT.json (from a run with the same settings) are kept and skipped; a killed run's progress is in
OUT.json.partial, which --resume continues.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from alignkit.evaluate import metrics as M
from alignkit.evaluate.prompts import extract_answer, model_context, resolve_framing
from alignkit.evaluate.report import (plot_shots, read_results, record, records_markdown, sidecar, write_json, write_markdown,
                                      write_predictions)
from alignkit.evaluate.suites import Suite, build_suite, parse_columns, parse_tasks
from alignkit.evaluate.config import EvalConfig  # declared with the other eval flags

METHODS = ("auto", "loglik", "generate")


def parse_shots(spec: str) -> list[int]:
    try:
        shots = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--shots takes comma-separated whole numbers like 0,1,5; got {spec!r}") from None
    if not shots or any(k < 0 for k in shots):
        raise ValueError(f"--shots takes comma-separated whole numbers ≥ 0 like 0,1,5; got {spec!r}")
    return sorted(set(shots))


def load_model(name_or_path: str, device: str = "auto"):
    import torch

    from alignkit.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(name_or_path)
    model = load_causal_lm(name_or_path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    return model, tokenizer


def _settings(cfg: EvalConfig) -> dict:
    """The settings that change results; a resumed run must match them."""
    keep = ("model_name_or_path", "dataset", "template", "columns", "split", "method", "framing", "system", "max_new_tokens", "seed", "limit",
            "calibrate")
    return {k: v for k, v in asdict(cfg).items() if k in keep}


def evaluate_unit(model, tokenizer, suite: Suite, k: int, framing: str, method: str = "auto", system: str = "",
                  batch_size: int = 16, max_new_tokens: int = 0, seed: int = 0, progress: bool = False,
                  calibrate: bool = False) -> tuple[list[dict], list[dict]]:
    """Score one task at k shots -> (records, predictions). With `calibrate`, classification by log-likelihood
    also reports `accuracy_calibrated` (contextual calibration, see classification.py) and its p_cf."""
    from alignkit.evaluate import classification as C
    from alignkit.evaluate.classification import argmax, match_option, option_scores
    from alignkit.generation import SamplingParams, generate_text

    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    items = [suite.build(suite.exemplars(example, k, seed), example) for example in suite.examples]
    framed = [model_context(tokenizer, item, framing, system) for item in items]
    contexts = [context for context, _ in framed]
    label = f"{suite.name} {k}-shot" if progress else ""
    n = len(items)
    extra = {"framing": framing, **({"template": suite.info["template"]} if "template" in suite.info else {})}
    predictions = [{"task": suite.name, "shots": k, "index": i, "where": ex.get("where"), "context": c}
                   for i, (ex, c) in enumerate(zip(suite.examples, contexts))]

    if suite.kind == "classification" and method in ("auto", "loglik"):
        options = [[prefix + o for o in suite.options(ex)] for ex, (_, prefix) in zip(suite.examples, framed)]
        content_free = []
        if calibrate and suite.text_fields:  # the same k-shot prompt around "N/A", "", "[MASK]"
            first = suite.examples[0]
            for text in C.CONTENT_FREE_INPUTS:
                blank = C.content_free_example(first, suite.text_fields, text)
                context, prefix = model_context(tokenizer, suite.build(suite.exemplars(first, k, seed), blank), framing, system)
                content_free.append((context, [prefix + o for o in suite.options(blank)]))
        scores = option_scores(model, tokenizer, contexts + [c for c, _ in content_free], options + [o for _, o in content_free],
                               batch_size, label)
        scores, free_scores = scores[:n], scores[n:]
        labels = [suite.label(ex) for ex in suite.examples]
        by_sum = [argmax([s for s, _ in row]) for row in scores]
        by_mean = [argmax([s / n_tok for s, n_tok in row]) for row in scores]
        acc, acc_mean = M.accuracy(by_sum, labels), M.accuracy(by_mean, labels)
        for p, row, pred, y in zip(predictions, scores, by_sum, labels):
            p.update(option_logprobs=[s for s, _ in row], prediction=pred, label=y, correct=pred == y)
        records = [record(suite.name, k, "accuracy", acc, n, stderr=M.standard_error(acc, n), method="loglik_sum", **extra),
                   record(suite.name, k, "accuracy_per_token", acc_mean, n, stderr=M.standard_error(acc_mean, n), method="loglik_mean", **extra)]
        if all(len(row) == 2 for row in scores):  # binary: does the option margin rank the examples, whatever the bias?
            margins = [row[1][0] - row[0][0] for row in scores]
            records.append(record(suite.name, k, "auc", M.roc_auc(margins, labels), n, method="loglik_margin", **extra))
        if free_scores:
            p_cf = C.content_free_distribution([C.option_probabilities(s) for s in free_scores])
            calibrated = [argmax(C.calibrate(C.option_probabilities(row), p_cf)) for row in scores]
            acc_cal = M.accuracy(calibrated, labels)
            for p, pred in zip(predictions, calibrated):
                p["prediction_calibrated"] = pred
            records.append(record(suite.name, k, "accuracy_calibrated", acc_cal, n, stderr=M.standard_error(acc_cal, n),
                                  method="loglik_sum_calibrated", p_cf=p_cf, **extra))
        return records, predictions

    params = SamplingParams(max_new_tokens=max_new_tokens or suite.max_new_tokens, temperature=0.0)
    raw = generate_text(model, tokenizer, contexts, params, batch_size, label)
    answers = [extract_answer(text, framing) for text in raw]
    references = [suite.reference(ex) for ex in suite.examples]
    for p, text, answer, ref in zip(predictions, raw, answers, references):
        p.update(generated=text, answer=answer, reference=ref)
    if suite.kind == "classification":
        labels = [suite.label(ex) for ex in suite.examples]
        chosen = []
        for ex, answer in zip(suite.examples, answers):
            index = match_option(answer, suite.options(ex))
            chosen.append(index if index is not None else match_option(answer, suite.words(ex)))
        for p, c, y in zip(predictions, chosen, labels):
            p.update(prediction=c, label=y, correct=c == y)
        acc = M.accuracy(chosen, labels)
        unparsed = sum(c is None for c in chosen) / n
        return [record(suite.name, k, "accuracy", acc, n, stderr=M.standard_error(acc, n), method="generate", **extra),
                record(suite.name, k, "unparsed_rate", unparsed, n, method="generate", **extra)], predictions
    records = []
    for metric in suite.metrics:
        if metric == "exact_match":
            value = M.exact_match_rate(answers, references)
            records.append(record(suite.name, k, metric, value, n, stderr=M.standard_error(value, n), method="generate", **extra))
        elif metric == "rouge_l":
            per_example = M.rouge_l_scores(answers, references)
            for p, score in zip(predictions, per_example):
                p["rouge_l"] = score
            records.append(record(suite.name, k, metric, sum(per_example) / n, n, method="generate", **extra))
        else:
            records.append(record(suite.name, k, metric, {"bleu": M.bleu, "chrf": M.chrf}[metric](answers, references), n, method="generate", **extra))
    if suite.kind == "exact_match":
        for p, answer, ref in zip(predictions, answers, references):
            p["correct"] = M.exact_match_rate([answer], [ref]) == 1.0
    return records, predictions


def _previous(cfg: EvalConfig, partial: Path, partial_predictions: Path) -> tuple[dict | None, list[dict]]:
    """--resume: the results to continue (a killed run's partial ones, else the finished OUT.json) and the
    predictions of their units."""
    if partial.exists():
        results, predictions = read_results(partial), partial_predictions
    else:
        results, predictions = read_results(cfg.output), sidecar(cfg.output, ".predictions.jsonl")
    if results is None:
        return None, []
    done = {(r["task"], r["shots"]) for r in results.get("records", [])}
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()] if predictions.exists() else []
    return results, [p for p in rows if (p.get("task"), p.get("shots")) in done]


def _append_jsonl(path: Path, rows: list[dict], fresh: bool) -> None:
    with open(path, "w" if fresh else "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def run_eval(cfg: EvalConfig, model=None, tokenizer=None, log=print) -> dict:
    """Evaluate every task at every shot count; write OUT.json after each unit, then OUT.md, OUT.png and
    OUT.predictions.jsonl. Returns the results payload."""
    tasks = parse_tasks(cfg.tasks)
    shots = parse_shots(cfg.shots)
    if cfg.limit is not None and cfg.limit <= 0:
        raise ValueError(f"--limit must be ≥ 1, got {cfg.limit}")
    if model is None:
        model, tokenizer = load_model(cfg.model_name_or_path, cfg.device)
    framing = resolve_framing(tokenizer, cfg.framing)
    payload = {"settings": _settings(cfg), "tasks": [], "records": []}
    # progress goes to OUT.json.partial and OUT.predictions.jsonl.partial (what --resume continues); OUT.json and
    # its sidecars are replaced only at the end, so a failing or killed run leaves the previous ones intact
    partial, partial_predictions = Path(f"{cfg.output}.partial"), Path(f"{sidecar(cfg.output, '.predictions.jsonl')}.partial")
    previous, kept_predictions = _previous(cfg, partial, partial_predictions) if cfg.resume else (None, [])
    if previous is not None and previous.get("settings") != payload["settings"]:
        raise ValueError(f"--resume: {cfg.output} was written with other settings {previous.get('settings')}; "
                         "use the same flags, another --output, or drop --resume")
    done = {(r["task"], r["shots"]) for r in (previous or {}).get("records", [])}
    started = False  # the partial files of an earlier run are replaced when this one finishes its first unit
    from alignkit.data.formats import InvalidRows

    for name, source in tasks:
        invalid = InvalidRows(skip=cfg.skip_invalid)
        suite = build_suite(name, source, cfg.dataset, cfg.seed, cfg.limit, cfg.template, cfg.split, parse_columns(cfg.columns), invalid)
        if suite.label is not None:  # what always answering the most frequent label would score
            labels = [suite.label(ex) for ex in suite.examples]
            suite.info["majority_label_share"] = max(labels.count(c) for c in set(labels)) / len(labels)
        payload["tasks"].append({"task": suite.name, "kind": suite.kind, "n": len(suite.examples), **suite.info,
                                 **({"skipped_invalid": dict(invalid.counts)} if invalid.total else {})})
        if invalid.total:
            log(invalid.summary())
        log(f"{suite.name}: {suite.kind}, {len(suite.examples)} examples, exemplar pool {len(suite.pool)}")
        for k in shots:
            if (suite.name, k) in done:
                payload["records"] += [r for r in previous["records"] if (r["task"], r["shots"]) == (suite.name, k)]
                log(f"{suite.name} {k}-shot: kept from {cfg.output} (--resume)")
                continue
            records, predictions = evaluate_unit(model, tokenizer, suite, k, framing, cfg.method, cfg.system, cfg.batch_size,
                                                 cfg.max_new_tokens, cfg.seed, cfg.progress, cfg.calibrate)
            payload["records"] += records
            _append_jsonl(partial_predictions, ([] if started else kept_predictions) + predictions, fresh=not started)
            write_json(payload, partial)
            started = True
            log("  ".join(f"{r['task']} {k}-shot {r['metric']} = {r['value']:.4g}" for r in records) + f"  (n={records[0]['n']})")
    if started:
        os.replace(partial_predictions, sidecar(cfg.output, ".predictions.jsonl"))
    else:  # every unit kept
        write_predictions(kept_predictions, cfg.output)
    write_json(payload, cfg.output)
    partial.unlink(missing_ok=True)
    png = plot_shots(payload["records"], sidecar(cfg.output, ".png"))
    markdown = records_markdown(payload["records"], f"{cfg.model_name_or_path}, framing {framing}, seed {cfg.seed}")
    write_markdown(cfg.output, markdown + (f"\n![scores by shots]({png.name})\n" if png else ""))
    return payload
