"""The harness the bench_*.py scripts share: alternating alignkit/TRL runs, each its own subprocess, and the
JSON results and markdown table they leave.

A stage (sft, rm, dpo) describes itself with a `Stage` and calls `main(stage)`. `main` runs the same script
again as `--worker TOOL --job JSON` for every run; the worker trains once and writes `bench_trace.json`
({t, cpu, tokens, loss, ...}: one entry per optimizer step) into the run's output directory, from which the
parent computes the run's numbers. Results go to benchmarks/results/<stage>.json and, between the
`<!-- <stage>-table:start/end -->` markers, to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"  # tiny model, data, run outputs and logs (git-ignored)
DOCS = ROOT / "docs" / "benchmarks.md"
SHARED_PREDICTIONS = ROOT.parent / "shared" / "data" / "self_instruct" / "predictions"
TINY = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256)
# SmolLM2-135M's shape, for `--random-weights` runs where the real weights cannot travel (the GPU machine):
# speed depends on the shape and the tokens, not on the weights' values
SMOLLM_SHAPE = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536)
# what alignkit_config and run_trl set on both sides, and what each side keeps, for the note under each table
SHARED_SETTINGS = ("fp32 weights (bf16 autocast only where the machine line says so), gradient checkpointing off, no gradient accumulation, linear LR schedule, "
                   "no warmup, weight decay 0, grad clip 1.0, seed 42, logging every step, no padding to multiples")
SAVED_AND_OPTIMIZERS = ("final model saved by both, each tool's default optimizer (alignkit torch AdamW, fused; "
                        "TRL adamw_torch_fused)")


@dataclass
class Trace:
    """What a worker recorded, one entry per optimizer step, and what the parent knows of the run."""

    t: list[float]  # wall clock at the end of each step
    cpu: list[float]  # the worker's own CPU time at the same moments
    tokens: list[int]  # non-padding tokens seen so far
    loss: list[float]
    logged: dict[str, list]  # the stage's further per-step values (DPO: reward margins)
    warmup: int  # the first `warmup` steps are left out of the steady state
    start: float  # wall clock when the worker process was started


# defaults of the Stage fields below: the plain case, no extras


def against_trl(tool: str) -> str:
    return "trl"


def no_extras(_) -> dict:
    return {}


def no_notes(results: dict) -> list[str]:
    return []


def no_options(parser: argparse.ArgumentParser) -> None:
    pass


@dataclass
class Stage:
    """What one bench script brings to the harness; everything else is shared."""

    name: str  # "sft": results/sft.json, the sft-table markers, alignkit.train.sft
    script: str  # the bench script, started again as `--worker TOOL --job JSON`
    doc: str  # its docstring; the first line is the --help description
    cases: dict[str, dict]  # case -> model, batch, steps, warmup, max_length, lr, ...
    tools: tuple[str, ...]  # every tool a worker can run, "alignkit" and "trl" first
    worker: Callable[[str, dict], dict]  # (tool, job) -> trace dict, in the worker process
    prepare: Callable[[str], tuple[str, str] | None]  # case -> (model dir, data file); None: skip the case here
    settings: str  # the settings both sides share, for the note under the table
    columns: str  # the medians table's columns after case and tool, in markdown: "steady tokens/s | ..."
    row: str  # one tool's medians in those columns, a str.format template: "{steady_tokens_per_s:.0f} | ..."
    ratio_columns: str  # the ratio table's columns after case (a tool column first when ratios are per tool)
    metrics: Callable[[Trace], dict] = no_extras  # the stage's own numbers per run, besides the shared ones
    extra_ratios: dict[str, str] = field(default_factory=dict)  # ratio name -> median key, alignkit/trl
    ratios_per_tool: bool = True  # False: sft.json's layout, one alignkit/trl pair and no tool level
    rival: Callable[[str], str] = against_trl  # the TRL tool an alignkit tool is compared with
    unsummarized: tuple[str, ...] = ()  # numeric run keys that get no median
    summary: Callable[[dict], dict] = no_extras  # medians per tool -> further keys of a case's results
    notes: Callable[[dict], list[str]] = no_notes  # lines under the ratio table
    options: Callable[[argparse.ArgumentParser], None] = no_options  # the stage's own flags
    pick_tools: Callable[[argparse.Namespace], list[str]] | None = None  # which tools run; None: all
    # (tool, trunk params, LM-head params) -> model FLOPs per counted token, for MFU; None: no MFU for the stage
    flops_per_token: Callable[[str, int, int], float] | None = None
    flops_note: str = ""  # the formula behind flops_per_token, for the note under the table


# ---------------------------------------------------------------------------------------------- workers


def alignkit_config(job: dict) -> dict:
    """The alignkit config fields every stage sets the same way (logging every step: one row per step)."""
    return dict(
        model_name_or_path=job["model"], dataset=job["data"], output_dir=job["out"], max_steps=job["steps"],
        per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1, learning_rate=job["lr"],
        lr_scheduler_type="linear", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
        max_length=job["max_length"], logging_steps=1, seed=42, progress=False, use_chat_template="yes",
        mixed_precision="bf16" if job.get("bf16") else "no",
    )


def run_alignkit(train: Callable, config, logged: dict[str, str] | None = None) -> dict:
    """Run `train(config)` and return its trace; `logged` maps trace keys to further metrics.jsonl columns.

    The steps are timed by wrapping MetricsLog.write, which alignkit calls once per optimizer step with
    logging_steps=1: nothing in the training loop itself changes.
    """
    import alignkit.train.loop as loop

    stamps: list[float] = []
    cpu: list[float] = []
    write = loop.MetricsLog.write

    def stamped(self, row):
        if "tokens" in row:  # a training row, not an eval or summary one
            stamps.append(time.time())
            cpu.append(time.process_time())
        write(self, row)

    loop.MetricsLog.write = stamped
    train(config)
    peak = cuda_peak_mb()
    rows = [json.loads(line) for line in Path(config.output_dir, "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens" in r]
    return {"t": stamps, "cpu": cpu, "tokens": [r["tokens"] for r in rows], "loss": [r["loss"] for r in rows],
            **{name: [r.get(key) for r in rows] for name, key in (logged or {}).items()}, **peak}


def cuda_peak_mb() -> dict:
    """{"cuda_peak_mb": the most GPU memory torch held at once} on a GPU run, {} on the CPU."""
    import torch

    return {"cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if torch.cuda.is_available() else {}


def run_trl(trainer_class, config_class, job: dict, logged: dict[str, str] | None = None, **config) -> dict:
    """Train with TRL's `trainer_class` on the job, with alignkit's settings plus `config`; return the trace."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    stamps: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.time())
            cpu.append(time.process_time())

    rows = [json.loads(line) for line in Path(job["data"]).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # alignkit's rule too
    args = config_class(
        output_dir=job["out"], max_steps=job["steps"], per_device_train_batch_size=job["batch"],
        gradient_accumulation_steps=1, learning_rate=job["lr"], lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, max_length=job["max_length"], logging_steps=1, seed=42,
        gradient_checkpointing=False, bf16=bool(job.get("bf16")), use_cpu=job.get("device", "cpu") == "cpu",
        report_to=[], save_strategy="no",
        disable_tqdm=True, model_init_kwargs={"dtype": "float32"}, **config,
    )
    trainer = trainer_class(model=job["model"], args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    peak = cuda_peak_mb()
    trainer.save_model(job["out"])  # alignkit always writes the final model; so does this job
    logs = [h for h in trainer.state.log_history if "loss" in h and "num_tokens" in h]
    return {"t": stamps, "cpu": cpu, "tokens": [int(h["num_tokens"]) for h in logs], "loss": [h["loss"] for h in logs],
            **{name: [h.get(key) for h in logs] for name, key in (logged or {}).items()}, **peak}


# ---------------------------------------------------------------------------------------------- data & models


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def model_path(name: str) -> str:
    """"tiny" -> the random tiny Llama (made once); anything else -> alignkit's resolution of the name."""
    from alignkit.models import resolve_model_path
    from alignkit.testing import make_tiny_model

    if name == "tiny":
        model, shape = WORK / "tiny-llama", TINY
    elif name == "smollm2-135m-instruct" and os.environ.get("BENCH_RANDOM_WEIGHTS"):
        model, shape = WORK / "smollm-shape-random", SMOLLM_SHAPE
    else:
        return resolve_model_path(name)
    if not (model / "config.json").exists():
        make_tiny_model(model, **shape)
    return str(model)


def preference_file(case: str, name: str, max_self_instruct: int | None = None) -> str | None:
    """The conversational preference pairs of a case in WORK/name, written once; None where they cannot be.

    tiny: built-in pairs (comparison, arithmetic). smollm: Self-Instruct pairs (text-davinci-003 over
    davinci) built by scripts/self_instruct_preferences.py from ../shared, the first `max_self_instruct` of them.
    """
    from alignkit.data.tasks import make_preferences

    data = WORK / name
    if data.exists():
        return str(data)
    if case == "tiny":
        rows = [r for task in ("comparison", "arithmetic") for r in make_preferences(task, "train", 200)]
    else:
        if not SHARED_PREDICTIONS.exists():
            print(f"skipping {case}: {SHARED_PREDICTIONS} is absent")
            return None
        subprocess.run([sys.executable, str(ROOT / "scripts" / "self_instruct_preferences.py"), str(SHARED_PREDICTIONS),
                        "--output_dir", str(WORK / "self_instruct")], check=True)
        rows = [json.loads(line) for line in (WORK / "self_instruct" / "train.jsonl").read_text().splitlines()]
        rows = rows[:max_self_instruct]
    write_jsonl(data, [{"prompt": [{"role": "user", "content": r["prompt"]}],
                        "chosen": [{"role": "assistant", "content": r["chosen"]}],
                        "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    return str(data)


# ---------------------------------------------------------------------------------------------- FLOPs


PEAK_SIZE = 2048  # the matmul of the peak: (n × n) @ (n × n)ᵀ, an nn.Linear forward's layout


def matmul_peaks(device: str = "cpu", seconds: float = 10.0) -> dict:
    """The machine's fp32 and bf16 matmul speed, GFLOP/s: the best of up to 5 timed `F.linear(a, b)` = a @ bᵀ
    of PEAK_SIZE² (2·n³ FLOPs each; one warm-up call first), at most `seconds` per precision, with the threads
    the workers get (the same OMP_NUM_THREADS). On a CPU without AVX512-BF16/AMX bf16 is emulated: this shows
    by how much, measured in the same run as the workers it is the yardstick of."""
    import torch
    import torch.nn.functional as F

    n, peaks = PEAK_SIZE, {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
        F.linear(a, b)
        sync()
        best, best_cpu, spent, reps = float("inf"), float("inf"), 0.0, 0
        while reps < 5 and (reps == 0 or spent < seconds):
            start, cpu = time.perf_counter(), time.process_time()
            F.linear(a, b)
            sync()
            took, took_cpu = time.perf_counter() - start, time.process_time() - cpu
            best, best_cpu, spent, reps = min(best, took), min(best_cpu, took_cpu), spent + took, reps + 1
        peaks[name] = round(2 * n**3 / best / 1e9, 2)
        # per CPU second of the process (all its threads): what a core does while it runs us, which waiting
        # for a core on a shared machine does not lower; the yardstick of the runs' tokens per CPU second
        peaks[f"{name}_per_cpu_s"] = round(2 * n**3 / best_cpu / 1e9, 2) if device == "cpu" else None
        peaks[f"{name}_timed_calls"] = reps
    return {**peaks, "size": n, "threads": torch.get_num_threads(), "device": device,
            "load1_at_measure": round(os.getloadavg()[0], 2)}


def param_counts(model_dir: str) -> tuple[int, int]:
    """(trunk, LM head) parameters of a causal LM: the trunk's matmul weights (every parameter but the input
    embedding and the head), and the head's vocabulary × hidden (counted once, tied or not)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    trunk = sum(p.numel() for p in model.parameters() if p is not embedding and p is not head)
    return trunk, head.numel()


def with_mfu(run: dict, flops_per_token: float | None, peaks: dict, precision: str) -> dict:
    """The run plus its model FLOP utilisation in %: flops_per_token × steady tokens/s ÷ the matmul peak of
    `precision`, by the wall clock, and by CPU time (tokens per CPU s ÷ peak per CPU s) where measured."""
    if not flops_per_token:
        return run
    mfu = {"mfu_pct": round(100 * flops_per_token * run["steady_tokens_per_s"] / (peaks[precision] * 1e9), 2)}
    if peaks.get(f"{precision}_per_cpu_s"):
        mfu["mfu_cpu_pct"] = round(100 * flops_per_token * run["steady_tokens_per_cpu_s"] / (peaks[f"{precision}_per_cpu_s"] * 1e9), 2)
    return {**run, **mfu}


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


def steady_rate(tokens: list[int], clock: list[float], warmup: int) -> float:
    """Tokens per second of `clock` (wall or CPU) over the steps after the warm-up."""
    return round((tokens[-1] - tokens[warmup - 1]) / (clock[-1] - clock[warmup - 1]), 1)


def median_step_ms(clock: list[float], warmup: int) -> float:
    return round(1000 * statistics.median(b - a for a, b in zip(clock[warmup - 1 :], clock[warmup:])), 1)


def run_one(stage: Stage, tool: str, case: str, job: dict, args) -> dict:
    load = wait_for_quiet(args)
    out = WORK / "runs" / f"{stage.name}-{case}-{tool}-{job['repeat']}"
    # the harness's own scratch directory for this (stage, case, tool, repeat): last time's copy goes, since
    # alignkit refuses to write into another run's outputs
    shutil.rmtree(out, ignore_errors=True)
    log_path = out.with_name(out.name + ".log")
    job = {**job, "out": str(out)}
    busy0, start = cpu_jiffies(), time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, stage.script, "--worker", tool, "--job", json.dumps(job)],
                                stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak RSS and CPU time
    end, busy1 = time.time(), cpu_jiffies()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tool} on {case} failed; see {log_path}")
    raw = json.loads((out / "bench_trace.json").read_text())
    gpu = {"cuda_peak_mb": raw.pop("cuda_peak_mb")} if "cuda_peak_mb" in raw else {}
    trace = Trace(t=raw.pop("t"), cpu=raw.pop("cpu"), tokens=raw.pop("tokens"), loss=raw.pop("loss"), logged=raw,
                  warmup=job["warmup"], start=start)
    t, tokens, w = trace.t, trace.tokens, trace.warmup
    assert len(t) == len(trace.cpu) == len(tokens) == job["steps"], (len(t), len(trace.cpu), len(tokens))
    hz, cpu_s = os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime
    return {
        "tool": tool, "repeat": job["repeat"], "load1_at_start": round(load, 2),
        # CPU time the rest of the machine used during the run, in cores (0 = we had the machine alone)
        "other_cores_busy": round(max(0.0, ((busy1 - busy0) / hz - cpu_s) / (end - start)), 2),
        "end_to_end_s": round(end - start, 2),
        "time_to_first_step_s": round(t[0] - start, 2),
        "steady_tokens_per_s": steady_rate(tokens, t, w),
        "steady_tokens_per_cpu_s": steady_rate(tokens, trace.cpu, w),  # the worker's own CPU time
        "steady_step_ms": median_step_ms(t, w),
        "tokens_per_step": round(tokens[-1] / len(tokens), 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(cpu_s, 1),
        "first_loss": round(trace.loss[0], 4), "final_loss": round(trace.loss[-1], 4),
        **stage.metrics(trace), **gpu,
    }


def run_quietest(stage: Stage, tool: str, case: str, job: dict, args) -> tuple[dict, list[dict]]:
    """Run, and rerun (at most --retries times) while other processes shared the CPU; the quietest run
    counts, the others are returned to be kept aside."""
    attempts = []
    for attempt in range(args.retries + 1):
        attempts.append(run_one(stage, tool, case, job, args))
        print(json.dumps({"case": case, "attempt": attempt, **attempts[-1]}), flush=True)
        if attempts[-1]["other_cores_busy"] <= args.max_other:
            break
    attempts.sort(key=lambda r: r["other_cores_busy"])
    return attempts[0], attempts[1:]


# ---------------------------------------------------------------------------------------------- report


def versions() -> dict:
    from importlib.metadata import version

    packages = ("alignkit", "trl", "torch", "transformers", "accelerate", "datasets", "tokenizers")
    found = {p: version(p) for p in packages}
    import torch

    return {**found, "python": platform.python_version(), "torch_threads": torch.get_num_threads()}


def ratios(stage: Stage, a: dict, b: dict) -> dict:
    """alignkit's medians `a` against TRL's `b`: speeds alignkit/TRL and times TRL/alignkit, so > 1 favours
    alignkit; peak RSS alignkit/TRL, so < 1 does."""
    rates = {"tokens_per_s (alignkit/trl)": "steady_tokens_per_s", **stage.extra_ratios}
    return {
        **{name: round(a[key] / b[key], 2) for name, key in rates.items()},
        "end_to_end speed-up (trl/alignkit)": round(b["end_to_end_s"] / a["end_to_end_s"], 2),
        "time_to_first_step speed-up (trl/alignkit)": round(b["time_to_first_step_s"] / a["time_to_first_step_s"], 2),
        "peak_rss (alignkit/trl)": round(a["peak_rss_mb"] / b["peak_rss_mb"], 2),
    }


def summarize(stage: Stage, runs: list[dict], tools: list[str]) -> dict:
    skip = {"repeat", *stage.unsummarized}
    numeric = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and k not in skip]
    med = {tool: {k: statistics.median(r[k] for r in runs if r["tool"] == tool) for k in numeric} for tool in tools}
    pairs = {tool: ratios(stage, med[tool], med[stage.rival(tool)])
             for tool in tools if tool.startswith("alignkit") and stage.rival(tool) in tools}
    return {"median": med, "ratios": pairs if stage.ratios_per_tool else pairs["alignkit"], **stage.summary(med)}


def table(stage: Stage, results: dict) -> str:
    """The markdown for docs/benchmarks.md: medians per case and tool, ratios, notes, settings."""
    medians = [m for res in results["cases"].values() for m in res["median"].values()]
    columns, row = stage.columns, stage.row
    if all("mfu_cpu_pct" in m for m in medians):
        columns, row = f"{columns} | MFU % wall / CPU time", f"{row} | {{mfu_pct:.2f}} / {{mfu_cpu_pct:.2f}}"
    elif all("mfu_pct" in m for m in medians):
        columns, row = f"{columns} | MFU %", f"{row} | {{mfu_pct:.2f}}"
    n_columns = columns.count("|") + 3  # + case, tool
    lines = [f"| case | tool | {columns} |", "|" + "---|" * n_columns]
    for case, res in results["cases"].items():
        for tool, m in res["median"].items():
            lines.append(f"| {case} | {tool} | {row.format(**m)} |")
    lines += ["", f"| case | {stage.ratio_columns} |", "|" + "---|" * (stage.ratio_columns.count("|") + 2)]
    for case, res in results["cases"].items():
        # sft.json keeps one flat dict of ratios; the others one per alignkit tool
        per_tool = res["ratios"] if stage.ratios_per_tool else {None: res["ratios"]}
        for tool, values in per_tool.items():
            lead = f"| {case} | " if tool is None else f"| {case} | {tool} | "
            lines.append(lead + " | ".join(f"{v:.2f}×" for v in values.values()) + " |")
    notes = stage.notes(results)
    if notes:
        lines += ["", *notes]
    s = results["settings"]
    peaks = s.get("matmul_peak_gflops")
    if peaks:
        lines += ["", f"Matmul peak measured in this run (F.linear of {peaks['size']}² matrices, {peaks['threads']} "
                  f"thread(s), best call): **fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s** "
                  + (f"by the wall clock, fp32 {peaks['fp32_per_cpu_s']:.1f} and bf16 {peaks['bf16_per_cpu_s']:.1f} "
                     "per CPU second " if peaks.get("fp32_per_cpu_s") else "")
                  + f"(load {peaks['load1_at_measure']:.1f} then). MFU = model FLOPs per token × steady tokens/s ÷ the "
                  f"peak of the precision the run used ({s.get('precision', 'fp32')}); by CPU time: tokens per CPU "
                  f"second ÷ peak per CPU second. {stage.flops_note}"]
    lines += ["", f"Medians of {s['repeats']} alternating runs per tool; {s['machine']}; versions: "
              + ", ".join(f"{k} {v}" for k, v in s["versions"].items()) + ". Settings: "
              + "; ".join(f"{c}: {v}" for c, v in s["cases"].items()) + f". {s['common']}"]
    return "\n".join(lines)


def write_docs(marker: str, text: str) -> None:
    start, end = f"<!-- {marker}-table:start -->", f"<!-- {marker}-table:end -->"
    doc = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if start not in doc:
        doc += f"\n{start}\n{end}\n"
    head, rest = doc.split(start, 1)
    DOCS.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def settings(stage: Stage, cases: dict[str, dict], args) -> dict:
    threads, bf16 = os.environ.get("OMP_NUM_THREADS"), args.precision == "bf16"
    machine = (f"{os.cpu_count()}-core CPU ({platform.machine()}, shared), "
               + (f"OMP_NUM_THREADS={threads}" if threads else "torch default threads") + (", bf16 autocast" if bf16 else ""))
    if args.device == "cuda":
        import torch

        machine = f"{torch.cuda.get_device_name()} GPU, {'bf16 autocast' if bf16 else 'fp32'}"
        machine += ", random weights of SmolLM2-135M's shape" if args.random_weights else ""
    return {
        "repeats": args.repeats, "versions": versions(), "precision": args.precision,
        "machine": machine,
        "cases": {c: dict(v) | ({"tiny_model": TINY} if v["model"] == "tiny" else {}) for c, v in cases.items()},
        "common": stage.settings,
    }


# ---------------------------------------------------------------------------------------------- main


def parse_args(stage: Stage) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=stage.doc.split("\n")[0])
    parser.add_argument("--which", choices=[*stage.cases, "both"], default="both")
    parser.add_argument("--repeats", type=int, default=2)
    stage.options(parser)
    parser.add_argument("--load-threshold", type=float, default=0.8, help="wait until the 1-min load is below this")
    parser.add_argument("--max-wait", type=float, default=60, help="... but at most this many seconds per run")
    parser.add_argument("--max-other", type=float, default=0.35,
                        help="rerun a run during which other processes used more than this many cores on average")
    parser.add_argument("--retries", type=int, default=1, help="... at most this many times; the quietest run counts")
    parser.add_argument("--steps", type=int, help="override every case's steps (a short smoke run; warm-up cut to "
                        "at most half of them); keep such results out of benchmarks/results with --output")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: both tools train on the GPU (alignkit picks it by itself; TRL gets use_cpu=False)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: bf16 autocast on both sides, fp32 master weights (alignkit --mixed_precision bf16, "
                             "TRL bf16=True); results go to results/<stage>_bf16.json and the <stage>-bf16-table markers")
    parser.add_argument("--random-weights", action="store_true",
                        help="the smollm cases use a random model of SmolLM2-135M's shape (no built-in weights needed)")
    parser.add_argument("--output", help="the results JSON (default: results/<stage>.json, results/<stage>_bf16.json)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/benchmarks.md")
    parser.add_argument("--docs-only", action="store_true", help="run nothing: rebuild the table from --output")
    parser.add_argument("--worker", choices=stage.tools, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be at least 2: one warm-up step and one steady step")
    suffix = "" if args.precision == "fp32" else f"_{args.precision}"
    args.output = args.output or str(HERE / "results" / f"{stage.name}{suffix}.json")
    args.marker = stage.name + suffix.replace("_", "-")  # sft-table, sft-bf16-table
    return args


def case_settings(stage: Stage, args) -> dict[str, dict]:
    if args.steps is None:
        return stage.cases
    # the steady state needs at least one step after the warm-up
    return {c: {**v, "steps": args.steps, "warmup": min(v["warmup"], args.steps // 2)} for c, v in stage.cases.items()}


def report(stage: Stage, results: dict, args) -> None:
    text = table(stage, results)
    if not args.no_docs:
        write_docs(args.marker, text)
    print(text)


def main(stage: Stage) -> None:
    args = parse_args(stage)
    if args.worker:
        job = json.loads(args.job)
        trace = stage.worker(args.worker, job)
        Path(job["out"], "bench_trace.json").write_text(json.dumps(trace))
        return
    output = Path(args.output)
    if args.docs_only:
        report(stage, json.loads(output.read_text()), args)
        return

    if args.random_weights:
        os.environ["BENCH_RANDOM_WEIGHTS"] = "1"  # read by model_path, here and in the workers
    tools = stage.pick_tools(args) if stage.pick_tools else list(stage.tools)
    cases = case_settings(stage, args)
    (WORK / "runs").mkdir(parents=True, exist_ok=True)
    results = json.loads(output.read_text()) if output.exists() else {"cases": {}}
    run_settings = settings(stage, cases, args)
    # the yardstick of MFU, once per run, on as quiet a machine as the runs get
    wait_for_quiet(args)
    peaks = run_settings["matmul_peak_gflops"] = matmul_peaks(args.device)
    print(json.dumps({"matmul_peak_gflops": peaks}), flush=True)
    # warm the page cache, so that the first run's start-up does not pay for reading the libraries from disk
    subprocess.run([sys.executable, "-c", f"import trl, alignkit.train.{stage.name}"], check=True)
    for case in cases if args.which == "both" else [args.which]:
        prepared = stage.prepare(case)
        if prepared is None:
            continue
        model, data = prepared
        counts = param_counts(model)
        runs, contended = [], []
        for repeat in range(args.repeats):
            for tool in tools:  # alternating: A B A B (A B C D ... with more tools)
                job = {**cases[case], "model": model, "data": data, "repeat": repeat,
                       **({"device": "cuda"} if args.device == "cuda" else {}),
                       **({"bf16": True} if args.precision == "bf16" else {})}
                run, aside = run_quietest(stage, tool, case, job, args)
                flops = stage.flops_per_token(tool, *counts) if stage.flops_per_token else None
                runs.append(with_mfu(run, flops, peaks, args.precision))
                contended += [with_mfu(r, flops, peaks, args.precision) for r in aside]
        summary = summarize(stage, runs, tools)
        results["cases"][case] = {"runs": runs, **summary, "discarded_contended_runs": contended,
                                  "params": {"trunk": counts[0], "lm_head": counts[1]}}
        print(case, *(json.dumps(v) for k, v in summary.items() if k != "median"), flush=True)
    results["settings"] = run_settings
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    report(stage, results, args)
