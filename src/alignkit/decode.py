"""A running batch that rows join and leave between decoding steps, and a cache of prompt prefixes' KV.

The server's engine (`alignkit.batching`) decodes with these instead of `alignkit.generation.generate`,
which samples a fixed batch from start to end (the path of PPO, eval and `alignkit generate`):

- `DecodeBatch.add` prefills only the newcomers and merges their KV cache into the running batch's: every
  layer's keys and values are left-padded (zeros, masked out) to a common length and concatenated along the
  batch. The running rows are never recomputed. Positions count each row's real tokens, as in `generate`,
  so a row's padding (from the merge, or from rows that left) does not change what it computes.
- `DecodeBatch.keep` drops rows (finished, client gone) and the columns no remaining row uses.
- `PrefixCache` keeps the per-layer KV of token sequences seen before (prompts, and prompt + reply when a
  row finishes: the next turn of that chat starts with it), indexed at every multiple of `BLOCK` tokens by
  a chain hash, so a new prompt that starts with a cached sequence's first k·BLOCK tokens (a system prompt,
  the history of a conversation) computes only the rest. Least recently used entries go first once the
  stored tensors exceed the memory bound.

Sampling uses `alignkit.generation.RowSampling`: per-row temperature / top-p / top-k / generator.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass

import torch

from alignkit.generation import RowSampling, _base

BLOCK = 16  # prefix-cache granularity in tokens: a hit reuses a multiple of this


def _chain_hashes(tokens: list[int], blocks: int) -> list[int]:
    """hash of tokens[: (j+1)·BLOCK] for j < blocks, each from the previous one and its block."""
    hashes, h = [], 0
    for j in range(blocks):
        h = hash((h, tuple(tokens[j * BLOCK : (j + 1) * BLOCK])))
        hashes.append(h)
    return hashes


@dataclass
class _Entry:
    tokens: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [1, heads, len(tokens), head_dim]
    hashes: list[int]
    nbytes: int


class PrefixCache:
    """LRU map from token prefixes to their per-layer KV (one row), bounded by `max_bytes` of tensors."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes, self.nbytes = max_bytes, 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # key: hash of the whole stored sequence
        self._index: dict[int, int] = {}  # hash at every block boundary -> key of an entry holding that prefix

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: list[int], limit: int) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The longest cached prefix of `tokens` of at most `limit` tokens (a multiple of BLOCK): (length, KV)."""
        best, key = 0, None
        for j, h in enumerate(_chain_hashes(tokens, limit // BLOCK)):
            if h not in self._index:
                break
            best, key = (j + 1) * BLOCK, self._index[h]
        if key is None:
            return 0, None
        entry = self._entries[key]
        if entry.tokens[:best] != tokens[:best]:  # a hash collision: never reuse another sequence's KV
            return 0, None
        self._entries.move_to_end(key)
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in entry.kv]

    def store(self, tokens: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the KV of `tokens` (per layer [1, heads, len(tokens), head_dim]) cut to a multiple of BLOCK."""
        length = len(tokens) // BLOCK * BLOCK
        if length == 0:
            return
        hashes = _chain_hashes(tokens, length // BLOCK)
        if hashes[-1] in self._entries:
            self._entries.move_to_end(hashes[-1])
            return
        kv = [(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in kv]  # own the memory, not a batch's view
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.max_bytes:
            return
        self._entries[hashes[-1]] = _Entry(tokens[:length], kv, hashes, nbytes)
        self.nbytes += nbytes
        for h in hashes:
            self._index[h] = hashes[-1]
        while self.nbytes > self.max_bytes:
            self._evict()

    def _evict(self) -> None:
        key, entry = self._entries.popitem(last=False)
        self.nbytes -= entry.nbytes
        for h in entry.hashes:
            if self._index.get(h) == key:
                del self._index[h]


def _left_pad_kv(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, width, D] with zeros on the left (masked out: never attended to)."""
    missing = width - tensor.shape[2]
    if missing == 0:
        return tensor
    return torch.cat([tensor.new_zeros(*tensor.shape[:2], missing, tensor.shape[3]), tensor], dim=2)


@dataclass
class Prefill:
    """Newcomers on their way into a `DecodeBatch`: their own KV cache (a reused prefix, then the prompt columns fed
    so far), the whole attention mask, and the left-padded rest of each distinct prompt. `DecodeBatch.advance` feeds
    it in chunks, between decoding steps of the running rows, so a long prompt does not stall their streams."""

    prompts: list[list[int]]  # one per new row
    unique: list[tuple[int, ...]]  # the distinct prompts, computed once each
    sampling: RowSampling
    cache: object  # transformers' DynamicCache
    mask: torch.Tensor  # [U, prefix width + rest width]: cached prefix columns, then the rest's
    ids: torch.Tensor  # [U, rest width]: the tokens to compute, left-padded
    hits: list[int]  # per distinct prompt: its leading tokens taken from the prefix cache, not computed
    fed: int = 0  # columns of `ids` already fed
    logits: torch.Tensor | None = None  # of the last position fed

    @property
    def left(self) -> int:
        return self.ids.shape[1] - self.fed

    def cached_tokens(self, prompt: list[int]) -> int:
        """How many of `prompt`'s tokens came from the prefix cache."""
        return self.hits[self.unique.index(tuple(prompt))]


class DecodeBatch:
    """The rows being decoded: their KV cache, attention mask, next positions, pending tokens and settings.

    The owner calls `add` (newcomers: returns their first tokens) or `begin` / `advance` (a chunk at a time) /
    `finish` for the same in steps, `step` (every row: returns the next tokens) and `keep` (rows that go on), from
    one thread, under torch.no_grad, with the model in eval mode.
    """

    def __init__(self, model, pad_id: int, prefix_cache: PrefixCache | None = None):
        from transformers import DynamicCache

        self.model, self.pad_id, self.prefix_cache = model, pad_id, prefix_cache
        base = _base(model)
        self._new_cache = lambda: DynamicCache(config=base.config)
        signature = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in signature else "past_key_values"  # transformers 5 renamed it
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in signature else {}
        self.device = next(model.parameters()).device
        self.cache = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # of each row's pending token
        self.pending = torch.zeros(0, dtype=torch.long, device=self.device)  # sampled, not yet fed to the model
        self.sampling: RowSampling | None = None
        self.stats = {"prefill_tokens": 0, "prefix_hit_tokens": 0, "steps": 0}

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                         **{self._cache_arg: cache}, **self._keep_last)
        return out.logits[:, -1, :].float()

    def add(self, prompts: list[list[int]], sampling: RowSampling) -> torch.Tensor:
        """Prefill `prompts` at once and append them to the batch (`begin`, `advance`, `finish`). Returns their first
        tokens [N]."""
        prefill = self.begin(prompts, sampling)
        self.advance(prefill)
        return self.finish(prefill)

    def begin(self, prompts: list[list[int]], sampling: RowSampling) -> Prefill:
        """Newcomers to prefill: a cached prefix is reused, equal prompts are computed once. Nothing runs yet."""
        unique = list(dict.fromkeys(tuple(p) for p in prompts))
        cache, mask = self._new_cache(), None
        hits = [(0, None)] * len(unique)
        if self.prefix_cache is not None:
            hits = [self.prefix_cache.lookup(list(p), len(p) - 1) for p in unique]  # ≥ 1 token left to predict from
        width = max(h for h, _ in hits)
        if width:  # the cached prefixes, left-padded: [zeros | prefix]
            reference = next(kv for _, kv in hits if kv)
            for layer, (k0, v0) in enumerate(reference):
                empty = (k0[:, :, :0], v0[:, :, :0])
                keys = [_left_pad_kv((kv[layer] if kv else empty)[0], width) for _, kv in hits]
                values = [_left_pad_kv((kv[layer] if kv else empty)[1], width) for _, kv in hits]
                cache.update(torch.cat(keys), torch.cat(values), layer)
            mask = torch.tensor([[0] * (width - h) + [1] * h for h, _ in hits], dtype=torch.long, device=self.device)
        rests = [list(p[h:]) for p, (h, _) in zip(unique, hits)]
        rest_width = max(map(len, rests))
        ids = torch.tensor([[self.pad_id] * (rest_width - len(r)) + r for r in rests], dtype=torch.long, device=self.device)
        rest_mask = torch.tensor([[0] * (rest_width - len(r)) + [1] * len(r) for r in rests], dtype=torch.long, device=self.device)
        mask = rest_mask if mask is None else torch.cat([mask, rest_mask], dim=1)
        self.stats["prefill_tokens"] += sum(map(len, rests))
        self.stats["prefix_hit_tokens"] += sum(h for h, _ in hits)
        return Prefill(prompts, unique, sampling, cache, mask, ids, [h for h, _ in hits], fed=0)

    def advance(self, prefill: Prefill, tokens: int | None = None) -> None:
        """Feed the next `tokens` positions of the newcomers' (left-padded) prompts, or all that are left."""
        start = prefill.mask.shape[1] - prefill.ids.shape[1] + prefill.fed  # the columns already in the cache
        stop = start + min(tokens or prefill.left, prefill.left)
        mask = prefill.mask[:, :stop]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids = prefill.ids[:, prefill.fed : prefill.fed + stop - start]
        prefill.logits = self._forward(ids, mask, positions[:, start:], prefill.cache)
        prefill.fed += stop - start

    def finish(self, prefill: Prefill) -> torch.Tensor:
        """Sample the prefilled newcomers' first tokens and append them to the batch. Returns those tokens [N]."""
        assert prefill.left == 0, "finish() before the whole prompt was fed"
        cache, mask, logits, prompts = prefill.cache, prefill.mask, prefill.logits, prefill.prompts
        if self.prefix_cache is not None:
            for row, prompt in enumerate(prefill.unique):
                self.prefix_cache.store(list(prompt), self._row_kv(cache, mask, row, len(prompt)))
        expand = torch.tensor([prefill.unique.index(tuple(p)) for p in prompts], device=self.device)
        if len(prefill.unique) != len(prompts):
            cache.batch_select_indices(expand)
            mask, logits = mask[expand], logits[expand]
        sampling = prefill.sampling
        first = sampling.choose(sampling.scale(logits))
        self._merge(cache, mask)
        self.positions = torch.cat([self.positions, torch.tensor([len(p) for p in prompts], device=self.device)])
        self.pending = torch.cat([self.pending, first])
        self.sampling = sampling if self.sampling is None else RowSampling.cat(self.sampling, sampling)
        return first

    def _merge(self, cache, mask: torch.Tensor) -> None:
        """Append the rows of (cache, mask) to the batch, left-padding whichever side is shorter."""
        if self.cache is None or self.rows == 0:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad_kv(mine.keys, width), _left_pad_kv(theirs.keys, width)])
            mine.values = torch.cat([_left_pad_kv(mine.values, width), _left_pad_kv(theirs.values, width)])
        pad = lambda m: torch.cat([m.new_zeros(m.shape[0], width - m.shape[1]), m], dim=1)  # noqa: E731
        self.mask = torch.cat([pad(self.mask), pad(mask)])

    def step(self) -> torch.Tensor:
        """Feed every row its pending token; sample and return the next ones [B]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        logits = self._forward(self.pending[:, None], self.mask, self.positions[:, None], self.cache)
        self.positions = self.positions + 1
        self.pending = self.sampling.choose(self.sampling.scale(logits))
        self.stats["steps"] += 1
        return self.pending

    def row_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """KV of the row's real tokens so far (its prompt and the tokens fed since), per layer [1, H, n, D]."""
        return self._row_kv(self.cache, self.mask, row, int(self.mask[row].sum()))

    @staticmethod
    def _row_kv(cache, mask: torch.Tensor, row: int, length: int):
        columns = mask[row].nonzero().squeeze(-1)[:length]
        return [(layer.keys[row : row + 1, :, columns], layer.values[row : row + 1, :, columns]) for layer in cache.layers]

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), and drop the leading columns none of them attends to."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.cache, self.sampling = None, None
            self.mask, self.positions, self.pending = self.mask[:0, :0], self.positions[:0], self.pending[:0]
            return
        index = torch.tensor(rows, device=self.device)
        self.mask, self.positions, self.pending = self.mask[index], self.positions[index], self.pending[index]
        self.sampling = self.sampling.select(index)
        start = int(self.mask.any(0).long().argmax())  # the first column some row uses
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
