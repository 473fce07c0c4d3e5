"""Task metrics: accuracy, exact match, ROUGE-L (rouge-score), BLEU and chrF (sacrebleu), spread statistics,
calibration error. Scales: accuracy-like metrics in [0, 1]; ROUGE-L, BLEU and chrF in [0, 100] (the scale
SuperNI, Self-Instruct and sacrebleu report)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from alignkit.data.tasks import exact_match


def _as_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def accuracy(predictions: Sequence, references: Sequence) -> float:
    """(1/N) Σ 1[ŷ_i = y_i]."""
    _check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / len(predictions)


def exact_match_rate(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """(1/N) Σ max_r EM(ŷ_i, r): `data.tasks.exact_match` (case, whitespace, quotes and a trailing period
    ignored; the first line of the prediction also counts) against the best of each row's references."""
    _check_lengths(predictions, references)
    refs = _as_lists(references)
    return sum(any(exact_match(p, r) for r in rs) for p, rs in zip(predictions, refs)) / len(predictions)


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of a score for label 1 (Mann–Whitney): P(s_pos > s_neg) + ½ P(s_pos = s_neg) over all
    (positive, negative) pairs. Threshold-free, so a constant bias towards one label does not change it; 0.5 =
    no signal. NaN when one class is absent."""
    _check_lengths(scores, labels)
    pos = sorted(s for s, y in zip(scores, labels) if y == 1)
    neg = sorted(s for s, y in zip(scores, labels) if y == 0)
    if not pos or not neg:
        return float("nan")
    import bisect

    wins = sum(bisect.bisect_left(neg, p) + 0.5 * (bisect.bisect_right(neg, p) - bisect.bisect_left(neg, p)) for p in pos)
    return wins / (len(pos) * len(neg))


def standard_error(p: float, n: int) -> float:
    """Binomial standard error of a proportion: √(p(1−p)/n)."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else float("nan")


@functools.lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]], use_stemmer: bool = True) -> list[float]:
    """Per-example ROUGE-L F-measure ×100, the best over each example's references (SuperNI / Self-Instruct).

    With L = |LCS(ŷ, r)| over rouge-score's tokens (lowercased, non-alphanumerics dropped, Porter-stemmed):
    P = L/|ŷ|, R = L/|r|, F = 2PR/(P+R) (0 when L = 0).
    """
    _check_lengths(predictions, references)
    scorer = _rouge_scorer(use_stemmer)
    return [100.0 * max(scorer.score(r, p)["rougeL"].fmeasure for r in rs) for p, rs in zip(predictions, _as_lists(references))]


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]], use_stemmer: bool = True) -> float:
    """Mean of `rouge_l_scores`."""
    scores = rouge_l_scores(predictions, references, use_stemmer)
    return sum(scores) / len(scores)


def _reference_streams(references: Sequence[str | Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference slot; rows with fewer references get None there."""
    refs = _as_lists(references)
    width = max(len(r) for r in refs)
    if width == 0 or any(len(r) == 0 for r in refs):
        raise ValueError("every prediction needs at least one reference")
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, up to 4-grams, exponential brevity penalty):
    BLEU = BP · exp(Σ_n ¼ log p_n), BP = min(1, exp(1 − r/c)), p_n = clipped n-gram precision over the corpus."""
    import sacrebleu

    _check_lengths(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score)


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, β = 2): F_β of averaged char n-gram precision and recall."""
    import sacrebleu

    _check_lengths(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score)


def spread(values: Sequence[float]) -> dict:
    """Spread of one score across conditions: mean, std (sample, n−1; 0 for one value), min, max, range = max − min."""
    if not values:
        raise ValueError("no values")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "range": max(values) - min(values), "n": n}


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE = Σ_b (|B_b|/N) · |acc(B_b) − conf(B_b)| over equal-width confidence bins on [0, 1]
    (a confidence of exactly 1 falls in the last bin)."""
    _check_lengths(confidences, correct)
    groups: dict[int, list[tuple[float, bool]]] = {}
    for c, ok in zip(confidences, correct):
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"confidence {c} is outside [0, 1]")
        groups.setdefault(min(int(c * bins), bins - 1), []).append((c, bool(ok)))
    total = len(confidences)
    return sum(len(g) / total * abs(sum(ok for _, ok in g) / len(g) - sum(c for c, _ in g) / len(g)) for g in groups.values())


def brier_score(confidences: Sequence[float], correct: Sequence[bool]) -> float:
    """(1/N) Σ (c_i − 1[correct_i])²."""
    _check_lengths(confidences, correct)
    return sum((c - float(ok)) ** 2 for c, ok in zip(confidences, correct)) / len(confidences)
