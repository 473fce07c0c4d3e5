#!/usr/bin/env python
"""Sampling speed: alignkit's sampler (`alignkit.generation.generate`) against transformers' `model.generate`.

    OMP_NUM_THREADS=1 python benchmarks/bench_generate.py [--batches 1,4,16,64:16] [--modes greedy,top_p]
        [--new-tokens 32] [--repeats 2] [--dtype float32|bfloat16] [--device cpu|cuda] [--random-weights]

Both tools get the same model (SmolLM2-135M-Instruct, the built-in `smollm2-135m-instruct`), the same token ids
(chat-templated short instructions of varying length, left-padded to one batch) and the same settings: greedy, or
sampling at temperature 1 with top_p 0.9 (top_k off), exactly `--new-tokens` new tokens per row (`B:N` in
`--batches` gives batch B its own N: the slow large batches fewer) (no stop tokens on
either side: alignkit `stop_token_ids=()`, transformers `eos_token_id=None`), weights in `--dtype`, torch.no_grad.
`alignkit generate`, PPO rollouts, `alignkit eval` and the server all sample through the measured function.

Each (tool, batch, repeat) is its own process (`--worker`), so peak RSS is that tool's; the tools alternate, the
order flipping every repeat, and each table entry is the median over the repeats. Within a worker, one short
warm-up generation runs first; then each mode is timed as
- prefill: from the call to the first sampled token (alignkit's `on_token` at step 0, transformers' streamer's
  second `put`), wall ms;
- decode: the remaining B·(N−1) tokens over the time after the first token, tokens/s of wall and of CPU time
  (time.process_time: the worker's own CPU, less sensitive to other jobs on a shared machine);
- total: B·N tokens over the whole call.
Greedy runs also record how many of alignkit's tokens equal transformers' (the same settings should give the
same tokens up to float rounding in the longer continuations).

Recorded with each run: the 1-minute load average at its start and the cores the rest of the machine used
during it. Results: benchmarks/results/generate.json and the table between the `generate-table` markers in
docs/benchmarks.md (`--no-docs` leaves it alone; `--output` writes elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))

from common import DOCS, WORK, cpu_jiffies  # noqa: E402

INSTRUCTIONS = [
    "Name a color.",
    "Explain how rainbows form, step by step.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me three tips for learning a new language quickly and remembering the words.",
    "Describe your ideal weekend.",
    "Summarize the plot of a famous novel in two sentences.",
    "Why is the sky blue?",
    "Write a short letter to a friend describing a trip to the mountains last summer.",
    "List five fruits.",
    "What are the pros and cons of working from home?",
    "Translate 'good morning' into Spanish.",
    "Tell me about the history of the bicycle, from its invention to today.",
    "How do I boil an egg?",
    "Suggest a name for a small bakery.",
    "Explain what a neural network is to a ten-year-old child who likes football.",
]
MODES = {"greedy": dict(temperature=0.0, top_p=1.0), "top_p": dict(temperature=1.0, top_p=0.9)}
TOOLS = ("alignkit", "transformers")


# ---------------------------------------------------------------------------------------------- worker


def prompt_ids(tokenizer, batch: int) -> list[list[int]]:
    out = []
    for i in range(batch):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCTIONS[i % len(INSTRUCTIONS)]}],
                                            tokenize=True, add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


class _Clock:
    """Wall and CPU time of the first sampled token."""

    def __init__(self):
        self.first: tuple[float, float] | None = None

    def mark(self) -> None:
        if self.first is None:
            self.first = (time.perf_counter(), time.process_time())


def run_alignkit(model, tokenizer, prompts, mode: str, new_tokens: int, seed: int):
    from alignkit.generation import SamplingParams, generate

    clock = _Clock()
    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=(), seed=seed, **MODES[mode])
    out = generate(model, tokenizer, prompts, params, on_token=lambda step, tokens, finished: clock.mark())
    assert out.response_ids.shape == (len(prompts), new_tokens)
    return out.response_ids, clock


def run_transformers(model, tokenizer, prompts, mode: str, new_tokens: int, seed: int):
    import torch
    from transformers import GenerationConfig

    from alignkit.generation import _left_pad

    clock = _Clock()

    class Streamer:  # put() gets the prompt first, then each step's tokens
        calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                clock.mark()

        def end(self):
            pass

    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, tokenizer.pad_token_id, device)
    sampling = mode != "greedy"
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=sampling, top_p=MODES[mode]["top_p"] if sampling else None,
                              temperature=1.0 if sampling else None, top_k=0 if sampling else None, eos_token_id=None,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    # generate() fills the settings left None from the model's generation config: no eos there either
    model.generation_config.eos_token_id = None
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=mask, generation_config=config, streamer=Streamer())  # no_grad, as alignkit
    response = out[:, ids.shape[1]:]
    assert response.shape == (len(prompts), new_tokens)
    return response, clock


def worker(tool: str, job: dict) -> None:
    import torch

    from alignkit.models import load_causal_lm, load_tokenizer, resolve_model_path

    from alignkit.testing import make_tiny_model

    torch.set_num_threads(job["threads"]) if job["threads"] else None
    dtype = getattr(torch, job["dtype"])
    name = resolve_model_path("smollm2-135m-instruct")
    tokenizer = load_tokenizer(name)
    if job["random_weights"]:  # SmolLM2's shape with random weights (machines without the built-in weights)
        from common import SMOLLM_SHAPE

        path = WORK / "smollm-shape-random"
        if not (path / "config.json").exists():
            make_tiny_model(path, **SMOLLM_SHAPE)
        name = str(path)
    model = load_causal_lm(name, dtype=dtype).to(job["device"]).eval()
    prompts = prompt_ids(tokenizer, job["batch"])
    run = run_alignkit if tool == "alignkit" else run_transformers
    run(model, tokenizer, prompts, job["modes"][0], 2, 0)  # warm-up: allocator, kernels, lazy imports
    results = {}
    for mode in job["modes"]:
        sync = torch.cuda.synchronize if job["device"] == "cuda" else (lambda: None)
        sync()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        tokens, clock = run(model, tokenizer, prompts, mode, job["new_tokens"], job["seed"])
        sync()
        wall1, cpu1 = time.perf_counter(), time.process_time()
        (first_wall, first_cpu), b, n = clock.first, job["batch"], job["new_tokens"]
        results[mode] = {
            "prefill_ms": round(1000 * (first_wall - wall0), 1), "prefill_cpu_ms": round(1000 * (first_cpu - cpu0), 1),
            "decode_tokens_per_s": round(b * (n - 1) / (wall1 - first_wall), 2),
            "decode_tokens_per_cpu_s": round(b * (n - 1) / (cpu1 - first_cpu), 2),
            "tokens_per_s": round(b * n / (wall1 - wall0), 2), "wall_s": round(wall1 - wall0, 3), "cpu_s": round(cpu1 - cpu0, 3),
            "tokens": tokens.tolist(),
        }
    Path(job["out"]).write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------- parent


def run_one(tool: str, job: dict) -> dict:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        job = {**job, "out": str(Path(tmp) / "result.json")}
        busy0, start = cpu_jiffies(), time.time()
        proc = subprocess.Popen([sys.executable, __file__, "--worker", tool, "--job", json.dumps(job)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: peak RSS and CPU seconds
        end, busy1 = time.time(), cpu_jiffies()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{tool} at batch {job['batch']} failed:\n{output[-3000:]}")
        modes = json.loads(Path(job["out"]).read_text())
    cpu_s = usage.ru_utime + usage.ru_stime
    hz = os.sysconf("SC_CLK_TCK")
    return {"tool": tool, "batch": job["batch"], "repeat": job["repeat"], "load1_at_start": round(load, 2),
            # CPU time the rest of the machine used during the run, in cores (0 = the machine was ours alone)
            "other_cores_busy": round(max(0.0, ((busy1 - busy0) / hz - cpu_s) / (end - start)), 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "process_cpu_s": round(cpu_s, 1), "modes": modes}


METRICS = ("prefill_ms", "prefill_cpu_ms", "decode_tokens_per_s", "decode_tokens_per_cpu_s", "tokens_per_s", "cpu_s")


def summarize(runs: list[dict], batches: list[int], modes: list[str]) -> dict:
    """Medians per batch, mode and tool; alignkit/transformers ratios of the speeds (> 1 favours alignkit)."""
    table = {}
    for b in batches:
        for mode in modes:
            med = {}
            for tool in TOOLS:
                mine = [r for r in runs if r["batch"] == b and r["tool"] == tool]
                med[tool] = {k: round(statistics.median(r["modes"][mode][k] for r in mine), 2) for k in METRICS}
                med[tool]["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in mine)
            a, t = med["alignkit"], med["transformers"]
            entry = {"median": med, "ratios": {
                "decode tokens/s": round(a["decode_tokens_per_s"] / t["decode_tokens_per_s"], 2),
                "decode tokens per CPU s": round(a["decode_tokens_per_cpu_s"] / t["decode_tokens_per_cpu_s"], 2),
                "prefill (transformers/alignkit ms)": round(t["prefill_ms"] / a["prefill_ms"], 2),
                "total tokens/s": round(a["tokens_per_s"] / t["tokens_per_s"], 2),
            }}
            if mode == "greedy" and all("tokens" in r["modes"][mode] for r in runs if r["batch"] == b):
                pairs = [(x, y) for ra in runs if ra["batch"] == b and ra["tool"] == "alignkit"
                         for rt in runs if rt["batch"] == b and rt["tool"] == "transformers" and rt["repeat"] == ra["repeat"]
                         for x, y in zip(ra["modes"][mode]["tokens"], rt["modes"][mode]["tokens"])]
                same = sum(sum(int(u == v) for u, v in zip(x, y)) for x, y in pairs)
                entry["greedy_tokens_equal"] = round(same / max(1, sum(len(x) for x, _ in pairs)), 3)
            table[f"{b}/{mode}"] = entry
    return table


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = ["| batch | mode | alignkit decode tokens/s | transformers decode tokens/s | ratio | ratio (CPU time) "
             "| prefill ms alignkit / transformers | prefill CPU ms alignkit / transformers | total tokens/s ratio "
             "| peak RSS MB alignkit / transformers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, entry in results["table"].items():
        batch, mode = key.split("/")
        a, t, r = entry["median"]["alignkit"], entry["median"]["transformers"], entry["ratios"]
        lines.append(f"| {batch} | {mode} | {a['decode_tokens_per_s']:.1f} | {t['decode_tokens_per_s']:.1f} | "
                     f"**{r['decode tokens/s']:.2f}×** | {r['decode tokens per CPU s']:.2f}× | {a['prefill_ms']:.0f} / {t['prefill_ms']:.0f} | "
                     f"{a['prefill_cpu_ms']:.0f} / {t['prefill_cpu_ms']:.0f} | "
                     f"{r['total tokens/s']:.2f}× | {a['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} |")
    loads = [r["load1_at_start"] for r in results["runs"]]
    others = [r["other_cores_busy"] for r in results["runs"]]
    equal = {k: e["greedy_tokens_equal"] for k, e in results["table"].items() if "greedy_tokens_equal" in e}
    per_batch = s["new_tokens"] if isinstance(s["new_tokens"], dict) else dict.fromkeys(s["batches"], s["new_tokens"])
    tokens = ", ".join(f"{n} at batch {b}" for b, n in per_batch.items())
    lines += ["", f"Medians of {s['repeats']} alternating runs per tool and batch; new tokens per row: {tokens} "
              f"(decode = all but the first); {s['machine']}; load average (1 min) at the runs' starts "
              f"{min(loads):.1f}–{max(loads):.1f}, other processes busy {min(others):.2f}–{max(others):.2f} cores; "
              + ("greedy tokens equal to transformers': " + ", ".join(f"batch {k.split('/')[0]} {v:.0%}" for k, v in equal.items())
                 if equal else "greedy tokens not compared (not recorded)")
              + "; versions: " + ", ".join(f"{k} {v}" for k, v in s["versions"].items()) + "."]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_docs(text: str) -> None:
    start, end = "<!-- generate-table:start -->", "<!-- generate-table:end -->"
    doc = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if start not in doc:
        doc += f"\n## Sampling: alignkit's sampler vs transformers `model.generate`\n\n{start}\n{end}\n"
    head, rest = doc.split(start, 1)
    write_atomic(DOCS, f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def versions(threads: int) -> dict:
    from importlib.metadata import version

    found = {p: version(p) for p in ("alignkit", "torch", "transformers")}
    return {**found, "python": platform.python_version(), "torch_threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,4,16,64:16",
                        help="comma-separated batch sizes; B:N gives batch B N new tokens instead of --new-tokens")
    parser.add_argument("--modes", default="greedy,top_p", help=f"comma-separated, of {','.join(MODES)}")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights' dtype on both sides (bfloat16 only where the CPU has avx512_bf16/AMX, or a GPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")),
                        help="torch threads in each worker (0: torch's default); default $OMP_NUM_THREADS")
    parser.add_argument("--random-weights", action="store_true", help="a random model of SmolLM2-135M's shape")
    parser.add_argument("--output", default=str(HERE / "results" / "generate.json"))
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/benchmarks.md")
    parser.add_argument("--docs-only", action="store_true", help="run nothing: rebuild the table from --output")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, json.loads(args.job))
    try:
        tokens_at = {int(b): int(n or args.new_tokens) for b, _, n in (item.partition(":") for item in args.batches.split(","))}
    except ValueError:
        parser.error(f"--batches: comma-separated integers B or B:N, got {args.batches!r}")
    batches, modes = list(tokens_at), args.modes.split(",")
    if any(b < 1 for b in batches) or not set(modes) <= set(MODES) or min(tokens_at.values()) < 2 or args.repeats < 1:
        parser.error(f"--batches ≥ 1, --modes of {sorted(MODES)}, --new-tokens ≥ 2, --repeats ≥ 1")
    output = Path(args.output)
    if args.docs_only:
        write_docs(markdown(json.loads(output.read_text())))
        return
    job = dict(modes=modes, new_tokens=args.new_tokens, seed=args.seed, dtype=args.dtype, device=args.device,
               threads=args.threads, random_weights=args.random_weights)
    runs = []
    for batch in batches:
        for repeat in range(args.repeats):
            for tool in TOOLS if repeat % 2 == 0 else TOOLS[::-1]:
                runs.append(run_one(tool, {**job, "batch": batch, "repeat": repeat, "new_tokens": tokens_at[batch]}))
                brief = {m: {k: v for k, v in r.items() if k != "tokens"} for m, r in runs[-1]["modes"].items()}
                print(json.dumps({**{k: v for k, v in runs[-1].items() if k != "modes"}, **brief}), flush=True)
    machine = (f"{os.cpu_count()}-core CPU ({platform.machine()}, {platform.processor() or 'shared'})" if args.device == "cpu"
               else "GPU") + f", {args.dtype} weights, torch threads {args.threads or 'default'}"
    if args.random_weights:
        machine += ", random weights of SmolLM2-135M's shape"
    results = {"settings": {"repeats": args.repeats, "new_tokens": tokens_at, "batches": batches, "modes": modes,
                            "machine": machine, "versions": versions(args.threads), "sampling": MODES},
               "table": summarize(runs, batches, modes), "runs": runs}
    write_atomic(output, json.dumps(results, indent=1))
    text = markdown(results)
    print(text)
    if not args.no_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
