"""The settings of `serve`, `chat` and `feedback export` (one knob per flag) and the bind policy; no heavy imports,
so `alignkit --help` stays fast and bad flags are refused before anything loads."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import knob, refuse

SQLITE_HEADER = b"SQLite format 3\x00"
DEVICE_HELP = "auto (cuda if available) | cpu | cuda"
SEPARATOR = "\n\n### Response:\n"


def check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        refuse("device", f"{device!r} is not allowed; one of: auto | cpu | cuda | cuda:N")


def check_sqlite(flag: str, path: str, must_exist: bool) -> None:
    """A feedback database must be SQLite: read its 16-byte header before any work (an empty file is a new database)."""
    target = Path(path)
    if not target.exists():
        if must_exist:
            refuse(flag, f"{path}: no such feedback database (the file `alignkit serve --feedback_db` writes)")
        return
    if target.is_dir():
        refuse(flag, f"{path} is a directory; give the SQLite file `alignkit serve --feedback_db` writes")
    with open(target, "rb") as handle:
        header = handle.read(len(SQLITE_HEADER))
    if header and header != SQLITE_HEADER:
        refuse(flag, f"{path} is not an SQLite database (its header is not 'SQLite format 3'); give the file `alignkit serve --feedback_db` writes")


def prefix_cache_knob():
    """--prefix_cache_mb, declared once for `serve` and `chat` (a chat's next turn starts with the last prompt and reply)."""
    return knob(256, "memory for the KV of prompt prefixes seen before (system prompts, chat histories), in MiB; "
                "0 disables the prefix cache", min=0)


@dataclass
class ServeConfig:
    """OpenAI-compatible chat server with a web page for chatting and collecting comparisons."""

    model_name_or_path: str = knob("smollm2-135m-instruct", "HF model dir, hub id, built-in name, or a pipeline stage RUN/sft|ppo|dpo",
                                   positional="MODEL")
    served_model_name: str = knob("", "the `model` id clients send (default: the model's name)")
    host: str = knob("127.0.0.1", "address to listen on; a non-loopback address needs --api_key")
    port: int = knob(8000, "TCP port (0: any free port)", min=0, max=65535)
    api_key: str = knob("", "require 'Authorization: Bearer KEY' (env ALIGNKIT_API_KEY)", envvar="ALIGNKIT_API_KEY")
    feedback_db: str = knob("", "SQLite file for the comparison view's judgments (off if empty)", path="output_file")
    context_length: int = knob(0, "prompt + reply budget in tokens (0: the model's)", min=0)
    history_strategy: str = knob("truncate", "what happens to old turns of a conversation over the context", choices=("truncate", "summarize"))
    summary_max_tokens: int = knob(128, "token limit of a summary of old turns", min=1)
    summarizer_model: str = knob("", "model that writes summaries (default: the served model)")
    use_chat_template: str = knob("auto", "format with the tokenizer's chat template", choices=("auto", "yes", "no"))
    separator: str = knob(SEPARATOR, "joins prompt and response when no chat template is used")
    default_max_tokens: int = knob(256, "max_tokens when a request gives none", min=1)
    max_tokens_limit: int = knob(1024, "largest max_tokens a request may ask for", min=1)
    max_n: int = knob(8, "largest n a request may ask for", min=1)
    max_batch_rows: int = knob(32, "rows decoded together at most", min=1)
    max_pending: int = knob(256, "queued + running requests before answering 429", min=1)
    prefix_cache_mb: int = prefix_cache_knob()
    prefill_chunk_tokens: int = knob(0, "prompt positions prefilled per step while other requests decode, so their streams "
                                     "go on while a long prompt joins (0: a newcomer's whole prompt at once)", min=0)
    max_body_bytes: int = knob(1_000_000, "largest request body in bytes", min=1)
    device: str = knob("auto", DEVICE_HELP)

    def validate(self) -> None:
        check_device(self.device)
        check_bind(self.host, self.api_key)  # a refusal should be instant, not after the model loads
        if self.default_max_tokens > self.max_tokens_limit:
            refuse("default_max_tokens", f"{self.default_max_tokens} is above --max_tokens_limit {self.max_tokens_limit}")
        if self.feedback_db:
            check_sqlite("feedback_db", self.feedback_db, must_exist=False)


@dataclass
class ChatConfig:
    """Chat in the terminal with streamed replies (/reset, /system, /save FILE, /history)."""

    model_name_or_path: str = knob("smollm2-135m-instruct", "HF model dir, hub id, built-in name, or a pipeline stage RUN/sft|ppo|dpo",
                                   positional="MODEL")
    system: str = knob("", "system message (change it in the chat with /system)")
    max_new_tokens: int = knob(256, "reply length limit (tokens)", min=1)
    temperature: float = knob(0.7, "sampling temperature; 0 = greedy", min=0, max=2)
    top_p: float = knob(0.95, "nucleus sampling", min=0, max=1, min_exclusive=True)
    seed: int | None = knob(None, "random seed of the sampler", min=0)
    context_length: int = knob(0, "token budget of a prompt + reply (0: the model's)", min=0)
    history_strategy: str = knob("truncate", "what happens to old turns that do not fit", choices=("truncate", "summarize"))
    summary_max_tokens: int = knob(128, "token limit of a summary of old turns", min=1)
    summarizer_model: str = knob("", "model that writes summaries (default: the chat model)")
    prefix_cache_mb: int = prefix_cache_knob()
    use_chat_template: str = knob("auto", "format with the tokenizer's chat template", choices=("auto", "yes", "no"))
    separator: str = knob(SEPARATOR, "joins prompt and response when no chat template is used")
    device: str = knob("auto", DEVICE_HELP)

    def validate(self) -> None:
        check_device(self.device)
        if self.context_length and self.max_new_tokens >= self.context_length:
            refuse("max_new_tokens", f"{self.max_new_tokens} leaves no room for the prompt in --context_length {self.context_length}")


@dataclass
class FeedbackExportConfig:
    """Write the stored judgments as preference rows: pairs {prompt, chosen, rejected}, rankings {prompt, responses, ranks};
    with --kind demonstrations, the written answers as SFT rows {prompt, completion}."""

    output: str = knob("", "JSONL: preferences for `alignkit rm` / `alignkit dpo`, demonstrations for `alignkit sft`", required=True,
                       path="output_file")
    feedback_db: str = knob("feedback.db", "the SQLite file `alignkit serve --feedback_db` wrote")
    annotator: str = knob("", "only this annotator's judgments")
    kind: str = knob("preferences", "preferences (the judgments) | demonstrations (the ideal answers people wrote)",
                     choices=("preferences", "demonstrations"))

    def validate(self) -> None:
        check_sqlite("feedback_db", self.feedback_db, must_exist=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_bind(host: str, api_key: str) -> None:
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"refusing to bind {host} (not a loopback address) without --api_key: anyone who can reach it could use "
            "the model and write feedback; pass --api_key KEY, or keep the default --host 127.0.0.1"
        )
