#!/usr/bin/env python
"""alignkit dpo vs TRL DPOTrainer: same model, pairs, β, batch and venv; alternating runs (A B C D A B C D).

    python benchmarks/bench_dpo.py --which tiny|smollm|both --repeats 2 [--tools alignkit,trl,alignkit-precompute]

Like bench_sft.py (the harness is in common.py): each run is its own subprocess, so peak RSS and wall time are
its own; each worker stamps the wall clock at every optimizer step next to the non-padding tokens seen so
far. Tokens are counted TRL's way on both sides: prompt+chosen plus prompt+rejected per pair (alignkit's
`tokens`), so tokens/s is proportional to pairs/s. Four tools: `alignkit` and `trl` with a reference model
run every step (the default of both), and `alignkit-precompute` / `trl-precompute` with
--precompute_ref_log_probs, whose steady-state step shows what dropping the reference forward pass is worth.
A fifth, `alignkit-flex` (CUDA only), runs `alignkit` with --attention_kernel flex: the prompt-shared rows of
policy and reference on FlexAttention block masks instead of SDPA with a dense 4-D mask; compared with `trl`.

Data: `tiny` uses built-in preference pairs (comparison, arithmetic: short answers after a chat prompt);
`smollm` uses real pairs, text-davinci-003 over davinci for Self-Instruct instructions, built by
scripts/self_instruct_preferences.py from ../shared (the case is skipped where that is absent), cut to
exactly steps × batch pairs so that both tools see the same pairs and precomputing costs one pass over them.
Rows are conversational ({"prompt": [user message], "chosen": [assistant message], ...}) and rendered with
the chat template by both tools. Results: benchmarks/results/dpo.json and the table between the `dpo-table`
markers in docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SAVED_AND_OPTIMIZERS, SHARED_SETTINGS, Stage, Trace, alignkit_config, main, median_step_ms, model_path,
    preference_file, run_alignkit, run_trl, steady_rate,
)

CASES = {  # steps, of which the first `warmup` are left out of the steady state
    # few steps: TRL's chunked LM head takes seconds per step on CPU (see docs/benchmarks.md)
    "tiny": dict(model="tiny", data="dpo_tiny.jsonl", batch=16, steps=12, warmup=3, max_length=512, lr=1e-4, beta=0.1),
    "smollm": dict(model="smollm2-135m-instruct", data="dpo_self_instruct.jsonl", batch=4, steps=6, warmup=2, max_length=512,
                   lr=1e-6, beta=0.1),
}
TOOLS = ("alignkit", "trl", "alignkit-precompute", "trl-precompute", "alignkit-flex")  # flex: --attention_kernel flex (CUDA)


def worker(tool: str, job: dict) -> dict:
    base, _, variant = tool.partition("-")
    precompute = variant == "precompute"
    if base == "trl":
        from trl import DPOConfig, DPOTrainer

        return run_trl(DPOTrainer, DPOConfig, job, logged={"margins": "rewards/margins"}, beta=job["beta"],
                       loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
                       precompute_ref_batch_size=job["batch"])
    from alignkit.config import DPOConfig
    from alignkit.train.dpo import run_dpo

    config = DPOConfig(**alignkit_config(job), per_device_eval_batch_size=job["batch"], beta=job["beta"],
                       loss_type="sigmoid", precompute_ref_log_probs=precompute, attention_kernel="flex" if variant == "flex" else "dense")
    return run_alignkit(run_dpo, config, logged={"margins": "rewards/margins"})


def prepare(case: str) -> tuple[str, str] | None:
    """The model directory and the case's data file; None: the case cannot run here. The Self-Instruct pairs
    are cut to steps × batch, so both tools see the same pairs and precomputing costs one pass over them."""
    data = preference_file(case, CASES[case]["data"], max_self_instruct=CASES[case]["steps"] * CASES[case]["batch"])
    return None if data is None else (model_path(CASES[case]["model"]), data)


def metrics(trace: Trace) -> dict:
    margin = trace.logged["margins"][-1]
    return {
        # the same from the process's CPU time: with one torch thread, what a step costs on a quiet core,
        # much less sensitive than the wall clock to other processes sharing the machine
        "steady_cpu_tokens_per_s": steady_rate(trace.tokens, trace.cpu, trace.warmup),
        "steady_cpu_step_ms": median_step_ms(trace.cpu, trace.warmup),
        "final_margin": None if margin is None else round(margin, 4),
    }


def precompute_cut(med: dict) -> dict:
    """How much of the steady step time precomputed reference log-probs save, per tool and clock."""
    return {"precompute_step_time_cut": {
        f"{tool} ({clock})": round(1 - med[f"{tool}-precompute"][key] / med[tool][key], 3)
        for tool in ("alignkit", "trl") if f"{tool}-precompute" in med
        for clock, key in (("wall", "steady_step_ms"), ("cpu", "steady_cpu_step_ms"))}}


def cut_note(results: dict) -> list[str]:
    cuts = [f"{case}: " + ", ".join(f"{tool} {100 * cut:.0f}%" for tool, cut in res["precompute_step_time_cut"].items())
            for case, res in results["cases"].items() if res.get("precompute_step_time_cut")]
    return ["Steady-state step time saved by precomputed reference log-probs: " + "; ".join(cuts) + "."] if cuts else []


def same_variant(tool: str) -> str:
    return "trl-precompute" if tool.endswith("-precompute") else "trl"  # alignkit-precompute against trl-precompute


def options(parser) -> None:
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help=f"comma-separated subset of {','.join(TOOLS)} (alignkit and trl always run)")


def tools(args) -> list[str]:
    return [t for t in TOOLS if t in ("alignkit", "trl") or t in args.tools.split(",")]


STAGE = Stage(
    name="dpo", script=__file__, doc=__doc__, cases=CASES, tools=TOOLS, worker=worker, prepare=prepare,
    metrics=metrics, options=options, pick_tools=tools, summary=precompute_cut, notes=cut_note,
    rival=same_variant,
    unsummarized=("final_margin",),  # None where TRL does not log it
    settings="sigmoid DPO loss, reference = a frozen copy of the starting model (or its precomputed log-probs), "
             f"{SHARED_SETTINGS}, same chat-templated tokens, tokens = those of prompt+chosen and prompt+rejected "
             f"(TRL's count) on both sides, {SAVED_AND_OPTIMIZERS}; TRL scores every position through its chunked "
             "LM head on CPU (its compact path needs Triton on a GPU), alignkit unembeds only response tokens",
    columns="steady tokens/s (wall) | step ms (wall) | tokens per CPU s | CPU ms per step | time to 1st step s "
            "| end-to-end s | peak RSS MB | first loss | other cores busy",
    row="{steady_tokens_per_s:.0f} | {steady_step_ms:.0f} | {steady_cpu_tokens_per_s:.0f} | {steady_cpu_step_ms:.0f} "
        "| {time_to_first_step_s:.1f} | {end_to_end_s:.1f} | {peak_rss_mb:.0f} | {first_loss:.4f} "
        "| {other_cores_busy:.2f}",
    extra_ratios={"tokens_per_cpu_s (alignkit/trl)": "steady_cpu_tokens_per_s"},
    flops_per_token=lambda tool, trunk, head: (6 if tool.endswith("precompute") else 8) * trunk,
    flops_note="DPO: 8·N_trunk FLOPs per counted token (prompt+chosen and prompt+rejected: the policy's forward and "
               "backward 6N plus the reference's forward 2N; 6N with precomputed reference log-probs, whose pass runs "
               "before step 1; the LM head left out, as for SFT: a lower bound of the useful arithmetic; so are "
               "the prompts alignkit computes once per pair, counted twice as TRL computes them).",
    ratio_columns="alignkit variant vs the same TRL variant | tokens/s alignkit/TRL (wall) | tokens per CPU s "
                  "alignkit/TRL | end-to-end TRL/alignkit | 1st step TRL/alignkit | peak RSS alignkit/TRL",
)

if __name__ == "__main__":
    main(STAGE)
