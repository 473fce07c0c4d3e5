#!/usr/bin/env python
"""fp32 vs bf16 held-out results of a short SFT or DPO run on the tiny test model, one line per seed: the
spread behind the tolerance of tests/test_mixed_precision.py::test_bf16_reaches_the_held_out_results_of_fp32.

    OMP_NUM_THREADS=1 python benchmarks/bf16_heldout_spread.py WORKDIR sft|dpo 0,1,2,3,4,5,6,7,8,9 [STEPS=4]

The runs are the test's: a hidden-64, 2-layer Llama (seed = the line's seed) with the built-in tokenizer, 4 steps of
batch 4 at lr 5e-3, max length 64; SFT on 32 arithmetic + reversal rows with 16 held-out rows, DPO on
builtin_pref:comparison:32 with 16 held-out pairs. Each line: {"seed", "no": {eval_...}, "bf16": {eval_...}}.
"""

import json
import sys
import time
from pathlib import Path

from alignkit import config
from alignkit.data import tasks
from alignkit.data.formats import write_jsonl
from alignkit.testing import make_tiny_model
from alignkit.train.dpo import run_dpo
from alignkit.train.sft import run_sft


def main(root: Path, stage: str, seeds: list[int], steps: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split, n, name in (("train", 32, "train.jsonl"), ("test", 8, "eval.jsonl")):
        rows = tasks.make_mixture(["arithmetic", "reversal"], split, n, seed=0)
        write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], root / name)
    for seed in seeds:
        model = make_tiny_model(root / f"model{seed}", hidden_size=64, num_layers=2, seed=seed)
        out = {}
        for precision in ("no", "bf16"):
            start, run_dir = time.time(), root / f"{stage}-{seed}-{precision}"
            common = dict(model_name_or_path=str(model), output_dir=str(run_dir), max_steps=steps, logging_steps=1,
                          progress=False, max_length=64, seed=seed, mixed_precision=precision,
                          per_device_train_batch_size=4, learning_rate=5e-3)
            if stage == "sft":
                run_sft(config.SFTConfig(**common, dataset=str(root / "train.jsonl"), eval_dataset=str(root / "eval.jsonl")))
            else:
                run_dpo(config.DPOConfig(**common, dataset="builtin_pref:comparison:32",
                                         eval_dataset="builtin_pref:comparison:16", beta=0.1))
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            out[precision] = {k: v for k, v in [r for r in rows if "eval_loss" in r][-1].items() if k.startswith("eval_")}
            out[precision]["s"] = round(time.time() - start, 1)
        print(json.dumps({"seed": seed, **out}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], [int(s) for s in sys.argv[3].split(",")], int(sys.argv[4]) if len(sys.argv) > 4 else 4)
