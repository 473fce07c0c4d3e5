#!/usr/bin/env python
"""alignkit rm vs TRL RewardTrainer: same model, pairs, hyperparameters and venv; alternating runs (A B A B).

    python benchmarks/bench_rm.py --which tiny|smollm|both --repeats 2 [--variants flat,fused,flex]

Like bench_sft.py (the harness is in common.py): each run is its own subprocess, so peak RSS and wall time
are its own; each worker stamps the wall clock at every optimizer step next to the non-padding tokens
seen so far. Tokens are counted the same way on both sides, TRL's way: the tokens of prompt+chosen plus
those of prompt+rejected (alignkit's `tokens`), so tokens/s is proportional to pairs/s. alignkit runs
each prompt once per pair (shared-prompt rows, see alignkit/train/rm.py). Ablations, as extra tools:
`--variants flat` runs alignkit with one padded row per response as TRL does (what the shared-prompt
layout is worth); `--variants fused` runs it with a fused AdamW (TRL's default optimizer; alignkit's
loop uses torch's default, per-tensor AdamW); `--variants flex` runs it with `--attention_kernel flex` (the
shared-prompt rows on FlexAttention block masks; CUDA only).

Data: `tiny` uses built-in preference pairs (comparison, arithmetic: short answers after a chat prompt);
`smollm` uses real pairs, text-davinci-003 over davinci for 200 Self-Instruct instructions, built by
scripts/self_instruct_preferences.py from ../shared (the case is skipped where that is absent). Both are
conversational rows ({"prompt": [user message], "chosen": [assistant message], ...}) rendered with the
chat template by both tools. Results: benchmarks/results/rm.json and the table between the `rm-table`
markers in docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SAVED_AND_OPTIMIZERS, SHARED_SETTINGS, Stage, Trace, alignkit_config, main, model_path, preference_file,
    run_alignkit, run_trl, steady_rate,
)

CASES = {  # steps, of which the first `warmup` are left out of the steady state
    "tiny": dict(model="tiny", data="tiny_prefs.jsonl", batch=16, steps=40, warmup=5, max_length=512, lr=1e-4),
    "smollm": dict(model="smollm2-135m-instruct", data="self_instruct_prefs.jsonl", batch=8, steps=6, warmup=2, max_length=512, lr=1e-5),
}


def worker(tool: str, job: dict) -> dict:
    if tool == "trl":
        from trl import RewardConfig, RewardTrainer

        return run_trl(RewardTrainer, RewardConfig, job)
    import torch

    import alignkit.train.loop as loop
    import alignkit.train.rm as rm
    from alignkit.config import RMConfig

    variant = tool.partition("-")[2]
    if variant == "flat":  # TRL's layout: one padded row per response, the prompt computed each time
        rm.supports_custom_masks = lambda model: False
    if variant == "fused":  # what a fused AdamW in train/loop.py would give (TRL's default optimizer)
        make_optimizer = loop.make_optimizer

        def fused(model, cfg):
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in make_optimizer(model, cfg).param_groups]
            return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)

        loop.make_optimizer = fused
    return run_alignkit(rm.run_rm, RMConfig(**alignkit_config(job), attention_kernel="flex" if variant == "flex" else "dense"))


def prepare(case: str) -> tuple[str, str] | None:
    """The model directory and the case's data file; None: the case cannot run here."""
    data = preference_file(case, CASES[case]["data"])
    return None if data is None else (model_path(CASES[case]["model"]), data)


def metrics(trace: Trace) -> dict:
    # CPU time of the process itself: what a step costs, whatever else shares the machine
    return {"steady_tokens_per_cpu_s": steady_rate(trace.tokens, trace.cpu, trace.warmup)}


def options(parser) -> None:
    parser.add_argument("--variants", default="", help="comma-separated ablations run as extra tools: flat, fused, flex")


def tools(args) -> list[str]:
    return ["alignkit", "trl"] + [f"alignkit-{v.strip()}" for v in args.variants.split(",") if v.strip()]


STAGE = Stage(
    name="rm", script=__file__, doc=__doc__, cases=CASES, tools=("alignkit", "trl", "alignkit-flat", "alignkit-fused", "alignkit-flex"),
    worker=worker, prepare=prepare, metrics=metrics, options=options, pick_tools=tools,
    settings=f"{SHARED_SETTINGS}, same chat-templated tokens, tokens = those of prompt+chosen and prompt+rejected "
             f"(TRL's count) on both sides, {SAVED_AND_OPTIMIZERS} and head init (alignkit N(0, 1/sqrt(d+1)); TRL "
             "transformers' default)",
    columns="steady tokens/s | tokens per CPU s | step ms | time to 1st step s | end-to-end s | peak RSS MB "
            "| other cores busy",
    row="{steady_tokens_per_s:.0f} | {steady_tokens_per_cpu_s:.0f} | {steady_step_ms:.0f} | "
        "{time_to_first_step_s:.1f} | {end_to_end_s:.1f} | {peak_rss_mb:.0f} | {other_cores_busy:.2f}",
    extra_ratios={"tokens_per_cpu_s (alignkit/trl)": "steady_tokens_per_cpu_s"},
    flops_per_token=lambda tool, trunk, head: 6 * trunk,
    flops_note="RM: 6·N_trunk FLOPs per counted token (prompt+chosen and prompt+rejected: forward and backward "
               "of the trunk; no LM head, the scalar head is negligible; alignkit computes each prompt once, so "
               "this counts the work TRL's layout needs; attention's T² terms left out).",
    ratio_columns="tool | tokens/s vs TRL | tokens per CPU s vs TRL | end-to-end TRL/alignkit | 1st step TRL/alignkit "
                  "| peak RSS alignkit/TRL",
)

if __name__ == "__main__":
    main(STAGE)
