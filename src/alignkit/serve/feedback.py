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

Demonstrations (a person's ideal answer to a prompt) live in their own table and export as SFT rows
{"prompt", "completion"}. A judge queue (`JudgeQueue`) is a fixed list of pre-sampled items that the
page serves one by one (the pipeline's `judge: human`); a stored judgment belongs to an item when its
prompt and set of responses are the item's, so a store from an earlier run counts for the same items.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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
CREATE TABLE IF NOT EXISTS demonstrations (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    annotator TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,      -- JSON message list, ending with a user message
    completion TEXT NOT NULL   -- the answer a person wrote as the ideal reply
);
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


@dataclass
class Demonstration:
    id: str
    annotator: str
    model: str
    prompt: list[dict]
    completion: str
    created_at: float = 0.0


def check_demonstration(d: Demonstration) -> None:
    """Raise ValueError naming the field when a demonstration cannot be stored."""
    if not isinstance(d.id, str) or not 8 <= len(d.id) <= 64:
        raise ValueError("id: must be a string of 8 to 64 characters (a UUID)")
    if not d.annotator.strip() or len(d.annotator) > 100:
        raise ValueError("annotator: must be a non-empty name of at most 100 characters")
    if not d.prompt or d.prompt[-1].get("role") != "user" or not d.prompt[-1].get("content", "").strip():
        raise ValueError("prompt: must be a message list ending with a non-empty user message")
    if not d.completion.strip():
        raise ValueError("completion: an empty answer teaches nothing; write the reply the assistant should give")


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


    def add_demonstration(self, d: Demonstration) -> bool:
        """Store a demonstration, committed before returning; False when its id is already stored (a retry)."""
        check_demonstration(d)
        row = (d.id, d.created_at or time.time(), d.annotator.strip(), d.model, json.dumps(d.prompt, ensure_ascii=False), d.completion)
        with self._write_lock:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
                inserted = db.execute("INSERT OR IGNORE INTO demonstrations VALUES (?, ?, ?, ?, ?, ?)", row).rowcount == 1
                db.execute("COMMIT")
                return inserted
            finally:
                db.close()

    def demonstration_count(self) -> int:
        db = self._connect()
        try:
            return db.execute("SELECT COUNT(*) FROM demonstrations").fetchone()[0]
        finally:
            db.close()

    def demonstrations(self, annotator: str | None = None) -> list[Demonstration]:
        db = self._connect()
        try:
            query, args = "SELECT id, annotator, model, prompt, completion, created_at FROM demonstrations", ()
            if annotator:
                query, args = query + " WHERE annotator = ?", (annotator,)
            rows = db.execute(query + " ORDER BY created_at, rowid", args).fetchall()
        finally:
            db.close()
        return [Demonstration(i, a, m, json.loads(p), c, t) for i, a, m, p, c, t in rows]


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
    counts: Counter = Counter()
    rows = []
    for j in _existing_store(db_path).judgments(annotator):
        row = preference_row(j)
        counts["pairs" if row and "chosen" in row else "rankings" if row else "skipped_all_tie"] += 1
        if row:
            rows.append(row)
    write_jsonl_atomically(rows, output)
    return counts


def _existing_store(db_path: str | Path) -> FeedbackStore:
    if not Path(db_path).exists():
        raise FileNotFoundError(f"{db_path}: no such feedback database (the file `alignkit serve --feedback_db` writes)")
    return FeedbackStore(db_path)


def write_jsonl_atomically(rows: list[dict], output: str | Path) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file, a crash never leaves one."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def demonstration_row(d: Demonstration) -> dict:
    """A demonstration as an SFT row {"prompt", "completion"} (prompt: a string for one user message, else the messages)."""
    prompt = d.prompt[0]["content"] if len(d.prompt) == 1 else d.prompt
    return {"prompt": prompt, "completion": d.completion, "id": d.id, "annotator": d.annotator, "model": d.model, "created_at": d.created_at}


def export_demonstrations(db_path: str | Path, output: str | Path, annotator: str | None = None) -> int:
    """Write the demonstrations as prompt/completion JSONL for `alignkit sft --dataset`; returns the row count."""
    rows = [demonstration_row(d) for d in _existing_store(db_path).demonstrations(annotator)]
    write_jsonl_atomically(rows, output)
    return len(rows)


# ------------------------------------------------------------------------------------------ a fixed queue to judge


@dataclass(frozen=True)
class JudgeItem:
    key: str  # item_key(prompt, responses): what ties a stored judgment to this item
    prompt: str
    responses: tuple[str, ...]  # distinct and non-empty, in the order given


def item_key(prompt: str, responses) -> str:
    """Content hash of a prompt and its set of responses (the order shown does not matter)."""
    return hashlib.sha256(json.dumps([prompt, sorted(responses)], ensure_ascii=False).encode()).hexdigest()[:32]


def judgment_key(j: Judgment) -> str | None:
    """The key of the queue item a judgment is about; None for a multi-message prompt (no queue item has one)."""
    if len(j.prompt) != 1:
        return None
    return item_key(j.prompt[0]["content"], j.responses)


def judge_items(items: list[dict], max_responses: int = 16) -> tuple[list[JudgeItem], Counter]:
    """Check pre-sampled {"prompt", "responses"} items; keep each item's distinct non-empty responses.

    Identical or empty responses cannot be told apart (and the store refuses empty ones), so they are
    dropped, and an item left with fewer than two is dropped; repeated items are judged once. Returns
    the items and counts of what was dropped.
    """
    kept, seen, dropped = [], set(), Counter()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"items[{i}]: must be a dict with a prompt and responses")
        prompt, responses = item.get("prompt"), item.get("responses")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"items[{i}].prompt: must be a non-empty string")
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise ValueError(f"items[{i}].responses: must be a list of strings")
        distinct = tuple(dict.fromkeys(r for r in responses if r.strip()))
        if len(distinct) > max_responses:
            raise ValueError(f"items[{i}].responses: at most {max_responses} responses can be ranked, got {len(distinct)}")
        dropped["responses_empty_or_repeated"] += len(responses) - len(distinct)
        key = item_key(prompt, distinct)
        if len(distinct) < 2:
            dropped["items_without_two_distinct_responses"] += 1
        elif key in seen:
            dropped["items_repeated"] += 1
        else:
            seen.add(key)
            kept.append(JudgeItem(key, prompt, distinct))
    return kept, dropped


def comparison_rows(prompt: str, j: Judgment) -> tuple[list[dict], int]:
    """Every pair of a judgment's responses with different ranks as {"prompt", "chosen", "rejected"}; and the tied pairs' count."""
    rows, ties = [], 0
    for a in range(len(j.responses)):
        for b in range(a + 1, len(j.responses)):
            if j.ranks[a] == j.ranks[b]:
                ties += 1
                continue
            best, worst = (a, b) if j.ranks[a] < j.ranks[b] else (b, a)
            rows.append({"prompt": prompt, "chosen": j.responses[best], "rejected": j.responses[worst]})
    return rows, ties


@dataclass
class JudgeQueue:
    """A fixed list of items for people to judge until `needed` of them are judged (in `store`)."""

    items: list[JudgeItem]
    needed: int
    store: FeedbackStore

    def judged(self) -> dict[str, Judgment]:
        """The first stored judgment of each item, by item key (later ones stay in the store, unused here)."""
        keys, first = {item.key for item in self.items}, {}
        for j in self.store.judgments():
            key = judgment_key(j)
            if key in keys and key not in first:
                first[key] = j
        return first

    def status(self, after: int = -1) -> dict:
        """Progress, and the next unjudged item after index `after` (wrapping around), responses in a shuffled order."""
        judged = self.judged()
        status = {"judged": len(judged), "needed": self.needed, "items": len(self.items), "item": None}
        if len(judged) >= self.needed:
            return status
        for step in range(1, len(self.items) + 1):
            index = (after + step) % len(self.items)
            item = self.items[index]
            if item.key not in judged:
                shown = list(item.responses)
                random.Random(item.key).shuffle(shown)  # no response is always shown first: position bias averages out
                status["item"] = {"index": index, "key": item.key, "prompt": [{"role": "user", "content": item.prompt}], "responses": shown}
                break
        return status
