"""FSDP2 (torch's `fully_shard`) behind accelerate's FSDP config, on any device, CPU included.

`accelerate launch --config_file configs/accelerate/fsdp.yaml` exports the config as ACCELERATE_USE_FSDP and
FSDP_* variables. accelerate 1.15 acts on them only when the process group is of a GPU-like kind: on a CPU
(gloo) its state is MULTI_CPU and it would wrap the model in plain DDP. So where accelerate would not shard,
this module does what its FSDP2 path does (in outline), from the same variables: one `fully_shard` unit per decoder layer
(the classes the config names, or the model's `_no_split_modules`), then the root, which keeps what is left
(embeddings, final norm, heads). Where accelerate does shard (GPUs), it is left to accelerate.

Every forward must enter through the root's `forward` (its hook gathers the root's parameters): the loss
helpers see an FSDP model and call the whole model, as under DDP (`alignkit.models.trunk_and_head`).
Gradients are reduce-scattered and averaged over processes as DDP averages them, so the loop's scaling holds.
The final save gathers one full state dict on rank 0 into an unsharded copy of the model made on the meta
device before sharding (no memory), which the stage saves as usual. Checkpoints gather the trainable weights
and the optimizer state the same way, into the files a 1-process run writes, and load by broadcasting them.

PPO's no-grad phases (sampling, old log-probs, critic and reference passes) call the policy's parts outside the
root's forward, and each process samples its own number of tokens: per-layer gathers would not pair up across
processes. `gathered` gives them a plain unsharded copy holding the full weights (one gather of every parameter,
then no collective until the phase ends); the training forward and backward go through the sharded root.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import weakref

import torch

logger = logging.getLogger(__name__)

# sharded model -> its unsharded twin on the meta device (filled with the full weights at the final save)
_SKELETONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).lower() == "true"


def fsdp_requested() -> bool:
    """The accelerate config asks for FSDP (`distributed_type: FSDP`, exported as ACCELERATE_USE_FSDP=true)."""
    return _flag("ACCELERATE_USE_FSDP")


def accelerate_shards(accelerator) -> bool:
    """Whether accelerate itself applies FSDP here (GPUs); otherwise (CPU) this module does."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp_config(cfg) -> None:
    """What alignkit's FSDP runs support, checked before any model loads (ValueError naming the setting): every
    trainer (SFT, RM, DPO, PPO/RLOO/GRPO); without a GPU (this module's own path)
    FSDP2 only, without offloading or accelerate's activation checkpointing."""
    if not torch.cuda.is_available():
        _check_cpu_settings()


def _check_cpu_settings() -> None:
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(f"the accelerate config asks for FSDP version {version} (fsdp_version); without a GPU alignkit runs FSDP2 "
                         "only: set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
    if _flag("FSDP_OFFLOAD_PARAMS"):
        raise ValueError("the accelerate config sets fsdp_offload_params: true; on a CPU the parameters are already in host memory: "
                         "set it to false")
    if _flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise ValueError("the accelerate config sets fsdp_activation_checkpointing: true; use alignkit's --gradient_checkpointing "
                         "instead (set it to false)")


def layer_classes(model: torch.nn.Module) -> set[str]:
    """The class names of the shard units: FSDP_TRANSFORMER_CLS_TO_WRAP (comma-separated) or else the
    `_no_split_modules` of the transformers models inside `model` (a peft or reward-model wrapper too)."""
    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    if named:
        return {name.strip() for name in named.split(",") if name.strip()}
    classes: set[str] = set()
    for module in model.modules():
        classes.update(getattr(module, "_no_split_modules", None) or [])
    if not classes:
        raise ValueError(f"{type(model).__name__}: no decoder-layer class to shard by (no _no_split_modules); name it with "
                         "fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    return classes


def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters live on the meta device (no memory); buffers and settings are copied.
    Tied parameters stay tied (deepcopy's memo maps each parameter once)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the root, over all processes (in place; returns the model)."""
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():  # each process keeps its slice of its own copy: start all from rank 0's, as DDP does
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor, src=0)
    reshard = _flag("FSDP_RESHARD_AFTER_FORWARD", "true")
    classes = layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no module of class {', '.join(sorted(classes))} to shard")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    # what this process really holds (tests read this line: under a silent fall-back to DDP it would be everything)
    local, total = local_elements(model)
    logger.info("FSDP2: rank %d holds %d of %d parameter elements (%d units of %s, plus the root)", torch.distributed.get_rank(),
                local, total, len(layers), ", ".join(sorted(classes)))
    return model


def prepare(accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """accelerator.prepare(model, optimizer); under FSDP, sharding the model here where accelerate would not (CPU),
    and pointing the optimizer, built on the unsharded parameters, at their shards. Under FSDP (either way) an
    unsharded copy on the meta device is kept for the final save."""
    if not fsdp_requested() or accelerator.num_processes == 1:
        return accelerator.prepare(model, optimizer)
    twin = meta_twin(model)
    if accelerate_shards(accelerator):  # GPUs: accelerate's own FSDP2 path (not run by alignkit's tests)
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        names = {id(p): name for name, p in model.named_parameters()}
        shard(model)
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        optimizer = accelerator.prepare(optimizer)  # not the model: accelerate would wrap it in DDP
    _SKELETONS[model] = twin
    return model, optimizer


def is_sharded(model: torch.nn.Module) -> bool:
    return model in _SKELETONS


def final_model(accelerator, model: torch.nn.Module) -> torch.nn.Module | None:
    """The model to save: accelerate's unwrapped model, or for an FSDP-sharded one its unsharded copy holding the
    full weights, gathered onto rank 0 (every process must call this; the others get None)."""
    if not is_sharded(model):
        return accelerator.unwrap_model(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    twin = _SKELETONS[model]
    twin.load_state_dict(full, assign=True, strict=True)
    _retie(twin)
    return twin


def _retie(model: torch.nn.Module) -> None:
    """assign=True gives each tied name its own tensor: make them one again in every transformers model inside
    `model` (a peft wrapper's, PPO's policy and critic)."""
    from transformers import PreTrainedModel

    inside: set[int] = set()
    for module in model.modules():  # pre-order: the outermost transformers model of each subtree comes first
        if id(module) not in inside and isinstance(module, PreTrainedModel):
            module.tie_weights()
            inside.update(id(m) for m in module.modules())


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """For phases without gradients that call a model's parts outside its forward, each process on its own (PPO's
    sampling, old log-probs, critic and reference passes): yields the model itself when it is not sharded, else an
    unsharded copy holding the full weights on every process, built from one gather of every parameter (every
    process must enter together). The phase then runs with no collective; the copy is dropped at the end, so the
    full weights live only during the phase (as FSDP's own unshard would hold them). The sharded model is left as
    it was: its training forward and backward gather layer by layer as usual."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # no cpu_offload: every rank gets it
    copy_ = meta_twin(_SKELETONS[model])  # a fresh copy: the skeleton stays empty for the final save
    copy_.load_state_dict(full, assign=True, strict=True)
    _retie(copy_)
    del full
    with torch.no_grad():
        yield copy_


def local_elements(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter elements this process holds, elements of the whole model): for an FSDP-sharded model at rest
    about total / processes; an unsharded model (or a layer left gathered) holds all of its elements."""
    from torch.distributed.tensor import DTensor

    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    return local, sum(p.numel() for p in model.parameters())


def eval_chunks(model: torch.nn.Module, examples: list, rank: int, world: int, size: int) -> list[tuple[list, bool]]:
    """This process's evaluation batches, (examples, counted): its share, examples[rank::world], by `size`. Under
    FSDP every forward gathers weights from all processes, so every process must run as many: one with fewer
    batches runs extra, uncounted ones (on the first examples) until it has as many as the largest share."""
    mine = examples[rank::world]
    chunks = [(mine[start : start + size], True) for start in range(0, len(mine), size)]
    if is_sharded(model) and examples:
        most = math.ceil(math.ceil(len(examples) / world) / size)
        chunks += [(examples[:size], False)] * (most - len(chunks))
    return chunks


# ---------------------------------------------------------------------------------------------
# checkpoints: a sharded run's state in the format of a 1-process checkpoint (full tensors, optimizer state
# numbered as torch numbers it), gathered to rank 0 to save and broadcast from rank 0 to load. So a checkpoint
# does not depend on how the run was sharded (nor on the number of processes holding the shards).


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """accelerate's wrapper's inner optimizer: torch's state-dict helpers may call its step() (with lr 0), which
    must not go through accelerate's gradient-accumulation bookkeeping."""
    return getattr(optimizer, "optimizer", optimizer)


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in the order `optimizer.state_dict()` numbers them (group by group)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
    """(trainable weights by name, optimizer state dict) of a sharded model, full tensors on rank 0's CPU, as a
    1-process run saves them (`trainable_state`, `optimizer.state_dict()`); None on the other ranks. Every process
    must call it (the shards are all-gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    inner = _torch_optimizer(optimizer)
    if not inner.state:  # no step taken yet (or all skipped): nothing sharded; torch's helper would take a step of lr 0 to fill it
        optim = inner.state_dict()
    else:
        by_name = get_optimizer_state_dict(model, inner, options=options)
        index = {name: i for i, name in enumerate(_parameter_names(model, inner))}
        optim = {"state": {index[name]: value for name, value in by_name.get("state", {}).items()},
                 "param_groups": [{**group, "params": [index[name] for name in group["params"]]} for group in by_name.get("param_groups", [])]}
    if torch.distributed.get_rank() != 0:
        return None
    # tied weights appear under each name in a state dict; a 1-process checkpoint holds each parameter once
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: value.contiguous() for name, value in weights.items() if name in trainable}, optim


def check_optimizer_state(optimizer: torch.optim.Optimizer, optim: dict) -> None:
    """A saved optimizer state dict fits this optimizer: as many groups, and state only for its parameters
    (ValueError otherwise, as torch's load_state_dict would say)."""
    inner = _torch_optimizer(optimizer)
    count = sum(len(group["params"]) for group in inner.param_groups)
    sizes = [len(group["params"]) for group in optim["param_groups"]]
    if sizes != [len(group["params"]) for group in inner.param_groups] or any(not 0 <= i < count for i in optim["state"]):
        raise ValueError(f"optimizer.pt holds parameter groups of sizes {sizes} for an optimizer whose groups have "
                         f"{[len(group['params']) for group in inner.param_groups]} parameters (a checkpoint of another model?)")


def load_checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict | None, optim: dict | None) -> None:
    """Load trainable weights and an optimizer state dict in the 1-process format (given on rank 0, None elsewhere)
    into a sharded model and its optimizer: rank 0 broadcasts each full tensor, every process keeps its shard.
    Every process must call it. Parameters without optimizer state in the checkpoint get none here either."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    inner = _torch_optimizer(optimizer)
    names = _parameter_names(model, inner)
    summary = [None if optim is None else {"stateful": [names[i] for i in optim["state"]], "param_groups": optim["param_groups"]}]
    torch.distributed.broadcast_object_list(summary, src=0)
    stateful, groups = set(summary[0]["stateful"]), summary[0]["param_groups"]
    # strict=False: the checkpoint holds the trainable weights only (a LoRA run's adapters), each tied weight once
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights or {}, options=options)
    if stateful:
        by_name = {} if optim is None else {
            "state": {names[i]: value for i, value in optim["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in optim["param_groups"]]}
        set_optimizer_state_dict(model, inner, by_name, options=options)
    params = [p for group in inner.param_groups for p in group["params"]]
    for name, param in zip(names, params):
        if name not in stateful:  # torch's helper fills a fresh optimizer's state with a step of lr 0 first
            inner.state.pop(param, None)
    for group, saved in zip(inner.param_groups, groups):  # hyperparameters (lr, initial_lr, ...) as torch's load_state_dict sets them
        group.update({key: value for key, value in saved.items() if key != "params"})
