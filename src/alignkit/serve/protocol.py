"""The OpenAI wire format: request models, their validation, error bodies, and the body-size limit.

Errors look like OpenAI's: {"error": {"message", "type", "param", "code"}}, with `param` naming the
offending field the way a client wrote it (`messages[2].role`, `max_tokens`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignkit.batching import Request as EngineRequest
from alignkit.data.formats import DataError, validate_messages

# ------------------------------------------------------------------------------------------ errors


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, **kwargs) -> JSONResponse:
    return JSONResponse(error_body(message, **kwargs), status_code=status)


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    # the deepest error is the most specific: for `stop: str | list[str]` given ["\ud800"], the list item's
    # complaint, not "should be a valid string"
    errors = error.errors()
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    param = ""
    for part in first.get("loc", ())[1:]:  # loc[0] is "body"
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in ("str", "int", "float", "bool", "none") or "[" in part or "-" in part:
            break  # a union member's tag (which type pydantic tried), not a field
        else:
            param += f".{part}" if param else part
    param = param or None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param


class BodyLimit:
    """Reject bodies over `max_bytes` with 413, declared (Content-Length) or streamed (chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = error_response(413, f"the request body is over the server's limit of {self.max_bytes} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(scope, receive, send)
        seen, started = 0, False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message):
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:  # read outside FastAPI's handlers (elsewhere the exception handler answers)
            if not started:
                await too_large(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive`; an HTTPException because FastAPI turns other errors while reading a body into a 400."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is over the server's limit of {max_bytes} bytes")
        self.code = "body_too_large"


# ------------------------------------------------------------------------------------------ request models


def _unicode(value: str) -> str:
    """JSON can escape a lone UTF-16 surrogate ("\\ud800"), which no tokenizer, SQLite or UTF-8 file takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate escape (\\ud800-\\udfff without its pair), which is not text") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
SEED_RANGE = (-(2**63), 2**63)  # what torch.Generator.manual_seed takes (a 64-bit integer)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Text
    content: Text | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other clients' fields (user, metadata, ...) are ignored
    model: Text
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    tools: list | None = None


class FeedbackIn(BaseModel):
    id: Text
    annotator: Text
    prompt: Text | list[Message]
    responses: list[Text]
    ranks: list[int]
    model: Text | None = None
    sampling: dict = Field(default_factory=dict)


# ------------------------------------------------------------------------------------------ the app


def chat_messages(body: ChatRequest) -> list[dict]:
    """Plain {role, content} dicts, checked: optional system first, then user/assistant alternating, ending with user."""
    messages = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the system role
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role: {m.role!r} is not supported (use system, user or assistant)", f"messages[{i}].role")
        if m.content is None:
            raise ApiError(400, f"messages[{i}].content: missing", f"messages[{i}].content")
        content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
        messages.append({"role": role, "content": content})
    try:
        messages = validate_messages(messages, "request", need_final_assistant=False)
    except DataError as error:
        raise ApiError(400, f"{error.field}: {str(error).split(': ', 2)[-1]}", error.field) from None
    if messages[-1]["role"] != "user":
        raise ApiError(400, f"messages[{len(messages) - 1}].role: the last message must be from the user", f"messages[{len(messages) - 1}].role")
    return messages


def engine_request(cfg, context_length: int, body: ChatRequest) -> EngineRequest:
    """Check the sampling parameters against the server's limits (`cfg`: a ServeConfig); the prompt is filled in later."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise ApiError(400, f"{name} is not supported by this server (leave it at 0)", name)
    if body.logprobs:
        raise ApiError(400, "logprobs is not supported by this server", "logprobs")
    if body.tools:
        raise ApiError(400, "tools are not supported by this server", "tools")
    max_tokens = body.max_completion_tokens or body.max_tokens or min(cfg.default_max_tokens, context_length // 2)
    if max_tokens > cfg.max_tokens_limit:
        raise ApiError(400, f"max_tokens: {max_tokens} is over this server's limit of {cfg.max_tokens_limit}", "max_tokens")
    if max_tokens >= context_length:
        raise ApiError(400, f"max_tokens: {max_tokens} leaves no room for the prompt in the context of {context_length} tokens", "max_tokens", "context_length_exceeded")
    n = body.n or 1
    if n > cfg.max_n:
        raise ApiError(400, f"n: {n} is over this server's limit of {cfg.max_n}", "n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s or len(s) > 200 for s in stop):
        raise ApiError(400, "stop: give up to 4 non-empty strings of at most 200 characters", "stop")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    return EngineRequest([], max_tokens, temperature, top_p, n, tuple(stop), body.seed)
