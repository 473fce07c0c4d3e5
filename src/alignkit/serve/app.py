"""The OpenAI-compatible HTTP server (FastAPI on uvicorn), the web page and the feedback API.

  POST /v1/chat/completions   streaming (SSE) and not; temperature, top_p, max_tokens, stop, n, seed
  GET  /v1/models, GET /health
  GET  /                      the web page (chat + comparison views), files under /static
  POST /api/feedback          store one judgment (idempotent by its id); GET /api/feedback/stats; GET /api/info
  GET  /api/judge             judge mode (the pipeline's `judge: human`): progress and the next item of a fixed queue
  POST /api/demonstrations    store a person's ideal answer to a prompt (idempotent by its id)

Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with a 4xx status for the
client's mistakes. With --api_key every /v1 and /api route wants `Authorization: Bearer KEY`.
A conversation longer than the context (minus max_tokens) goes through the history strategy.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignkit.batching import Delta, Engine, Failed, Finished
from alignkit.chat.history import PromptTooLong, SummaryCache, fit_history, model_summarizer
from alignkit.data.formats import DataError, validate_messages
from alignkit.data.tokenize import Formatting
from alignkit.serve.config import ServeConfig, check_bind, is_loopback  # noqa: F401  (re-exported)
from alignkit.serve.feedback import Demonstration, FeedbackStore, JudgeQueue, Judgment
from alignkit.serve.protocol import (
    ApiError,
    BodyLimit,
    ChatRequest,
    FeedbackIn,
    Message,
    Text,
    chat_messages,
    engine_request,
    error_body,
    error_response,
    validation_message,
)

STATIC = Path(__file__).parent / "static"


@dataclass
class ServerState:
    cfg: ServeConfig
    engine: Engine
    tokenizer: Any
    model_id: str
    context_length: int
    fmt: Formatting
    summary_engine: Engine | None = None  # None: `engine` summarizes
    feedback: FeedbackStore | None = None
    cache: SummaryCache = field(default_factory=SummaryCache)
    started: float = field(default_factory=time.time)
    judge_queue: JudgeQueue | None = None  # set: the page serves these items to judge (alignkit.pipeline.human)


def _fit(state: ServerState, messages: list[dict], max_tokens: int):
    summarizer = None
    if state.cfg.history_strategy == "summarize":
        engine = state.summary_engine or state.engine
        summarizer = model_summarizer(engine.tokenizer, state.fmt, engine.complete_text, state.context_length)
    return fit_history(messages, state.tokenizer, state.fmt, state.context_length - max_tokens, state.cfg.history_strategy,
                       summarizer, state.cache, state.cfg.summary_max_tokens)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="alignkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.alignkit = state
    app.add_middleware(BodyLimit, max_bytes=state.cfg.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request, error: ApiError):
        return error_response(error.status, error.message, kind=error.kind, param=error.param, code=error.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, error: RequestValidationError):
        message, param = validation_message(error)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        code = getattr(error, "code", None) or ("not_found" if error.status_code == 404 else None)
        return error_response(error.status_code, str(error.detail), code=code)

    def authorize(request: Request) -> None:
        key = state.cfg.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")

    guarded = [Depends(authorize)]

    @app.get("/health")
    def health():
        return {"status": "ok", "model": state.model_id, "waiting": state.engine.waiting, "running_rows": state.engine.running_rows,
                "uptime_s": round(time.time() - state.started, 1)}

    @app.get("/v1/models", dependencies=guarded)
    def models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": int(state.started), "owned_by": "alignkit"}]}

    @app.get("/api/info", dependencies=guarded)
    def info():
        cfg = state.cfg
        return {"model": state.model_id, "context_length": state.context_length, "feedback": state.feedback is not None,
                "history_strategy": cfg.history_strategy, "max_tokens_limit": cfg.max_tokens_limit, "max_n": cfg.max_n}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest, request: Request):
        if body.model != state.model_id:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {state.model_id!r}", "model", "model_not_found")
        messages = chat_messages(body)
        sampling = engine_request(state.cfg, state.context_length, body)
        if state.engine.waiting + state.engine.running_rows >= state.cfg.max_pending:
            raise ApiError(429, "the server is busy; retry in a moment", code="server_busy", kind="rate_limit_error")
        try:
            fitted = await run_in_threadpool(_fit, state, messages, sampling.max_tokens)
        except PromptTooLong as error:
            raise ApiError(400, str(error), "messages", "context_length_exceeded") from None
        sampling.prompt_ids = fitted.prompt_ids
        history = {"strategy": state.cfg.history_strategy, "dropped_turns": fitted.dropped_turns, "summarized": fitted.summary is not None}
        loop, events, submitted = asyncio.get_running_loop(), asyncio.Queue(), []

        def emit(event) -> None:  # engine thread -> this request's event loop
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed (server shutting down)
                for job in submitted:
                    job.cancel()

        job = state.engine.submit(sampling, emit)
        submitted.append(job)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_id}
        prompt_tokens = len(fitted.prompt_ids)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _stream(job, events, meta, sampling.n, prompt_tokens, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons, tokens, cached = [""] * sampling.n, [None] * sampling.n, 0, 0
        watcher = asyncio.create_task(_hang_up_watch(request, events))
        try:
            while any(r is None for r in reasons):
                event = await events.get()
                if event is HUNG_UP:
                    return JSONResponse({}, status_code=499)  # nobody reads it; the finally frees the rows now
                if isinstance(event, Failed):
                    raise ApiError(500, event.message, kind="server_error")
                if isinstance(event, Delta):
                    texts[event.index] += event.text
                else:
                    reasons[event.index], tokens = event.reason, tokens + event.tokens
                    cached = event.cached_tokens
        finally:
            watcher.cancel()
            job.cancel()  # a no-op once finished; frees the rows if the client went away
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(prompt_tokens, tokens, cached),
                "system_fingerprint": None, "history": history}

    @app.post("/api/feedback", dependencies=guarded)
    def feedback(body: FeedbackIn):
        if state.feedback is None:
            raise ApiError(503, "feedback collection is off: start the server with --feedback_db FILE", code="feedback_off")
        if isinstance(body.prompt, str):
            prompt = [{"role": "user", "content": body.prompt}]
        else:
            prompt = [{"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])} for m in body.prompt]
        try:
            prompt = validate_messages(prompt, "feedback", "prompt", need_final_assistant=False)
        except DataError as error:
            raise ApiError(400, f"{error.field}: {str(error).split(': ', 2)[-1]}", error.field) from None
        judgment = Judgment(body.id, body.annotator, body.model or state.model_id, prompt, body.responses, body.ranks, body.sampling)
        try:
            stored = state.feedback.add(judgment)
        except ValueError as error:
            raise ApiError(400, str(error), str(error).split(":")[0]) from None
        return {"id": body.id, "stored": stored, "total": state.feedback.count()}

    @app.get("/api/feedback/stats", dependencies=guarded)
    def feedback_stats():
        if state.feedback is None:
            return {"enabled": False, "total": 0, "by_annotator": {}}
        by = state.feedback.counts_by_annotator()
        return {"enabled": True, "total": sum(by.values()), "by_annotator": by}

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    @app.get("/", include_in_schema=False)
    def index():
        # the page loads nothing from elsewhere (offline); the policy makes sure of it
        headers = {"Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'", "Cache-Control": "no-store"}
        return FileResponse(STATIC / "index.html", headers=headers)

    _add_people_routes(app, state, guarded)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class DemonstrationIn(BaseModel):
    id: Text
    annotator: Text
    prompt: Text | list[Message]
    completion: Text
    model: Text | None = None


def _prompt_messages(prompt: str | list[Message]) -> list[dict]:
    """A prompt as checked {role, content} messages (a string is one user message); ApiError 400 naming the field."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])} for m in prompt]
    try:
        return validate_messages(messages, "request", "prompt", need_final_assistant=False)
    except DataError as error:
        raise ApiError(400, f"{error.field}: {str(error).split(': ', 2)[-1]}", error.field) from None


def _add_people_routes(app: FastAPI, state: ServerState, guarded: list) -> None:
    """Judge mode (a fixed queue of pre-sampled items) and demonstrations (a person's ideal answer)."""

    @app.get("/api/judge", dependencies=guarded)
    def judge_next(after: int = -1):
        if state.judge_queue is None:
            return {"active": False}
        return {"active": True, **state.judge_queue.status(after)}

    @app.post("/api/demonstrations", dependencies=guarded)
    def demonstration(body: DemonstrationIn):
        if state.feedback is None:
            raise ApiError(503, "feedback collection is off: start the server with --feedback_db FILE", code="feedback_off")
        demo = Demonstration(body.id, body.annotator, body.model or state.model_id, _prompt_messages(body.prompt), body.completion)
        try:
            stored = state.feedback.add_demonstration(demo)  # committed (synchronous=FULL) before we answer
        except ValueError as error:
            raise ApiError(400, str(error), str(error).split(":")[0]) from None
        return {"id": body.id, "stored": stored, "total": state.feedback.demonstration_count()}


HUNG_UP = object()


async def _hang_up_watch(request: Request, events: asyncio.Queue) -> None:
    """Put HUNG_UP on `events` when the client disconnects. The body is read, so the next ASGI message is
    the disconnect: waiting for it notices a hang-up at once, even while tokens keep coming (polling between
    events would not run while they do)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(HUNG_UP)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens whose KV came from the prefix cache
    (every choice of a request shares its prompt, so any choice's count is the request's)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


async def _stream(job, events: asyncio.Queue, meta: dict, n: int, prompt_tokens: int, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, then `data: [DONE]`."""

    def chunk(choices: list[dict], **extra) -> str:
        return "data: " + json.dumps({**meta, "object": "chat.completion.chunk", "choices": choices, **extra}) + "\n\n"

    try:
        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        finished, tokens, cached = 0, 0, 0
        while finished < n:
            event = await events.get()
            if isinstance(event, Failed):
                yield "data: " + json.dumps(error_body(event.message, kind="server_error")) + "\n\n"
                break
            if isinstance(event, Delta):
                yield chunk([{"index": event.index, "delta": {"content": event.text}, "finish_reason": None}])
            elif isinstance(event, Finished):
                finished, tokens, cached = finished + 1, tokens + event.tokens, event.cached_tokens
                yield chunk([{"index": event.index, "delta": {}, "finish_reason": event.reason}])
        if include_usage:
            yield chunk([], usage=_usage(prompt_tokens, tokens, cached))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away mid-stream (the generator is cancelled): free its rows


# ------------------------------------------------------------------------------------------ building and running


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def load_state(cfg: ServeConfig) -> ServerState:
    """Load the model(s), start the engine(s), open the feedback store."""
    from alignkit.models import load_causal_lm, load_tokenizer

    if cfg.history_strategy not in ("truncate", "summarize"):
        raise ValueError(f"--history_strategy must be truncate or summarize, got {cfg.history_strategy!r}")
    if not 1 <= cfg.max_n <= cfg.max_batch_rows:
        raise ValueError(f"--max_n must be between 1 and --max_batch_rows ({cfg.max_batch_rows}), got {cfg.max_n}")
    device = _device(cfg.device)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    model = load_causal_lm(cfg.model_name_or_path).to(device)
    engine = Engine(model, tokenizer, max_batch_rows=cfg.max_batch_rows, prefix_cache_bytes=cfg.prefix_cache_mb * 2**20,
                    prefill_chunk=cfg.prefill_chunk_tokens).start()
    summary_engine = None
    if cfg.history_strategy == "summarize" and cfg.summarizer_model:
        summary_engine = Engine(load_causal_lm(cfg.summarizer_model).to(device), load_tokenizer(cfg.summarizer_model)).start()
    context_length = cfg.context_length or int(getattr(model.config, "max_position_embeddings", 2048))
    name = cfg.served_model_name or Path(cfg.model_name_or_path.rstrip("/")).name
    return ServerState(cfg, engine, tokenizer, name, context_length, Formatting(cfg.use_chat_template, cfg.separator),
                       summary_engine, FeedbackStore(cfg.feedback_db) if cfg.feedback_db else None)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port); SO_REUSEADDR lets a restarted server take the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class BackgroundServer:
    """uvicorn in a thread (tests, benchmarks): `with BackgroundServer(app) as server: server.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def config_dict(cfg: ServeConfig) -> dict:
    """The config without the secret (for logs)."""
    return {k: ("***" if k == "api_key" and v else v) for k, v in asdict(cfg).items()}
