"""Classification by ranking the options' log-likelihoods, or by matching a generated answer to an option;
contextual calibration (Zhao et al., 2021).

Log-likelihood ranking: for a context x and candidate continuations o_1 … o_C (the options, in label order),

    LL(o_c) = Σ_t log p(o_c,t | x, o_c,<t)            (sum over the option's tokens)
    ŷ = argmax_c LL(o_c)          or, by mean,   ŷ = argmax_c LL(o_c) / |o_c|

The context and each option are tokenized separately (as `data.tokenize` does for prompt and answer), and
every (example, option) pair is one row of a batch: rows are sorted by length and right-padded, and only
the option positions are unembedded (the vocabulary projection is most of a small model's cost).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from alignkit.data.tasks import normalize_answer


def _shared_prefix_length(sequences: Sequence[list[int]], starts: Sequence[int]) -> int:
    """Tokens every sequence starts with, stopping before the token that predicts any row's first scored token."""
    limit = min(starts) - 1
    first = sequences[0]
    length = 0
    while length < limit and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


def _prefix_cache(model, prefix: list[int], device):
    """The KV cache of the shared prefix (one row), computed once per call."""
    from transformers import DynamicCache

    from alignkit.models import unwrap_base

    base = unwrap_base(model)
    cache = DynamicCache(config=base.config)
    ids = torch.tensor([prefix], device=device)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), **{_cache_arg(base): cache}, use_cache=True)
    return cache


def _cache_arg(base) -> str:
    import inspect

    # transformers 5 renamed `past_key_values` -> `cache` (as in alignkit.generation)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _plan_rows(contexts: dict[str, list[int]], options: dict[str, list[int]], pairs: Sequence[tuple[str, str]]):
    """Rows to run: (token ids, context length, [(pair index, first option position, option tokens)]).

    An option of one token needs no row of its own: its log-prob is read at the last context position, which
    every row of that context shares, so it rides along on the context's first row."""
    by_context: dict[str, list[int]] = {}
    for index, (context, _) in enumerate(pairs):
        by_context.setdefault(context, []).append(index)
    rows = []
    for context, indices in by_context.items():
        ctx = contexts[context]
        singles = [i for i in indices if len(options[pairs[i][1]]) == 1]
        multis = [i for i in indices if len(options[pairs[i][1]]) > 1]
        riders = [(i, len(ctx), options[pairs[i][1]]) for i in singles]
        if not multis:
            rows.append((ctx, len(ctx), riders))
        for n, i in enumerate(multis):
            opt = options[pairs[i][1]]
            rows.append((ctx + opt, len(ctx), [(i, len(ctx), opt)] + (riders if n == 0 else [])))
    return rows


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16, progress: str = "",
                          min_shared_prefix: int = 16) -> list[tuple[float, int]]:
    """(Σ log p(continuation tokens | context), number of continuation tokens) for each (context, continuation).

    k-shot contexts of one run share their exemplars: when all rows start with the same ≥ `min_shared_prefix`
    tokens, that prefix runs once and its KV cache is reused by every batch (the same numbers, several times
    less compute). Token ids are those of tokenizing each context whole, so the split changes nothing."""
    import copy

    from alignkit.models import trunk_and_head, unwrap_base
    from alignkit.progress import progress_bar

    contexts = {c: tokenizer(c, add_special_tokens=False)["input_ids"] for c in dict.fromkeys(c for c, _ in pairs)}
    options = {o: tokenizer(o, add_special_tokens=False)["input_ids"] for o in dict.fromkeys(o for _, o in pairs)}
    for text, ids in list(contexts.items()) + list(options.items()):
        if not ids:
            raise ValueError(f"empty {'context' if text in contexts else 'option'} in log-likelihood scoring: {text!r}")
    if not pairs:
        return []
    rows = _plan_rows(contexts, options, pairs)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shared = _shared_prefix_length([r[0] for r in rows], [r[1] for r in rows])
    shared = shared if shared >= min_shared_prefix else 0
    base = unwrap_base(model)
    trunk, head = trunk_and_head(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]), reverse=True)
    results: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        prefix_cache = _prefix_cache(model, rows[0][0][:shared], device) if shared else None
        with progress_bar(bool(progress)) as bar:
            task = bar.add_task(progress or "score", total=len(pairs), status="")
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                width = max(len(rows[i][0]) for i in chunk) - shared
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), shared + width), dtype=torch.long)
                mask[:, :shared] = 1
                batch_rows, columns, targets, owners = [], [], [], []
                for b, i in enumerate(chunk):
                    sequence, _, scored = rows[i]
                    input_ids[b, : len(sequence) - shared] = torch.tensor(sequence[shared:])
                    mask[b, shared : len(sequence)] = 1
                    for pair_index, begin, option in scored:
                        for offset, token in enumerate(option):  # the hidden state at position − 1 predicts it
                            batch_rows.append(b)
                            columns.append(begin + offset - 1 - shared)
                            targets.append(token)
                            owners.append(pair_index)
                kwargs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                          "position_ids": (shared + torch.arange(width))[None].expand(len(chunk), -1).to(device)}
                if shared:
                    cache = copy.deepcopy(prefix_cache)
                    cache.batch_repeat_interleave(len(chunk))
                    kwargs |= {_cache_arg(base): cache, "use_cache": True}
                else:
                    kwargs["use_cache"] = False
                index = (torch.tensor(batch_rows, device=device), torch.tensor(columns, device=device))
                if trunk is not None:  # unembed only the scored positions
                    logits = head(trunk(**kwargs).last_hidden_state[index])
                else:
                    logits = model(**kwargs).logits[index]
                token_logps = logits.float().log_softmax(-1).gather(-1, torch.tensor(targets, device=device)[:, None]).squeeze(-1).tolist()
                sums: dict[int, list[float]] = {}
                for owner, value in zip(owners, token_logps):
                    sums.setdefault(owner, []).append(value)
                for owner, values in sums.items():
                    results[owner] = (math.fsum(values), len(values))
                bar.update(task, advance=len(sums))
    finally:
        for module, training in modes.items():
            module.training = training
    return results


def option_scores(model, tokenizer, contexts: Sequence[str], options: Sequence[Sequence[str]], batch_size: int = 16,
                  progress: str = "") -> list[list[tuple[float, int]]]:
    """For each context, [(sum log-prob, n tokens)] of each of its options, in option order."""
    if len(contexts) != len(options):
        raise ValueError(f"{len(contexts)} contexts for {len(options)} option lists")
    pairs = [(c, o) for c, opts in zip(contexts, options) for o in opts]
    flat = continuation_logprobs(model, tokenizer, pairs, batch_size, progress)
    out, cursor = [], 0
    for opts in options:
        out.append(flat[cursor : cursor + len(opts)])
        cursor += len(opts)
    return out


def option_probabilities(scores: Sequence[tuple[float, int]], by: str = "sum") -> list[float]:
    """p_c = exp(s_c) / Σ_j exp(s_j), s = LL (by="sum") or LL/|o| (by="mean"): the model's distribution over
    the options alone."""
    if by not in ("sum", "mean"):
        raise ValueError(f"option scoring must be 'sum' or 'mean', got {by!r}")
    values = [s if by == "sum" else s / max(n, 1) for s, n in scores]
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first on ties (deterministic)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def match_option(answer: str, options: Sequence[str]) -> int | None:
    """The option a generated answer names: equal after `normalize_answer` (whole answer or its first line),
    else the longest option the first line starts with at a word boundary; None if none matches."""
    normalized = [normalize_answer(o) for o in options]
    lines = answer.strip().splitlines()
    for text in (answer, lines[0] if lines else ""):
        text = normalize_answer(text)
        if text in normalized:
            return normalized.index(text)
    first = normalize_answer(lines[0]) if lines else ""
    hits = [i for i, o in enumerate(normalized) if o and first.startswith(o) and (len(first) == len(o) or not first[len(o)].isalnum())]
    return max(hits, key=lambda i: len(normalized[i])) if hits else None


# ---------------------------------------------------------------------------------------------
# contextual calibration

CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")


def content_free_example(example: dict, text_fields: list[str], text: str) -> dict:
    """The example with every text field (the input, not the label) replaced by a content-free string."""
    return {**{key: value for key, value in example.items() if key != "where"}, **{f: text for f in text_fields}, "where": "content-free"}


def content_free_distribution(probabilities: Sequence[Sequence[float]]) -> list[float]:
    """p_cf: the option distributions the model gives to content-free inputs, averaged then renormalized."""
    if not probabilities:
        raise ValueError("no content-free probabilities")
    width = len(probabilities[0])
    mean = [sum(p[c] for p in probabilities) / len(probabilities) for c in range(width)]
    total = sum(mean)
    return [m / total for m in mean]


def calibrate(probabilities: Sequence[float], p_cf: Sequence[float]) -> list[float]:
    """Contextual calibration (Zhao et al., 2021): q = softmax(W p + b) with W = diag(p_cf)⁻¹, b = 0.

    A content-free input then maps to the uniform distribution over options, and the prediction is
    argmax_c p_c / p_cf,c.
    """
    if len(probabilities) != len(p_cf):
        raise ValueError(f"{len(probabilities)} probabilities for {len(p_cf)} content-free probabilities")
    logits = [p / max(cf, 1e-12) for p, cf in zip(probabilities, p_cf)]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    return [e / total for e in exps]
