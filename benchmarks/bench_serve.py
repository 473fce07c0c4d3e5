#!/usr/bin/env python
"""Throughput of `alignkit serve` at 1, 4 and 16 concurrent clients: does batching pay?

    python benchmarks/bench_serve.py --which tiny|smollm|both [--concurrency 1,4,16] [--requests 3] [--max_tokens 32]

Each case loads the model once, starts the real server (FastAPI on uvicorn, in a thread, on a free
loopback port) and, for each concurrency level C, runs C client threads that each send `--requests`
non-streaming chat completions one after another (different prompts; temperature 0.7 and top_p 1.0 by
default: top_p < 1 adds a full-vocabulary sort per step to the sampler, which `--top_p` measures).
tokens/s = the completion tokens the server reported (`usage`) / wall time of the level. Also recorded: requests/s, mean and p95 latency, the largest batch
the engine formed, and the machine's load at the start (other jobs share these CPUs).

`--mode engine` skips HTTP and calls the batching engine from threads (for machines without FastAPI,
e.g. a GPU box); `--random_init` builds the model from its config.json with random weights (same
shapes and cost per token; such a model never stops early, so every request decodes max_tokens).

Results: benchmarks/results/serve.json (one entry per case, mode and device; rerunning one replaces it)
and the table between the `serve-table` markers in docs/serving.md (`--no-docs` leaves it alone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

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


def load_model(name: str, random_init: bool, device: str):
    import torch

    from alignkit.models import load_causal_lm, load_tokenizer, make_tiny_model

    if name == "tiny":
        path = HERE / ".work" / "serve-tiny"
        if not (path / "config.json").exists():
            make_tiny_model(path)
        name = str(path)
    tokenizer = load_tokenizer(name)
    if random_init:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name), dtype=torch.float32)
    else:
        model = load_causal_lm(name)
    return model.to(device).eval(), tokenizer, name


def run_level(send, clients: int, requests: int) -> dict:
    """`clients` threads, each sending `requests` requests in a row; send(i) -> completion tokens."""
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            start = time.perf_counter()
            try:
                n = send(c * requests + r)
            except Exception as error:  # recorded, not fatal: the table shows it
                with lock:
                    errors.append(repr(error))
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens.append(n)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "clients": clients, "requests": len(latencies), "errors": errors, "wall_s": round(wall, 3),
        "completion_tokens": sum(tokens), "tokens_per_s": round(sum(tokens) / wall, 1),
        "requests_per_s": round(len(latencies) / wall, 3),
        "latency_mean_s": round(statistics.mean(latencies), 3) if latencies else None,
        "latency_p95_s": round(ordered[math.ceil(0.95 * len(ordered)) - 1], 3) if ordered else None,  # nearest rank
        "latencies_s": [round(x, 3) for x in latencies],
    }


def bench_case(name: str, args) -> dict:
    import torch

    from alignkit.data.tokenize import Formatting, prompt_text
    from alignkit.batching import Engine, Request

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tokenizer, path = load_model(name, args.random_init, device)
    engine = Engine(model, tokenizer, max_batch_rows=args.max_batch_rows).start()
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    levels = []
    try:
        if args.mode == "engine":
            encoded = [tokenizer(prompt_text(tokenizer, m, Formatting()), add_special_tokens=False)["input_ids"] for m in messages]

            def send(i: int) -> int:
                request = Request(encoded[i % len(encoded)], args.max_tokens, temperature=args.temperature, top_p=args.top_p)
                return sum(tokens for _, _, tokens in engine.complete(request))

            server = None
        else:
            import httpx

            from alignkit.serve.app import BackgroundServer, ServeConfig, ServerState, create_app

            cfg = ServeConfig(path, served_model_name="bench", max_tokens_limit=max(args.max_tokens, 1024), max_batch_rows=args.max_batch_rows)
            state = ServerState(cfg, engine, tokenizer, "bench", int(model.config.max_position_embeddings), Formatting())
            server = BackgroundServer(create_app(state)).start()
            local = threading.local()

            def send(i: int) -> int:
                if not hasattr(local, "http"):
                    local.http = httpx.Client(base_url=server.url, timeout=600)
                body = {"model": "bench", "messages": messages[i % len(messages)], "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
                response = local.http.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                return response.json()["usage"]["completion_tokens"]

        send(0)  # warm-up: first-call allocations do not count
        for clients in args.concurrency:
            engine.stats["max_rows"] = 0
            load = os.getloadavg()[0]
            level = run_level(send, clients, args.requests)
            level.update(max_batch_rows_seen=engine.stats["max_rows"], load_1min_at_start=round(load, 2))
            levels.append(level)
            print(f"{name:7s} {args.mode:6s} clients={clients:3d}  {level['tokens_per_s']:8.1f} tok/s  "
                  f"{level['requests_per_s']:6.2f} req/s  mean latency {level['latency_mean_s']} s  batch<= {level['max_batch_rows_seen']}  "
                  f"errors={len(level['errors'])}", flush=True)
        if server:
            server.stop()
    finally:
        engine.shutdown()
    return {
        "case": name, "mode": args.mode, "model": path, "random_init": args.random_init, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens, "requests_per_client": args.requests, "max_batch_rows": args.max_batch_rows,
        "parameters": sum(p.numel() for p in model.parameters()), "levels": levels,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


DOCS = ROOT / "docs" / "serving.md"
MARK_START, MARK_END = "<!-- serve-table:start -->", "<!-- serve-table:end -->"


def docs_table(results: list[dict]) -> str:
    lines = ["| model | device | mode | clients | tokens/s | × one client | requests/s | mean latency (s) | p95 (s) | largest batch | load (1 min) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in results:
        base = row["levels"][0]["tokens_per_s"] or 1
        device = row["device_name"] if row["device"] == "cuda" else f"{row['device']} ({row['torch_threads']} thread)"
        for level in row["levels"]:
            lines.append(f"| {row['case']} | {device} | {row['mode']} | {level['clients']} | {level['tokens_per_s']} | "
                         f"{level['tokens_per_s'] / base:.1f} | {level['requests_per_s']} | {level['latency_mean_s']} | "
                         f"{level['latency_p95_s']} | {level['max_batch_rows_seen']} | {level['load_1min_at_start']} |")
    return "\n".join(lines)


def write_docs(results: list[dict]) -> None:
    text = DOCS.read_text()
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        DOCS.write_text(head + MARK_START + "\n" + docs_table(results) + "\n" + MARK_END + rest.split(MARK_END, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", default="both", help="tiny | smollm | both | a model path")
    parser.add_argument("--mode", default="http", choices=["http", "engine"])
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=3, help="requests per client, sent one after another")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_batch_rows", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--random_init", action="store_true", help="random weights from config.json (no weights file needed)")
    parser.add_argument("--no-docs", dest="docs", action="store_false", help="leave docs/serving.md alone")
    parser.add_argument("--case_name", default="", help="name the case in the results (default: --which)")
    parser.add_argument("--output", default=str(HERE / "results" / "serve.json"))
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    names = {"both": ["tiny", "smollm2-135m-instruct"], "smollm": ["smollm2-135m-instruct"]}.get(args.which, [args.which])

    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else []
    for name in names:
        row = bench_case(name, args)
        row["case"] = args.case_name or row["case"]
        results = [r for r in results if (r["case"], r["mode"], r["device"]) != (row["case"], row["mode"], row["device"])] + [row]
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=1) + "\n")
    if args.docs:
        write_docs(results)
    print(f"results in {output}")


if __name__ == "__main__":
    main()
