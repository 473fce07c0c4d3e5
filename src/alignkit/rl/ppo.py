"""PPO for language models (and the critic-free RLOO/GRPO estimators in the same loop).

One iteration (= one --max_steps step of the training loop, `train.loop.train`):
  1. rollout: sample k responses to each of --rollout_batch_size prompts (`rl.rollout`). The sampler
     keeps log π_old of each action and, from a hook on the LM head, the entropy and V_old (value head) of
     each state: no second pass of the policy (--recompute_old_logprobs asks for one);
  2. score them (`alignkit.rl.rewards.build_reward`), apply the missing-EOS penalty, normalization, clipping;
  3. log π_ref with teacher forcing (and V_old from a separate critic, if any: with one minibatch per
     iteration that pass keeps its graph and serves as the first update's critic forward); per-token
     reward r_t = −β·KL_t (+ the score at the last token);
  4. advantages: GAE on the value head (gae), or a per-response baseline (rloo / grpo) — steps 1–4 are
     `rl.experience.make_experience`;
  5. --num_ppo_epochs passes of minibatches (`optimize`): clipped policy loss + vf_coef · clipped value loss
     (+ ptx_coef · LM loss on --ptx_dataset), stopping early when the approximate KL to π_old > kl_early_stop;
  6. adaptive β (when --kl_target > 0) and the iteration's metrics row; the loop logs, checkpoints, saves.

Dropout is off throughout (the policy stays in eval mode), so the ratio π/π_old is 1 before the first
update (up to float rounding between the sampler's KV-cache decode and the training forward). The sampling
seed of iteration i is a function of (--seed, i, process), so resuming from a checkpoint replays the same
rollouts.

Several processes (torchrun / accelerate launch): `ActorCritic` is prepared by accelerate (DDP), so the
gradients of each update are all-reduced by the engine. Process r of W samples, scores and trains on its
N/W rows of the global batch (`experience.Processes`), which it holds as local slots. Each epoch permutes
the slots (one permutation, the same on every process) and a minibatch is the same M/W slots on every
process, so every process takes part in every backward with as many rows as the others. Each process's
loss is its rows' sum divided by the minibatch's global token count, times W (DDP averages): the gradient
is that of the global minibatch's loss. With one process the slots are the rows and this is the
single-process update; W processes make the same update as one process holding the same global batch when a
minibatch is the whole batch (--mini_batch_size ≥ rollout_batch_size · k); with several minibatches the
partition into minibatches differs (the same in distribution), because it is drawn over N/W slots, not N rows.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import PPOConfig
from alignkit.data.formats import InvalidRows
from alignkit.data.prompts import PromptExample, load_prompts
from alignkit.data.tokenize import Formatting
from alignkit.losses import KL_ESTIMATORS, kl_controller, kl_penalty, ppo_policy_loss_sum, ppo_value_loss_sum
from alignkit.models import LoraSettings, apply_lora, load_causal_lm, load_tokenizer, save_model, unwrap_base
from alignkit.rl.experience import Experience, Processes, make_experience, score_responses
from alignkit.rl.rollout import ActorCritic
from alignkit.train import sharding
from alignkit.train.checkpoint import prepare_output_dir
from alignkit.train.loop import Engine, Iterations, check_engine_flags, forward_context, micro_batches, optimizer_step, train, training_device

ESTIMATORS = ("gae", "rloo", "grpo")
logger = logging.getLogger(__name__)


def _check(cfg: PPOConfig) -> None:
    check_engine_flags(cfg)  # --mixed_precision (fp16 off CUDA is refused) and --report_to, before any model loads
    if not cfg.dataset:
        raise ValueError("--dataset is required (prompts: {'prompt'} or {'messages'} rows, or builtin:TASK)")
    if cfg.advantage_estimator not in ESTIMATORS:
        raise ValueError(f"--advantage_estimator must be one of {ESTIMATORS}, got {cfg.advantage_estimator!r}")
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"--kl_estimator must be one of {KL_ESTIMATORS}, got {cfg.kl_estimator!r}")
    if cfg.advantage_estimator != "gae" and cfg.num_samples_per_prompt < 2:
        raise ValueError(f"--advantage_estimator {cfg.advantage_estimator} needs --num_samples_per_prompt ≥ 2")
    if min(cfg.max_steps, cfg.mini_batch_size, cfg.rollout_batch_size, cfg.num_ppo_epochs) <= 0:
        raise ValueError("--max_steps, --rollout_batch_size, --mini_batch_size and --num_ppo_epochs must be positive")
    if cfg.ptx_coef > 0 and not cfg.ptx_dataset:
        raise ValueError("--ptx_coef needs --ptx_dataset")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for flag, value in (("rollout_batch_size", cfg.rollout_batch_size), ("mini_batch_size", cfg.mini_batch_size)):
        if value % world:
            raise ValueError(f"--{flag} {value} must be a multiple of the number of processes ({world})")


def _ptx_examples(cfg: PPOConfig, tokenizer) -> list:
    from alignkit.data.formats import load_sft_examples
    from alignkit.data.tokenize import tokenize_all
    from alignkit.train.sft import SFTExample

    rows, _ = load_sft_examples(cfg.ptx_dataset, cfg.dataset_split, InvalidRows(skip=cfg.skip_invalid))
    tokenized = tokenize_all(rows, tokenizer, Formatting(cfg.use_chat_template, cfg.separator, 1.0), cfg.max_length, cfg.truncation)
    return [SFTExample(i, w) for i, w in zip(tokenized.input_ids, tokenized.weights)]


def optimize(cfg: PPOConfig, procs: Processes, engine: Engine, exp: Experience, step: int, ptx: list, state: dict, pad_id: int) -> dict:
    """Step 5: epochs × minibatches of the global batch, one optimizer step each, through the prepared
    (DDP) module; `state["ptx_batches"]` counts the PPO-ptx batches drawn (a function of it, so resume replays them)."""
    from alignkit.train.sft import SFTExample
    from alignkit.train.sft import collate as sft_collate

    accelerator, model, device = engine.accelerator, engine.model, engine.accelerator.device
    n_local, per_process = len(exp.mask), cfg.mini_batch_size // procs.world
    start = time.perf_counter()
    totals, updates, trained_tokens, stopped, first_ratio_error = {}, 0, 0.0, False, float("nan")
    skipped = 0  # updates whose loss or gradient was not finite (--skip_nonfinite)
    for epoch in range(cfg.num_ppo_epochs):
        order = torch.randperm(n_local, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step * 31 + epoch)).tolist()
        for first in range(0, n_local, per_process):
            slots = order[first : first + per_process]  # the same slots on every process
            rows = procs.global_rows(slots)
            tokens = exp.lengths[rows].sum().clamp(min=1)  # the minibatch's response tokens, on all processes
            index = torch.tensor(slots, device=device)
            m, old = exp.mask[index], exp.old_logp[index]
            values = None
            if exp.first_values is not None:  # epoch 0's only minibatch: V at θ_old is V_old, graph and all
                values, exp.first_values = exp.first_values[index], None
            ptx_batch, normalizer = None, 1.0
            if ptx:  # every process draws the same rows and trains on its share of them
                ptx_rows = next(micro_batches(len(ptx), cfg.mini_batch_size, cfg.seed + 1, state["ptx_batches"]))
                state["ptx_batches"] += 1
                normalizer = max(sum(sum(ptx[i].weights[1:]) for i in ptx_rows), 1e-12)
                share = [ptx[i] for i in ptx_rows[procs.rank :: procs.world]]
                if not share and sharding.is_sharded(model):  # FSDP: every process runs as many layer forwards (each gathers weights)
                    share = [SFTExample(ptx[ptx_rows[0]].input_ids, [0.0] * len(ptx[ptx_rows[0]].weights))]  # weight 0: adds nothing
                if share:
                    ptx_batch = {k: v.to(device) for k, v in sft_collate(share, pad_id).items()}
            with forward_context(cfg, device):
                out, ptx_sum = model(exp.episodes.select(slots), cfg.temperature, cfg.shared_prefix_tokens, values, ptx_batch)
            # sums over this process's rows: policy loss, clipped, value loss, value clipped, k3 KL to π_old, ptx loss
            sums = torch.zeros(6, device=device)
            ratio_error = ((out.logprobs.detach() - old).exp() - 1).abs().mul(m).max()
            sums[4] = (kl_penalty(out.logprobs.detach(), old, "k3") * m).sum()
            policy_sum, sums[1] = ppo_policy_loss_sum(out.logprobs, old, exp.advantages[index], m, cfg.cliprange)
            loss, sums[0] = policy_sum / tokens, policy_sum.detach()
            if exp.returns is not None:
                value_sum, sums[3] = ppo_value_loss_sum(out.values, exp.old_values[index], exp.returns[index], m, cfg.cliprange_value)
                loss, sums[2] = loss + cfg.vf_coef * value_sum / tokens, value_sum.detach()
            if ptx_sum is not None:
                loss, sums[5] = loss + cfg.ptx_coef * ptx_sum / normalizer, ptx_sum.detach()
            sums = procs.sum(sums) / torch.cat([tokens.expand(5), torch.tensor([normalizer], device=device)])
            if epoch == 0 and first == 0:  # no update yet this iteration: π/π_old must be 1
                first_ratio_error = float(procs.max(ratio_error))
            if cfg.kl_early_stop > 0 and float(sums[4]) > cfg.kl_early_stop:
                accelerator.backward(loss * 0)  # DDP expects a backward for each forward; no update follows
                engine.optimizer.zero_grad(set_to_none=True)
                stopped = True  # the updates so far moved π too far from π_old: skip the rest
                break
            # DDP averages over the W processes: × W makes the gradient Σ_processes ∂(rows' sum)/∂θ / tokens
            accelerator.backward(loss * procs.world)
            metrics = {"policy_loss": sums[0], "clipfrac": sums[1], "approx_kl": sums[4]}
            if exp.returns is not None:
                metrics.update(value_loss=sums[2], value_clipfrac=sums[3])
            if ptx:
                metrics["ptx_loss"] = sums[5]
            step_loss = float(sums[0] + cfg.vf_coef * sums[2] + cfg.ptx_coef * sums[5])
            _, was_skipped = optimizer_step(engine, step_loss, step)
            if was_skipped:
                skipped += 1
                continue
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            updates += 1
            trained_tokens += float(exp.tokens[rows].sum())
        if stopped:
            break
    seconds = time.perf_counter() - start
    return {**{key: value / max(updates, 1) for key, value in totals.items()}, "ppo_updates": updates,
            "ratio_error_before_update": first_ratio_error, "early_stopped": stopped,
            **({"nonfinite_skipped": skipped} if cfg.skip_nonfinite else {}),
            "training_tokens_per_second": trained_tokens / max(seconds, 1e-9), "seconds": seconds}


OVEROPTIMIZATION_WINDOW = 4  # iterations


def _slope(values: list[float]) -> float:
    """Least-squares slope of values against 0, 1, 2, ..."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / sum((x - mean_x) ** 2 for x in range(n))


def overoptimized(proxy: list[float], gold: list[float], window: int = OVEROPTIMIZATION_WINDOW) -> bool:
    """Reward over-optimization (Gao et al. 2022): over the last `window` iterations the trained-on score rose
    (positive least-squares slope) while the gold score of the same samples fell (negative slope)."""
    if len(proxy) < window or len(gold) < window:
        return False
    return _slope(proxy[-window:]) > 0 and _slope(gold[-window:]) < 0


def _build_models(cfg: PPOConfig, device) -> tuple[ActorCritic, torch.nn.Module | None]:
    """(policy with its value head or critic, frozen reference or None = the policy with its adapters disabled)."""
    lm = load_causal_lm(cfg.model_name_or_path)
    fresh_lora = cfg.use_peft and not hasattr(lm, "peft_config")
    if fresh_lora:
        lm = apply_lora(lm, LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules))
    if cfg.ref_model:
        ref = load_causal_lm(cfg.ref_model).requires_grad_(False).eval()
    elif fresh_lora:
        ref = None  # the starting policy = the policy with its new adapter disabled
    else:  # (a LoRA SFT output is its own adapter: the reference is a frozen copy of it)
        ref = copy.deepcopy(lm).requires_grad_(False).eval()
    value_head, critic = None, None
    if cfg.advantage_estimator == "gae" and cfg.critic_model:
        from alignkit.reward_model import load_reward_model, reward_head

        critic, head_is_new = load_reward_model(cfg.critic_model)
        if not critic.decoder:
            raise ValueError(f"--critic_model {cfg.critic_model}: needs a decoder (causal LM or decoder reward model), not an encoder")
        if head_is_new:
            torch.nn.init.zeros_(reward_head(critic.model).weight)
    elif cfg.advantage_estimator == "gae":
        value_head = torch.nn.Linear(unwrap_base(lm).config.hidden_size, 1)
        torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)
    policy = ActorCritic(lm, value_head, critic).to(device)
    return policy, ref.to(device) if ref is not None else None


def _save_policy(policy: ActorCritic, tokenizer, folder: Path) -> None:
    """The policy in HF format, plus value_head.safetensors or critic/."""
    save_model(policy.lm, tokenizer, folder)
    if policy.value_head is not None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in policy.value_head.state_dict().items()}, str(folder / "value_head.safetensors"))
    if policy.critic is not None:
        policy.critic.model.save_pretrained(folder / "critic", safe_serialization=True)


@dataclass
class PPORun:
    """What an iteration works with besides the engine; `state` (β, update and ptx-batch counts) is the stage's
    resumable state."""

    cfg: PPOConfig
    procs: Processes
    tokenizer: object
    prompts: list[PromptExample]
    reward: object
    gold: object | None
    ref: torch.nn.Module | None
    ptx: list
    state: dict
    history: dict = field(default_factory=lambda: {"score": [], "gold_score": []})
    stream: object = None  # the prompt order, from the first iteration run (resume: the checkpoint's step)
    kl_control: object = None  # β, fixed or adapted towards --kl_target; from state["kl_coef"] at the first iteration run

    def iteration(self, step: int, engine: Engine) -> dict:
        cfg, procs, k, device = self.cfg, self.procs, self.cfg.num_samples_per_prompt, engine.accelerator.device
        if self.stream is None:  # the first iteration this run makes: the loop has restored `state`
            self.stream = micro_batches(len(self.prompts), cfg.rollout_batch_size, cfg.seed, step - 1)
            self.kl_control = kl_controller(self.state["kl_coef"], cfg.kl_target, cfg.kl_horizon)
        kl_control = self.kl_control
        mine = [self.prompts[i] for i in next(self.stream)][procs.rank :: procs.world]
        batch = [p for p in mine for _ in range(k)]
        sharded = sharding.is_sharded(engine.model)
        # sampling, scoring, reference and critic passes: on the whole policy (under FSDP a gathered copy, see sharding.gathered)
        with sharding.gathered(engine.accelerator.unwrap_model(engine.model)) as policy, forward_context(cfg, device):
            exp = make_experience(cfg, procs, policy, self.ref, self.reward, self.tokenizer, batch, step, kl_control.value, device,
                                  critic_graph=not sharded)
        if self.gold is not None:  # the same samples, scored by the gold function
            gold_raw, _ = score_responses(self.gold, exp.episodes, batch, device)
            exp.stats["gold_score"] = float(procs.gather(gold_raw).mean())
            self._watch_overoptimization(step, exp.stats)
        update = optimize(cfg, procs, engine, exp, step, self.ptx, self.state, self.tokenizer.pad_token_id)
        if sharded:  # what this process holds after the update (tests read it: a no-op shard would hold everything)
            logger.info("FSDP2: rank %d holds %d of %d policy parameter elements after iteration %d", procs.rank,
                        *sharding.local_elements(engine.model), step)
        self.state["updates"] += update["ppo_updates"]
        kl_control.update(exp.stats["kl"], len(exp.lengths))
        self.state["kl_coef"] = kl_control.value
        # the slowest process sets the pace of each phase
        names = [*exp.seconds, "update"]
        seconds = procs.max(torch.tensor([*exp.seconds.values(), update.pop("seconds")], device=device)).tolist()
        return {**exp.stats, **update, "learning_rate": engine.scheduler.get_last_lr()[0],
                "generation_tokens_per_second": float(exp.lengths.sum()) / max(seconds[0], 1e-9),
                **{f"seconds/{name}": round(s, 4) for name, s in zip(names, seconds)}}

    def _watch_overoptimization(self, step: int, stats: dict) -> None:
        for key in self.history:
            self.history[key].append(stats[key])
        score, gold, n = self.history["score"], self.history["gold_score"], OVEROPTIMIZATION_WINDOW
        if overoptimized(score, gold) and self.procs.rank == 0:
            logger.warning("iteration %d: over-optimization? over the last %d iterations the score rose (%.3f -> %.3f) while the "
                           "gold score fell (%.3f -> %.3f)", step, n, score[-n], score[-1], gold[-n], gold[-1])


def run_ppo(cfg: PPOConfig) -> dict:
    """Train cfg.model_name_or_path with PPO/RLOO/GRPO on the prompts of cfg.dataset; returns the last metrics row."""
    from accelerate.utils import set_seed

    from alignkit.rl.rewards import build_reward

    _check(cfg)
    prepare_output_dir(cfg)  # before anything loads: refuse to mix runs
    device, k = training_device(), cfg.num_samples_per_prompt
    procs = Processes(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")), k)
    set_seed(cfg.seed)  # fresh LoRA adapters are random (DDP then starts every process from rank 0's)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    prompts = load_prompts(cfg.dataset, cfg.dataset_split, tokenizer, Formatting(cfg.use_chat_template, cfg.separator),
                           cfg.max_prompt_length, cfg.skip_invalid, verbose=procs.rank == 0)
    reward = build_reward(cfg.reward_model, cfg.reward_fn, cfg.reward_weights, device=device)
    gold = build_reward("", cfg.gold_reward_fn) if cfg.gold_reward_fn else None  # log only, never trained on
    ptx = _ptx_examples(cfg, tokenizer) if cfg.ptx_coef > 0 else []
    policy, ref = _build_models(cfg, device)
    run = PPORun(cfg, procs, tokenizer, prompts, reward, gold, ref, ptx, {"kl_coef": cfg.kl_coef, "updates": 0, "ptx_batches": 0})
    updates_per_iteration = cfg.num_ppo_epochs * math.ceil(cfg.rollout_batch_size * k / cfg.mini_batch_size)
    stage = Iterations(model=policy, steps=cfg.max_steps, schedule_steps=cfg.max_steps * updates_per_iteration, iteration=run.iteration,
                       save=lambda model, folder: _save_policy(model, tokenizer, folder), state=run.state,
                       status=lambda row: f"score {row['score']:.3f}  kl {row['kl']:.3f}")
    return train(stage, cfg)
