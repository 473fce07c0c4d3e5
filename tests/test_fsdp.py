"""FSDP2 with 2 CPU processes (gloo) through the shipped accelerate config: each rank holds about half of the
parameters, and SFT, RM, DPO (and LoRA) give the step losses, gradient norms, evaluation loss and saved weights
of one process with the same global batch; the final model is one Hugging Face directory that reloads. What
alignkit's own FSDP path does not support (FSDP1, DeepSpeed without CUDA) is refused before any model loads
(exit code 2). Checkpoints and exact resume under FSDP: tests/test_fsdp_checkpoint.py."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from alignkit.data import tasks
from alignkit.data.formats import write_jsonl
from alignkit.train import sharding
from test_distributed import DATA, accelerate_launch, stage_args

HOLDS = re.compile(r"FSDP2: rank (\d) holds (\d+) of (\d+) parameter elements")


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    """16 training rows and 5 evaluation rows: 3 + 2 per process, so with batches of 2 one process has a batch
    more than the other (the evaluation must not hang on the uneven shares)."""
    folder = tmp_path_factory.mktemp("fsdp-data")
    rows = tasks.make_mixture(["reversal", "arithmetic"], "train", 8, seed=2)
    write_jsonl(rows, folder / "train.jsonl")
    write_jsonl(rows[:5], folder / "eval.jsonl")
    return folder


def run_fsdp_and_one(stage, model_dir, data, tmp_path, extra=()):
    """FSDP (2 processes, batch 4 each) and one process (2 accumulated micro-batches of 4): (rows of each, the
    launch's output). Gradients are clipped at 1.0 so the logged norm is the clipped one of all parameters."""
    from alignkit.cli import app

    args = [*stage_args(stage, model_dir, data, tmp_path / "fsdp"), "--max_grad_norm", "1.0", *extra]
    launched = accelerate_launch("fsdp.yaml", args)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = [*stage_args(stage, model_dir, data, tmp_path / "one"), "--max_grad_norm", "1.0", "--gradient_accumulation_steps", "2", *extra]
    result = CliRunner().invoke(app, one)
    assert result.exit_code == 0, result.output
    rows = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in ("one", "fsdp")}
    return rows, launched.stdout + launched.stderr


def assert_sharded(output: str) -> None:
    """Both ranks said how many parameter elements they hold: about half each, together all of them. Under a
    silent fall-back to DDP (accelerate's behaviour on CPU) no rank would say it, or each would hold all."""
    holds = {int(rank): (int(local), int(total)) for rank, local, total in HOLDS.findall(output)}
    assert sorted(holds) == [0, 1], output[-2000:]
    total = holds[0][1]
    assert holds[0][0] + holds[1][0] == total
    assert all(0.45 * total < local < 0.55 * total for local, _ in holds.values())


def assert_same_run(rows, weights_one: dict, weights_fsdp: dict) -> None:
    """Losses to 1e-5 relative (float32 sums in another order, ~1e-7 each, as under DDP); gradient norms to 2e-4
    relative: the norm is a float32 reduction of ~3.2M squares (the 49k×64 tied embedding dominates), itself off
    from the float64 norm by up to 6.4e-5 at that size, and FSDP takes it over two half-shards, which moves it by
    up to 4.3e-5 (both measured on 5 random vectors of 3.2M; in these runs ≤ 2.2e-5; DDP's is bitwise equal);
    weights to 2e-5 absolute (two Adam steps: a rounding-level gradient difference moves a weight ≪ lr)."""
    train = {name: [r for r in rows[name] if "loss" in r] for name in rows}
    assert [r["step"] for r in train["fsdp"]] == [1, 2]
    for a, b in zip(train["one"], train["fsdp"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-4)
    assert train["one"][1]["loss"] != train["one"][0]["loss"]  # the update did something
    assert weights_one.keys() == weights_fsdp.keys()
    assert all(torch.allclose(weights_one[n], weights_fsdp[n], atol=2e-5) for n in weights_one)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_fsdp_two_processes_equal_one_process(stage, tiny_model_dir, sft_files, tmp_path):
    extra = ["--eval_dataset", str(sft_files / "eval.jsonl"), "--per_device_eval_batch_size", "2"] if stage == "sft" else []
    rows, output = run_fsdp_and_one(stage, tiny_model_dir, DATA[stage] or sft_files / "train.jsonl", tmp_path, extra)
    assert_sharded(output)
    assert sorted(p.name for p in (tmp_path / "fsdp").glob("*.safetensors")) == ["model.safetensors"]
    assert_same_run(rows, load_file(str(tmp_path / "one/model.safetensors")), load_file(str(tmp_path / "fsdp/model.safetensors")))
    if stage == "sft":  # evaluation over uneven shares: every example counted once
        evals = {name: [r["eval_loss"] for r in rows[name] if "eval_loss" in r] for name in rows}
        assert len(evals["fsdp"]) == 1 and evals["fsdp"][0] == pytest.approx(evals["one"][0], rel=1e-5)

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    reloaded = loader.from_pretrained(tmp_path / "fsdp")
    saved = load_file(str(tmp_path / "fsdp/model.safetensors"))
    state = reloaded.state_dict()
    assert all(torch.equal(state[name], value) for name, value in saved.items())


@pytest.fixture
def adapter_dir(tiny_model_dir, tmp_path):
    """A LoRA adapter with nonzero A and B (a fresh adapter's B is 0 and its A is drawn unseeded before the run's
    seed is set, so two runs would not start alike)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_lora_under_fsdp_equals_one_process(adapter_dir, sft_files, tmp_path):
    """LoRA: frozen base and trainable adapters share the shard units; the saved adapter equals one process's."""
    rows, output = run_fsdp_and_one("sft", adapter_dir, sft_files / "train.jsonl", tmp_path, ["--learning_rate", "1e-2"])
    assert_sharded(output)
    one, fsdp = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("one", "fsdp"))
    assert len(one) == 28  # 7 linear layers × 2 decoder layers × (A, B)
    assert_same_run(rows, one, fsdp)
    assert not any(torch.equal(one[n], load_file(str(adapter_dir / "adapter_model.safetensors"))[n]) for n in one)  # trained


# ---------------------------------------------------------------------------------------------
# refusals and pieces, in one process


def fsdp_env(monkeypatch, **variables):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("flag, env, message", [
    ([], {"FSDP_VERSION": "1"}, "fsdp_version: 2"),
    ([], {"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
    ([], {"ACCELERATE_USE_FSDP": "false", "ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
])
def test_unsupported_sharding_is_refused_before_loading(flag, env, message, monkeypatch, tmp_path, tiny_model_dir, sft_files):
    """Exit code 2, the setting named, nothing written."""
    if torch.cuda.is_available():
        pytest.skip("on GPUs accelerate applies FSDP and DeepSpeed itself")
    from alignkit.cli import app

    fsdp_env(monkeypatch, **env)
    result = CliRunner().invoke(app, [*stage_args("sft", tiny_model_dir, sft_files / "train.jsonl", tmp_path / "out"), *flag])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_eval_chunks_give_every_process_as_many_forwards():
    """7 examples, 2 processes, batches of 2: shares of 4 and 3 -> 2 batches each; every example counted once."""
    model = torch.nn.Linear(2, 2)
    examples = list(range(7))
    plain = [sharding.eval_chunks(model, examples, rank, 2, 2) for rank in (0, 1)]
    assert [len(chunks) for chunks in plain] == [2, 2] and all(counted for chunks in plain for _, counted in chunks)
    assert sorted(e for chunks in plain for chunk, _ in chunks for e in chunk) == examples
    uneven = [sharding.eval_chunks(model, list(range(5)), rank, 2, 2) for rank in (0, 1)]
    assert [len(chunks) for chunks in uneven] == [2, 1]  # fine without FSDP: no collective in the forward
    sharding._SKELETONS[model] = model  # as shard() records a sharded model
    try:
        padded = [sharding.eval_chunks(model, list(range(5)), rank, 2, 2) for rank in (0, 1)]
    finally:
        del sharding._SKELETONS[model]
    assert [len(chunks) for chunks in padded] == [2, 2]
    counted = sorted(e for chunks in padded for chunk, ok in chunks if ok for e in chunk)
    assert counted == [0, 1, 2, 3, 4] and [ok for _, ok in padded[1]] == [True, False]


def test_meta_twin_has_the_structure_and_no_memory(tiny_model_dir):
    """The unsharded copy the final save fills: parameters on the meta device, tied weights still one parameter,
    buffers (rotary frequencies) copied; loading a full state dict into it gives the original weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    twin = sharding.meta_twin(model)
    assert all(p.is_meta for p in twin.parameters())
    assert twin.get_output_embeddings().weight is twin.get_input_embeddings().weight
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), twin.buffers()))
    twin.load_state_dict(model.state_dict(), assign=True, strict=True)
    twin.tie_weights()
    assert twin.get_output_embeddings().weight is twin.get_input_embeddings().weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    assert not any(p.is_meta for p in model.parameters())  # the original is untouched


def test_fsdp_config_names_fsdp2_and_full_state_dict():
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/accelerate/fsdp.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert config["fsdp_config"]["fsdp_offload_params"] is False and config["fsdp_config"]["fsdp_activation_checkpointing"] is False
