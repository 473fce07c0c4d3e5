"""The training engine around every stage: --gradient_checkpointing (really recomputes, changes nothing else)
and --report_to tensorboard (the logged rows, read back from the event file)."""

import json

import pytest
import torch
from stages import files, run_stage  # noqa: F401 (a fixture)

# the values each stage logs that a forward (step 1) and the update after it (step 2) decide
LOGGED = {"sft": ["loss"], "rm": ["loss", "accuracy"], "dpo": ["loss", "rewards/margins"], "ppo": ["entropy", "policy_loss", "value_loss", "kl"]}


@pytest.fixture
def checkpointed_calls(monkeypatch):
    """Counts the layer forwards transformers runs through torch's checkpoint (0 = nothing was checkpointed)."""
    import transformers.modeling_utils as modeling_utils

    calls = []
    original = modeling_utils.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting)
    return calls


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_gradient_checkpointing_recomputes_and_changes_no_number(stage, files, tiny_model_dir, tmp_path, checkpointed_calls):  # noqa: F811
    """With the flag, every decoder layer of the trained model goes through (non-reentrant) checkpointing; two
    steps with a learning rate give the same logged values as without it, to float32 rounding: the backward
    recomputes each layer's forward with the same inputs and kernels, so the gradients (and the update that
    step 2's numbers depend on) are the same; 1e-5 relative covers summation-order differences."""
    settings = dict(max_steps=2, learning_rate=1e-3, lr_scheduler_type="constant")
    plain = run_stage(stage, files, tiny_model_dir, tmp_path / "plain", **settings)
    assert checkpointed_calls == []
    checkpointed = run_stage(stage, files, tiny_model_dir, tmp_path / "ckpt", gradient_checkpointing=True, **settings)
    assert len(checkpointed_calls) >= 2 * 2 and set(checkpointed_calls) == {False}  # 2 layers × 2 steps at least, non-reentrant
    assert [r["step"] for r in plain] == [r["step"] for r in checkpointed] == [1, 2]
    for a, b in zip(plain, checkpointed):
        for key in LOGGED[stage]:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a[key], b[key])
    if stage != "ppo":  # the update moved the weights (PPO's kl at step 2 shows its update did)
        assert plain[1]["loss"] != plain[0]["loss"]


def test_gradient_checkpointing_keeps_fewer_activations_and_equal_gradients(tiny_model_dir):
    """Saved-for-backward bytes of one SFT forward drop with checkpointing (only each layer's input is kept),
    and the gradients equal those without it (same float32 computations replayed: 1e-6 relative)."""
    from alignkit.models import load_causal_lm
    from alignkit.train.loop import enable_gradient_checkpointing
    from alignkit.train.sft import sft_loss

    g = torch.Generator().manual_seed(0)
    weights = torch.zeros(4, 48)
    weights[:, -4:] = 1  # few unembedded positions: the layers' activations dominate what the forward saves
    batch = {"input_ids": torch.randint(0, 1000, (4, 48), generator=g), "attention_mask": torch.ones(4, 48, dtype=torch.long),
             "weights": weights}

    def saved_bytes_and_grads(checkpointing: bool):
        model = load_causal_lm(str(tiny_model_dir)).train()
        if checkpointing:
            assert enable_gradient_checkpointing(model) == 1
        saved, parameters = [], {p.data_ptr() for p in model.parameters()}

        def pack(t):  # activations only: weights are kept either way
            if t.data_ptr() not in parameters:
                saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = sft_loss(model, batch)
        forward_bytes = sum(saved)
        loss.backward()
        return forward_bytes, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_bytes, plain_grads = saved_bytes_and_grads(False)
    ckpt_bytes, ckpt_grads = saved_bytes_and_grads(True)
    assert ckpt_bytes < 0.8 * plain_bytes, (ckpt_bytes, plain_bytes)
    for name, grad in plain_grads.items():
        assert torch.allclose(ckpt_grads[name], grad, rtol=1e-6, atol=1e-9), name


def test_gradient_checkpointing_with_lora_trains_the_adapters(files, tiny_model_dir, tmp_path, checkpointed_calls):  # noqa: F811
    """LoRA freezes the embeddings: the inputs are made to require grad, so the adapters still get gradients."""
    settings = dict(max_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    plain = run_stage("sft", files, tiny_model_dir, tmp_path / "plain", **settings)
    checkpointed = run_stage("sft", files, tiny_model_dir, tmp_path / "ckpt", gradient_checkpointing=True, **settings)
    assert checkpointed_calls
    assert [r["loss"] for r in checkpointed] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    assert checkpointed[1]["loss"] != checkpointed[0]["loss"] and checkpointed[0]["grad_norm"] > 0


def _scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_report_to_tensorboard_writes_every_logged_row(stage, files, tiny_model_dir, tmp_path):  # noqa: F811
    """Each numeric field of each metrics.jsonl row is a scalar at its step under OUTPUT/runs/ (float32 in the event file)."""
    rows = run_stage(stage, files, tiny_model_dir, tmp_path / "out", max_steps=2, learning_rate=1e-3, report_to="tensorboard")
    scalars = _scalars(tmp_path / "out" / "runs")
    key = "loss" if stage == "sft" else "policy_loss"
    assert [step for step, _ in scalars[f"train/{key}"]] == [r["step"] for r in rows] == [1, 2]
    assert [value for _, value in scalars[f"train/{key}"]] == pytest.approx([r[key] for r in rows], rel=1e-6, abs=1e-12)
    assert [step for step, _ in scalars["train/learning_rate"]] == [1, 2]


def test_report_to_none_writes_no_events_and_wandb_needs_its_package(files, tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    import builtins

    run_stage("sft", files, tiny_model_dir, tmp_path / "none", max_steps=1)
    assert not (tmp_path / "none" / "runs").exists()
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ValueError, match="--report_to wandb needs the wandb package"):
        run_stage("sft", files, tiny_model_dir, tmp_path / "wandb", max_steps=1, report_to="wandb")
    with pytest.raises(ValueError, match="--report_to must be one of"):
        run_stage("sft", files, tiny_model_dir, tmp_path / "bad", max_steps=1, report_to="mlflow")


def test_metrics_rows_stay_json(tmp_path):
    """The tensorboard writer skips what is not a number (None grad_norm, booleans stay numbers)."""
    from alignkit.train.loop import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", True, report_to="tensorboard", run_dir=tmp_path / "runs")
    log.write({"step": 1, "loss": 2.5, "grad_norm": None, "early_stopped": True, "note": "x"})
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.5, "grad_norm": None, "early_stopped": True, "note": "x"}
    scalars = _scalars(tmp_path / "runs")
    assert scalars["train/loss"] == [(1, 2.5)] and scalars["train/early_stopped"] == [(1, 1.0)] and "train/grad_norm" not in scalars
