"""The shipped accelerate configs on this CPU: DDP with 2 processes (gloo) gives the step losses and the weights
of one process with the same global batch (SFT, RM, DPO, PPO), and saves one Hugging Face model that reloads.
FSDP: tests/test_fsdp.py."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from alignkit.data import tasks
from alignkit.data.formats import write_jsonl

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
DATA = {"sft": None, "rm": "builtin_pref:comparison:16", "dpo": "builtin_pref:comparison:16"}


def free_port() -> int:
    """A port nobody listens on (other test sessions may be running a launch on the default 29500)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(config: str, args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/CONFIG --num_processes 2 -m alignkit.cli ARGS` (no --cpu:
    with it accelerate 1.15 starts a single process; alignkit itself picks gloo on a machine without CUDA)."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [accelerate, "launch", "--config_file", str(CONFIGS / config), "--num_processes", "2", "--main_process_port", str(free_port()),
               "-m", "alignkit.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def stage_args(stage: str, model_dir, data, output_dir) -> list[str]:
    return [stage, "--model_name_or_path", str(model_dir), "--dataset", str(data), "--output_dir", str(output_dir), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1", "--no_progress",
            "--max_grad_norm", "0", "--lr_scheduler_type", "constant", "--max_length", "128"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "train.jsonl"
    write_jsonl(tasks.make_mixture(["reversal", "arithmetic"], "train", 8, seed=2), path)
    return path


def _run_both(stage, data, model_dir, tmp_path, extra=()) -> dict[str, list[dict]]:
    """The DDP run (2 processes, batch 4 each) and the one-process run (2 accumulated micro-batches of 4): their rows."""
    from alignkit.cli import app

    two = accelerate_launch("ddp.yaml", [*stage_args(stage, model_dir, data, tmp_path / "two"), *extra])
    assert two.returncode == 0, two.stderr[-3000:]
    result = CliRunner().invoke(app, [*stage_args(stage, model_dir, data, tmp_path / "one"), "--gradient_accumulation_steps", "2", *extra])
    assert result.exit_code == 0, result.output
    return {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("one", "two")}


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_ddp_two_processes_equal_one_process(stage, tiny_model_dir, sft_data, tmp_path):
    """2 processes × 4 examples per step vs 1 process × 2 accumulated micro-batches of 4: the same 8 examples per
    step. Step losses agree to 1e-5 relative (float32 sums in a different order: ~1e-7 each) and the saved weights
    to 2e-5 absolute (two Adam steps of lr 1e-3; a rounding-level gradient difference moves a weight ≪ 1e-3)."""
    rows = _run_both(stage, DATA[stage] or sft_data, tiny_model_dir, tmp_path)
    assert [r["step"] for r in rows["two"]] == [1, 2] and [r["epoch"] for r in rows["two"]] == [r["epoch"] for r in rows["one"]]
    for a, b in zip(rows["one"], rows["two"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert rows["one"][1]["loss"] != rows["one"][0]["loss"]  # the update did something

    # one Hugging Face model, written once, that reloads with the weights of the single process
    assert sorted(p.name for p in (tmp_path / "two").glob("*.safetensors")) == ["model.safetensors"]
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    loader.from_pretrained(tmp_path / "two")
    one, two_weights = load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "two/model.safetensors"))
    assert one.keys() == two_weights.keys()
    assert all(torch.allclose(one[n], two_weights[n], atol=2e-5) for n in one)


def test_bf16_under_ddp_is_the_bf16_of_one_process(tiny_model_dir, sft_data, tmp_path):
    """--mixed_precision bf16 means the same in 2 processes (DDP calls the whole model) as in one (trunk and head
    called apart): both autocast every forward, so the step losses agree to bf16 level — 2e-3 relative, a few
    bf16 roundings (2^-8 each) of logits that enter the mean loss with random signs — and both differ from fp32's."""
    rows = _run_both("sft", sft_data, tiny_model_dir, tmp_path, ["--mixed_precision", "bf16"])
    for a, b in zip(rows["one"], rows["two"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
    from alignkit.cli import app

    result = CliRunner().invoke(app, [*stage_args("sft", tiny_model_dir, sft_data, tmp_path / "fp32"), "--gradient_accumulation_steps", "2"])
    assert result.exit_code == 0, result.output
    fp32 = json.loads(open(tmp_path / "fp32" / "metrics.jsonl").readline())["loss"]
    assert rows["one"][0]["loss"] != fp32 and rows["two"][0]["loss"] != fp32


def test_shipped_configs_parse_and_name_their_backend():
    import yaml

    kinds = {name: yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()) for name in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")}
    assert kinds["ddp"]["distributed_type"] == "MULTI_GPU"
    assert kinds["fsdp"]["distributed_type"] == "FSDP" and kinds["fsdp"]["fsdp_config"]["fsdp_version"] == 2
    assert [kinds[f"deepspeed_zero{z}"]["deepspeed_config"]["zero_stage"] for z in (2, 3)] == [2, 3]
    assert all(config["mixed_precision"] == "no" for config in kinds.values())  # alignkit's --mixed_precision decides


# ---------------------------------------------------------------------------------------------
# PPO: the policy is a DDP module; every process takes part in every minibatch's backward

PPO_UPDATE = '''
"""One PPO update (2 epochs over one minibatch) on a fixed global experience of 8 rows, this process's share of it:
writes this process's first all-reduced gradient and final weights to OUT/{mode}_{rank}.safetensors, once with
the engine's gradient sync and once with it turned off (accelerator.no_sync around the update)."""
import contextlib, os, sys
import torch
from safetensors.torch import save_file
from alignkit.config import PPOConfig
from alignkit.data.prompts import load_prompts
from alignkit.generation import SamplingParams
from alignkit.models import load_tokenizer
from alignkit.rl.experience import Experience, Processes
from alignkit.rl.ppo import _build_models, optimize
from alignkit.rl.rollout import rollout
from alignkit.train.loop import Engine, make_accelerator, make_optimizer, make_scheduler

model_dir, out = sys.argv[1], sys.argv[2]
for mode in ("synced", "unsynced"):
    cfg = PPOConfig(model_name_or_path=model_dir, rollout_batch_size=8, mini_batch_size=8, num_ppo_epochs=2, learning_rate=1e-3,
                    max_grad_norm=0.0, lr_scheduler_type="constant", shared_prefix_tokens=0, output_dir=out)
    accelerator = make_accelerator(cfg)
    procs = Processes(accelerator.num_processes, accelerator.process_index, 1)
    torch.manual_seed(0)
    policy, _ = _build_models(cfg, accelerator.device)
    policy.eval()
    tokenizer = load_tokenizer(model_dir)
    prompts = [p.ids for p in load_prompts("builtin:arithmetic:8", "train", tokenizer, max_prompt_length=cfg.max_prompt_length)]
    # the same global batch on every process (one seed), of which each keeps its rows in slot order
    episodes = rollout(policy.lm, tokenizer, prompts, SamplingParams(6, 1.0, seed=3))
    mask = episodes.response_mask.float()
    noise = torch.Generator().manual_seed(1)
    advantages, returns = torch.randn(mask.shape, generator=noise) * mask, torch.randn(mask.shape, generator=noise) * mask
    mine = [row for row in range(8) if procs.owns(row)]
    take = lambda t: t[mine]
    exp = Experience(episodes.select(mine), take(mask), take(episodes.logprobs * mask), torch.zeros_like(take(mask)), take(advantages),
                     take(returns), mask.sum(1), mask.sum(1) + episodes.prompt_mask.sum(1), {}, {})
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, 2)
    model, optimizer = accelerator.prepare(policy, optimizer)
    grads, step = {}, optimizer.step
    def recording_step(*args, **kwargs):
        if not grads:
            grads.update({"grad." + n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)
    optimizer.step = recording_step
    with accelerator.no_sync(model) if mode == "unsynced" else contextlib.nullcontext():
        optimize(cfg, procs, Engine(accelerator, model, optimizer, scheduler, cfg), exp, 1, [], {"ptx_batches": 0}, tokenizer.pad_token_id)
    weights = {"weight." + n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    save_file({**grads, **weights}, os.path.join(out, f"{mode}_{accelerator.process_index}.safetensors"))
'''


def _ppo_update(tmp_path, model_dir, processes: int) -> Path:
    script, out = tmp_path / "ppo_update.py", tmp_path / f"world{processes}"
    script.write_text(PPO_UPDATE)
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    launch = [torchrun, "--nproc_per_node", str(processes), "--master_port", str(free_port())] if processes > 1 else [sys.executable]
    done = subprocess.run([*launch, str(script), str(model_dir), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ppo_updates(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_update")
    return {world: _ppo_update(root, tiny_model_dir, world) for world in (1, 2)}


def test_ppo_ddp_gradient_of_two_processes_is_that_of_one(ppo_updates):
    """A fixed experience of 8 rows, split 4 + 4 over two DDP processes, against one process holding all 8: the first
    update's gradient (after DDP's all-reduce) is the same sum of per-token terms divided by the same token count,
    added in another order, so it agrees to float32 rounding: ‖g₂ − g₁‖ ≤ 1e-5·‖g₁‖ per parameter (rounding is ~1e-7
    relative per addition; a missing all-reduce or a missing ×W gives differences of order ‖g₁‖). The value head
    and the policy both get gradients (gae)."""
    one = load_file(str(ppo_updates[1] / "synced_0.safetensors"))
    two = load_file(str(ppo_updates[2] / "synced_0.safetensors"))
    grads = [name for name in one if name.startswith("grad.")]
    assert "grad.value_head.weight" in grads and any(n.startswith("grad.lm.") for n in grads)
    for name in grads:
        scale = one[name].norm()
        assert scale > 0, name
        assert (two[name] - one[name]).norm() <= 1e-5 * scale, (name, float((two[name] - one[name]).norm() / scale))


def test_ppo_ddp_all_reduces_gradients(ppo_updates):
    """Each process trains on its own 4 rows, yet both end with the same weights (bit for bit: both apply the same
    all-reduced gradient): DDP summed them. With the sync turned off (no_sync around the update) the same
    processes end with different weights, so this comparison would catch gradients that are not all-reduced."""
    ranks = [load_file(str(ppo_updates[2] / f"{mode}_{rank}.safetensors")) for mode in ("synced", "unsynced") for rank in (0, 1)]
    weights = [name for name in ranks[0] if name.startswith("weight.")]
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in weights)
    assert not all(torch.equal(ranks[2][n], ranks[3][n]) for n in weights)


PPO_REWARD = """
def varied(prompts, responses):
    \"\"\"Differs from row to row even when greedy decoding gives every prompt the same response.\"\"\"
    return [(len(p) % 7) / 7 + len(set(r)) / 8 for p, r in zip(prompts, responses)]
"""


def test_ppo_ddp_two_processes_make_the_run_of_one(tiny_model_dir, tmp_path):
    """`accelerate launch` with the DDP config, 2 processes (gloo): each samples and trains on half the prompts, yet
    statistics, loss normalizers and (DDP's) gradients span the whole batch. Greedy decoding (--top_p 1e-6 keeps only
    the top token; --temperature must be > 0) makes both runs draw the same responses, and each minibatch is the whole
    batch (--mini_batch_size 8; with several minibatches W processes partition the batch differently, see rl/ppo.py),
    so the metrics and the final weights equal those of one process holding the whole batch."""
    from alignkit.cli import app

    write_jsonl(tasks.make_mixture(["reversal"], "train", 8, seed=2), tmp_path / "ptx.jsonl")
    write_jsonl([{"prompt": r["prompt"]} for r in tasks.make_mixture(["arithmetic"], "train", 16, seed=1)], tmp_path / "prompts.jsonl")
    (tmp_path / "reward.py").write_text(PPO_REWARD)
    # padded rows (--shared_prefix_tokens 0): each episode is computed with the same bits however the batch is
    # split; prefix-shared rows are compared with padded ones in a one-process test (test_ppo.py). The reward varies
    # from row to row: with equal scores the advantages would be whitened float rounding (the KL before the first
    # update), which differs with the batch shape on some CPUs.
    args = ["ppo", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(tmp_path / "prompts.jsonl"), "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--max_steps", "2", "--rollout_batch_size", "8", "--mini_batch_size", "8", "--num_ppo_epochs", "2",
            "--max_new_tokens", "6", "--top_p", "1e-6", "--normalize_scores", "--ptx_coef", "0.5", "--ptx_dataset", str(tmp_path / "ptx.jsonl"),
            "--max_grad_norm", "0", "--shared_prefix_tokens", "0", "--reward_fn", f"{tmp_path / 'reward.py'}:varied", "--no_progress"]
    two = accelerate_launch("ddp.yaml", [*args, "--output_dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    result = CliRunner().invoke(app, [*args, "--output_dir", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    one, rows = ([json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("one", "two"))
    assert [r["step"] for r in rows] == [1, 2]  # one row per iteration, from rank 0
    # The runs add the same float32 terms in different orders (all-reduced gradients and statistics, batches of 4
    # rows or 8), so each per-token term carries ~1e-7 relative rounding, which Adam's 1/√v carries into later
    # updates. Each logged mean is compared with 1e-4 of the size of the terms it sums, not of the result:
    # policy_loss, returns and explained_variance are means of ± terms of size ~1 (whitened advantages and
    # normalized scores have RMS 1, ratios are ~1) that can cancel to ~0; kl sums per-token log π − log π_ref over a
    # response, each a difference of log-probs of size ~entropy; clipfrac averages 0/1 flags; the rest (score,
    # entropy, length, value and ptx losses, k3 KL) average non-negative terms: relative to themselves.
    for a, b in zip(one, rows):
        scale = {"policy_loss": 1.0, "returns": 1.0, "explained_variance": 1.0, "clipfrac": 1.0, "kl": a["response_length"] * a["entropy"]}
        for key in ("score", "kl", "entropy", "response_length", "policy_loss", "value_loss", "clipfrac", "approx_kl", "ptx_loss",
                    "returns", "explained_variance"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-4 * scale.get(key, 0.0)), (key, a[key], b[key])
        assert a["ppo_updates"] == b["ppo_updates"] == 2
    # The weights: Adam's m/√v turns a rounding-level difference in a near-zero gradient component into a step
    # difference of up to ~lr, so elements can differ by ~1e-5 (measured: max 1.9e-5, one element of 8192 above
    # 1e-5). Compared per tensor against the size of its update: ‖w₂ − w₁‖ ≤ 1e-3·‖w₁ − w₀‖ (measured worst ratio
    # 6.7e-5; a gradient that is not summed over processes gives ratios of order 1).
    w0 = load_file(str(tiny_model_dir / "model.safetensors"))
    w1, w2 = load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "two/model.safetensors"))
    for n in w1:
        assert (w2[n] - w1[n]).norm() <= 1e-3 * (w1[n] - w0[n]).norm(), (n, float((w2[n] - w1[n]).norm()), float((w1[n] - w0[n]).norm()))
    assert not all(torch.equal(w1[n], w0[n]) for n in w1)  # it trained
    bad = accelerate_launch("ddp.yaml", [*args, "--mini_batch_size", "3", "--output_dir", str(tmp_path / "bad")])
    assert bad.returncode != 0 and "--mini_batch_size 3 must be a multiple of the number of processes (2)" in bad.stderr
