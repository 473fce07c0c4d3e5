"""Batched sampling with a KV cache: our own loop instead of `model.generate`.

Why not `model.generate`: PPO needs the log-prob of every sampled token, computed exactly the way
training recomputes it (log_softmax(logits / temperature) of the *unfiltered* distribution, same
position ids, same attention mask), and the chat server / CLI need tokens streamed as they come.
Owning the loop makes both explicit instead of depending on logits-processor internals.

Conventions shared with the training-time log-prob code:
- prompts are LEFT-padded, so every row's next token is predicted from the last column;
- position ids are `cumsum(attention_mask) - 1` clamped at 0, so padding does not shift positions;
- a response is right-padded with the pad id after its stop token, and masked out there.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class SamplingParams:
    """How to sample. temperature, top_p, top_k and seed are one value for every row, or a list with one per
    row (a server's batch of requests with different settings; see `RowSampling`)."""

    max_new_tokens: int = 64
    temperature: float | list[float] = 1.0  # 0 means greedy
    top_p: float | list[float] = 1.0
    top_k: int | list[int] = 0  # 0 = off
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's and generation config's eos ids
    # one value: one private torch.Generator draws for the whole batch (global RNG untouched). A list: row i
    # draws from its own stream, seeded with seed[i] (or the torch.Generator given there, advanced in place),
    # so its samples depend on nothing else in the batch; None there: the global RNG
    seed: int | None | list[int | torch.Generator | None] = None

    @property
    def per_row(self) -> bool:
        return any(isinstance(v, (list, tuple)) for v in (self.temperature, self.top_p, self.top_k, self.seed))


class Sequences(NamedTuple):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


@dataclass
class GenerationOutput:
    prompt_ids: torch.Tensor  # [B, P] left-padded with the pad id
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    response_ids: torch.Tensor  # [B, T] right-padded with the pad id
    response_mask: torch.Tensor  # [B, T] 1 on generated tokens up to and including the stop token
    logprobs: torch.Tensor  # [B, T] float32 log-prob of each sampled token; 0 where masked
    finished: torch.Tensor  # [B] bool: the row ended on a stop token (not on max_new_tokens)

    def sequences(self) -> Sequences:
        """Prompt + response as one batch, with the mask and position ids the sampler used.

        A teacher-forced forward pass over these reproduces `logprobs`: the logits at column
        P - 1 + t predict response token t.
        """
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        attention_mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        return Sequences(input_ids, attention_mask, _position_ids(attention_mask))


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row starts at 0 like an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def default_stop_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The tokenizer's eos plus the generation config's eos ids (chat models often list several)."""
    ids = [tokenizer.eos_token_id]
    gen_eos = getattr(getattr(_base(model), "generation_config", None), "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. The most likely token always survives."""
    if top_k > 0 and top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        logits = _nucleus(logits, top_p)
    return logits


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from `probs` [B, V] by inverting the CDF: the first token whose cumulative mass
    exceeds u·total, u ~ U[0, 1). Exact, and on a CPU ~15x faster than torch.multinomial over a 49152-token
    vocabulary (one cumsum and a binary search instead of multinomial's per-row setup). `uniform` [B, 1]:
    the u of each row, drawn by the caller (rows with their own generators); else drawn from `generator`."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    if uniform is None:
        uniform = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype)
    u = uniform.to(cdf.dtype) * total
    # the first index whose cdf exceeds u: cdf rises there, so that token has mass
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # ... unless u·total rounded up to the total (about once in 2^24 draws): then no cdf exceeds it and the
    # search returns V; take the last token that has mass (a full pass, so only when it happens)
    beyond = token == probs.shape[-1]
    if bool(beyond.any()):
        last_with_mass = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
        token = torch.where(beyond, last_with_mass, token)
    return token


NUCLEUS_CANDIDATES = 1024


def _nucleus(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays while the mass
    of the tokens ranked before it is < top_p. Ties rank the lowest id first (as argmax), so a tiny top_p
    is greedy. A token's mass is exp(logit − logsumexp(row)) wherever it is ranked, so every path below
    rounds alike and a row's nucleus does not depend on the path (or on the other rows of the batch).

    Sorting the whole vocabulary every step is slow (49152 entries per row: ~5 ms a row on a CPU), and the
    nucleus almost always lies among the top few hundred tokens: rank only the top NUCLEUS_CANDIDATES, and
    sort the whole vocabulary only for the rows whose candidates hold less than top_p of the mass (there the
    nucleus may reach beyond). `top_p`: one value, or a [B, 1] tensor of one per row.
    """
    log_total = logits.logsumexp(-1, keepdim=True)
    k = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    values, ids = logits.topk(k, dim=-1)
    ids, by_id = ids.sort(dim=-1)  # topk's order among equal values is unspecified: restore "lowest id first"
    values, order = values.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)
    keep_ranked, before, probs = _keep_ranked(values, log_total, top_p)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, keep_ranked)
    # exact when the candidates hold top_p of the mass and no token left outside ties the last one kept
    last_kept = values.gather(-1, (keep_ranked.sum(-1, keepdim=True) - 1)).squeeze(-1)
    complete = ((before[:, -1:] + probs[:, -1:]) >= top_p).squeeze(-1) & (last_kept > values[:, -1])
    if k < logits.shape[-1] and not bool(complete.all()):
        rows = (~complete).nonzero().squeeze(-1)
        values, ids = logits[rows].sort(dim=-1, descending=True, stable=True)
        keep_ranked = _keep_ranked(values, log_total[rows], top_p[rows] if isinstance(top_p, torch.Tensor) else top_p)[0]
        keep[rows] = torch.zeros_like(keep_ranked).scatter_(-1, ids, keep_ranked)
    return logits.masked_fill(~keep, float("-inf"))


def _keep_ranked(values: torch.Tensor, log_total: torch.Tensor, top_p: float | torch.Tensor):
    """For logits ranked in descending order: which stay in the nucleus, the mass before each, each's mass."""
    probs = (values - log_total).exp()
    before = probs.cumsum(-1) - probs
    keep_ranked = before < top_p
    keep_ranked[..., 0] = True
    return keep_ranked, before, probs


@dataclass
class RowSampling:
    """Per-row settings as tensors, built once per `generate` call when `SamplingParams.per_row`.

    Each step is vectorised over the batch (temperature, top-k and top-p as [B] tensors); the only loop over
    rows is the draw of u for rows with their own generator, one `torch.rand` per generator."""

    temperature: torch.Tensor  # [B] float32, 1 on greedy rows (their logits stay unscaled, as in the one-setting path)
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] long, 0 = off
    top_p: torch.Tensor  # [B] float32
    generators: list[torch.Generator | None]  # per row: its own stream, or None (the shared generator or global RNG)
    shared: torch.Generator | None  # draws for the rows without their own generator

    @classmethod
    def build(cls, params: SamplingParams, batch: int, device) -> RowSampling:
        def rows(value, name):
            values = list(value) if isinstance(value, (list, tuple)) else [value] * batch
            if len(values) != batch:
                raise ValueError(f"SamplingParams.{name} has {len(values)} values for a batch of {batch} rows")
            return values

        temperature = torch.tensor([float(t) for t in rows(params.temperature, "temperature")], dtype=torch.float32, device=device)
        greedy = temperature <= 0
        shared, generators = None, [None] * batch
        if isinstance(params.seed, (list, tuple)):
            generators = [s if isinstance(s, torch.Generator) or s is None else torch.Generator(device=device).manual_seed(int(s))
                          for s in rows(params.seed, "seed")]
        elif params.seed is not None:
            shared = torch.Generator(device=device).manual_seed(params.seed)
        return cls(torch.where(greedy, torch.ones_like(temperature), temperature), greedy,
                   torch.tensor([int(k) for k in rows(params.top_k, "top_k")], dtype=torch.long, device=device),
                   torch.tensor([float(p) for p in rows(params.top_p, "top_p")], dtype=torch.float32, device=device),
                   generators, shared)

    def select(self, keep: torch.Tensor) -> RowSampling:
        """The settings of the rows `keep` ([N] indices), in that order."""
        index = keep.tolist()
        return RowSampling(self.temperature[keep], self.greedy[keep], self.top_k[keep], self.top_p[keep],
                           [self.generators[i] for i in index], self.shared)

    @staticmethod
    def cat(first: RowSampling, second: RowSampling) -> RowSampling:
        """The rows of `first`, then those of `second` (the shared stream is `first`'s)."""
        return RowSampling(torch.cat([first.temperature, second.temperature]), torch.cat([first.greedy, second.greedy]),
                           torch.cat([first.top_k, second.top_k]), torch.cat([first.top_p, second.top_p]),
                           first.generators + second.generators, first.shared)

    def scale(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if bool((self.temperature == 1).all()) else logits / self.temperature[:, None]

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token of each row from temperature-scaled `logits` [B, V]: argmax on greedy rows, else a draw
        from the top-k / nucleus-filtered distribution of the row's own settings."""
        token = logits.argmax(-1)
        sampled = (~self.greedy).nonzero().squeeze(-1)
        if sampled.numel() == 0:
            return token
        sub = logits if sampled.numel() == logits.shape[0] else logits[sampled]
        top_k, top_p = self.top_k[sampled], self.top_p[sampled]
        sub = _top_k_rows(sub, top_k)
        nucleus = (top_p < 1).nonzero().squeeze(-1)
        if nucleus.numel() == sub.shape[0]:
            sub = _nucleus(sub, top_p[:, None])
        elif nucleus.numel():
            sub = sub.index_put((nucleus,), _nucleus(sub[nucleus], top_p[nucleus, None]))
        token[sampled] = sample_categorical(sub.softmax(-1), uniform=self._uniform(sampled.tolist(), logits.device))
        return token

    def _uniform(self, rows: list[int], device) -> torch.Tensor:
        """u ~ U[0, 1) for each sampled row: one number from its own generator, or from the shared stream."""
        u = torch.empty((len(rows), 1), dtype=torch.float32, device=device)
        shared = [i for i, row in enumerate(rows) if self.generators[row] is None]
        if shared:
            u[shared] = torch.rand((len(shared), 1), generator=self.shared, device=device)
        for i, row in enumerate(rows):
            if self.generators[row] is not None:
                u[i] = torch.rand((1,), generator=self.generators[row], device=device)
        return u


def _top_k_rows(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Per-row top-k ([B] long, 0 = off): one topk of the largest k, then each row keeps its first k ranks."""
    on = (top_k > 0) & (top_k < logits.shape[-1])
    if not bool(on.any()):
        return logits
    k_max = int(top_k[on].max())
    ids = logits.topk(k_max, dim=-1).indices
    keep_ranked = torch.arange(k_max, device=logits.device)[None] < torch.where(on, top_k, k_max)[:, None]
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids, keep_ranked) | ~on[:, None]
    return logits.masked_fill(~keep, float("-inf"))


def _left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


SHARED_PREFIX_MIN_TOKENS = 16


def _prefill_shared_prefix(model, prompt_ids: list[list[int]], pad_id: int, device, model_kwargs: dict):
    """(input_ids, attention_mask, position_ids) of the first decoding call.

    Prompts that begin alike (a chat template's system prompt, k samples of one prompt) would have the
    prefill compute their common prefix once per row. When the batch shares at least
    SHARED_PREFIX_MIN_TOKENS tokens, the decoder trunk runs that prefix once, its cache is repeated for
    every row, and the first call gets only each prompt's remainder (left-padded; the cache's mask then
    has the padding between prefix and remainder, and positions count real tokens as always). The trunk
    runs without the LM head, so a hook on the head still sees one call per sampled token. Otherwise:
    the whole left-padded prompts."""
    from alignkit.models import trunk_and_head
    from alignkit.packing import common_prefix_length

    common = common_prefix_length(prompt_ids)
    common = min(common, min(map(len, prompt_ids)) - 1)  # every row keeps ≥ 1 token to predict from
    trunk, _ = trunk_and_head(model)
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if len(prompt_ids) < 2 or common < SHARED_PREFIX_MIN_TOKENS or trunk is None or not hasattr(cache, "batch_repeat_interleave"):
        prompt, prompt_mask = _left_pad(prompt_ids, pad_id, device)
        return prompt, prompt_mask, _position_ids(prompt_mask)
    prefix = torch.tensor([prompt_ids[0][:common]], dtype=torch.long, device=device)
    cache_kwargs = {k: v for k, v in model_kwargs.items() if k != "logits_to_keep"}
    trunk(input_ids=prefix, attention_mask=torch.ones_like(prefix), position_ids=torch.arange(common, device=device)[None], **cache_kwargs)
    cache.batch_repeat_interleave(len(prompt_ids))
    rest, rest_mask = _left_pad([p[common:] for p in prompt_ids], pad_id, device)
    attention_mask = torch.cat([rest_mask.new_ones((len(prompt_ids), common)), rest_mask], dim=1)
    return rest, attention_mask, _position_ids(attention_mask)[:, common:]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    on_token: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> GenerationOutput:
    """Sample continuations of a batch of tokenized prompts.

    `params` holds one setting for every row (the fast path PPO and eval use), or per-row lists
    (`SamplingParams.per_row`): greedy rows, sampled rows and rows with their own seed then decode in one
    batch, and a row with its own seed samples what it would alone.
    `on_token(step, token_ids[B], finished[B])` runs after every step (streaming); finished rows
    receive the pad id. The model is in eval mode during sampling (no dropout: the log-probs must
    match a deterministic recomputation) and every submodule's mode is restored afterwards.
    """
    from transformers import DynamicCache

    base = _base(model)
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer)
    stop_ids = params.stop_token_ids if params.stop_token_ids is not None else default_stop_token_ids(model, tokenizer)
    stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    prompt, prompt_mask = _left_pad(prompt_ids, pad_id, device)
    batch, max_new = prompt.shape[0], params.max_new_tokens
    # one setting for all rows (PPO, eval): scalars, the fastest path; else per-row tensors
    rows = RowSampling.build(params, batch, device) if params.per_row else None
    greedy = rows is None and params.temperature <= 0
    temperature = 1.0 if rows is not None or greedy else float(params.temperature)
    generator = None
    if rows is None and params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    response = torch.full((batch, max_new), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((batch, max_new), dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    # transformers 5.x renamed the cache argument `past_key_values` -> `cache` (old name deprecated);
    # the cache is filled in place, so we never need to read it back from the output.
    signature = inspect.signature(base.forward).parameters
    model_kwargs = {"use_cache": True}
    model_kwargs["cache" if "cache" in signature else "past_key_values"] = DynamicCache(config=base.config)
    if "logits_to_keep" in signature:
        model_kwargs["logits_to_keep"] = 1  # the prefill would otherwise build [B, P, vocab] logits

    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        input_ids, prompt_attention, position_ids = _prefill_shared_prefix(model, prompt_ids, pad_id, device, model_kwargs)
        # the attention mask of every step is a prefix of one preallocated mask: finished rows keep decoding
        # pad tokens whose outputs are masked, so their mask can simply grow with the others'
        width = prompt_attention.shape[1]
        attention_mask = torch.cat([prompt_attention, prompt_attention.new_ones((batch, max_new))], dim=1)
        steps = 0
        for step in range(max_new):
            out = model(input_ids=input_ids, attention_mask=attention_mask[:, : width + step], position_ids=position_ids, **model_kwargs)
            logits = out.logits[:, -1, :].float()
            if temperature != 1.0:
                logits = logits / temperature
            if rows is not None:
                logits = rows.scale(logits)
                token = rows.choose(logits)
            elif greedy:
                token = logits.argmax(-1)
            else:
                probs = _filter_logits(logits, params.top_k, params.top_p).softmax(-1)
                token = sample_categorical(probs, generator)
            # the log-prob PPO needs: temperature-scaled but *unfiltered* distribution
            token_logprob = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)

            active = ~finished
            token = torch.where(active, token, torch.full_like(token, pad_id))
            response[:, step] = token
            response_mask[:, step] = active.long()
            logprobs[:, step] = torch.where(active, token_logprob, torch.zeros_like(token_logprob))
            finished = finished | (active & torch.isin(token, stop_ids))
            steps = step + 1
            if on_token is not None:
                on_token(step, token, finished.clone())
            if bool(finished.all()):
                break

            input_ids = token[:, None]
            position_ids = position_ids[:, -1:] + 1
    finally:
        for module, training in modes.items():
            module.training = training

    return GenerationOutput(
        prompt_ids=prompt,
        prompt_mask=prompt_mask,
        response_ids=response[:, :steps],
        response_mask=response_mask[:, :steps],
        logprobs=logprobs[:, :steps],
        finished=finished,
    )


def generate_text(model, tokenizer, prompts: list[str], params: SamplingParams, batch_size: int = 16, progress: str = "") -> list[str]:
    """Complete already-formatted prompt strings (chat template applied by the caller).

    Prompts are batched by length to waste less compute on padding; results come back in input
    order. With a seed, batch i uses seed + i so batches do not share random draws. A non-empty
    `progress` names a progress bar over the prompts.
    """
    from alignkit.progress import progress_bar

    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[str] = [""] * len(prompts)
    with progress_bar(bool(progress)) as bar:
        task = bar.add_task(progress or "generate", total=len(prompts), status="")
        for batch_index, start in enumerate(range(0, len(order), batch_size)):
            _generate_batch(model, tokenizer, encoded, order[start : start + batch_size], params, batch_index, results)
            bar.advance(task, min(batch_size, len(order) - start))
    return results


def _generate_batch(model, tokenizer, encoded, chunk, params, batch_index, results) -> None:
    """Fill results[i] for the prompt indices in `chunk`."""
    if isinstance(params.seed, int):
        params = dataclasses.replace(params, seed=params.seed + batch_index)
    out = generate(model, tokenizer, [encoded[i] for i in chunk], params)
    for row, i in enumerate(chunk):
        ids = out.response_ids[row][out.response_mask[row].bool()].tolist()
        results[i] = tokenizer.decode(ids, skip_special_tokens=True)
