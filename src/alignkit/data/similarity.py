"""ROUGE-L similarity of a text to every text in a growing pool: exact, and fast at 50k entries.

For token lists a (m tokens) and b (n tokens) whose longest common subsequence has L tokens,

    P = L / n,   R = L / m,   F = 2·P·R / (P + R)   (= 2L / (m + n); F = 0 when L = 0 or a list is empty)

computed with the same float operations as `rouge_score.rouge_scorer.RougeScorer(["rougeL"])` (F is symmetric
in a and b bit for bit: 2·P is exact and IEEE + and · commute), on the tokens of rouge_score's own default
tokenizer (lower-case, every run of non-[a-z0-9] characters is a space, no stemming). The reference costs an
m·n Python DP per pair; against a pool of 50k instructions that is minutes per candidate. Three things make
the pool search fast while keeping every score exact:

1. Tokenization cache. Each pool text is tokenized once into integer ids, kept in a padded id matrix.
2. An exact upper bound. L ≤ |a ∩ b| (multiset intersection: an LCS is a common sub-multiset), hence
   F ≤ 2·|a ∩ b| / (m + n). An inverted index (token -> pool rows, counts) gives |a ∩ b| for the whole pool in
   one vectorized add per distinct candidate token. Rows are compared best-bound first, and a row whose bound
   cannot reach the best score found so far is never compared: the maximum stays exact.
3. Bit-parallel LCS (Allison-Dix, in Hyyrö's form) for many rows at once. With the candidate as the pattern,
   M[s] has bit i set where a[i] = s; starting from V = all ones, every token s of b does
       U = V & M[s];   V = (V + U) | (V - U)
   and L = the number of zero bits of V. One numpy step per position of b updates V for all compared rows;
   candidates longer than 64 tokens use several 64-bit words with an explicit carry.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from rouge_score import tokenizers

_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)
_PAD = 0  # token id 0 is padding: it is in no candidate, so its pattern mask is 0 and the LCS step is the identity
_TIE_SLACK = 1e-12  # the bound 2|a∩b|/(m+n) and the exact F may differ in the last bit


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokens (what RougeScorer(["rougeL"]) compares)."""
    return _TOKENIZER.tokenize(text)


def rouge_l_fmeasure(lcs: np.ndarray, target_len: int, prediction_lens: np.ndarray) -> np.ndarray:
    """F of the formula above, element-wise, with rouge_score's operation order (float64)."""
    lcs = lcs.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 where L = 0; those entries are set to 0 below
        precision = lcs / prediction_lens
        recall = lcs / target_len
        f = 2 * precision * recall / (precision + recall)
    return np.where(lcs > 0, f, 0.0)


def _popcount(words: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(words).astype(np.int64)
    as_bytes = words.view(np.uint8).reshape(*words.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(-1, dtype=np.int64)


def lcs_lengths(pattern: list[int], rows: np.ndarray) -> np.ndarray:
    """LCS length between `pattern` (token ids, no 0) and each row of `rows` ([K, T] ids, 0 = padding)."""
    if not pattern or rows.size == 0:
        return np.zeros(rows.shape[0], dtype=np.int64)
    words = (len(pattern) + 63) // 64
    masks: dict[int, np.ndarray] = {}
    for i, token in enumerate(pattern):
        masks.setdefault(token, np.zeros(words, dtype=np.uint64))[i // 64] |= np.uint64(1) << np.uint64(i % 64)
    # a lookup table indexed by the row tokens, remapped to 0..len(masks) so the table stays small
    symbols = np.fromiter(masks, dtype=rows.dtype)
    table = np.zeros((len(symbols) + 1, words), dtype=np.uint64)
    order = np.argsort(symbols)
    symbols = symbols[order]
    table[1:] = np.stack(list(masks.values()))[order]
    where = np.searchsorted(symbols, rows).clip(max=len(symbols) - 1)
    local = np.where(symbols[where] == rows, where + 1, 0)
    row_masks = table[local]  # [K, T, words]

    v = np.full((rows.shape[0], words), np.iinfo(np.uint64).max, dtype=np.uint64)
    for t in range(rows.shape[1]):
        u = v & row_masks[:, t]
        if words == 1:
            v = (v + u) | (v - u)  # uint64 arithmetic wraps: the carry out of bit 63 is dropped, as it must be
        else:
            v = _add_with_carry(v, u) | (v - u)  # v - u never borrows across words: u's bits are a subset of v's
    # bits at and above len(pattern) start at 1 and stay 1, so every zero bit is an LCS step
    return words * 64 - _popcount(v).sum(-1)


def _add_with_carry(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x + y for multi-word integers stored little-endian along the last axis (overflow of the top word dropped)."""
    out = np.empty_like(x)
    carry = np.zeros(x.shape[0], dtype=np.uint64)
    for w in range(x.shape[1]):
        partial = x[:, w] + y[:, w]
        total = partial + carry
        carry = ((partial < x[:, w]) | (total < partial)).astype(np.uint64)
        out[:, w] = total
    return out


@dataclass
class Match:
    score: float  # the highest ROUGE-L F against the pool (0.0 for an empty pool)
    index: int  # the pool row that scored it (the lowest such row), -1 for an empty pool


@dataclass
class _Postings:
    rows: np.ndarray = field(default_factory=lambda: np.zeros(8, dtype=np.int32))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(8, dtype=np.int32))
    size: int = 0

    def append(self, row: int, count: int) -> None:
        if self.size == len(self.rows):
            self.rows = np.resize(self.rows, 2 * self.size)
            self.counts = np.resize(self.counts, 2 * self.size)
        self.rows[self.size], self.counts[self.size] = row, count
        self.size += 1


class RougePool:
    """A growing set of texts; `best_match(text)` is the exact max ROUGE-L F of `text` against all of them."""

    def __init__(self, texts: list[str] = (), first_chunk: int = 64, chunk_rows: int = 4096):
        self.texts: list[str] = []
        self.first_chunk = first_chunk  # rows compared before the bound starts pruning
        self.chunk_rows = chunk_rows  # rows per vectorized LCS call
        self._vocab: dict[str, int] = {}
        self._postings: dict[int, _Postings] = {}
        self._ids = np.zeros((0, 16), dtype=np.int32)
        self._lengths = np.zeros(0, dtype=np.int64)
        self.compared = 0  # exact LCS computations so far (for the benchmark: how much the bound saves)
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self.texts)

    def _encode(self, text: str, grow: bool) -> list[int]:
        if grow:
            return [self._vocab.setdefault(token, len(self._vocab) + 1) for token in rouge_tokens(text)]
        # a token the pool has never seen matches nothing: give it an id no pool row holds
        return [self._vocab.get(token, -1) for token in rouge_tokens(text)]

    def add(self, text: str) -> int:
        """Add a text; returns its row."""
        ids = self._encode(text, grow=True)
        row = len(self.texts)
        if row == self._ids.shape[0] or len(ids) > self._ids.shape[1]:
            capacity = max(2 * self._ids.shape[0], 64) if row == self._ids.shape[0] else self._ids.shape[0]
            grown = np.zeros((capacity, max(self._ids.shape[1], len(ids))), dtype=np.int32)
            grown[: row, : self._ids.shape[1]] = self._ids[:row]
            self._ids = grown
            self._lengths = np.resize(self._lengths, capacity)
        self._ids[row, : len(ids)] = ids
        self._lengths[row] = len(ids)
        for token, count in Counter(ids).items():
            self._postings.setdefault(token, _Postings()).append(row, count)
        self.texts.append(text)
        return row

    def upper_bounds(self, ids: list[int]) -> np.ndarray:
        """2·|a ∩ b| / (m + n) for every pool row b: an upper bound of its ROUGE-L F (0 where nothing is shared)."""
        overlap = np.zeros(len(self.texts), dtype=np.int64)
        for token, count in Counter(ids).items():
            postings = self._postings.get(token)
            if postings is not None:  # rows in one posting list are distinct, so fancy-index += is safe
                overlap[postings.rows[: postings.size]] += np.minimum(postings.counts[: postings.size], count)
        return 2.0 * overlap / (len(ids) + self._lengths[: len(self.texts)])

    def scores(self, text: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Exact ROUGE-L F of `text` against the given rows (default: all)."""
        ids = self._encode(text, grow=False)
        rows = np.arange(len(self.texts)) if rows is None else np.asarray(rows, dtype=np.int64)
        return self._exact(ids, rows)

    def _exact(self, ids: list[int], rows: np.ndarray) -> np.ndarray:
        if not ids or len(rows) == 0:
            return np.zeros(len(rows), dtype=np.float64)
        lengths = self._lengths[rows]
        lcs = np.zeros(len(rows), dtype=np.int64)
        # chunks of similar length, each cut to its own longest row: few padding steps, bounded memory
        by_length = np.argsort(lengths, kind="stable")
        for start in range(0, len(rows), self.chunk_rows):
            part = by_length[start : start + self.chunk_rows]
            width = int(lengths[part].max())
            lcs[part] = lcs_lengths(ids, self._ids[rows[part], :width])
        self.compared += len(rows)
        return rouge_l_fmeasure(lcs, len(ids), lengths)

    def best_match(self, text: str) -> Match:
        ids = self._encode(text, grow=False)
        if not self.texts or not ids:
            return Match(0.0, -1 if not self.texts else 0)
        bounds = self.upper_bounds(ids)
        # the rows with the highest bounds first (argpartition: no full sort of a 50k pool per candidate)
        k = min(self.first_chunk, len(bounds))
        head = np.argpartition(-bounds, k - 1)[:k] if k < len(bounds) else np.arange(len(bounds))
        head = head[bounds[head] > 0]
        if len(head) == 0:
            return Match(0.0, 0)
        scores = self._exact(ids, head)
        best = float(scores.max())
        # then only the rows that could still beat (or tie) the best
        could = bounds >= max(best - _TIE_SLACK, np.finfo(float).tiny)
        could[head] = False
        tail = np.flatnonzero(could)
        if len(tail):
            head = np.concatenate([head, tail])
            scores = np.concatenate([scores, self._exact(ids, tail)])
            best = float(scores.max())
        if best == 0.0:
            return Match(0.0, 0)
        return Match(best, int(head[scores == best].min()))
