"""The learning tests' training runs, as functions of a seed: the tests call them with their own seed, and
this file run as a script calls them over many seeds to measure the spread behind each test's bound.

    OMP_NUM_THREADS=1 PYTHONPATH=src python tests/learning.py sft|dpo|ppo|big_beta|rloo|grpo|self_instruct SEEDS WORKDIR

SEEDS is a comma list (e.g. 2,4,5). One JSON line per seed: the quantities the test asserts on, and the wall time.
Seed 42 is each test's own run. For SFT and DPO a seed s sets the tiny model's initialisation and `--seed` (42: model
seed 0 with `--seed 42`); the PPO runs share the test's model and vary `--seed` (the sampling and head init).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------- SFT


def sft_learns_comparison(tmp_path: Path, seed: int = 42) -> dict:
    """tests/test_sft.py::test_sft_learns_a_task_and_generalizes_to_held_out_items: a hidden-128, 2-layer model,
    400 steps of batch 32 on 2,000 'which number is larger' rows; exact match on 100 unseen test pairs."""
    from alignkit.config import SFTConfig
    from alignkit.data import tasks
    from alignkit.data.formats import write_jsonl
    from alignkit.evaluate.tasks import exact_match_eval
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.testing import make_tiny_model
    from alignkit.train.sft import formatting, run_sft

    model_dir = make_tiny_model(tmp_path / "model", hidden_size=128, num_layers=2, seed=0 if seed == 42 else seed)
    data = tmp_path / "train.jsonl"
    write_jsonl(tasks.make_task("comparison", "train", 2000, seed=0), data)
    fmt = dict(use_chat_template="no", separator=" = ")
    run_sft(SFTConfig(model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(tmp_path / "out"), max_steps=400,
                      per_device_train_batch_size=32, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_ratio=0.05,
                      logging_steps=50, progress=False, max_length=128, seed=seed, **fmt))
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    test_rows = tasks.make_task("comparison", "test", 100)
    tokenizer = load_tokenizer(str(model_dir))
    cfg = SFTConfig(**fmt)
    before = exact_match_eval(load_causal_lm(str(model_dir)), tokenizer, test_rows, formatting(cfg), max_new_tokens=6)
    after = exact_match_eval(load_causal_lm(str(tmp_path / "out")), tokenizer, test_rows, formatting(cfg), max_new_tokens=6)
    return {"exact_match_before": before["exact_match"], "exact_match_after": after["exact_match"],
            "loss_ratio": rows[-1]["loss"] / rows[0]["loss"]}


# ---------------------------------------------------------------------------------------------- DPO


def dpo_after_sft(tmp_path: Path, seed: int = 42) -> dict:
    """tests/test_dpo.py::test_dpo_teaches_the_preferred_answer_after_sft: 150 SFT steps on 'which number is larger'
    (hidden 64), then 40 DPO steps (β 1, --sft_weight 1) on larger-over-smaller pairs; held-out implicit-reward
    accuracy, and the mean probability of sampling the chosen / rejected answer before and after DPO."""
    import torch

    from alignkit.config import DPOConfig, SFTConfig
    from alignkit.models import load_causal_lm, load_tokenizer
    from alignkit.testing import make_tiny_model
    from alignkit.train import dpo
    from alignkit.train.sft import run_sft

    model_dir = make_tiny_model(tmp_path / "model", hidden_size=64, num_layers=2, seed=0 if seed == 42 else seed)
    tokenizer = load_tokenizer(str(model_dir))
    fmt = dict(use_chat_template="no", separator=" = ", progress=False, seed=seed)
    run_sft(SFTConfig(model_name_or_path=str(model_dir), dataset="builtin:comparison:2000", output_dir=str(tmp_path / "sft"),
                      max_steps=150, per_device_train_batch_size=32, learning_rate=3e-3, lr_scheduler_type="cosine",
                      warmup_ratio=0.05, logging_steps=50, **fmt))
    row = dpo.run_dpo(DPOConfig(model_name_or_path=str(tmp_path / "sft"), dataset="builtin_pref:comparison:2000",
                                eval_dataset="builtin_pref:comparison:200", output_dir=str(tmp_path / "dpo"), max_steps=40,
                                per_device_train_batch_size=32, learning_rate=3e-4, beta=1.0, sft_weight=1.0, logging_steps=10, **fmt))
    pairs = dpo.build_pairs("builtin_pref:comparison:200", "test", tokenizer, DPOConfig(**fmt), "test", {})
    batch = dpo.collate(pairs, tokenizer.pad_token_id)
    rates = {}
    for name in ("sft", "dpo"):
        with torch.no_grad():
            probs = dpo.sequence_logps(load_causal_lm(str(tmp_path / name)).eval(), batch)[0].exp()
        rates[name] = (probs[: len(pairs)].mean().item(), probs[len(pairs):].mean().item())
    return {"accuracy": row["eval_rewards/accuracies"], "chosen_before": rates["sft"][0], "chosen_after": rates["dpo"][0],
            "rejected_before": rates["sft"][1], "rejected_after": rates["dpo"][1]}


# ---------------------------------------------------------------------------------------------- PPO

REWARD = '''
def words(prompts, responses):
    """Words started per response token budget (8): a space opens a word."""
    return [r.count(" ") / 8 for r in responses]


def varied(prompts, responses):
    """Differs from row to row even when greedy decoding gives every prompt the same response."""
    return [(len(p) % 7) / 7 + len(set(r)) / 8 for p, r in zip(prompts, responses)]
'''


def make_ppo_setup(root: Path, tiny_model_dir: Path) -> Path:
    """The tiny model with one embedding feature: +0.3 for tokens that start a word ("Ġ..."), −0.3 otherwise,
    so "write more words" is one direction the policy can learn in a few iterations (it starts at ~0.2)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.data import tasks
    from alignkit.data.formats import write_jsonl

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    starts_word = torch.tensor([t.startswith("Ġ") for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))])
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = torch.where(starts_word, 0.3, -0.3)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = tasks.make_mixture(["arithmetic"], "train", 32, seed=1)
    write_jsonl([{"prompt": r["prompt"]} for r in rows], root / "prompts.jsonl")
    (root / "reward.py").write_text(REWARD)
    return root


def ppo_config(setup: Path, name: str, **overrides):
    """The tests' PPO settings on the setup's model, prompts and `words` reward, writing into setup/name."""
    from alignkit.config import PPOConfig

    settings = dict(
        model_name_or_path=str(setup / "model"), dataset=str(setup / "prompts.jsonl"), output_dir=str(setup / name),
        reward_fn=f"{setup / 'reward.py'}:words", max_steps=8, rollout_batch_size=16, mini_batch_size=8, num_ppo_epochs=4,
        max_new_tokens=8, learning_rate=1e-3, lr_scheduler_type="constant", kl_coef=0.05, progress=False,
    )
    return PPOConfig(**{**settings, **overrides})


def train(setup: Path, name: str, **overrides) -> list[dict]:
    """A PPO run with ppo_config's settings; returns its metrics rows."""
    from alignkit.rl.ppo import run_ppo

    cfg = ppo_config(setup, name, **overrides)
    run_ppo(cfg)
    return [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def critic_free_run(setup: Path, estimator: str, output_dir: Path, seed: int) -> list[dict]:
    """tests/test_ppo.py::test_critic_free_estimators_raise_the_score, one seed: 14 iterations of 16 prompts × 4."""
    return train(setup, estimator, output_dir=str(output_dir), advantage_estimator=estimator, num_samples_per_prompt=4,
                 rollout_batch_size=16, learning_rate=1.5e-3, num_ppo_epochs=2, max_steps=14, seed=seed)


def score_rise(rows: list[dict]) -> float:
    """The last four iterations' mean score minus the first two's."""
    return mean(rows[-4:], "score") - mean(rows[:2], "score")


# ---------------------------------------------------------------------------------------------- self-instruct


def self_instruct_short_run(tmp_path: Path, seed: int = 0) -> dict:
    """tests/test_self_instruct.py::test_short_run_with_the_builtin_model: one round of the built-in model writing
    instructions (one prompt, short completions); returns the run's report (candidates, accepted, rejected, ...)."""
    from alignkit.data import self_instruct as si

    return si.run_self_instruct(si.SelfInstructConfig(
        output_dir=str(tmp_path / "out"), model_name_or_path="smollm2-135m-instruct", num_instructions=1, prompts_per_round=1,
        max_stalled_rounds=1, max_instruction_tokens=48, max_instance_tokens=32, max_new_per_prompt=3, classification_shots=2,
        instance_shots=1, progress=False, seed=seed))


# ---------------------------------------------------------------------------------------------- the spread script


def measure(kind: str, seed: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    if kind == "sft":
        return sft_learns_comparison(work, seed)
    if kind == "dpo":
        return dpo_after_sft(work, seed)
    if kind == "self_instruct":
        report = self_instruct_short_run(work, seed)
        return {k: report[k] for k in ("candidates", "accepted") if k in report}
    from alignkit.testing import make_tiny_model

    setup = make_ppo_setup(work, make_tiny_model(work / "tiny", hidden_size=64, num_layers=2))  # conftest's tiny_model_dir
    if kind in ("rloo", "grpo"):
        rows = critic_free_run(setup, kind, work / kind, seed)
        return {"rise": score_rise(rows), "scores": [round(r["score"], 3) for r in rows]}
    gae = train(setup, "gae", seed=seed)
    out = {"score_5_8": mean(gae[4:], "score"), "first_score": gae[0]["score"], "kl_3_8": mean(gae[2:], "kl")}
    if kind == "big_beta":
        big = train(setup, "big_beta", kl_coef=10.0, seed=seed)
        out.update(big_kl_3_8=mean(big[2:], "kl"), kl_ratio=mean(big[2:], "kl") / mean(gae[2:], "kl"),
                   score_drop=mean(gae[4:], "score") - mean(big[4:], "score"))
    return out


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    kind, seeds, root = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3])
    for seed in seeds:
        start = time.time()
        result = measure(kind, seed, root / f"{kind}-{seed}")
        print(json.dumps({"kind": kind, "seed": seed, **result, "wall_s": round(time.time() - start)}), flush=True)
