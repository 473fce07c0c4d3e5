#!/usr/bin/env python
"""--attention_kernel flex against dense on a CUDA GPU: the same DPO log-probs and gradients, and the time of one
forward + backward, on a random model of SmolLM2-135M's shape (`common.SMOLLM_SHAPE`).

    python benchmarks/flex_check.py [--pairs 8] [--repeats 10]

The CPU tests (tests/test_flex_mask.py) check the block mask and FlexAttention's forward (eager) against the
dense path; FlexAttention's fused kernel and its backward exist only on the GPU, so this is where they are
checked. Rows: DPO pairs (prompt + chosen + rejected, `train.dpo.collate`) with prompts of 64..400 tokens and
responses of 16..300, random token ids. Prints one JSON line per precision: the largest log-prob difference
relative to the largest |log-prob|, the relative difference of the gradient norms and of the gradient of the
first layer's query weights, and the median forward + backward milliseconds of each kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMOLLM_SHAPE, WORK  # noqa: E402


def pairs(count: int, vocab: int, seed: int = 0):
    from alignkit.train.dpo import DPOPair

    g = torch.Generator().manual_seed(seed)
    size = lambda low, high: int(torch.randint(low, high + 1, (1,), generator=g))  # noqa: E731
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [DPOPair(ids(size(64, 400)), ids(size(16, 300)), ids(size(16, 300))) for _ in range(count)]


def step(model, batch, precision: str):
    from alignkit.precision import autocast
    from alignkit.train.dpo import sequence_logps

    model.zero_grad(set_to_none=True)
    with autocast(precision, "cuda"):
        logps, _ = sequence_logps(model, batch)
    logps.sum().backward()
    return logps.detach().float()


def timed(model, batch, precision: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, batch, precision)
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    from alignkit import attention
    from alignkit.models import load_causal_lm
    from alignkit.testing import make_tiny_model
    from alignkit.train.dpo import collate

    path = WORK / "smollm-shape-random"
    if not (path / "config.json").exists():
        make_tiny_model(path, **SMOLLM_SHAPE)
    models = {kernel: load_causal_lm(str(path)).cuda() for kernel in ("dense", "flex")}
    attention.use_attention_kernel(models["flex"], "flex")
    vocab = models["dense"].config.vocab_size
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in collate(pairs(args.pairs, vocab), 0, shared=True).items()}
    for precision in ("no", "bf16"):
        dense, flex = step(models["dense"], batch, precision), step(models["flex"], batch, precision)
        grads = {k: torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None]) for k, m in models.items()}
        query = {k: m.model.layers[0].self_attn.q_proj.weight.grad.float() for k, m in models.items()}
        row = {
            "precision": precision, "pairs": args.pairs, "row_tokens": batch["input_ids"].shape[1],
            "logp_max_abs_diff_rel": ((flex - dense).abs().max() / dense.abs().max()).item(),
            "grad_norm_rel_diff": ((grads["flex"].norm() - grads["dense"].norm()).abs() / grads["dense"].norm()).item(),
            "grad_rel_diff": ((grads["flex"] - grads["dense"]).norm() / grads["dense"].norm()).item(),
            "q_proj0_grad_rel_diff": ((query["flex"] - query["dense"]).norm() / query["dense"].norm()).item(),
            "dense_ms": round(timed(models["dense"], batch, precision, args.repeats), 1),
            "flex_ms": round(timed(models["flex"], batch, precision, args.repeats), 1),
        }
        row["speedup"] = round(row["dense_ms"] / row["flex_ms"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
