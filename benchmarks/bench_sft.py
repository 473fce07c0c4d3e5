#!/usr/bin/env python
"""alignkit SFT vs TRL SFTTrainer: same model, data, hyperparameters and venv; alternating runs (A B A B).

    python benchmarks/bench_sft.py --which tiny|smollm|both --repeats 2

Each run is its own subprocess (`--worker alignkit|trl`), so its peak RSS (os.wait4's ru_maxrss) and wall
time are its own. Both see identical token sequences: a conversational prompt/completion JSONL rendered with
the tokenizer's chat template, loss on the completion tokens only. Each worker stamps the wall clock at the
end of every optimizer step (TRL: a TrainerCallback's on_step_end; alignkit: its metrics.jsonl write, with
logging_steps=1 on both sides) next to the non-padding tokens seen so far, so steady-state tokens/s is
(tokens[N] - tokens[w]) / (t[N] - t[w]) after w warm-up steps. Results: benchmarks/results/sft.json and the
table between the markers in docs/benchmarks.md. Set up the venv as benchmarks/README.md says.
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

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"  # tiny model, data, run outputs (git-ignored)
DOCS = HERE.parent / "docs" / "benchmarks.md"
MARK_START, MARK_END = "<!-- sft-table:start -->", "<!-- sft-table:end -->"
TINY = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256)
CASES = {  # steps, of which the first `warmup` are left out of the steady state
    "tiny": dict(model="tiny", batch=16, steps=20, warmup=5, max_length=256, lr=1e-3),
    "smollm": dict(model="smollm2-135m-instruct", batch=8, steps=12, warmup=3, max_length=256, lr=5e-5),
}
TOOLS = ("alignkit", "trl")


# ---------------------------------------------------------------------------------------------- workers


def worker_alignkit(job: dict) -> dict:
    import alignkit.train.loop as loop
    from alignkit.config import SFTConfig
    from alignkit.train.sft import run_sft

    stamps: list[float] = []
    write = loop.MetricsLog.write

    def stamped(self, row):  # logging_steps=1: one training row per optimizer step
        if "tokens" in row:
            stamps.append(time.time())
        write(self, row)

    loop.MetricsLog.write = stamped
    run_sft(SFTConfig(
        model_name_or_path=job["model"], dataset=job["data"], output_dir=job["out"], max_steps=job["steps"],
        per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1, learning_rate=job["lr"],
        lr_scheduler_type="linear", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
        max_length=job["max_length"], logging_steps=1, seed=42, progress=False, use_chat_template="yes",
        mixed_precision="no",
    ))
    rows = [json.loads(line) for line in Path(job["out"], "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens" in r]
    return {"t": stamps, "tokens": [r["tokens"] for r in rows], "loss": [r["loss"] for r in rows]}


def worker_trl(job: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.time())

    rows = [json.loads(line) for line in Path(job["data"]).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # alignkit's rule too
    args = SFTConfig(
        output_dir=job["out"], max_steps=job["steps"], per_device_train_batch_size=job["batch"],
        gradient_accumulation_steps=1, learning_rate=job["lr"], lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, max_length=job["max_length"], logging_steps=1, seed=42,
        gradient_checkpointing=False, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
        completion_only_loss=True, disable_tqdm=True, model_init_kwargs={"dtype": "float32"},
    )
    trainer = SFTTrainer(model=job["model"], args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    trainer.save_model(job["out"])  # alignkit always writes the final model; so does this job
    logs = [h for h in trainer.state.log_history if "loss" in h and "num_tokens" in h]
    return {"t": stamps, "tokens": [int(h["num_tokens"]) for h in logs], "loss": [h["loss"] for h in logs]}


# ---------------------------------------------------------------------------------------------- one run


def cpu_jiffies() -> int:
    """Busy (non-idle, non-iowait) jiffies of all CPUs together, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def wait_for_quiet(args) -> float:
    """Wait (at most --max-wait s) until the 1-min load is below --load-threshold, or, since our own previous
    run keeps that average up for a minute, until the rest of the machine has used < 0.2 cores for 4 s."""
    deadline, hz = time.time() + args.max_wait, os.sysconf("SC_CLK_TCK")
    while os.getloadavg()[0] >= args.load_threshold and time.time() < deadline:
        before = cpu_jiffies()
        time.sleep(4)
        if (cpu_jiffies() - before) / hz / 4 < 0.2:
            break
    return os.getloadavg()[0]


def run_one(tool: str, case: str, job: dict, args) -> dict:
    load = wait_for_quiet(args)
    out = WORK / "runs" / f"{case}-{tool}-{job['repeat']}"
    job = {**job, "out": str(out)}
    busy0 = cpu_jiffies()
    start = time.time()
    with open(WORK / "runs" / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", tool, "--job", json.dumps(job)],
                                stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    end = time.time()
    busy1 = cpu_jiffies()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tool} on {case} failed; see {WORK / 'runs' / (out.name + '.log')}")
    trace = json.loads((out / "bench_trace.json").read_text())
    t, tokens, loss, w = trace["t"], trace["tokens"], trace["loss"], job["warmup"]
    assert len(t) == len(tokens) == job["steps"], (len(t), len(tokens))
    hz, cpu_s = os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime
    rates = [(tokens[i] - tokens[i - 1]) / (t[i] - t[i - 1]) for i in range(w, len(t))]
    return {
        "tool": tool, "repeat": job["repeat"], "load1_at_start": round(load, 2),
        # CPU time the rest of the machine used during the run, in cores (0 = we had the machine alone)
        "other_cores_busy": round(max(0.0, ((busy1 - busy0) / hz - cpu_s) / (end - start)), 2),
        "end_to_end_s": round(end - start, 2),
        "time_to_first_step_s": round(t[0] - start, 2),
        "steady_tokens_per_s": round((tokens[-1] - tokens[w - 1]) / (t[-1] - t[w - 1]), 1),
        "steady_step_ms": round(1000 * statistics.median(b - a for a, b in zip(t[w - 1 :], t[w:])), 1),
        # from the median and from the fastest steady step: load from other processes only adds time, so on a
        # shared machine these are closer to the machine's real speed (both tools get identical batches)
        "median_step_tokens_per_s": round(statistics.median(rates), 1),
        "best_step_tokens_per_s": round(max(rates), 1),
        "tokens_per_step": round(tokens[-1] / len(tokens), 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(cpu_s, 1),
        "first_loss": round(loss[0], 4), "final_loss": round(loss[-1], 4),
        "mean_loss_last5": round(statistics.mean(loss[-5:]), 4),
        "step_s": [round(b - a, 3) for a, b in zip([start] + t, t)],  # step 1's includes the start-up
    }


# ---------------------------------------------------------------------------------------------- setup & report


def prepare(case: str) -> str:
    """The model directory and a conversational prompt/completion JSONL both tools read."""
    from alignkit.data.tasks import make_mixture
    from alignkit.models import make_tiny_model, resolve_model_path

    WORK.mkdir(parents=True, exist_ok=True)
    data = WORK / "tasks.jsonl"
    if not data.exists():
        rows = make_mixture(["arithmetic", "reversal"], "train", 200, seed=0)
        data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                            "completion": [{"role": "assistant", "content": r["completion"]}]}) + "\n"
                                for r in rows))
    if CASES[case]["model"] == "tiny":
        model = WORK / "tiny-llama"
        if not (model / "config.json").exists():
            make_tiny_model(model, **TINY)
        return str(model)
    return resolve_model_path(CASES[case]["model"])


def versions() -> dict:
    from importlib.metadata import version

    found = {p: version(p) for p in ("alignkit", "trl", "torch", "transformers", "accelerate", "datasets", "tokenizers")}
    import torch

    return {**found, "python": platform.python_version(), "torch_threads": torch.get_num_threads()}


def summarize(runs: list[dict]) -> dict:
    med = {tool: {k: statistics.median(r[k] for r in runs if r["tool"] == tool)
                  for k in runs[0] if isinstance(runs[0][k], (int, float)) and k != "repeat"} for tool in TOOLS}
    a, b = med["alignkit"], med["trl"]
    return {"median": med, "ratios": {
        "tokens_per_s (alignkit/trl)": round(a["steady_tokens_per_s"] / b["steady_tokens_per_s"], 2),
        "median-step tokens_per_s (alignkit/trl)": round(a["median_step_tokens_per_s"] / b["median_step_tokens_per_s"], 2),
        "best-step tokens_per_s (alignkit/trl)": round(a["best_step_tokens_per_s"] / b["best_step_tokens_per_s"], 2),
        "end_to_end speed-up (trl/alignkit)": round(b["end_to_end_s"] / a["end_to_end_s"], 2),
        "time_to_first_step speed-up (trl/alignkit)": round(b["time_to_first_step_s"] / a["time_to_first_step_s"], 2),
        "peak_rss (alignkit/trl)": round(a["peak_rss_mb"] / b["peak_rss_mb"], 2),
    }}


def table(results: dict) -> str:
    lines = ["| case | tool | steady tokens/s | median-step tokens/s | best-step tokens/s | median step ms "
             "| time to 1st step s | end-to-end s | peak RSS MB | final loss (last 5 mean) | load at start "
             "| other cores busy |", "|" + "---|" * 12]
    for case, res in results["cases"].items():
        for tool in TOOLS:
            m = res["median"][tool]
            lines.append(f"| {case} | {tool} | {m['steady_tokens_per_s']:.0f} | {m['median_step_tokens_per_s']:.0f} | "
                         f"{m['best_step_tokens_per_s']:.0f} | {m['steady_step_ms']:.0f} | "
                         f"{m['time_to_first_step_s']:.1f} | {m['end_to_end_s']:.1f} | {m['peak_rss_mb']:.0f} | "
                         f"{m['final_loss']:.3f} ({m['mean_loss_last5']:.3f}) | {m['load1_at_start']:.2f} | "
                         f"{m['other_cores_busy']:.2f} |")
    lines += ["", "| case | tokens/s alignkit/TRL | median-step tokens/s alignkit/TRL | best-step tokens/s alignkit/TRL "
              "| end-to-end TRL/alignkit | 1st step TRL/alignkit | peak RSS alignkit/TRL |", "|" + "---|" * 7]
    for case, res in results["cases"].items():
        lines.append(f"| {case} | " + " | ".join(f"{v:.2f}×" for v in res["ratios"].values()) + " |")
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
    parser.add_argument("--load-threshold", type=float, default=0.8, help="wait until the 1-min load is below this")
    parser.add_argument("--max-wait", type=float, default=60, help="... but at most this many seconds per run")
    parser.add_argument("--max-other", type=float, default=0.35,
                        help="rerun a run during which other processes used more than this many cores on average")
    parser.add_argument("--retries", type=int, default=1, help="... at most this many times")
    parser.add_argument("--output", default=str(HERE / "results" / "sft.json"))
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/benchmarks.md")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(args.job)
        trace = (worker_alignkit if args.worker == "alignkit" else worker_trl)(job)
        Path(job["out"], "bench_trace.json").write_text(json.dumps(trace))
        return

    cases = ["tiny", "smollm"] if args.which == "both" else [args.which]
    (WORK / "runs").mkdir(parents=True, exist_ok=True)
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {"cases": {}}
    settings = {
        "repeats": args.repeats, "versions": versions(),
        "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}, shared), torch default threads",
        "cases": {c: {k: v for k, v in CASES[c].items()} | ({"tiny_model": TINY} if c == "tiny" else {}) for c in CASES},
        "common": "fp32 (bf16 off), gradient checkpointing off, no gradient accumulation, linear LR schedule, "
                  "no warmup, weight decay 0, grad clip 1.0, seed 42, logging every step, no padding to multiples, "
                  "no packing, completion-only loss, same chat-templated tokens, final model saved by both, "
                  "each tool's default optimizer (alignkit torch AdamW; TRL adamw_torch_fused)",
    }
    subprocess.run([sys.executable, "-c", "import trl, alignkit.train.sft"], check=True)  # warm the page cache
    for case in cases:
        model, runs, contended = prepare(case), [], []
        for repeat in range(args.repeats):
            for tool in TOOLS:  # A B A B
                job = {**CASES[case], "model": model, "data": str(WORK / "tasks.jsonl"), "repeat": repeat}
                for attempt in range(args.retries + 1):  # a run that shared the CPU is kept aside and rerun
                    run = run_one(tool, case, job, args)
                    print(json.dumps({"case": case, "attempt": attempt, **run}), flush=True)
                    if run["other_cores_busy"] <= args.max_other or attempt == args.retries:
                        break
                    contended.append(run)
                runs.append(run)
        results["cases"][case] = {"runs": runs, **summarize(runs), "discarded_contended_runs": contended}
        print(case, json.dumps(results["cases"][case]["ratios"]), flush=True)
    results["settings"] = settings
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_docs:
        write_docs(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
