"""The server's settings and the bind policy: stdlib only, so `alignkit --help` stays fast."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass
class ServeConfig:
    model_name_or_path: str = "smollm2-135m-instruct"
    served_model_name: str = ""  # the id clients pass as `model`; default: the model's name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""
    feedback_db: str = ""
    context_length: int = 0  # 0: the model's max_position_embeddings
    history_strategy: str = "truncate"
    summary_max_tokens: int = 128
    summarizer_model: str = ""  # default: the served model writes the summaries
    use_chat_template: str = "auto"
    separator: str = "\n\n### Response:\n"
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    max_n: int = 8
    max_batch_rows: int = 32
    max_pending: int = 256  # queued + running requests before 429
    max_body_bytes: int = 1_000_000
    device: str = "auto"


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
