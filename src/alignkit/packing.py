"""Prefix-shared rows: sequences that begin with the same tokens are laid out as a tree in one row, so
the shared tokens are computed once, with a custom attention mask that makes every sequence see exactly
what it would see alone.

A row is a list of segments (runs of tokens); each segment has a parent segment that comes before it in
the row. A token attends to the earlier tokens of its own segment and to every token of its ancestors,
and its position id continues from the end of its parent chain. A transformer without cross-row state
then computes, for every token, the same hidden state as in the unshared layout (up to float rounding),
and the gradient is the same too: a shared token's activation simply feeds several continuations.

Users: the reward model (one prompt, K responses), DPO (prompt, chosen, rejected) and PPO (the common
prefix of a batch's prompts — a chat template's system prompt, a task instruction — then each distinct
prompt's remainder, then each of its sampled responses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.attention import TREE_FLEX, tree_block_mask
from alignkit.models import unwrap_base


def supports_custom_masks(model) -> bool:
    """Prefix-shared rows need attention that takes a custom 4-D mask and position ids as given;
    sliding-window attention would ignore its window under a custom mask."""
    config = unwrap_base(model).config
    return config._attn_implementation in ("sdpa", "eager", TREE_FLEX) and getattr(config, "sliding_window", None) is None


def tree_mask(segment: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] boolean mask (query i may attend key j) of rows laid out as segment trees.

    segment [B, L]: the segment number of each column, −1 on padding; parent [B, S]: the parent of each
    segment, −1 for a root. Query i attends key j iff j ≤ i and seg(j) is seg(i) or one of its ancestors.
    A padding query attends only padding (itself at least), so no softmax row is empty."""
    batch, width = segment.shape
    count = parent.shape[1]
    rows = torch.arange(batch)[:, None]
    # ancestor[b, s, a]: a is s or an ancestor of s; index `count` stands for padding
    ancestor = torch.eye(count + 1, dtype=torch.bool).repeat(batch, 1, 1)
    up = torch.cat([torch.where(parent >= 0, parent, count), torch.full((batch, 1), count)], 1)  # [B, S + 1]
    chain = torch.arange(count + 1).repeat(batch, 1)
    for _ in range(count):  # walk every segment's parent chain up to its root
        chain = up.gather(1, chain)
        if bool((chain == count).all()):
            break
        ancestor[rows, torch.arange(count + 1)[None, :], chain] = True
    ancestor[:, :count, count] = False  # a real query never attends padding
    seg = torch.where(segment >= 0, segment, count).long()
    may = ancestor[rows[:, :, None], seg[:, :, None], seg[:, None, :]]
    return (may & torch.ones(width, width, dtype=torch.bool).tril())[:, None]


def for_attention(mask: torch.Tensor, model) -> torch.Tensor:
    """The boolean mask as the model's attention takes it: sdpa reads "may attend" booleans; eager adds
    the mask to the scores, so it gets 0 / −large; --attention_kernel flex takes it as a FlexAttention block mask."""
    implementation = unwrap_base(model).config._attn_implementation
    if implementation == TREE_FLEX:
        return tree_block_mask(mask)
    if implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)


@dataclass
class PackedEpisodes:
    input_ids: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor  # [R, 1, L, L] boolean (see tree_mask)
    position_ids: torch.Tensor  # [R, L]
    states: torch.Tensor  # [B, T]: flat index (row · L + column) of the hidden state s_t of episode b's step t


def pack_episodes(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor,
                  row_tokens: int, pad_id: int) -> PackedEpisodes:
    """Lay out a batch of episodes (left-padded prompts [B, P], right-padded responses [B, T]) as
    prefix-shared rows of about `row_tokens` columns: the prompts' longest common prefix once per row,
    then, per distinct prompt, its remainder once, then each of its episodes' responses.

    A response of n actions needs only its first n − 1 tokens as input: the state s_0 that chose a_0 is
    the prompt's last token and s_t (t ≥ 1) is a_{t−1}; the last action is never an input. A row takes
    episodes until the next one would pass `row_tokens` (a longer episode gets a row of its own):
    attention costs O(L²) per row, so rows stay short enough for it to remain small next to the
    per-token layers."""
    batch, steps = response_ids.shape
    prompts = [tuple(p[m.bool()].tolist()) for p, m in zip(prompt_ids, prompt_mask)]
    lengths = response_mask.sum(1).tolist()
    inputs = [r[: max(int(n) - 1, 0)].tolist() for r, n in zip(response_ids, lengths)]
    groups: dict[tuple, list[int]] = {}
    for b in sorted(range(batch), key=lambda b: (prompts[b], inputs[b], b)):
        groups.setdefault(prompts[b], []).append(b)
    distinct = list(groups)  # sorted by content: the same episodes in any order give the same rows, bit for bit
    common = common_prefix_length(distinct)  # a prompt equal to it has an empty remainder: its state s_0 is in the prefix

    rows: list[dict] = []
    where = torch.zeros(batch, steps, 2, dtype=torch.long)  # (row, column) of each state

    def new_row() -> dict:
        row = {"ids": list(distinct[0][:common]), "segment": [0] * common, "position": list(range(common)), "parent": [-1],
               "last": {}, "episodes": 0}
        rows.append(row)
        return row

    row = new_row()
    for prompt, members in groups.items():
        rest = prompt[common:]
        for b in members:
            need = len(inputs[b]) + (0 if prompt in row["last"] else len(rest))
            if row["episodes"] and len(row["ids"]) + need > row_tokens:
                row = new_row()
            if prompt not in row["last"]:
                seg = len(row["parent"])
                row["parent"].append(0)
                row["ids"] += rest
                row["segment"] += [seg] * len(rest)
                row["position"] += list(range(common, len(prompt)))
                row["last"][prompt] = (seg, len(row["ids"]) - 1 if rest else common - 1)
            group_segment, last = row["last"][prompt]
            seg = len(row["parent"])
            row["parent"].append(group_segment)
            start = len(row["ids"])
            row["ids"] += inputs[b]
            row["segment"] += [seg] * len(inputs[b])
            row["position"] += list(range(len(prompt), len(prompt) + len(inputs[b])))
            r = len(rows) - 1
            where[b, : int(lengths[b]), 0] = r
            where[b, : int(lengths[b]), 1] = torch.tensor([last] + list(range(start, start + len(inputs[b]))), dtype=torch.long)
            row["episodes"] += 1

    width = max(len(r["ids"]) for r in rows)
    segments = max(len(r["parent"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    parent = torch.full((len(rows), segments), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row["ids"])
        input_ids[r, :n], segment[r, :n], position_ids[r, :n] = torch.tensor(row["ids"]), torch.tensor(row["segment"]), torch.tensor(row["position"])
        parent[r, : len(row["parent"])] = torch.tensor(row["parent"])
    states = (where[..., 0] * width + where[..., 1]) * response_mask.long().to(where.device)
    return PackedEpisodes(input_ids, tree_mask(segment, parent), position_ids, states)


def pack_sequences(sequences: list[list[int]], row_tokens: int, pad_id: int = 0) -> PackedEpisodes:
    """Whole sequences in prefix-shared rows; `states[:, 0]` indexes each one's last token (where a
    reward model reads its score). Built as episodes whose prompt is the sequence and whose single
    action is never an input."""
    width = max(map(len, sequences))
    prompt_ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences])
    prompt_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    one = torch.ones(len(sequences), 1, dtype=torch.long)
    return pack_episodes(prompt_ids, prompt_mask, one * pad_id, one, row_tokens, pad_id)


def common_prefix_length(sequences) -> int:
    """How many leading tokens all the sequences share."""
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n
