"""Checkpoints and exact resume under FSDP: 2 CPU processes (gloo) through configs/accelerate/fsdp.yaml.

A checkpoint of a sharded run holds what a 1-process (or DDP) run's holds: the full trainable weights and the
full optimizer state (numbered as torch numbers it), gathered to rank 0 and written by it atomically, plus one RNG
file per process. Resuming broadcasts them from rank 0 and every process keeps its shards.

- Exact resume with real kills, as tests/test_resume.py does in one process: each run is launched three times or
  more (uninterrupted; with --save_steps 1 and the loop's test hook SIGKILLing every process at a step, or rank 0
  halfway through writing a checkpoint, which brings the launch down; resumed with `latest`). The metrics rows and
  the final weights must be bitwise equal to the uninterrupted run's: each launch runs the same float operations in
  the same order (one thread per process; gloo's 2-process reductions are deterministic), and everything carried
  across the kill (weight and Adam-moment shards, each process's RNG and unlogged metric sums) is stored bit for bit.
- The format does not depend on the sharding: a DDP launch resumes an FSDP checkpoint, and FSDP resumes a DDP one.
- PPO (with a separate critic) resumes exactly under FSDP too.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.data import tasks
from alignkit.data.formats import write_jsonl
from test_distributed import accelerate_launch
from test_resume import metrics, weights

PREFS = "builtin_pref:comparison:16"


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    """16 training rows; 5 evaluation rows (3 + 2 per process: the uneven evaluation shares FSDP pads)."""
    folder = tmp_path_factory.mktemp("fsdp-ckpt-data")
    rows = tasks.make_mixture(["reversal", "arithmetic"], "train", 8, seed=2)
    write_jsonl(rows, folder / "train.jsonl")
    write_jsonl(rows[:5], folder / "eval.jsonl")
    return folder


def args(stage: str, model_dir, dataset, output_dir: Path, *extra) -> list[str]:
    """4 steps with a linear schedule (the scheduler's state matters), checkpoints every step."""
    return [stage, "--model_name_or_path", str(model_dir), "--dataset", str(dataset), "--output_dir", str(output_dir),
            "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--lr_scheduler_type", "linear",
            "--logging_steps", "1", "--no_progress", "--max_length", "128", "--save_steps", "1", *extra]


def launch(config: str, arguments: list[str], monkeypatch=None, kill: tuple[str, int] | None = None, expect_ok: bool = True):
    """One `accelerate launch` of 2 processes; with `kill` = (ALIGNKIT_KILL_AT_STEP | ALIGNKIT_KILL_IN_SAVE, step)
    the loop's test hook SIGKILLs the processes there, and the launch must fail."""
    if kill:
        monkeypatch.setenv(kill[0], str(kill[1]))
    try:
        result = accelerate_launch(config, arguments)
    finally:
        if kill:
            monkeypatch.delenv(kill[0])
    if kill:
        assert result.returncode != 0 and "SIGKILL" in result.stdout + result.stderr, result.stderr[-3000:]
    elif expect_ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def check_exact_resume(arguments, tmp_path: Path, monkeypatch, kills: list[tuple[str, int]], full: Path | None = None) -> None:
    """Uninterrupted (or `full`, an uninterrupted run of the same arguments) vs killed at each of `kills` in turn
    and resumed with `latest`: the same metrics rows and the same final weights, bit for bit; --save_total_limit
    (default 2) kept the two newest checkpoints and no temporary file of a killed write is left."""
    if full is None:
        full = tmp_path / "full"
        launch("fsdp.yaml", arguments(full))
    cut = tmp_path / "cut"
    for kill in kills:
        resume = ["--resume_from_checkpoint", "latest"] if (cut / "config.yaml").exists() else []
        launch("fsdp.yaml", [*arguments(cut), *resume], monkeypatch, kill)
    resumed = launch("fsdp.yaml", [*arguments(cut), "--resume_from_checkpoint", "latest"])
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert metrics(cut) == metrics(full)
    expected, got = weights(full), weights(cut)
    assert expected.keys() == got.keys() and len(expected) > 0
    changed = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not changed, f"{len(changed)} tensors differ after resume, e.g. {changed[:3]}"
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-3", "step-4"]
    assert not [p for p in cut.rglob("*") if ".tmp-" in p.name]


def kill_step(name: str) -> int:
    """A step in 2..3 of the 4 (so a checkpoint exists to resume from), drawn from a generator seeded with the
    case's name (random, but the same everywhere)."""
    return random.Random(name).randint(2, 3)


def sft_arguments(model_dir, data: Path):
    """Logging every 2 steps (a logged row averages steps that straddle a kill: the unlogged sums of each process
    must survive it), 2 accumulated micro-batches, evaluation at step 3 and at the end."""
    return lambda output_dir: args("sft", model_dir, data / "train.jsonl", output_dir, "--logging_steps", "2",
                                   "--gradient_accumulation_steps", "2", "--eval_dataset", str(data / "eval.jsonl"),
                                   "--per_device_eval_batch_size", "2", "--eval_steps", "3")


@pytest.fixture(scope="module")
def sft_full(tiny_model_dir, sft_data, tmp_path_factory) -> Path:
    """The uninterrupted FSDP SFT run, keeping all its checkpoints (--save_total_limit 0; not in the fingerprint)."""
    output_dir = tmp_path_factory.mktemp("fsdp-sft") / "full"
    launch("fsdp.yaml", [*sft_arguments(tiny_model_dir, sft_data)(output_dir), "--save_total_limit", "0"])
    return output_dir


def test_sft_under_fsdp_resumes_exactly_after_a_kill_and_a_kill_during_a_save(tiny_model_dir, sft_data, sft_full, tmp_path, monkeypatch):
    """Killed after step 2 (before its checkpoint: resumed from step 1's, whose window holds step 1's unlogged
    sums), then with rank 0 halfway through writing checkpoint 3 (step 2's stays the latest)."""
    check_exact_resume(sft_arguments(tiny_model_dir, sft_data), tmp_path, monkeypatch,
                       [("ALIGNKIT_KILL_AT_STEP", 2), ("ALIGNKIT_KILL_IN_SAVE", 3)], full=sft_full)


def test_rm_under_fsdp_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    arguments = lambda output_dir: args("rm", tiny_model_dir, PREFS, output_dir, "--per_device_train_batch_size", "3")  # noqa: E731
    check_exact_resume(arguments, tmp_path, monkeypatch, [("ALIGNKIT_KILL_AT_STEP", kill_step("fsdp-rm"))])


def test_dpo_with_lora_under_fsdp_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    """Fresh LoRA adapters (dropout 0.05: each process's dropout RNG must come back) trained by DPO, the reference
    being the adapters disabled; the checkpoint holds the adapters only."""
    arguments = lambda output_dir: args("dpo", tiny_model_dir, PREFS, output_dir, "--per_device_train_batch_size", "3", "--use_peft")  # noqa: E731
    check_exact_resume(arguments, tmp_path, monkeypatch, [("ALIGNKIT_KILL_AT_STEP", kill_step("fsdp-dpo-lora"))])
    saved = load_file(str(tmp_path / "cut" / "checkpoints" / "step-4" / "trainable.safetensors"))
    assert saved and all("lora_" in name for name in saved)


@pytest.fixture(scope="module")
def ppo_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp-ckpt-ppo")
    rows = tasks.make_mixture(["reversal", "arithmetic"], "train", 6, seed=1)
    write_jsonl([{"prompt": r["prompt"]} for r in rows], folder / "prompts.jsonl")
    (folder / "reward.py").write_text("def words(prompts, responses, **columns):\n    return [float(len(r.split())) for r in responses]\n")
    return folder


def test_ppo_with_a_separate_critic_under_fsdp_resumes_exactly(tiny_model_dir, ppo_files, tmp_path, monkeypatch):
    """PPO whose sharded model holds two transformers (policy and critic, each with tied embeddings), sampling at
    temperature 1 from each process's own RNG: the policy and the critic come back bit for bit, and so do the rows."""
    arguments = lambda output_dir: [  # noqa: E731
        "ppo", "--model_name_or_path", str(tiny_model_dir), "--critic_model", str(tiny_model_dir), "--dataset", str(ppo_files / "prompts.jsonl"),
        "--reward_fn", f"{ppo_files / 'reward.py'}:words", "--output_dir", str(output_dir), "--max_steps", "4", "--rollout_batch_size", "4",
        "--mini_batch_size", "2", "--num_ppo_epochs", "2", "--max_new_tokens", "4", "--learning_rate", "1e-3", "--lr_scheduler_type", "linear",
        "--logging_steps", "1", "--no_progress", "--save_steps", "1"]
    check_exact_resume(arguments, tmp_path, monkeypatch, [("ALIGNKIT_KILL_AT_STEP", kill_step("fsdp-ppo-critic"))])
    assert {name.split(":")[0] for name in weights(tmp_path / "cut")} == {"model.safetensors", "critic/model.safetensors"}


# ---------------------------------------------------------------------------------------------
# one format, whatever the sharding


def rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_files(fsdp: Path, ddp: Path) -> None:
    """Two checkpoints of the same step, written under FSDP and under DDP (whose rank 0 writes what one process
    writes): the same files, tensors of the same names, shapes and dtypes, optimizer state numbered alike with
    the same hyperparameters. Values agree to float level: from the same step-2 state, the one step that differs
    clips its gradients by max_grad_norm / norm, a float32 norm that FSDP takes over two half-shards (up to ~4e-5
    relative off DDP's: tests/test_fsdp.py), so every gradient, hence Adam's moments, may move by that relative
    amount (exp_avg_sq twice it). Measured in two runs: at most 2.0e-5 of a tensor's largest magnitude on exp_avg,
    4.8e-5 on exp_avg_sq, 1.2e-7 absolute on weights; allowed: 4e-4 of the largest magnitude, 2e-5 on weights."""
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in ddp.iterdir())
    a, b = load_file(str(fsdp / "trainable.safetensors")), load_file(str(ddp / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(a[n].shape == b[n].shape and a[n].dtype == b[n].dtype for n in a)
    assert all(torch.allclose(a[n], b[n], rtol=0, atol=2e-5) for n in a)
    x, y = (torch.load(path / "optimizer.pt", weights_only=True) for path in (fsdp, ddp))
    assert x["scheduler"] == y["scheduler"]
    assert x["optimizer"]["param_groups"] == y["optimizer"]["param_groups"]
    assert x["optimizer"]["state"].keys() == y["optimizer"]["state"].keys() and len(x["optimizer"]["state"]) == len(a)
    for index, state in x["optimizer"]["state"].items():
        other = y["optimizer"]["state"][index]
        assert state.keys() == other.keys()
        for key, value in state.items():
            assert value.shape == other[key].shape and value.dtype == other[key].dtype
            scale = float(other[key].abs().max())
            assert torch.allclose(value, other[key], rtol=0, atol=4e-4 * scale), (index, key)


def assert_close_runs(got: Path, full: Path) -> None:
    """Rows of the steps before the resumed checkpoint are kept as they were; the later ones agree to float level
    (losses 1e-5 relative, gradient norms 2e-4: see tests/test_fsdp.py) and so do the final weights (2e-5 absolute;
    a resume that lost the Adam moments would move them by ~the learning rate, 2.5e-4 at step 4)."""
    expected, found = rows(full), rows(got)
    assert [r["step"] for r in found] == [r["step"] for r in expected] and len(found) == 4  # steps 2 and 4, evaluations 3 and 4
    for a, b in zip(expected, found):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-4 if key == "grad_norm" else 1e-5), (a["step"], key)
    one, two = load_file(str(full / "model.safetensors")), load_file(str(got / "model.safetensors"))
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[n], two[n], rtol=0, atol=2e-5) for n in one)


def test_ddp_resumes_an_fsdp_checkpoint_and_fsdp_a_ddp_one(tiny_model_dir, sft_data, sft_full, tmp_path):
    """The FSDP run's checkpoint of step 2, resumed under DDP (2 processes) for steps 3 and 4; that run's (DDP-written)
    checkpoint of step 3 resumed under FSDP for step 4. Both end as the uninterrupted FSDP run does, and the
    checkpoints of step 3 written under FSDP and under DDP are the same files."""
    arguments = sft_arguments(tiny_model_dir, sft_data)
    ddp, back = tmp_path / "ddp", tmp_path / "back"
    shutil.copytree(sft_full, ddp)
    launch("ddp.yaml", [*arguments(ddp), "--resume_from_checkpoint", str(ddp / "checkpoints" / "step-2")])
    assert_same_files(sft_full / "checkpoints" / "step-3", ddp / "checkpoints" / "step-3")
    shutil.copytree(ddp, back)
    launch("fsdp.yaml", [*arguments(back), "--resume_from_checkpoint", str(back / "checkpoints" / "step-3")])
    assert_close_runs(ddp, sft_full)
    assert_close_runs(back, sft_full)


def test_a_bad_checkpoint_stops_every_fsdp_process_with_its_message(sft_full, tiny_model_dir, sft_data, tmp_path):
    """Rank 0 reads the files; when it cannot, every process stops with its message (exit code 2), none waits for
    tensors that never come, and the run's outputs stay as they were."""
    run = tmp_path / "run"
    shutil.copytree(sft_full, run)
    (run / "checkpoints" / "step-4" / "optimizer.pt").write_bytes(b"not a checkpoint")
    before = (run / "model.safetensors").read_bytes()
    result = launch("fsdp.yaml", [*sft_arguments(tiny_model_dir, sft_data)(run), "--resume_from_checkpoint", "latest"], expect_ok=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", output), output[-3000:]
    assert output.count("cannot be loaded safely") >= 2, output[-3000:]  # both processes said it
    assert not re.search(r'File "[^"]*alignkit/', output), output[-3000:]  # no traceback from alignkit (accelerate's launcher prints its own)
    assert (run / "model.safetensors").read_bytes() == before


def test_another_number_of_processes_is_refused_before_loading(sft_full, tiny_model_dir, sft_data, tmp_path, monkeypatch):
    """The files would load in one process, but the global batch, the data position and each process's RNG and
    unlogged metric sums belong to 2: resuming the 2-process run in 1 is refused (exit code 2, both counts named),
    nothing is written."""
    from typer.testing import CliRunner

    from alignkit.cli import app

    run = tmp_path / "run"
    shutil.copytree(sft_full, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = CliRunner().invoke(app, [*sft_arguments(tiny_model_dir, sft_data)(run), "--resume_from_checkpoint", "latest"])
    assert result.exit_code == 2, result.output
    assert "written by a run of 2 process(es), this one has 1" in result.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_an_optimizer_state_of_another_model_is_refused():
    """Rank 0 checks the saved optimizer state against the optimizer before broadcasting it (so every process gets
    the message): the same groups and parameter numbers pass; another model's are refused with both sizes."""
    from alignkit.train import sharding

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    sharding.check_optimizer_state(optimizer, optimizer.state_dict())
    other = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match=r"groups of sizes \[4\] for an optimizer whose groups have \[2\] parameters"):
        sharding.check_optimizer_state(other, optimizer.state_dict())


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process, in this process: FSDP2 shards over it (every shard is whole), so the
    gather and broadcast code runs without a launch."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_gather_and_load_give_the_files_of_an_unsharded_model(tiny_model_dir, one_process_group):
    """In one process group: before any step the optimizer state saved is torch's empty one, without the step of
    lr 0 torch's helper would take to fill it; after a step, the gathered weights and optimizer state equal an
    unsharded model's after the same step (bitwise: a group of one reduces nothing); loading them into a fresh
    sharded model and optimizer gives them back bitwise, the hyperparameters too; a parameter without optimizer
    state in the checkpoint gets none."""
    import copy

    from transformers import AutoModelForCausalLM

    from alignkit.train import sharding
    from alignkit.train.checkpoint import trainable_state

    def model_and_optimizer(shard: bool, lr: float = 1e-3):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = sharding.shard(model) if shard else model
        return model, torch.optim.AdamW(model.parameters(), lr=lr, fused=True)

    plain, plain_optimizer = model_and_optimizer(False)
    sharded, sharded_optimizer = model_and_optimizer(True)
    _, empty = sharding.gather_checkpoint_state(sharded, sharded_optimizer)
    assert empty == plain_optimizer.state_dict() and not sharded_optimizer.state
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    for model, optimizer in ((plain, plain_optimizer), (sharded, sharded_optimizer)):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    weights, state = sharding.gather_checkpoint_state(sharded, sharded_optimizer)
    expected_weights, expected_state = trainable_state(plain), plain_optimizer.state_dict()
    assert weights.keys() == expected_weights.keys() and all(torch.equal(weights[n], expected_weights[n]) for n in weights)
    assert state["param_groups"] == expected_state["param_groups"] and state["state"].keys() == expected_state["state"].keys()
    assert all(torch.equal(state["state"][i][k], expected_state["state"][i][k]) for i in state["state"] for k in state["state"][i])

    partial = copy.deepcopy(expected_state)
    del partial["state"][3]
    fresh, fresh_optimizer = model_and_optimizer(True, lr=5.0)  # the saved learning rate must replace 5.0
    sharding.load_checkpoint_state(fresh, fresh_optimizer, {n: t.clone() for n, t in expected_weights.items()}, copy.deepcopy(partial))
    weights, state = sharding.gather_checkpoint_state(fresh, fresh_optimizer)
    assert all(torch.equal(weights[n], expected_weights[n]) for n in weights)
    assert state["param_groups"] == expected_state["param_groups"] and state["state"].keys() == partial["state"].keys()
    assert all(torch.equal(state["state"][i][k], partial["state"][i][k]) for i in state["state"] for k in state["state"][i])
