"""The shipped accelerate configs on this CPU: DDP with 2 processes (gloo) gives the step losses and the weights
of one process with the same global batch, and saves one Hugging Face model that reloads. FSDP: tests/test_fsdp.py."""

import json
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
