"""PPO, RLOO under FSDP2 with 2 CPU processes (gloo) through the shipped accelerate config: each rank holds about
half of the policy's parameter elements while it trains, the sampling, critic and reference passes run on a
gathered copy of the whole policy (`sharding.gathered`), and the run makes the metrics and weights of one process
with the same global batch (PPO with a value head, PPO with a separate critic), or of DDP with the same processes
(RLOO with a fresh LoRA adapter, sampled at temperature 1). The final model is one Hugging Face directory that
reloads."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from alignkit.data import tasks
from alignkit.data.formats import write_jsonl
from test_distributed import PPO_REWARD, accelerate_launch
from test_fsdp import assert_sharded

AFTER_ITERATION = re.compile(r"FSDP2: rank (\d) holds (\d+) of (\d+) policy parameter elements after iteration (\d+)")


@pytest.fixture(scope="module")
def ppo_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp-ppo")
    write_jsonl(tasks.make_mixture(["reversal"], "train", 8, seed=2), folder / "ptx.jsonl")
    write_jsonl([{"prompt": r["prompt"]} for r in tasks.make_mixture(["arithmetic"], "train", 16, seed=1)], folder / "prompts.jsonl")
    (folder / "reward.py").write_text(PPO_REWARD)
    return folder


def ppo_args(model_dir, files, extra=()) -> list[str]:
    """Two iterations of 8 responses, one minibatch of the whole batch, 2 epochs (see the DDP test in
    test_distributed.py for why: with several minibatches W processes partition the batch differently). Padded rows
    (--shared_prefix_tokens 0) compute each episode with the same bits however the batch is split."""
    return ["ppo", "--model_name_or_path", str(model_dir), "--dataset", str(files / "prompts.jsonl"), "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--max_steps", "2", "--rollout_batch_size", "8", "--mini_batch_size", "8",
            "--num_ppo_epochs", "2", "--max_new_tokens", "6", "--normalize_scores", "--max_grad_norm", "0", "--shared_prefix_tokens", "0",
            "--reward_fn", f"{files / 'reward.py'}:varied", "--no_progress", *extra]


def launch(config: str, args: list[str], output_dir) -> str:
    done = accelerate_launch(config, [*args, "--output_dir", str(output_dir)])
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def rows_of(output_dir) -> list[dict]:
    return [json.loads(line) for line in open(output_dir / "metrics.jsonl")]


def assert_sharded_while_training(output: str) -> None:
    """Both ranks hold about half of the policy's parameter elements at rest after each iteration's update (and at
    the start, `assert_sharded`): a shard left gathered, or a rank running alone, fails this."""
    assert_sharded(output)
    after = {(int(rank), int(step)): (int(local), int(total)) for rank, local, total, step in AFTER_ITERATION.findall(output)}
    assert sorted(after) == [(0, 1), (0, 2), (1, 1), (1, 2)], output[-2000:]
    for step in (1, 2):
        total = after[0, step][1]
        assert after[0, step][0] + after[1, step][0] == total
        assert all(0.45 * total < after[rank, step][0] < 0.55 * total for rank in (0, 1))


def assert_same_metrics(one: list[dict], two: list[dict], keys: tuple[str, ...]) -> None:
    """The DDP test's tolerances (test_distributed.py::test_ppo_ddp_two_processes_make_the_run_of_one): each logged
    mean to 1e-4 of the size of the terms it sums (FSDP reduce-scatters gradients and sums statistics in another
    order than one process; ~1e-7 relative per term, carried into later updates by Adam's 1/√v)."""
    assert [r["step"] for r in two] == [1, 2]  # one row per iteration, from rank 0
    for a, b in zip(one, two):
        scale = {"policy_loss": 1.0, "returns": 1.0, "explained_variance": 1.0, "clipfrac": 1.0, "kl": a["response_length"] * a["entropy"]}
        for key in keys:
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-4 * scale.get(key, 0.0)), (key, a[key], b[key])
        assert a["ppo_updates"] == b["ppo_updates"] == 2


def assert_same_weights(start: dict, one: dict, two: dict) -> None:
    """Per tensor, against the size of its update: ‖w₂ − w₁‖ ≤ 1e-3·‖w₁ − w₀‖ (Adam turns a rounding-level difference
    in a near-zero gradient component into a step difference of up to ~lr; measured worst ratio 6.7e-5, as under
    DDP; a gradient not summed over processes, or one reduced twice, gives ratios of order 1)."""
    assert one.keys() == two.keys()
    moved = [n for n in one if not torch.equal(one[n], start[n])]
    assert moved  # it trained
    for n in moved:
        assert (two[n] - one[n]).norm() <= 1e-3 * (one[n] - start[n]).norm(), (n, float((two[n] - one[n]).norm()),
                                                                                float((one[n] - start[n]).norm()))


COMMON = ("score", "kl", "entropy", "response_length", "policy_loss", "clipfrac", "approx_kl")


def test_ppo_value_head_under_fsdp_equals_one_process(tiny_model_dir, ppo_files, tmp_path):
    """GAE with a value head and PPO-ptx: greedy decoding (--top_p 1e-6 keeps only the top token) makes both runs draw
    the same responses. The saved policy reloads with transformers and equals one process's; so does the value head."""
    from alignkit.cli import app

    args = ppo_args(tiny_model_dir, ppo_files, ["--top_p", "1e-6", "--ptx_coef", "0.5", "--ptx_dataset", str(ppo_files / "ptx.jsonl")])
    output = launch("fsdp.yaml", args, tmp_path / "fsdp")
    assert_sharded_while_training(output)
    result = CliRunner().invoke(app, [*args, "--output_dir", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert_same_metrics(rows_of(tmp_path / "one"), rows_of(tmp_path / "fsdp"),
                        (*COMMON, "value_loss", "ptx_loss", "returns", "explained_variance"))
    saved = load_file(str(tmp_path / "fsdp/model.safetensors"))
    assert_same_weights(load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(tmp_path / "one/model.safetensors")), saved)
    # the value head starts at 0. Not its bias: its gradient is the mean of V − R over the batch's tokens, and with
    # normalized scores and V ≈ 0 the first iteration's R averages to rounding level (returns ≈ 1e-7 in the rows), so
    # Adam (which divides by √v) turns that rounding into a step difference of up to ~lr (measured 2.0e-5 of 8.2e-4)
    heads = [{"weight": load_file(str(tmp_path / name / "value_head.safetensors"))["weight"]} for name in ("one", "fsdp")]
    assert_same_weights({"weight": torch.zeros_like(heads[0]["weight"])}, *heads)

    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp").state_dict()
    assert all(torch.equal(state[name], value) for name, value in saved.items())


def test_ppo_separate_critic_under_fsdp_equals_one_process(tiny_model_dir, ppo_files, tmp_path):
    """GAE with a separate critic (a sequence-classification copy of the tiny model, new head at 0), sharded with the
    policy: one process keeps the critic's rollout pass as the first update's forward; FSDP (whose rollout passes run
    on a gathered copy) reruns it through the sharded root. Same metrics and weights, critic included."""
    from alignkit.cli import app

    args = ppo_args(tiny_model_dir, ppo_files, ["--top_p", "1e-6", "--critic_model", str(tiny_model_dir)])
    output = launch("fsdp.yaml", args, tmp_path / "fsdp")
    assert_sharded_while_training(output)
    result = CliRunner().invoke(app, [*args, "--output_dir", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert_same_metrics(rows_of(tmp_path / "one"), rows_of(tmp_path / "fsdp"), (*COMMON, "value_loss", "returns", "explained_variance"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert_same_weights(start, *(load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "fsdp")))
    critics = [load_file(str(tmp_path / name / "critic" / "model.safetensors")) for name in ("one", "fsdp")]
    assert "score.weight" in critics[0]
    assert_same_weights({n: start.get(n, torch.zeros_like(v)) for n, v in critics[0].items()}, *critics)


def test_rloo_lora_under_fsdp_equals_ddp(tiny_model_dir, ppo_files, tmp_path):
    """RLOO (k = 2) with a fresh LoRA adapter (the reference is the policy with its adapter disabled, on the gathered
    copy), sampled at temperature 1: against DDP with the same 2 processes, whose per-process sampling seeds are the
    same, so both draw the same responses (DDP = one process: test_distributed.py). Same metrics; the adapters' B
    (which start at 0) moved alike; A (random start) agrees to 2e-5 (four Adam steps of lr 1e-3)."""
    args = ppo_args(tiny_model_dir, ppo_files, ["--advantage_estimator", "rloo", "--num_samples_per_prompt", "2", "--rollout_batch_size", "4",
                                                "--use_peft", "--lora_r", "4", "--learning_rate", "1e-2"])
    output = launch("fsdp.yaml", args, tmp_path / "fsdp")
    assert_sharded_while_training(output)
    launch("ddp.yaml", args, tmp_path / "ddp")
    assert_same_metrics(rows_of(tmp_path / "ddp"), rows_of(tmp_path / "fsdp"), COMMON)
    ddp, fsdp = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys() and len(ddp) == 28  # 7 linear layers × 2 decoder layers × (A, B)
    b = [n for n in ddp if "lora_B" in n]
    assert_same_weights({n: torch.zeros_like(ddp[n]) for n in b}, {n: ddp[n] for n in b}, {n: fsdp[n] for n in b})
    assert all(torch.allclose(ddp[n], fsdp[n], atol=2e-5) for n in ddp if n not in b)


def test_zero_weight_ptx_row_adds_nothing(tiny_model_dir, tokenizer):
    """Under FSDP a process with no row of a PPO-ptx batch runs one of the batch's rows with weight 0 (so every process
    runs as many layer forwards): its loss sum is exactly 0 and it gives no gradient, while the same row with its
    weights does."""
    from transformers import AutoModelForCausalLM

    from alignkit.train.sft import SFTExample, collate, sft_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tokenizer("Reverse the letters of 'garden'. nedrag")["input_ids"]
    for weight in (0.0, 1.0):
        model.zero_grad(set_to_none=True)
        loss, _ = sft_loss(model, collate([SFTExample(ids, [weight] * len(ids))], tokenizer.pad_token_id))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if weight == 0.0:
            assert float(loss.detach()) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)
        else:
            assert float(loss.detach()) > 0 and any(float(g.abs().max()) > 0 for g in grads)
