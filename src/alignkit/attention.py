"""Attention kernels for prefix-shared rows (`packing`): the dense 4-D tree mask, or a FlexAttention block mask.

A prefix-shared row (a prompt computed once for its K responses: reward model, DPO, PPO passes) needs a
custom mask. Given as a dense [B, 1, L, L] tensor, it keeps SDPA on its unfused math kernel on CUDA; the
same mask as a FlexAttention `BlockMask` runs on a fused kernel that also skips the blocks no query sees.

`--attention_kernel`:
  dense  the dense mask through SDPA (or eager attention): the CPU path and the reference in tests;
  flex   tree rows through FlexAttention, compiled on CUDA; refused without a CUDA GPU, because FlexAttention
         has no backward pass on CPU (its forward runs there unfused, as tests use it);
  auto   flex on a CUDA GPU with FlexAttention, dense elsewhere.

With flex, the model's attention implementation becomes `TREE_FLEX`, registered with transformers: a
layer given a `BlockMask` runs FlexAttention, any other mask (plain padded batches, generation with a KV
cache) runs SDPA exactly as before. Conversion happens where the dense mask meets the model
(`packing.for_attention`), so the trainers and the row layouts are unchanged.

The block mask is built from per-token ids read off the dense mask: columns whose visibility to every later
query is identical form one group (a segment, or a chain of segments nobody branches from), and
query q may attend key k iff k ≤ q and `visible[group(q), group(k)]`, where `visible[s, t]` is the dense
mask at (last token of s, first token of t). The rebuilt mask is checked against the dense one, element
for element; a mask that is not a tree (none is built today) falls back to a mask_mod that reads the dense
mask itself.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

KERNELS = ("auto", "dense", "flex")
TREE_FLEX = "sdpa_tree_flex"  # "sdpa" in the name: transformers checks SDPA's availability for it, as for sdpa
BLOCK = 128  # FlexAttention's default block size; per-token ids are padded to a multiple of it


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_refusal(kernel: str) -> str | None:
    """Why `--attention_kernel kernel` cannot run on this machine, or None (checked before any model loads)."""
    if kernel != "flex":
        return None
    if not flex_available():
        return f"flex needs torch.nn.attention.flex_attention (torch {torch.__version__} has none); use dense or auto"
    if not torch.cuda.is_available():
        return "flex needs a CUDA GPU (none is visible): FlexAttention has no backward pass on CPU; use dense or auto here"
    return None


def resolve(kernel: str) -> str:
    """auto -> flex on a CUDA GPU with FlexAttention, else dense."""
    if kernel == "auto":
        return "flex" if flex_available() and torch.cuda.is_available() else "dense"
    return kernel


def use_attention_kernel(model: torch.nn.Module, kernel: str) -> str:
    """Switch every transformers model inside `model` (peft, reward-model and value-head wrappers included) to the
    attention for `kernel`; returns the kernel used. flex switches SDPA models only: eager attention (asked for
    on purpose), flash attention and sliding windows (no prefix sharing for them) stay as they are."""
    from transformers import PreTrainedModel

    if kernel == "auto":
        why = "a CUDA GPU with FlexAttention" if resolve(kernel) == "flex" else "no CUDA GPU with FlexAttention"
        logger.info(f"--attention_kernel auto: {resolve(kernel)} ({why})")
    kernel = resolve(kernel)
    if kernel == "dense":
        return kernel
    register()
    done: set[int] = set()
    for module in model.modules():  # pre-order: the outermost transformers model of each subtree comes first
        if id(module) in done or not isinstance(module, PreTrainedModel):
            continue
        done.update(id(m) for m in module.modules())
        if module.config._attn_implementation == "sdpa" and getattr(module.config, "sliding_window", None) is None:
            module.set_attn_implementation(TREE_FLEX)
    return kernel


@functools.cache
def register() -> None:
    """TREE_FLEX as a transformers attention implementation: SDPA's masks and kernel, FlexAttention for BlockMasks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TREE_FLEX, tree_flex_attention)
    AttentionMaskInterface.register(TREE_FLEX, sdpa_mask)


@functools.cache
def _flex_kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # compiled, it is one fused kernel; eager (CPU, tests) it materializes the scores like the math path
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention


def tree_flex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: query [B, H, L, D], key/value [B, Hkv, L, D] -> ([B, L, H, D], None)."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout > 0:
        raise ValueError(f"{type(module).__name__}: attention dropout ({dropout}) is not supported with --attention_kernel flex")
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads and heads & (heads - 1):  # as transformers' flex path: grouped kernels want power-of-two heads
        key, value = key.repeat_interleave(heads // kv_heads, 1), value.repeat_interleave(heads // kv_heads, 1)
    out = _flex_kernel(query.device.type)(query, key, value, block_mask=attention_mask, scale=scaling,
                                          enable_gqa=key.shape[1] != heads)
    return out.transpose(1, 2).contiguous(), None


def tree_ids(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(group [B, L] long, visible [B, G, G] bool) of a dense tree mask [B, 1, L, L] (see the module docstring).

    Column j starts a new group iff some query q ≥ j sees exactly one of the keys j − 1 and j."""
    dense = mask[:, 0]
    batch, width = dense.shape[0], dense.shape[-1]
    later = torch.ones(width, width - 1, dtype=torch.bool, device=dense.device).tril(-1)  # [q, j − 1]: q ≥ j
    differs = ((dense[:, :, 1:] != dense[:, :, :-1]) & later).any(1)  # [B, L − 1]
    starts = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=dense.device), differs], 1)
    group = starts.long().cumsum(1) - 1
    count = int(group[:, -1].max()) + 1
    columns = torch.arange(width, device=dense.device).expand(batch, width)
    first = torch.full((batch, count), width - 1, device=dense.device).scatter_reduce(1, group, columns, "amin")
    last = torch.zeros((batch, count), dtype=torch.long, device=dense.device).scatter_reduce(1, group, columns, "amax")
    rows = torch.arange(batch, device=dense.device)[:, None, None]
    visible = dense[rows, last[:, :, None], first[:, None, :]]  # groups a row lacks read arbitrary cells, never used
    return group, visible


def mask_from_ids(group: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The dense [B, 1, L, L] mask that (group, visible) stand for: what the block mask's mask_mod evaluates to."""
    width = group.shape[1]
    rows = torch.arange(group.shape[0], device=group.device)[:, None, None]
    causal = torch.ones(width, width, dtype=torch.bool, device=group.device).tril()
    return (visible[rows, group[:, :, None], group[:, None, :]] & causal)[:, None]


def tree_mask_mod(group: torch.Tensor, visible: torch.Tensor):
    """FlexAttention's mask_mod (batch, head, query, key) -> may attend, for (group, visible) of `tree_ids`.
    The ids are padded to whole blocks: a kernel may read indices past the row's end in its last block."""
    pad = -group.shape[1] % BLOCK
    group = torch.nn.functional.pad(group, (0, pad))

    def mask_mod(b, h, q, k):
        return (k <= q) & visible[b, group[b, q], group[b, k]]

    return mask_mod


def dense_mask_mod(mask: torch.Tensor):
    """The fallback mask_mod: reads the dense [B, 1, L, L] mask (padded to whole blocks)."""
    pad = -mask.shape[-1] % BLOCK
    dense = torch.nn.functional.pad(mask[:, 0], (0, pad, 0, pad))

    def mask_mod(b, h, q, k):
        return dense[b, q, k]

    return mask_mod


def tree_block_mask(mask: torch.Tensor):
    """The dense boolean tree mask [B, 1, L, L] as a FlexAttention BlockMask on the mask's device."""
    from torch.nn.attention.flex_attention import create_block_mask

    group, visible = tree_ids(mask)
    if torch.equal(mask_from_ids(group, visible), mask):
        mask_mod = tree_mask_mod(group, visible)
    else:
        logger.debug("attention mask is not a segment tree: the block mask reads the dense mask")
        mask_mod = dense_mask_mod(mask)
    batch, width = mask.shape[0], mask.shape[-1]
    return create_block_mask(mask_mod, batch, None, width, width, device=mask.device)
