"""The one training loop every trainer uses.

A trainer describes its stage; this module does the rest: accelerate (so `torchrun`/`accelerate launch`
give DDP), AdamW, the LR schedule, clipping, mixed precision, periodic eval, progress, metrics.jsonl,
checkpoints, exact resume and the final save. Two kinds of stage supply one step's worth of work:

- `Stage` (SFT, RM, DPO): examples, how to batch them and a batch loss; `batch_loss_step` runs one
  optimizer step over its gradient-accumulated micro-batches;
- `Iterations` (PPO/RLOO/GRPO): `iteration(step, engine)` makes experience and optimizes on it (several
  optimizer steps, each through `optimizer_step`), and returns the step's metrics row.

Normalization: the loss of one optimizer step is Σ(loss sums) / Σ(example weights) over all its
micro-batches on all processes. Every process knows the whole step's examples (the data order is
a pure function of the seed), so it computes that denominator locally, with no communication.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from alignkit import atomic
from alignkit.attention import flex_refusal, use_attention_kernel
from alignkit.config import TrainConfig, save_config
from alignkit.train.checkpoint import (  # noqa: F401  (find_checkpoint, trainable_state: used by ppo and tests)
    advance_schedule, drop_later_checkpoints, find_checkpoint, kill_point, load_checkpoint, nonfinite_step, prepare_output_dir, save_checkpoint,
    trainable_state,
)
from alignkit.precision import autocast, resolve_mixed_precision
from alignkit.progress import progress_bar
from alignkit.train import sharding
from alignkit.train.metrics import MetricsLog  # noqa: F401  (benchmarks time steps by wrapping MetricsLog.write)

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    """A batch-loss stage (SFT, RM, DPO): what the trainer tells the loop."""

    model: torch.nn.Module
    train_examples: list
    collate: Callable[[list], dict]  # examples -> batch of tensors
    loss: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]  # -> (sum, metric sums)
    weight: Callable[[Any], float]  # an example's share of the normalizer (e.g. its weighted token count)
    num_tokens: Callable[[Any], int]  # its non-padding tokens, for throughput
    save: Callable[[torch.nn.Module, Path], None]  # writes the final model in HF format
    eval_examples: list | None = None
    # values the stage sets once and exact resume must restore (JSON-serialisable); saved in every checkpoint
    state: dict = field(default_factory=dict)


@dataclass
class Engine:
    """What a stage's step works with: the accelerator and the prepared model and optimizer (a DDP module and
    accelerate's optimizer under torchrun), the LR schedule and the run's config."""

    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    cfg: TrainConfig


@dataclass
class Iterations:
    """A stage that runs its own optimizer steps within each loop step (PPO: one rollout-and-update iteration)."""

    model: torch.nn.Module  # what the optimizer trains (prepared by accelerate); kept in eval mode (no dropout)
    steps: int  # loop steps (iterations)
    schedule_steps: int  # optimizer steps the LR schedule spans
    iteration: Callable[[int, Engine], dict]  # (step, engine) -> the step's metrics row
    save: Callable[[torch.nn.Module, Path], None]  # writes the final model in HF format
    status: Callable[[dict], str] = lambda row: ""  # the progress bar's text for a row
    # values exact resume must restore (JSON-serialisable; the iteration may update them); saved in every checkpoint
    state: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# pieces


def load_datasets(cfg: TrainConfig, build: Callable[[str, str, str, dict], list], what: str) -> tuple[list, list | None, dict]:
    """Training and evaluation examples of a stage: `build(source, split, name, report)` for cfg.dataset and, if
    set, cfg.eval_dataset (built-in sources evaluate on their held-out "test" split). Returns them with the
    per-source report (counts of kept, truncated, dropped and invalid rows) that `write_data_report` saves."""
    prepare_output_dir(cfg)  # the first thing every batch-loss trainer does with the run: refuse to mix runs
    report: dict = {}
    train_examples = build(cfg.dataset, cfg.dataset_split, "train", report)
    eval_split = "test" if cfg.eval_dataset.startswith(("builtin:", "builtin_pref:")) else cfg.dataset_split
    eval_examples = build(cfg.eval_dataset, eval_split, "eval", report) if cfg.eval_dataset else None
    if not train_examples:
        raise ValueError(f"{cfg.dataset}: no usable {what} left (see the counts above)")
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # the trainer builds its model next: fresh LoRA adapters and heads are random, and must follow --seed
    return train_examples, eval_examples, report


def write_data_report(cfg: TrainConfig, report: dict) -> None:
    # rank 0 alone: it runs the output-dir guard, which another rank's early write would trip
    if int(os.environ.get("RANK", "0")) == 0:
        atomic.write_json(Path(cfg.output_dir, "data_report.json"), report)


def write_config(cfg: TrainConfig, output_dir: Path) -> None:
    save_config(cfg, output_dir / "config.yaml")  # atomic: a temporary name, then renamed


def save_final_model(save: Callable[[Path], None], output_dir: Path) -> None:
    """`save(folder)` writes the model into a temporary folder inside output_dir, whose files then replace
    the old ones one rename each: a kill during the (slow) save leaves the previous model intact."""
    tmp = output_dir / f".tmp-model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save(tmp)
        atomic.move_contents(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one settings singleton per process; a pipeline that runs several stages in one
    # process (or one stage in bf16 after another in fp32) needs a fresh one each time. The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # resolved once here ("auto" -> bf16 | no): every later reader (autocast, config.yaml) sees what runs
    cfg.mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    # without cpu=True and no GPU, each torchrun process would silently train alone. accelerate's own
    # mixed precision gives fp16 its loss scaler; the autocast of every forward is `forward_context`.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise RuntimeError(f"launched with WORLD_SIZE={expected} but accelerate sees {accelerator.num_processes} process(es)")
    return accelerator


def training_device() -> torch.device:
    """The device `make_accelerator`'s accelerator trains on, known before it exists (accelerate's process state,
    which it keeps): where a trainer loads the frozen models that are not prepared (PPO's reference and reward)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).device


def forward_context(cfg: TrainConfig, device):
    """The context every forward of a stage runs in: autocast under --mixed_precision (see alignkit.precision)."""
    return autocast(cfg.mixed_precision, device)


def enable_gradient_checkpointing(model: torch.nn.Module, in_eval_mode: bool = False) -> int:
    """--gradient_checkpointing: every transformers model inside `model` (a peft wrapper, a reward model, PPO's
    policy and critic) recomputes its layers' activations in the backward pass instead of keeping them.
    Non-reentrant checkpointing (the one torch recommends); with frozen embeddings (LoRA) the inputs are made to
    require grad, as transformers advises. transformers checkpoints only layers in training mode: `in_eval_mode`
    (PPO keeps dropout off) flags the decoder layers alone as training, so their dropout modules stay off.
    Returns how many models it was enabled on."""
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    inside_enabled: set[int] = set()
    enabled = 0
    for module in model.modules():  # pre-order: the outermost transformers model of each subtree comes first
        if id(module) in inside_enabled or not isinstance(module, PreTrainedModel) or not module.supports_gradient_checkpointing:
            continue
        if hasattr(module, "activation_checkpointing_enable"):  # transformers ≥ 5.x's name
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if any(not p.requires_grad for p in module.get_input_embeddings().parameters()):
            module.enable_input_require_grads()
        inside_enabled.update(id(m) for m in module.modules())
        enabled += 1
        if in_eval_mode:
            for layer in module.modules():
                if isinstance(layer, GradientCheckpointingLayer):
                    layer.training = True  # the flag of this module only: its dropout children stay in eval mode
    return enabled


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused=True: one kernel over all parameters instead of a Python loop of small ops (on SmolLM2 on CPU
    # ~650 ms -> ~100 ms per optimizer step); same update as the default implementation.
    params = decay + no_decay
    fused = bool(params) and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def micro_batches(num_examples: int, batch_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Endless stream of micro-batches (index lists), reshuffled each epoch from seed + epoch."""
    per_epoch = math.ceil(num_examples / batch_size)
    number = start
    while True:
        epoch, offset = divmod(number, per_epoch)
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for position in range(offset, per_epoch):
            yield order[position * batch_size : (position + 1) * batch_size]
            number += 1


REPORT_TO = ("none", "tensorboard", "wandb")


def check_sharding_backend(cfg: TrainConfig) -> None:
    """accelerate (1.15) turns on FSDP and DeepSpeed only on GPUs: on a CPU-only machine FSDP runs through
    alignkit.train.sharding (its supported settings checked here), and DeepSpeed, which needs CUDA, is refused
    instead of silently training as plain DDP; see docs/distributed.md."""
    if sharding.fsdp_requested():
        sharding.check_fsdp_config(cfg)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
        raise ValueError("the accelerate config asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true), which needs CUDA GPUs; this machine "
                         "has none. On CPU use configs/accelerate/fsdp.yaml (FSDP2) or configs/accelerate/ddp.yaml (DDP over gloo)")


def attention_kernel(cfg: TrainConfig) -> str:
    """--attention_kernel of the trainers with prefix-shared rows (RM, DPO, PPO); SFT has no such rows: dense."""
    return getattr(cfg, "attention_kernel", "dense")


def check_engine_flags(cfg: TrainConfig) -> None:
    """The engine's flags, checked before any model loads: --mixed_precision is resolved ("auto" -> bf16 | no,
    fp16 off CUDA refused), --attention_kernel flex needs CUDA, and --report_to must name a destination that is available."""
    cfg.mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    check_sharding_backend(cfg)
    if (why := flex_refusal(attention_kernel(cfg))) is not None:
        raise ValueError(f"--attention_kernel: {why}")
    if cfg.report_to not in REPORT_TO:
        raise ValueError(f"--report_to must be one of {' | '.join(REPORT_TO)}, got {cfg.report_to!r}")
    if cfg.report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--report_to wandb needs the wandb package (pip install wandb); --report_to tensorboard works offline") from None


# ---------------------------------------------------------------------------------------------
# one step's worth of work


def total_steps(cfg: TrainConfig, num_examples: int, world: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = cfg.gradient_accumulation_steps * world
    return max(1, math.ceil(cfg.num_train_epochs * math.ceil(num_examples / cfg.per_device_train_batch_size) / per_step))


@torch.no_grad()
def evaluate(stage: Stage, accelerator, model, cfg: TrainConfig) -> dict[str, float]:
    """Σ loss sums / Σ weights over the whole eval set, sharded over processes."""
    model.eval()
    examples = stage.eval_examples or []
    totals: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=accelerator.device)}
    for chunk, counted in sharding.eval_chunks(model, examples, accelerator.process_index, accelerator.num_processes, cfg.per_device_eval_batch_size):
        with forward_context(cfg, accelerator.device):
            loss_sum, metrics = stage.loss(model, _to_device(stage.collate(chunk), accelerator.device))
        if not counted:
            continue  # FSDP: a forward that only takes part in the other processes' weight gathering
        totals["loss"] += loss_sum.detach().float()
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0) + value.detach().float()
    model.train()
    denominator = sum(stage.weight(e) for e in examples)
    reduced = {k: accelerator.reduce(v, reduction="sum").item() / max(denominator, 1e-12) for k, v in sorted(totals.items())}
    return {f"eval_{k}": v for k, v in reduced.items()}


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _grad_norm(model, cfg: TrainConfig, accelerator) -> tuple[float | None, float | None]:
    """(the norm to log: clipped's pre-clip norm, or None without clipping; the norm to check for inf/nan,
    None under fp16, whose loss scaler skips overflowing steps itself)."""
    if cfg.max_grad_norm > 0:
        norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        return norm, None if cfg.mixed_precision == "fp16" else norm
    if cfg.mixed_precision == "fp16":
        return None, None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return None, float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def optimizer_step(engine: Engine, loss: float, step: int) -> tuple[float | None, bool]:
    """After the backward passes of one update: clip, check loss and gradient for inf/nan, step the optimizer
    (fp16: through accelerate's loss scaler), advance the schedule, clear the gradients. Every process holds
    the same (all-reduced) gradients and loss, so all agree on skipping. Returns (the gradient norm to log,
    whether --skip_nonfinite skipped the update)."""
    grad_norm, checked_norm = _grad_norm(engine.model, engine.cfg, engine.accelerator)
    skipped = nonfinite_step(loss, checked_norm, step, engine.cfg)
    if not skipped:  # a skipped update keeps weights and moments; the schedule still advances (LR = f(step))
        engine.optimizer.step()
    advance_schedule(engine.scheduler)
    engine.optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def batch_loss_step(stage: Stage, engine: Engine, examples: list[list], step: int) -> tuple[dict, float | None, bool]:
    """One optimizer step of a batch-loss stage over `examples`, the step's micro-batches on all processes (this
    process takes its share). Returns (this process's metric sums, each / the step's denominator; the gradient
    norm; whether the step was skipped)."""
    accelerator, model, cfg = engine.accelerator, engine.model, engine.cfg
    world, rank = accelerator.num_processes, accelerator.process_index
    denominator = sum(stage.weight(e) for batch in examples for e in batch)
    mine = examples[rank::world]
    sums = {"loss": torch.zeros((), device=accelerator.device)}
    for index, chunk in enumerate(mine):
        batch = _to_device(stage.collate(chunk), accelerator.device)
        sync = index == len(mine) - 1
        with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
            with forward_context(cfg, accelerator.device):
                loss_sum, metrics = stage.loss(model, batch)
            # DDP averages gradients over processes; scale so the result is the step's sum / denominator
            accelerator.backward(loss_sum * (world / denominator))
        sums["loss"] += loss_sum.detach().float() / denominator
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0) + value.detach().float() / denominator
    step_loss = float(accelerator.reduce(sums["loss"], reduction="sum")) if world > 1 else float(sums["loss"])
    grad_norm, skipped = optimizer_step(engine, step_loss, step)
    return sums, grad_norm, skipped


@dataclass
class Window:
    """A batch-loss stage's metric sums over the steps since the last logged row; saved in checkpoints (the sums
    per process), so a resumed run logs the rows of an uninterrupted one."""

    sums: dict
    steps: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def means(self, accelerator) -> dict:
        """The window's means (reduced over processes; None when every step was skipped) and throughput; starts a new window."""
        row = {k: accelerator.reduce(v, reduction="sum").item() / self.steps if self.steps else None for k, v in self.sums.items()}
        row["tokens_per_second"] = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.sums = {key: torch.zeros((), device=accelerator.device) for key in self.sums}
        self.steps, self.tokens = 0, 0
        return row


def _batch_loss_row(stage: Stage, engine: Engine, stream, window: Window, state: dict, step: int, logging: bool) -> dict | None:
    """Run step `step` of a batch-loss stage; its metrics row when `logging` (the window's means), else None."""
    cfg = engine.cfg
    per_step = cfg.gradient_accumulation_steps * engine.accelerator.num_processes
    examples = [[stage.train_examples[i] for i in next(stream)] for _ in range(per_step)]
    learning_rate = engine.scheduler.get_last_lr()[0]
    sums, grad_norm, skipped = batch_loss_step(stage, engine, examples, step)
    step_tokens = sum(stage.num_tokens(e) for batch in examples for e in batch)
    state["nonfinite_skipped"] += skipped
    state["tokens"] += step_tokens
    window.tokens += step_tokens
    if not skipped:
        window.steps += 1
        for key, value in sums.items():
            window.sums[key] = window.sums.get(key, 0) + value
    if not logging:
        return None
    means = window.means(engine.accelerator)
    tokens_per_second = means.pop("tokens_per_second")
    micro_per_epoch = math.ceil(len(stage.train_examples) / cfg.per_device_train_batch_size)
    return {"epoch": round(step * per_step / micro_per_epoch, 4), **means, "learning_rate": learning_rate, "grad_norm": grad_norm,
            "tokens": state["tokens"], "tokens_per_second": tokens_per_second,
            **({"nonfinite_skipped": state["nonfinite_skipped"]} if cfg.skip_nonfinite else {})}


def _status(row: dict) -> str:
    loss = "skipped" if row["loss"] is None else f"{row['loss']:.4f}"
    return f"loss {loss}  {row['tokens_per_second']:.0f} tok/s"


# ---------------------------------------------------------------------------------------------
# the shell


def _resume(cfg: TrainConfig, accelerator, model, optimizer, scheduler, output_dir: Path) -> tuple[dict, dict]:
    """(trainer state, this process's unlogged metric sums) from --resume_from_checkpoint, or fresh ones."""
    state = {"step": 0, "tokens": 0, "nonfinite_skipped": 0}
    checkpoint = find_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
    if checkpoint is None:
        return state, {}
    saved, process_state = load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler)
    state.update(saved)
    if accelerator.is_main_process:
        drop_later_checkpoints(output_dir, state["step"])
    logger.info("resumed from %s at step %d", checkpoint, state["step"])
    return state, process_state


def train(stage: Stage | Iterations, cfg: TrainConfig) -> dict:
    """Run the stage's steps; write metrics, checkpoints and the final model to cfg.output_dir. Returns the last row."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, output_dir)
    world = accelerator.num_processes
    batch_loss = isinstance(stage, Stage)

    model = stage.model
    use_attention_kernel(model, attention_kernel(cfg))  # before sharding wraps it; a no-op for dense
    model.train(batch_loss)  # iterations (PPO) keep dropout off: sampling and training log-probs must agree
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, in_eval_mode=not batch_loss)
    optimizer = make_optimizer(model, cfg)
    steps = total_steps(cfg, len(stage.train_examples), world) if batch_loss else stage.steps
    scheduler = make_scheduler(optimizer, cfg, steps if batch_loss else stage.schedule_steps)
    model, optimizer = sharding.prepare(accelerator, model, optimizer)  # FSDP where accelerate would not shard (CPU)
    engine = Engine(accelerator, model, optimizer, scheduler, cfg)

    state, process_state = _resume(cfg, accelerator, model, optimizer, scheduler, output_dir)
    stage.state.update(state.pop("stage", {}))
    log = MetricsLog(output_dir / "metrics.jsonl", accelerator.is_main_process, state["step"], cfg.report_to, config=cfg)
    window = Window({"loss": torch.zeros((), device=accelerator.device),
                     **{k: v.to(accelerator.device) for k, v in process_state.get("window", {}).items()}},
                    state.pop("window_steps", 0), state.pop("window_tokens", 0))
    if batch_loss:
        start = state["step"] * cfg.gradient_accumulation_steps * world
        stream = micro_batches(len(stage.train_examples), cfg.per_device_train_batch_size, cfg.seed, start)
    last_row: dict = {}

    with progress_bar(cfg.progress and accelerator.is_main_process) as progress:
        bar = progress.add_task("train" if batch_loss else "iterations", total=steps, completed=state["step"], status="")
        while state["step"] < steps:
            step = state["step"] + 1
            logging_step = step % cfg.logging_steps == 0 or step == steps
            if batch_loss:
                row = _batch_loss_row(stage, engine, stream, window, state, step, logging_step)
            else:
                row = stage.iteration(step, engine)
            state["step"] = step
            if logging_step:
                last_row = {"step": step, **row}
                log.write(last_row)
                progress.update(bar, status=_status(last_row) if batch_loss else stage.status(last_row))
            if batch_loss and stage.eval_examples and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == steps):
                eval_row = {"step": step, **evaluate(stage, accelerator, model, cfg)}
                log.write(eval_row)
                last_row = {**last_row, **eval_row}
            kill_point("ALIGNKIT_KILL_AT_STEP", step)
            if cfg.save_steps and step % cfg.save_steps == 0:
                save_checkpoint(output_dir / "checkpoints" / f"step-{step}", accelerator, model, optimizer, scheduler,
                                {**state, "stage": dict(stage.state), "window_steps": window.steps, "window_tokens": window.tokens},
                                cfg.save_total_limit, cfg, {"window": {k: torch.as_tensor(v).detach().cpu() for k, v in window.sums.items()}})
            if window.tokens == 0:
                window.start = time.perf_counter()  # eval and checkpoint time stay out of tokens/s
            progress.update(bar, completed=step)

    log.close()
    accelerator.wait_for_everyone()
    final = sharding.final_model(accelerator, model)  # under FSDP every process takes part in gathering the weights
    if accelerator.is_main_process:
        save_final_model(lambda folder: stage.save(final, folder), output_dir)
    accelerator.wait_for_everyone()
    return last_row
