"""`alignkit chat`: an interactive terminal chat with streamed tokens.

Commands: /reset (forget the conversation, keep the system message), /system TEXT (set it; `/system`
alone clears it), /save FILE (.jsonl: append one {"messages"} row, usable as SFT data; otherwise write
{"messages": [...]} as JSON), /history (the conversation, and what the model currently sees of it),
/help, /quit (or Ctrl-D). Ctrl-C while the model writes stops the reply.

Generation goes through the same batching engine as the server (one code path for streaming, stop
handling and max tokens), and the conversation through the same history budget.
"""

from __future__ import annotations

import json
import queue
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alignkit import atomic
from alignkit.batching import Delta, Engine, Failed, Finished, Request
from alignkit.chat.history import FittedPrompt, SummaryCache, fit_history, model_summarizer
from alignkit.data.tokenize import Formatting

HELP = """commands:
  /reset         start over (the system message stays)
  /system TEXT   set the system message (/system alone clears it)
  /save FILE     save the conversation (.jsonl: append a {"messages"} row; else JSON)
  /history       show the conversation and what the model sees of it
  /quit          leave (Ctrl-D works too); Ctrl-C stops a reply"""


@dataclass
class ChatSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    context_length: int = 2048
    history_strategy: str = "truncate"
    summary_max_tokens: int = 128


@dataclass
class ChatSession:
    system: str = ""
    turns: list[dict] = field(default_factory=list)  # user/assistant messages, alternating
    cache: SummaryCache = field(default_factory=SummaryCache)
    last_fit: FittedPrompt | None = None
    last_cached_tokens: int = 0  # of the last prompt, the tokens whose KV the prefix cache held (not computed again)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns


def save_conversation(messages: list[dict], path: str) -> str:
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("nothing to save yet: the conversation has no assistant reply")
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".jsonl":
        # appended by rewriting the file under a temporary name and renaming it (alignkit.atomic): a plain
        # append of a long row can be cut short by a kill, leaving a torn last line in the user's data
        before = target.read_bytes() if target.exists() else b""
        with atomic.atomic_path(target) as tmp:
            row = json.dumps({"messages": messages}, ensure_ascii=False) + "\n"
            tmp.write_bytes(before + (b"\n" if before and not before.endswith(b"\n") else b"") + row.encode("utf-8"))
        return f"appended the conversation ({len(messages)} messages) to {target}"
    atomic.write_text(target, json.dumps({"messages": messages}, ensure_ascii=False, indent=2) + "\n")
    return f"saved the conversation ({len(messages)} messages) to {target}"


def describe_history(session: ChatSession, budget: int) -> str:
    lines = [f"[{m['role']}] {m['content']}" for m in session.messages()] or ["(empty conversation)"]
    fit = session.last_fit
    if fit:
        lines.append(f"-- the last prompt had {len(fit.prompt_ids)} tokens (budget {budget}: context minus max_new_tokens); "
                     f"{session.last_cached_tokens} of them came from the prefix cache")
    if fit and fit.dropped_turns:
        how = f"this summary in their place: {fit.summary!r}" if fit.summary is not None else "nothing in their place (truncated)"
        lines.append(f"-- the model did not see the first {fit.dropped_turns} turn(s); it saw {how}")
    return "\n".join(lines)


def reply(engine: Engine, session: ChatSession, user_text: str, fmt: Formatting, settings: ChatSettings,
          write: Callable[[str], None], summary_engine: Engine | None = None) -> str:
    """Add the user's message, stream the reply through `write`, and add the reply to the session."""
    messages = session.messages() + [{"role": "user", "content": user_text}]
    summarizer = None
    if settings.history_strategy == "summarize":
        helper = summary_engine or engine
        summarizer = model_summarizer(helper.tokenizer, fmt, helper.complete_text, settings.context_length)
    fit = fit_history(messages, engine.tokenizer, fmt, settings.context_length - settings.max_new_tokens,
                      settings.history_strategy, summarizer, session.cache, settings.summary_max_tokens)
    session.last_fit = fit
    events: queue.Queue = queue.Queue()
    request = Request(fit.prompt_ids, settings.max_new_tokens, settings.temperature, settings.top_p, seed=settings.seed)
    job = engine.submit(request, events.put)
    text = ""
    try:
        while True:
            event = events.get()
            if isinstance(event, Delta):
                text += event.text
                write(event.text)
            elif isinstance(event, Finished):
                session.last_cached_tokens = event.cached_tokens
                break
            elif isinstance(event, Failed):
                raise RuntimeError(f"generation failed: {event.message}")
    except KeyboardInterrupt:
        job.cancel()
        write(" [stopped]")
    write("\n")
    session.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
    return text


def run_chat(engine: Engine, fmt: Formatting, settings: ChatSettings, system: str = "", read: Callable[[str], str] = input,
             write: Callable[[str], None] | None = None, summary_engine: Engine | None = None) -> ChatSession:
    """The read-eval-print loop; returns the session at exit (end of input or /quit)."""
    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    write = write or out
    session = ChatSession(system=system)
    write("alignkit chat — /help for commands\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return session
        text = line.strip()
        if not text:
            continue
        command, _, argument = text.partition(" ")
        if command in ("/quit", "/exit"):
            return session
        if command == "/help":
            write(HELP + "\n")
        elif command == "/reset":
            session.turns, session.last_fit = [], None
            write("conversation cleared\n")
        elif command == "/system":
            session.system = argument.strip()
            write(f"system message set: {session.system!r}\n" if session.system else "system message cleared\n")
        elif command == "/save":
            if not argument.strip():
                write("usage: /save FILE\n")
                continue
            try:
                write(save_conversation(session.messages(), argument.strip()) + "\n")
            except (ValueError, OSError) as error:
                write(f"error: {error}\n")
        elif command == "/history":
            write(describe_history(session, settings.context_length - settings.max_new_tokens) + "\n")
        elif command.startswith("/") and " " not in command and command[1:].isalpha():
            write(f"unknown command {command}; /help lists them\n")
        else:
            write("assistant> ")
            try:
                reply(engine, session, text, fmt, settings, write, summary_engine)
            except ValueError as error:  # e.g. the message alone does not fit the context
                write(f"error: {error}\n")
