"""Prompt sensitivity of few-shot classification, and how much contextual calibration narrows it.

Three factors, each varied alone around one base condition (the set's first direct template, the exemplars of
`seed`, in their drawn order):

  template    every non-inverted template of the Flan set
  exemplars   the k exemplars drawn with seeds seed, seed+1, …
  order       permutations of the base exemplars (the drawn order first)

Each condition scores the same evaluated examples by option log-likelihood (sum) and reports accuracy; per factor
the spread over its conditions is mean, std (sample), min, max and range = max − min (`metrics.spread`).

Calibration (Zhao et al., 2021): per condition, the option distribution p_cf of the same k-shot prompt with the
query's text fields replaced by each content-free input ("N/A", "", "[MASK]"), averaged; then every example's
prediction is argmax softmax(diag(p_cf)⁻¹ p). Conditions whose prompt biases the model towards one label lose
that bias, which is what narrows the spread.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass

from alignkit.evaluate import metrics as M
from alignkit.evaluate.classification import (argmax, calibrate, content_free_distribution, content_free_example,
                                              option_probabilities, option_scores)
from alignkit.evaluate.prompts import exemplar_order, model_context, resolve_framing
from alignkit.evaluate.report import markdown_table, plot_sensitivity, record, sidecar, write_json, write_markdown
from alignkit.evaluate.suites import Suite
from alignkit.evaluate.config import SensitivityConfig  # declared with the other eval flags

FACTORS = ("template", "exemplars", "order")


@dataclass
class Condition:
    factor: str
    name: str
    template: str
    seed: int
    order: tuple[int, ...]


def order_permutations(k: int, n: int, seed: int) -> list[tuple[int, ...]]:
    """The identity first, then n − 1 further distinct permutations of range(k), drawn by the seed (fewer when
    k! < n)."""
    identity = tuple(range(k))
    if math.factorial(k) <= n:
        return [identity] + [p for p in itertools.permutations(range(k)) if p != identity]
    rng, chosen = random.Random(f"orders:{seed}"), [identity]
    while len(chosen) < n:
        perm = tuple(rng.sample(range(k), k))
        if perm not in chosen:
            chosen.append(perm)
    return chosen


def conditions(template_ids: list[str], k: int, seed: int, n_seeds: int, n_orders: int) -> list[Condition]:
    base_template, identity = template_ids[0], tuple(range(k))
    out = [Condition("template", t, t, seed, identity) for t in template_ids]
    out += [Condition("exemplars", f"seed {s}", base_template, s, identity) for s in range(seed, seed + n_seeds)]
    if k > 1:
        out += [Condition("order", "(" + " ".join(map(str, p)) + ")", base_template, seed, p) for p in order_permutations(k, n_orders, seed)]
    return out


def score_condition(model, tokenizer, suite: Suite, exemplars: list[dict], framing: str, system: str, batch_size: int,
                    content_free: list[dict] | None, progress: str = "") -> dict:
    """Accuracy of one condition, and with calibration its p_cf and calibrated accuracy."""
    examples = suite.examples + (content_free or [])
    items = [suite.build(exemplars, ex) for ex in examples]
    framed = [model_context(tokenizer, item, framing, system) for item in items]
    options = [[prefix + o for o in suite.options(ex)] for ex, (_, prefix) in zip(examples, framed)]
    scores = option_scores(model, tokenizer, [c for c, _ in framed], options, batch_size, progress)
    probs = [option_probabilities(s, "sum") for s in scores]
    n = len(suite.examples)
    labels = [suite.label(ex) for ex in suite.examples]
    out = {"accuracy": M.accuracy([argmax(p) for p in probs[:n]], labels), "n": n,
           "predicted_share": _shares([argmax(p) for p in probs[:n]], len(probs[0]))}
    if content_free:
        p_cf = content_free_distribution(probs[n:])
        calibrated = [argmax(calibrate(p, p_cf)) for p in probs[:n]]
        out |= {"accuracy_calibrated": M.accuracy(calibrated, labels), "p_cf": p_cf,
                "predicted_share_calibrated": _shares(calibrated, len(p_cf))}
    return out


def _shares(predictions: list[int], width: int) -> list[float]:
    """How often each option is predicted: a prompt that makes the model say one label shows here."""
    return [sum(p == c for p in predictions) / len(predictions) for c in range(width)]


def run_conditions(model, tokenizer, suite: Suite, template_suites: dict[str, Suite], conds: list[Condition], k: int,
                   framing: str, system: str = "", batch_size: int = 16, content_free_texts: list[str] | None = None,
                   text_fields: list[str] | None = None, progress: bool = False, log=print) -> list[dict]:
    """One row per condition: factor, condition, template, seed, order, accuracy (and calibrated accuracy, p_cf).
    A condition shared by several factors (the base) is scored once. `template_suites` maps a template id to the
    suite that renders it (same examples and pool)."""
    pool_keys = {_key(ex) for ex in suite.examples}
    pool = [ex for ex in suite.pool if _key(ex) not in pool_keys]  # one exemplar set for every query

    cache: dict[tuple, dict] = {}
    rows = []
    for index, cond in enumerate(conds):
        key = (cond.template, cond.seed, cond.order)
        if key not in cache:
            if k > len(pool):
                raise ValueError(f"{k}-shot prompts need {k} exemplars; the pool has {len(pool)} besides the evaluated examples")
            drawn = [pool[i] for i in exemplar_order(len(pool), cond.seed)[:k]]
            exemplars = [drawn[i] for i in cond.order]
            target = template_suites[cond.template]
            content_free = None
            if content_free_texts is not None:
                content_free = [content_free_example(suite.examples[0], text_fields or [], t) for t in content_free_texts]
            label = f"{cond.factor} {cond.name} ({index + 1}/{len(conds)})" if progress else ""
            cache[key] = score_condition(model, tokenizer, target, exemplars, framing, system, batch_size, content_free, label)
            cal = cache[key].get("accuracy_calibrated")
            log(f"{cond.factor:9s} {cond.name:16s} accuracy {cache[key]['accuracy']:.3f}" + (f"  calibrated {cal:.3f}" if cal is not None else ""))
        rows.append({**asdict(cond), "order": list(cond.order), **cache[key]})
    return rows


def _key(example: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in example.items() if k not in ("where", "label_index")))


def summarize(rows: list[dict]) -> list[dict]:
    """Per factor: spread of accuracy (and calibrated accuracy) over its conditions, and how calibration changed it."""
    out = []
    for factor in dict.fromkeys(r["factor"] for r in rows):
        mine = [r for r in rows if r["factor"] == factor]
        raw = M.spread([r["accuracy"] for r in mine])
        out.append({"factor": factor, "calibrated": False, **raw})
        if all(r.get("accuracy_calibrated") is not None for r in mine):
            cal = M.spread([r["accuracy_calibrated"] for r in mine])
            out.append({"factor": factor, "calibrated": True, **cal, "range_change": cal["range"] - raw["range"],
                        "std_change": cal["std"] - raw["std"], "mean_change": cal["mean"] - raw["mean"]})
    return out


def run_sensitivity(cfg: SensitivityConfig, model=None, tokenizer=None, log=print) -> dict:
    from alignkit.data import flan
    from alignkit.evaluate.runner import load_model
    from alignkit.evaluate.suites import build_suite, flan_suite_from, parse_tasks

    if cfg.shots < 0 or cfg.n_seeds < 1 or cfg.n_orders < 1:
        raise ValueError("--shots must be ≥ 0, --n_seeds and --n_orders ≥ 1")
    [(name, source)] = parse_tasks(cfg.task)
    suite = build_suite(name, source, cfg.dataset, cfg.seed, cfg.limit, split=cfg.split)
    if suite.kind != "classification":
        raise ValueError(f"sensitivity needs a classification template set (e.g. sst2, rte, ag_news); {name!r} is {suite.kind}")
    ts = flan.load_template_set(name)
    direct = [t for t in ts.templates if not t.inverted]
    wanted = [t.strip() for t in cfg.templates.split(",") if t.strip()] if cfg.templates not in ("all", "") else [t.id for t in direct]
    templates = {t.id: t for t in direct}
    unknown = [t for t in wanted if t not in templates]
    if unknown:
        raise ValueError(f"--templates: {unknown} are not non-inverted templates of {ts.name!r}; choose from {list(templates)}")
    info = {k: v for k, v in suite.info.items() if k not in ("template_set", "template")}
    template_suites = {t: flan_suite_from(ts, templates[t], suite.examples, suite.pool, **info) for t in wanted}
    if model is None:
        model, tokenizer = load_model(cfg.model_name_or_path, cfg.device)
    framing = resolve_framing(tokenizer, cfg.framing)
    conds = conditions(wanted, cfg.shots, cfg.seed, cfg.n_seeds, cfg.n_orders)
    content_free = cfg.content_free.split("|") if cfg.calibrate else None
    log(f"{ts.name}: {len(suite.examples)} examples, {cfg.shots}-shot, {len(conds)} conditions "
        f"({len({(c.template, c.seed, c.order) for c in conds})} distinct)" + (f", calibration on {content_free}" if content_free else ""))
    rows = run_conditions(model, tokenizer, suite, template_suites, conds, cfg.shots, framing, cfg.system, cfg.batch_size,
                          content_free, suite.text_fields, cfg.progress, log)
    summary = summarize(rows)
    records = [record(ts.name, cfg.shots, f"accuracy_{s['factor']}_{'calibrated_' if s['calibrated'] else ''}{stat}", s[stat], len(suite.examples))
               for s in summary for stat in ("mean", "std", "min", "max", "range")]
    labels = [suite.label(ex) for ex in suite.examples]
    majority = max(labels.count(c) for c in set(labels)) / len(labels)
    payload = {"settings": {**asdict(cfg), "framing": framing},
               "task": {"task": ts.name, "n": len(suite.examples), "majority_label_share": majority, **suite.info},
               "conditions": rows, "summary": summary, "records": records}
    write_json(payload, cfg.output)
    png = plot_sensitivity(rows, sidecar(cfg.output, ".png"), baseline=majority)
    write_markdown(cfg.output, sensitivity_markdown(payload) + f"\n![accuracy per condition]({png.name})\n")
    return payload


def sensitivity_markdown(payload: dict) -> str:
    s, task = payload["settings"], payload["task"]
    head = (f"## Prompt sensitivity: {task['task']}, {s['shots']}-shot, n = {task['n']}\n\n"
            f"Model `{s['model_name_or_path']}`, framing {s['framing']}, option log-likelihood (sum), seed {s['seed']}. "
            f"Always answering the most frequent label scores {task['majority_label_share']:.3f}.\n\n")
    summary = [{**row, "calibrated": "yes" if row["calibrated"] else "no", "conditions": row["n"]} for row in payload["summary"]]
    table = markdown_table(summary, ["factor", "calibrated", "mean", "std", "min", "max", "range", "conditions"])
    per = [{**r, "p_cf": " / ".join(f"{p:.2f}" for p in r["p_cf"]) if r.get("p_cf") else None} for r in payload["conditions"]]
    for r in per:  # how often each label is predicted: 1.00 / 0.00 means the prompt, not the input, decides
        r["predicted"] = " / ".join(f"{x:.2f}" for x in r["predicted_share"])
        if r.get("predicted_share_calibrated"):
            r["predicted_calibrated"] = " / ".join(f"{x:.2f}" for x in r["predicted_share_calibrated"])
    calibrated = ["accuracy_calibrated", "p_cf", "predicted_calibrated"] if any(r.get("p_cf") for r in per) else []
    columns = ["factor", "name", "accuracy", "predicted", *calibrated]
    return head + table + "\n\n### Conditions\n\n" + markdown_table(per, columns) + "\n"
