#!/usr/bin/env python
"""alignkit SFT vs TRL SFTTrainer: same model, data, hyperparameters and venv; alternating runs (A B A B).

    python benchmarks/bench_sft.py --which tiny|smollm|both --repeats 2

Each run is its own subprocess (`--worker alignkit|trl`), so its peak RSS (os.wait4's ru_maxrss) and wall
time are its own. Both see identical token sequences: a conversational prompt/completion JSONL rendered with
the tokenizer's chat template, loss on the completion tokens only. Each worker stamps the wall clock at the
end of every optimizer step (TRL: a TrainerCallback's on_step_end; alignkit: its metrics.jsonl write, with
logging_steps=1 on both sides) next to the non-padding tokens seen so far, so steady-state tokens/s is
(tokens[N] - tokens[w]) / (t[N] - t[w]) after w warm-up steps. Results: benchmarks/results/sft.json and the
table between the markers in docs/benchmarks.md. Set up the venv as benchmarks/README.md says; the harness
(runs, retries, summary, table) is in common.py.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SAVED_AND_OPTIMIZERS, SHARED_SETTINGS, WORK, Stage, Trace, alignkit_config, main, model_path, run_alignkit,
    run_trl, write_jsonl,
)

CASES = {  # steps, of which the first `warmup` are left out of the steady state
    "tiny": dict(model="tiny", batch=16, steps=20, warmup=5, max_length=256, lr=1e-3),
    "smollm": dict(model="smollm2-135m-instruct", batch=8, steps=12, warmup=3, max_length=256, lr=5e-5),
}


def worker(tool: str, job: dict) -> dict:
    if tool == "trl":
        from trl import SFTConfig, SFTTrainer

        return run_trl(SFTTrainer, SFTConfig, job, completion_only_loss=True)
    from alignkit.config import SFTConfig
    from alignkit.train.sft import run_sft

    return run_alignkit(run_sft, SFTConfig(**alignkit_config(job)))


def prepare(case: str) -> tuple[str, str]:
    """The model directory and a conversational prompt/completion JSONL both tools read."""
    from alignkit.data.tasks import make_mixture

    data = WORK / "tasks.jsonl"
    if not data.exists():
        rows = make_mixture(["arithmetic", "reversal"], "train", 200, seed=0)
        write_jsonl(data, [{"prompt": [{"role": "user", "content": r["prompt"]}],
                            "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    return model_path(CASES[case]["model"]), str(data)


def metrics(trace: Trace) -> dict:
    t, tokens, w = trace.t, trace.tokens, trace.warmup
    rates = [(tokens[i] - tokens[i - 1]) / (t[i] - t[i - 1]) for i in range(w, len(t))]
    return {
        # from the median and from the fastest steady step: load from other processes only adds time, so on a
        # shared machine these are closer to the machine's real speed (both tools get identical batches)
        "median_step_tokens_per_s": round(statistics.median(rates), 1),
        "best_step_tokens_per_s": round(max(rates), 1),
        "mean_loss_last5": round(statistics.mean(trace.loss[-5:]), 4),
        "step_s": [round(b - a, 3) for a, b in zip([trace.start] + t, t)],  # step 1's includes the start-up
    }


STAGE = Stage(
    name="sft", script=__file__, doc=__doc__, cases=CASES, tools=("alignkit", "trl"), worker=worker,
    prepare=prepare, metrics=metrics,
    settings=f"{SHARED_SETTINGS}, no packing, completion-only loss, same chat-templated tokens, {SAVED_AND_OPTIMIZERS}",
    columns="steady tokens/s | median-step tokens/s | best-step tokens/s | median step ms | time to 1st step s "
            "| end-to-end s | peak RSS MB | final loss (last 5 mean) | load at start | other cores busy",
    row="{steady_tokens_per_s:.0f} | {median_step_tokens_per_s:.0f} | {best_step_tokens_per_s:.0f} | "
        "{steady_step_ms:.0f} | {time_to_first_step_s:.1f} | {end_to_end_s:.1f} | {peak_rss_mb:.0f} | "
        "{final_loss:.3f} ({mean_loss_last5:.3f}) | {load1_at_start:.2f} | {other_cores_busy:.2f}",
    extra_ratios={"median-step tokens_per_s (alignkit/trl)": "median_step_tokens_per_s",
                  "best-step tokens_per_s (alignkit/trl)": "best_step_tokens_per_s"},
    ratios_per_tool=False,
    flops_per_token=lambda tool, trunk, head: 6 * trunk,
    flops_note="SFT: 6·N_trunk FLOPs per non-padding token (forward 2N + backward 4N of the trunk's weights; the LM "
               "head is left out because the tools differ in where they apply it, alignkit on completion positions "
               "only, TRL on every position, so this is a lower bound of the useful arithmetic; attention's T² "
               "terms, < 5% at these lengths, too).",
    ratio_columns="tokens/s alignkit/TRL | median-step tokens/s alignkit/TRL | best-step tokens/s alignkit/TRL "
                  "| end-to-end TRL/alignkit | 1st step TRL/alignkit | peak RSS alignkit/TRL",
)

if __name__ == "__main__":
    main(STAGE)
