#!/usr/bin/env python
"""alignkit dpo vs TRL DPOTrainer: same model, pairs, β, batch and venv; alternating runs (A B C D A B C D).

    python benchmarks/bench_dpo.py --which tiny|smollm|both --repeats 2 [--tools alignkit,trl,alignkit-precompute]

Like bench_sft.py (whose helpers it imports): each run is its own subprocess, so peak RSS and wall time are
its own; each worker stamps the wall clock at every optimizer step next to the non-padding tokens seen so
far. Tokens are counted TRL's way on both sides: prompt+chosen plus prompt+rejected per pair (alignkit's
`tokens`), so tokens/s is proportional to pairs/s. Four tools: `alignkit` and `trl` with a reference model
run every step (the default of both), and `alignkit-precompute` / `trl-precompute` with
--precompute_ref_log_probs, whose steady-state step shows what dropping the reference forward pass is worth.

Data: `tiny` uses built-in preference pairs (comparison, arithmetic: short answers after a chat prompt);
`smollm` uses real pairs, text-davinci-003 over davinci for Self-Instruct instructions, built by
scripts/self_instruct_preferences.py from ../shared (the case is skipped where that is absent), cut to
exactly steps × batch pairs so that both tools see the same pairs and precomputing costs one pass over them.
Rows are conversational ({"prompt": [user message], "chosen": [assistant message], ...}) and rendered with
the chat template by both tools. Results: benchmarks/results/dpo.json and the table between the `dpo-table`
markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import TINY, WORK, cpu_jiffies, versions, wait_for_quiet  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = ROOT / "docs" / "benchmarks.md"
MARK_START, MARK_END = "<!-- dpo-table:start -->", "<!-- dpo-table:end -->"
SHARED_PREDICTIONS = ROOT.parent / "shared" / "data" / "self_instruct" / "predictions"
CASES = {  # steps, of which the first `warmup` are left out of the steady state
    # few steps: TRL's chunked LM head takes seconds per step on CPU (see docs/benchmarks.md)
    "tiny": dict(model="tiny", data="dpo_tiny.jsonl", batch=16, steps=12, warmup=3, max_length=512, lr=1e-4, beta=0.1),
    "smollm": dict(model="smollm2-135m-instruct", data="dpo_self_instruct.jsonl", batch=4, steps=6, warmup=2, max_length=512,
                   lr=1e-6, beta=0.1),
}
TOOLS = ("alignkit", "trl", "alignkit-precompute", "trl-precompute")


# ---------------------------------------------------------------------------------------------- workers


def worker_alignkit(job: dict, precompute: bool) -> dict:
    import alignkit.train.loop as loop
    from alignkit.config import DPOConfig
    from alignkit.train.dpo import run_dpo

    stamps: list[float] = []
    cpu: list[float] = []
    write = loop.MetricsLog.write

    def stamped(self, row):  # logging_steps=1: one training row per optimizer step
        if "tokens" in row:
            stamps.append(time.time())
            cpu.append(time.process_time())
        write(self, row)

    loop.MetricsLog.write = stamped
    run_dpo(DPOConfig(
        model_name_or_path=job["model"], dataset=job["data"], output_dir=job["out"], max_steps=job["steps"],
        per_device_train_batch_size=job["batch"], per_device_eval_batch_size=job["batch"], gradient_accumulation_steps=1,
        learning_rate=job["lr"], lr_scheduler_type="linear", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
        max_length=job["max_length"], logging_steps=1, seed=42, progress=False, use_chat_template="yes",
        beta=job["beta"], loss_type="sigmoid", precompute_ref_log_probs=precompute,
    ))
    rows = [json.loads(line) for line in Path(job["out"], "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens" in r]
    return {"t": stamps, "cpu": cpu, "tokens": [r["tokens"] for r in rows], "loss": [r["loss"] for r in rows],
            "margins": [r["rewards/margins"] for r in rows]}


def worker_trl(job: dict, precompute: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    stamps: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.time())
            cpu.append(time.process_time())

    rows = [json.loads(line) for line in Path(job["data"]).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # alignkit's rule too
    args = DPOConfig(
        output_dir=job["out"], max_steps=job["steps"], per_device_train_batch_size=job["batch"],
        gradient_accumulation_steps=1, learning_rate=job["lr"], lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, max_length=job["max_length"], logging_steps=1, seed=42,
        gradient_checkpointing=False, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, model_init_kwargs={"dtype": "float32"}, beta=job["beta"], loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=job["batch"],
    )
    trainer = DPOTrainer(model=job["model"], args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    trainer.save_model(job["out"])  # alignkit always writes the final model; so does this job
    logs = [h for h in trainer.state.log_history if "loss" in h and "num_tokens" in h]
    return {"t": stamps, "cpu": cpu, "tokens": [int(h["num_tokens"]) for h in logs], "loss": [h["loss"] for h in logs],
            "margins": [h.get("rewards/margins") for h in logs]}


def worker(tool: str, job: dict) -> dict:
    base, _, variant = tool.partition("-")
    return (worker_trl if base == "trl" else worker_alignkit)(job, precompute=variant == "precompute")


# ---------------------------------------------------------------------------------------------- one run


def run_one(tool: str, case: str, job: dict, args) -> dict:
    load = wait_for_quiet(args)
    out = WORK / "runs" / f"dpo-{case}-{tool}-{job['repeat']}"
    job = {**job, "out": str(out)}
    busy0, start = cpu_jiffies(), time.time()
    with open(WORK / "runs" / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", tool, "--job", json.dumps(job)], stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    end, busy1 = time.time(), cpu_jiffies()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tool} on {case} failed; see {WORK / 'runs' / (out.name + '.log')}")
    trace = json.loads((out / "bench_trace.json").read_text())
    t, c, tokens, loss, w = trace["t"], trace["cpu"], trace["tokens"], trace["loss"], job["warmup"]
    assert len(t) == len(c) == len(tokens) == job["steps"], (len(t), len(tokens))
    hz, cpu_s = os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime
    return {
        "tool": tool, "repeat": job["repeat"], "load1_at_start": round(load, 2),
        # CPU time the rest of the machine used during the run, in cores (0 = we had the machine alone)
        "other_cores_busy": round(max(0.0, ((busy1 - busy0) / hz - cpu_s) / (end - start)), 2),
        "end_to_end_s": round(end - start, 2),
        "time_to_first_step_s": round(t[0] - start, 2),
        "steady_tokens_per_s": round((tokens[-1] - tokens[w - 1]) / (t[-1] - t[w - 1]), 1),
        "steady_step_ms": round(1000 * statistics.median(b - a for a, b in zip(t[w - 1 :], t[w:])), 1),
        # the same from the process's CPU time: with one torch thread, what a step costs on a quiet core,
        # much less sensitive than the wall clock to other processes sharing the machine
        "steady_cpu_tokens_per_s": round((tokens[-1] - tokens[w - 1]) / (c[-1] - c[w - 1]), 1),
        "steady_cpu_step_ms": round(1000 * statistics.median(b - a for a, b in zip(c[w - 1 :], c[w:])), 1),
        "tokens_per_step": round(tokens[-1] / len(tokens), 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(cpu_s, 1),
        "first_loss": round(loss[0], 4), "final_loss": round(loss[-1], 4),
        "final_margin": round(trace["margins"][-1], 4) if trace["margins"][-1] is not None else None,
    }


# ---------------------------------------------------------------------------------------------- setup & report


def conversational(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def prepare(case: str) -> str | None:
    """The model directory (None: the case cannot run here); writes the case's data file once."""
    from alignkit.data.tasks import make_preferences
    from alignkit.models import make_tiny_model, resolve_model_path

    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / CASES[case]["data"]
    if case == "tiny" and not data.exists():
        rows = [r for task in ("comparison", "arithmetic") for r in make_preferences(task, "train", 200)]
        data.write_text("".join(json.dumps(conversational(r["prompt"], r["chosen"], r["rejected"])) + "\n" for r in rows))
    if case == "smollm" and not data.exists():
        if not SHARED_PREDICTIONS.exists():
            print(f"skipping smollm: {SHARED_PREDICTIONS} is absent")
            return None
        subprocess.run([sys.executable, str(ROOT / "scripts" / "self_instruct_preferences.py"), str(SHARED_PREDICTIONS),
                        "--output_dir", str(WORK / "self_instruct")], check=True)
        rows = [json.loads(line) for line in (WORK / "self_instruct" / "train.jsonl").read_text().splitlines()]
        rows = rows[: CASES[case]["steps"] * CASES[case]["batch"]]
        data.write_text("".join(json.dumps(conversational(r["prompt"], r["chosen"], r["rejected"])) + "\n" for r in rows))
    if CASES[case]["model"] == "tiny":
        model = WORK / "tiny-llama"
        if not (model / "config.json").exists():
            make_tiny_model(model, **TINY)
        return str(model)
    return resolve_model_path(CASES[case]["model"])


def summarize(runs: list[dict], tools: list[str]) -> dict:
    numeric = [k for k in runs[0] if isinstance(runs[0][k], (int, float)) and k not in ("repeat", "final_margin")]
    med = {tool: {k: statistics.median(r[k] for r in runs if r["tool"] == tool) for k in numeric} for tool in tools}
    ratios = {}
    for tool in [t for t in tools if t.startswith("alignkit") and "trl" + t[len("alignkit"):] in tools]:
        a, b = med[tool], med["trl" + tool[len("alignkit"):]]  # each alignkit variant against the same TRL variant
        ratios[tool] = {
            "tokens_per_s (alignkit/trl)": round(a["steady_tokens_per_s"] / b["steady_tokens_per_s"], 2),
            "tokens_per_cpu_s (alignkit/trl)": round(a["steady_cpu_tokens_per_s"] / b["steady_cpu_tokens_per_s"], 2),
            "end_to_end speed-up (trl/alignkit)": round(b["end_to_end_s"] / a["end_to_end_s"], 2),
            "time_to_first_step speed-up (trl/alignkit)": round(b["time_to_first_step_s"] / a["time_to_first_step_s"], 2),
            "peak_rss (alignkit/trl)": round(a["peak_rss_mb"] / b["peak_rss_mb"], 2),
        }
    cuts = {f"{tool} ({clock})": round(1 - med[f"{tool}-precompute"][key] / med[tool][key], 3)
            for tool in ("alignkit", "trl") if f"{tool}-precompute" in med
            for clock, key in (("wall", "steady_step_ms"), ("cpu", "steady_cpu_step_ms"))}
    return {"median": med, "ratios": ratios, "precompute_step_time_cut": cuts}


def table(results: dict) -> str:
    lines = ["| case | tool | steady tokens/s (wall) | step ms (wall) | tokens per CPU s | CPU ms per step | time to 1st step s "
             "| end-to-end s | peak RSS MB | first loss | other cores busy |", "|" + "---|" * 11]
    for case, res in results["cases"].items():
        for tool, m in res["median"].items():
            lines.append(f"| {case} | {tool} | {m['steady_tokens_per_s']:.0f} | {m['steady_step_ms']:.0f} | "
                         f"{m['steady_cpu_tokens_per_s']:.0f} | {m['steady_cpu_step_ms']:.0f} | "
                         f"{m['time_to_first_step_s']:.1f} | {m['end_to_end_s']:.1f} | {m['peak_rss_mb']:.0f} | "
                         f"{m['first_loss']:.4f} | {m['other_cores_busy']:.2f} |")
    lines += ["", "| case | alignkit variant vs the same TRL variant | tokens/s alignkit/TRL (wall) | tokens per CPU s "
              "alignkit/TRL | end-to-end TRL/alignkit | 1st step TRL/alignkit | peak RSS alignkit/TRL |", "|---|---|---|---|---|---|---|"]
    for case, res in results["cases"].items():
        for tool, ratios in res["ratios"].items():
            lines.append(f"| {case} | {tool} | " + " | ".join(f"{v:.2f}×" for v in ratios.values()) + " |")
    cuts = [f"{case}: " + ", ".join(f"{tool} {100 * cut:.0f}%" for tool, cut in res["precompute_step_time_cut"].items())
            for case, res in results["cases"].items() if res.get("precompute_step_time_cut")]
    if cuts:
        lines += ["", "Steady-state step time saved by precomputed reference log-probs: " + "; ".join(cuts) + "."]
    s = results["settings"]
    lines += ["", f"Medians of {s['repeats']} alternating runs per tool; {s['machine']}; versions: "
              + ", ".join(f"{k} {v}" for k, v in s["versions"].items()) + ". Settings: "
              + "; ".join(f"{c}: {v}" for c, v in s["cases"].items()) + f". {s['common']}"]
    return "\n".join(lines)


def write_docs(text: str) -> None:
    doc = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if MARK_START not in doc:
        doc += f"\n{MARK_START}\n{MARK_END}\n"
    head, rest = doc.split(MARK_START, 1)
    DOCS.write_text(f"{head}{MARK_START}\n{text}\n{MARK_END}{rest.split(MARK_END, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--which", choices=["tiny", "smollm", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)} (alignkit and trl always run)")
    parser.add_argument("--load-threshold", type=float, default=0.8, help="wait until the 1-min load is below this")
    parser.add_argument("--max-wait", type=float, default=60, help="... but at most this many seconds per run")
    parser.add_argument("--max-other", type=float, default=0.35,
                        help="rerun a run during which other processes used more than this many cores on average")
    parser.add_argument("--retries", type=int, default=1, help="... at most this many times")
    parser.add_argument("--output", default=str(HERE / "results" / "dpo.json"))
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/benchmarks.md")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.job)
        trace = worker(args.worker, job)
        Path(job["out"], "bench_trace.json").write_text(json.dumps(trace))
        return

    tools = [t for t in TOOLS if t in ("alignkit", "trl") or t in args.tools.split(",")]
    cases = ["tiny", "smollm"] if args.which == "both" else [args.which]
    (WORK / "runs").mkdir(parents=True, exist_ok=True)
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {"cases": {}}
    settings = {
        "repeats": args.repeats, "versions": versions(),
        "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}, shared), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "cases": {c: dict(CASES[c]) | ({"tiny_model": TINY} if c == "tiny" else {}) for c in CASES},
        "common": "sigmoid DPO loss, reference = a frozen copy of the starting model (or its precomputed log-probs), "
                  "fp32 (bf16 off), gradient checkpointing off, no gradient accumulation, linear LR schedule, no warmup, "
                  "weight decay 0, grad clip 1.0, seed 42, logging every step, no padding to multiples, same "
                  "chat-templated tokens, tokens = those of prompt+chosen and prompt+rejected (TRL's count) on both "
                  "sides, final model saved by both, each tool's default optimizer (alignkit torch AdamW; TRL "
                  "adamw_torch_fused); TRL scores every position through its chunked LM head on CPU (its compact "
                  "path needs Triton on a GPU), alignkit unembeds only response tokens",
    }
    subprocess.run([sys.executable, "-c", "import trl, alignkit.train.dpo"], check=True)  # warm the page cache
    for case in cases:
        model, runs, contended = prepare(case), [], []
        if model is None:
            continue
        for repeat in range(args.repeats):
            for tool in tools:  # A B C D A B C D
                job = {**CASES[case], "model": model, "data": str(WORK / CASES[case]["data"]), "repeat": repeat}
                attempts = []
                for attempt in range(args.retries + 1):  # a run that shared the CPU is rerun; the quietest is kept
                    attempts.append(run_one(tool, case, job, args))
                    print(json.dumps({"case": case, "attempt": attempt, **attempts[-1]}), flush=True)
                    if attempts[-1]["other_cores_busy"] <= args.max_other:
                        break
                attempts.sort(key=lambda r: r["other_cores_busy"])
                runs.append(attempts[0])
                contended += attempts[1:]
        results["cases"][case] = {"runs": runs, **summarize(runs, tools), "discarded_contended_runs": contended}
        print(case, json.dumps(results["cases"][case]["ratios"]), json.dumps(results["cases"][case]["precompute_step_time_cut"]), flush=True)
    results["settings"] = settings
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_docs:
        write_docs(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
