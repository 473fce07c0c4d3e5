"""One optimizer step of each trainer on tiny data, for the tests of the training engine (precision,
gradient checkpointing, tensorboard): `files` (a fixture) and `run_stage`."""

import json

import pytest
import torch

from alignkit.data import tasks
from alignkit.data.formats import write_jsonl

REWARD = '''
def words(prompts, responses):
    return [r.count(" ") / 8 for r in responses]
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    from alignkit.testing import make_tiny_model

    root = tmp_path_factory.mktemp("precision")
    rows = tasks.make_mixture(["reversal", "arithmetic"], "train", 8, seed=1)
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], root / "sft.jsonl")
    write_jsonl([{"prompt": r["prompt"]} for r in rows], root / "prompts.jsonl")
    (root / "reward.py").write_text(REWARD)
    # a reference that differs from the policy: with π = π_ref the DPO loss is log 2 in any precision
    make_tiny_model(root / "ref", hidden_size=64, num_layers=2, seed=1)
    return root


def run_stage(stage: str, files, model_dir, output_dir, **overrides) -> list[dict]:
    """One optimizer step (one PPO iteration) of `stage` with learning rate 0; its metrics rows."""
    from alignkit import config
    from alignkit.train.dpo import run_dpo
    from alignkit.rl.ppo import run_ppo
    from alignkit.train.rm import run_rm
    from alignkit.train.sft import run_sft

    common = dict(model_name_or_path=str(model_dir), output_dir=str(output_dir), max_steps=1, learning_rate=0.0,
                  logging_steps=1, progress=False, max_length=128)
    specific = {
        "sft": (config.SFTConfig, run_sft, dict(dataset=str(files / "sft.jsonl"), per_device_train_batch_size=16)),
        "rm": (config.RMConfig, run_rm, dict(dataset="builtin_pref:comparison:16", per_device_train_batch_size=16)),
        "dpo": (config.DPOConfig, run_dpo, dict(dataset="builtin_pref:comparison:16", per_device_train_batch_size=16, ref_model=str(files / "ref"))),
        "ppo": (config.PPOConfig, run_ppo, dict(dataset=str(files / "prompts.jsonl"), reward_fn=f"{files / 'reward.py'}:words",
                                                rollout_batch_size=8, mini_batch_size=8, num_ppo_epochs=1, max_new_tokens=6)),
    }
    cls, run, settings = specific[stage]
    torch.manual_seed(0)  # fresh LoRA adapters are drawn before the trainer seeds: runs in one process start alike
    run(cls(**{**common, **settings, **overrides}))
    return [json.loads(line) for line in open(output_dir / "metrics.jsonl")]
