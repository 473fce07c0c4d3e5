"""Human comparisons in SQLite, and their export as preference data for `alignkit rm` / `alignkit dpo`.

One judgment = a prompt (messages), K >= 2 sampled responses and a rank per response (lower is better,
equal ranks tie): a pairwise choice A > B is ranks [1, 2], a tie [1, 1]. Each judgment carries the id
its page made for it (a UUID), so a page that retries after a network error or a server restart
stores it once (INSERT OR IGNORE). The database runs in WAL mode with synchronous=FULL: a committed
judgment survives a crash of the server, and readers (export) never block annotators.

Export rows (read by alignkit.data.preferences.load_preferences):
  K = 2, a winner      {"prompt", "chosen", "rejected"}
  K > 2                {"prompt", "responses": [best, ..., worst], "ranks": [...]}  (ties keep equal ranks)
  all responses tie    nothing to learn: skipped and counted
The prompt is a string when it is a single user message, else the message list. Provenance (id,
annotator, model, created_at) rides along as extra keys, which the loaders ignore.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alignkit import atomic

SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    annotator TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,      -- JSON message list, ending with a user message
    responses TEXT NOT NULL,   -- JSON list of K strings, in the order shown
    ranks TEXT NOT NULL,       -- JSON list of K ints, lower is better, equal = tie
    sampling TEXT NOT NULL     -- JSON: temperature, top_p, max_tokens, seed, ...
);
CREATE INDEX IF NOT EXISTS judgments_created ON judgments (created_at);
"""


@dataclass
class Judgment:
    id: str
    annotator: str
    model: str
    prompt: list[dict]
    responses: list[str]
    ranks: list[int]
    sampling: dict = field(default_factory=dict)
    created_at: float = 0.0


def check_judgment(j: Judgment, max_responses: int = 16) -> None:
    """Raise ValueError naming the field when a judgment cannot be stored."""
    if not isinstance(j.id, str) or not 8 <= len(j.id) <= 64:
        raise ValueError("id: must be a string of 8 to 64 characters (a UUID)")
    if not j.annotator.strip() or len(j.annotator) > 100:
        raise ValueError("annotator: must be a non-empty name of at most 100 characters")
    if not j.prompt or j.prompt[-1].get("role") != "user":
        raise ValueError("prompt: must be a message list ending with a user message")
    if not 2 <= len(j.responses) <= max_responses:
        raise ValueError(f"responses: need 2 to {max_responses} responses, got {len(j.responses)}")
    if any(not r.strip() for r in j.responses):
        raise ValueError("responses: an empty response cannot be judged; sample again")
    if len(j.ranks) != len(j.responses) or any(not 1 <= r <= len(j.responses) for r in j.ranks):
        raise ValueError(f"ranks: need one rank from 1 to {len(j.responses)} per response (lower is better, equal ranks tie)")


class FeedbackStore:
    """A connection per call: safe from any thread, and from several processes on the same file.

    Writers of one process take turns on a lock: SQLite's own busy handler sleeps up to 100 ms per
    retry, which under 20 concurrent annotators costs far more than waiting for an ~8 ms commit.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._write_lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # autocommit; explicit BEGIN below
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def add(self, j: Judgment) -> bool:
        """Store a judgment; False when one with this id is already stored (a retry)."""
        check_judgment(j)
        row = (j.id, j.created_at or time.time(), j.annotator.strip(), j.model, json.dumps(j.prompt, ensure_ascii=False),
               json.dumps(j.responses, ensure_ascii=False), json.dumps(j.ranks), json.dumps(j.sampling, sort_keys=True))
        with self._write_lock:
            return self._insert(row)

    def _insert(self, row: tuple) -> bool:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            inserted = db.execute("INSERT OR IGNORE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row).rowcount == 1
            db.execute("COMMIT")
            return inserted
        finally:
            db.close()

    def count(self) -> int:
        db = self._connect()
        try:
            return db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]
        finally:
            db.close()

    def counts_by_annotator(self) -> dict[str, int]:
        db = self._connect()
        try:
            return dict(db.execute("SELECT annotator, COUNT(*) FROM judgments GROUP BY annotator ORDER BY annotator"))
        finally:
            db.close()

    def judgments(self, annotator: str | None = None) -> list[Judgment]:
        db = self._connect()
        try:
            query = "SELECT id, annotator, model, prompt, responses, ranks, sampling, created_at FROM judgments"
            args: tuple = ()
            if annotator:
                query, args = query + " WHERE annotator = ?", (annotator,)
            rows = db.execute(query + " ORDER BY created_at, rowid", args).fetchall()
        finally:
            db.close()
        return [Judgment(i, a, m, json.loads(p), json.loads(r), json.loads(k), json.loads(s), t) for i, a, m, p, r, k, s, t in rows]


def preference_row(j: Judgment) -> dict | None:
    """A judgment as a preference row (see the module docstring); None when every response ties."""
    if len(set(j.ranks)) == 1:
        return None
    prompt = j.prompt[0]["content"] if len(j.prompt) == 1 else j.prompt
    meta = {"id": j.id, "annotator": j.annotator, "model": j.model, "created_at": j.created_at}
    if len(j.responses) == 2:
        best, worst = (0, 1) if j.ranks[0] < j.ranks[1] else (1, 0)
        return {"prompt": prompt, "chosen": j.responses[best], "rejected": j.responses[worst], **meta}
    order = sorted(range(len(j.responses)), key=lambda i: j.ranks[i])  # stable: shown order among ties
    return {"prompt": prompt, "responses": [j.responses[i] for i in order], "ranks": [j.ranks[i] for i in order], **meta}


def export_preferences(db_path: str | Path, output: str | Path, annotator: str | None = None) -> Counter:
    """Write the judgments as preference JSONL; returns counts: written pairs, rankings, skipped ties."""
    if not Path(db_path).exists():
        raise FileNotFoundError(f"{db_path}: no such feedback database (the file `alignkit serve --feedback_db` writes)")
    counts: Counter = Counter()
    rows = []
    for j in FeedbackStore(db_path).judgments(annotator):
        row = preference_row(j)
        counts["pairs" if row and "chosen" in row else "rankings" if row else "skipped_all_tie"] += 1
        if row:
            rows.append(row)
    atomic.write_jsonl(output, rows)  # a failed export leaves the previous file intact
    return counts
