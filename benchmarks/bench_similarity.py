#!/usr/bin/env python
"""Seconds per 1,000 candidate instructions for the Self-Instruct ROUGE-L filter, pools of 1k, 10k and 50k.

    OMP_NUM_THREADS=1 python benchmarks/bench_similarity.py [--pools 1000,10000,50000] [--candidates 1000]

The pool is synthesized from real instructions (the 175 Self-Instruct seeds in ../shared when present, else
alignkit's own seed set) with variations like those a generator makes: words swapped for words of other
instructions, words dropped or inserted, halves of two instructions joined. Candidates are made the same
way; a fifth of them are light edits of pool entries, so some land above the 0.7 threshold as in a real run.

Methods, each asked for the max ROUGE-L F of every candidate against the whole pool:
  rouge_score        RougeScorer(["rougeL"]).score(candidate, entry) for every entry (the reference;
                     timed on a few candidates and scaled to 1,000: it takes minutes per candidate at 50k)
  rouge_score_cached rouge_score's own LCS (`_score_lcs`) on pool tokens tokenized once (the cheapest use
                     of the library; also timed on a few candidates and scaled)
  bitparallel        alignkit RougePool.scores: cached ids, numpy bit-parallel LCS against every entry
  alignkit           alignkit RougePool.best_match: the above plus the exact token-overlap bound
Every method's maxima are checked to be identical to the reference on the candidates both ran.
Results: benchmarks/results/similarity.json (numbers quoted in docs/self_instruct.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer

from alignkit.data.similarity import RougePool, rouge_tokens

ROOT = Path(__file__).resolve().parents[1]
SHARED_SEEDS = ROOT.parent / "shared" / "data" / "self_instruct" / "seed_tasks.jsonl"
OWN_SEEDS = ROOT / "src" / "alignkit" / "data" / "seed_tasks.jsonl"


def load_instructions(path: Path) -> list[str]:
    return [json.loads(line)["instruction"] for line in path.read_text().splitlines() if line.strip()]


def vary(rng: random.Random, base: list[str], words: list[str], strength: float) -> str:
    """A variation of a random base instruction: each word swapped/dropped with prob. `strength`, sometimes spliced."""
    tokens = rng.choice(base).split()
    if rng.random() < 0.3:  # join the first half of one instruction with the second half of another
        other = rng.choice(base).split()
        tokens = tokens[: len(tokens) // 2] + other[len(other) // 2 :]
    out = []
    for token in tokens:
        roll = rng.random()
        if roll < strength / 2:
            out.append(rng.choice(words))
        elif roll < strength:
            continue
        else:
            out.append(token)
        if rng.random() < strength / 4:
            out.append(rng.choice(words))
    return " ".join(out) or rng.choice(words)


def synthesize(rng, base, words, n, strength) -> list[str]:
    return [vary(rng, base, words, strength) for _ in range(n)]


def time_reference(candidates, pool_texts, cached: bool) -> tuple[float, list[float]]:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    start = time.perf_counter()
    if cached:
        pool_tokens = [rouge_tokens(t) for t in pool_texts]  # counted: the cache is built inside the timing
        maxima = [max((rouge_scorer._score_lcs(rouge_tokens(c), p).fmeasure for p in pool_tokens), default=0.0) for c in candidates]
    else:
        maxima = [max((scorer.score(c, p)["rougeL"].fmeasure for p in pool_texts), default=0.0) for c in candidates]
    return time.perf_counter() - start, maxima


def run(pool_size: int, n_candidates: int, n_reference: int, base, words, seed: int) -> dict:
    rng = random.Random(seed)
    pool_texts = synthesize(rng, base, words, pool_size, strength=0.5)
    fresh = synthesize(rng, base, words, n_candidates - n_candidates // 5, strength=0.5)
    near = [vary(rng, pool_texts, words, strength=0.1) for _ in range(n_candidates // 5)]
    candidates = fresh + near
    rng.shuffle(candidates)

    start = time.perf_counter()
    pool = RougePool(pool_texts)
    build_s = time.perf_counter() - start

    start = time.perf_counter()
    matches = [pool.best_match(c) for c in candidates]
    alignkit_s = time.perf_counter() - start
    compared = pool.compared

    subset = candidates[: max(n_reference * 4, 20)]
    start = time.perf_counter()
    brute = [float(pool.scores(c).max()) for c in subset]
    bitparallel_s = (time.perf_counter() - start) * n_candidates / len(subset)

    ref = candidates[:n_reference]
    ref_s, ref_max = time_reference(ref, pool_texts, cached=False)
    cached_s, cached_max = time_reference(ref, pool_texts, cached=True)
    assert [m.score for m in matches[:n_reference]] == ref_max == cached_max, "max ROUGE-L differs from rouge_score"
    assert brute == [m.score for m in matches[: len(subset)]], "pruned and brute-force maxima differ"

    per_1000 = 1000 / n_candidates
    rejected = sum(m.score >= 0.7 for m in matches)
    return {
        "pool": pool_size,
        "candidates": n_candidates,
        "pool_build_s": round(build_s, 3),
        "seconds_per_1000": {
            "rouge_score": round(ref_s * 1000 / n_reference, 1),
            "rouge_score_cached": round(cached_s * 1000 / n_reference, 1),
            "bitparallel": round(bitparallel_s * per_1000, 2),
            "alignkit": round(alignkit_s * per_1000, 3),
        },
        "reference_candidates_timed": n_reference,
        "exact_lcs_per_candidate": round(compared / n_candidates, 1),
        "share_at_or_above_0.7": round(rejected / n_candidates, 3),
        "mean_max_similarity": round(float(np.mean([m.score for m in matches])), 4),
    }


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", default="1000,10000,50000")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--reference", type=int, default=3, help="candidates timed with the rouge_score reference")
    parser.add_argument("--seeds", type=Path, default=SHARED_SEEDS if SHARED_SEEDS.exists() else OWN_SEEDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "similarity.json")
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]
    base = load_instructions(args.seeds)
    words = sorted({w for text in base for w in text.split()})
    results = []
    for size in (int(s) for s in args.pools.split(",")):
        row = run(size, args.candidates, args.reference, base, words, args.seed)
        print(json.dumps(row))
        results.append(row)
    record = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_similarity.py " + " ".join(
            f"--{k} {v}" for k, v in [("pools", args.pools), ("candidates", args.candidates), ("reference", args.reference)]
        ),
        "seeds": str(args.seeds.relative_to(ROOT.parent)) if args.seeds.is_relative_to(ROOT.parent) else str(args.seeds),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores (shared), python {platform.python_version()}, numpy {np.__version__}",
        "load_avg_1min": {"start": round(load_at_start, 2), "end": round(os.getloadavg()[0], 2)},  # 2 cores: > 2 means contention
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
