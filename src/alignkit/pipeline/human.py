"""People as the judge of the pipeline's compare stage (`judge: human`).

The stage has sampled K responses per prompt from the SFT model; this serves them on the web page's
comparison view (the page of `alignkit serve`, in judge mode), logs progress as judgments arrive, and
returns once `needed` items are judged in the SQLite feedback store. A store that already holds them
(an earlier run, or the same items judged elsewhere) returns at once, without loading the model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from alignkit.serve.feedback import FeedbackStore, JudgeQueue, comparison_rows, judge_items

log = logging.getLogger(__name__)
POLL_S = 0.5


def _visible(logger: logging.Logger) -> None:
    """The URL must reach the person even when nobody configured logging (the run waits for them)."""
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


def _rows(queue: JudgeQueue) -> list[dict]:
    judged = queue.judged()
    rows, ties = [], 0
    for item in queue.items:
        if item.key in judged:
            pairs, tied = comparison_rows(item.prompt, judged[item.key])
            rows += pairs
            ties += tied
    log.info("%d judged item(s) -> %d preference pair(s); dropped %d tied pair(s)", len(judged), len(rows), ties)
    return rows


def collect_human_comparisons(model_dir: str, items: list[dict], store: str | Path, needed: int,
                              host: str = "127.0.0.1", port: int = 0, api_key: str = "",
                              timeout_s: float | None = None) -> list[dict]:
    """items: [{"prompt": str, "responses": [str, ...]}] (pre-sampled by the SFT model). Serve the comparison page on these
    samples (a real uvicorn server; the model in model_dir backs the page's chat/demonstration features if needed), log
    progress ("37 of 200 comparisons") as judgments arrive, block until `needed` judgments on these items are in the SQLite
    store at `store` (return at once if it already holds them), stop the server, and return preference rows
    {"prompt", "chosen", "rejected"} (ties dropped and counted in a log line).

    An item is judged once (two responses: a pick; more: a ranking, which gives a pair per two different
    ranks). Empty and repeated responses are dropped first; `needed` must not exceed the items left.
    A non-loopback `host` needs `api_key` (as for `alignkit serve`). `timeout_s`: give up waiting (TimeoutError).
    """
    from alignkit.serve.config import check_bind

    _visible(log)
    queue_items, dropped = judge_items(items)
    if sum(dropped.values()):
        log.info("judge queue: %s", ", ".join(f"{name.replace('_', ' ')}: {n}" for name, n in sorted(dropped.items()) if n))
    if not 1 <= needed <= len(queue_items):
        raise ValueError(f"needed: {needed} judgments asked for, but there are {len(queue_items)} items with two or more "
                         f"distinct non-empty responses (of {len(items)} given); sample more prompts or ask for fewer judgments")
    check_bind(host, api_key)
    queue = JudgeQueue(queue_items, needed, FeedbackStore(store))
    judged = len(queue.judged())
    if judged >= needed:
        log.info("%s already holds %d of %d comparisons: not serving", store, judged, needed)
        return _rows(queue)

    from alignkit.serve.app import BackgroundServer, ServeConfig, create_app, load_state

    state = load_state(ServeConfig(str(model_dir), host=host, port=port, api_key=api_key, feedback_db=str(store)))
    state.judge_queue = queue
    try:
        with BackgroundServer(create_app(state), host=host, port=port) as server:
            log.info("people judge the samples: open %s/ in a browser (%d of %d comparisons so far; judgments go to %s)",
                     server.url, judged, needed, store)
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while judged < needed:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{judged} of {needed} comparisons after {timeout_s} s; the judgments so far stay in {store}")
                time.sleep(POLL_S)
                now = len(queue.judged())
                if now != judged:
                    judged = now
                    log.info("%d of %d comparisons", judged, needed)
    finally:
        state.engine.shutdown()
    return _rows(queue)
