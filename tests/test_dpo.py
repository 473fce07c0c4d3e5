"""DPO trainer: exact invariants, logged numbers vs a direct two-model computation, precompute, LoRA, learning."""

import gc
import json
import math
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.config import DPOConfig
from alignkit.data import tasks
from alignkit.data.formats import write_jsonl
from alignkit.data.preferences import load_preferences, tokenize_preference
from alignkit.data.tokenize import Formatting
from alignkit.train import dpo
from learning import dpo_after_sft


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory):
    """Every row format: strings, messages (with a system turn), an implicit prompt, a ranking of 3."""
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in tasks.make_preferences("arithmetic", "train", 4, seed=3)]
    rows.append({"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Which number is larger, 12 or 71?"}],
                 "chosen": [{"role": "assistant", "content": "71"}], "rejected": [{"role": "assistant", "content": "12"}]})
    rows.append({"chosen": [{"role": "user", "content": "Reverse 'garden'."}, {"role": "assistant", "content": "nedrag"}],
                 "rejected": [{"role": "user", "content": "Reverse 'garden'."}, {"role": "assistant", "content": "garden, reversed, is nedrag"}]})
    rows.append({"prompt": "Spell 'cat'.", "responses": ["c-a-t", "c-a-t-t", "dog"]})
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    write_jsonl(rows, path)
    return path  # 4 + 1 + 1 + 3 = 9 pairs


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    from alignkit.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-ref") / "model", hidden_size=64, num_layers=2, seed=1)


def run(tmp_path, model_dir, data, **overrides):
    settings = dict(model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(tmp_path / "out"), max_steps=1,
                    per_device_train_batch_size=16, learning_rate=0.0, logging_steps=1, progress=False, max_length=128)
    settings.update(overrides)
    dpo.run_dpo(DPOConfig(**settings))
    return [json.loads(line) for line in open(settings["output_dir"] + "/metrics.jsonl")]


@pytest.fixture
def loads(monkeypatch):
    """Every model run_dpo loads, as weak references (counting them; checking that one was freed)."""
    loaded = []
    original = dpo.load_causal_lm

    def counting(path, *args, **kwargs):
        model = original(path, *args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(dpo, "load_causal_lm", counting)
    return loaded


# ---------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("loss_type, expected", [("sigmoid", math.log(2)), ("ipo", 1 / (4 * 0.1**2)), ("hinge", 1.0)])
def test_first_loss_with_the_policy_as_reference_is_exact(tmp_path, tiny_model_dir, pref_file, loss_type, expected):
    row = run(tmp_path, tiny_model_dir, pref_file, loss_type=loss_type, beta=0.1)[0]
    assert row["loss"] == pytest.approx(expected, rel=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert row[key] == 0.0, key  # π = π_ref exactly: chosen and rejected rows go through the same computation


# ---------------------------------------------------------------------------------------------- vs a direct computation


def sequence_logps(model_dir, pref_file):
    """Per pair: (Σ log p chosen, Σ log p rejected, |chosen|, |rejected|), each sequence alone, full logits, float64."""
    from alignkit.models import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).double()
    out = []
    for example in load_preferences(str(pref_file)):
        tokenized = tokenize_preference(example, tokenizer, Formatting())
        scores = []
        for response in tokenized.response_ids:
            ids = tokenized.prompt_ids + response
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
            start = len(tokenized.prompt_ids)
            scores.append((sum(log_probs[t - 1, ids[t]].item() for t in range(start, len(ids))), len(response)))
        out += [(scores[w][0], scores[l][0], scores[w][1], scores[l][1]) for w, l in tokenized.pairs]
    return out


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > -30 else x


def direct_row(policy, reference, cfg: dict) -> dict:
    """The mean over pairs of each loss and metric, from the formulas in the issue (written out anew here)."""
    beta, eps, gamma, alpha = cfg.get("beta", 0.1), cfg.get("label_smoothing", 0.0), cfg.get("simpo_gamma", 0.5), cfg.get("sft_weight", 0.0)
    kind = cfg.get("loss_type", "sigmoid")
    rows = []
    for (pc, pr, nc, nr), (rc, rr, _, _) in zip(policy, reference):
        if kind == "simpo":
            reward_c, reward_r = beta * pc / nc, beta * pr / nr
            z = reward_c - reward_r - gamma
            loss = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
        else:
            reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
            h = (pc - rc) - (pr - rr)
            loss = {
                "sigmoid": -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h),
                "robust": (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps),
                "hinge": max(0.0, 1 - beta * h),
                "ipo": (h - 1 / (2 * beta)) ** 2,
            }[kind]
        loss += alpha * (-pc / nc)
        rows.append({"loss": loss, "rewards/chosen": reward_c, "rewards/rejected": reward_r, "rewards/margins": reward_c - reward_r,
                     "rewards/accuracies": float(reward_c > reward_r), "logps/chosen": pc, "logps/rejected": pr, "nll": -pc / nc})
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def direct_tolerances(policy, reference, cfg: dict, precision: float = 1e-5) -> dict:
    """Absolute tolerance of each key of `direct_row`. alignkit runs in float32 and the direct rows in float64;
    a float32 sum of log-probs is good to `precision` of its own size (float32 rounds at 6e-8, and a
    log-prob is ~100 operations deep). Each key is a function of a pair's four log-prob sums, so it may move
    by |∂key/∂sum| · Σ|sums| · precision: relative to the log-probs it combines, not to the result (a
    margin is a small difference of sums of about −40). Accuracies are exact if no margin is that close
    to a tie (asserted)."""
    beta, eps, kind = cfg.get("beta", 0.1), cfg.get("label_smoothing", 0.0), cfg.get("loss_type", "sigmoid")
    rows = []
    for (pc, pr, nc, nr), (rc, rr, _, _) in zip(policy, reference):
        if kind == "simpo":  # rewards β·(log-prob sum)/length, no reference
            size, margin = (abs(pc) / nc + abs(pr) / nr) * precision, pc / nc - pr / nr
        else:
            size, margin = (abs(pc) + abs(pr) + abs(rc) + abs(rr)) * precision, (pc - rc) - (pr - rr)
        slope = 2 * abs(margin - 1 / (2 * beta)) if kind == "ipo" else beta / (1 - 2 * eps if kind == "robust" else 1)
        assert abs(margin) > size, "a pair too close to a tie for an exact accuracy"
        nll = abs(pc) / nc * precision
        rows.append({"loss": slope * size + cfg.get("sft_weight", 0.0) * nll, "rewards/chosen": beta * size, "rewards/rejected": beta * size,
                     "rewards/margins": beta * size, "rewards/accuracies": 0.0, "logps/chosen": abs(pc) * precision,
                     "logps/rejected": abs(pr) * precision, "nll": nll})
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


@pytest.fixture(scope="module")
def both_logps(tiny_model_dir, other_model_dir, pref_file):
    return sequence_logps(tiny_model_dir, pref_file), sequence_logps(other_model_dir, pref_file)


@pytest.mark.parametrize("cfg", [
    dict(loss_type="sigmoid", beta=0.5),
    dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.2),  # conservative DPO
    dict(loss_type="robust", beta=0.3, label_smoothing=0.1),
    dict(loss_type="hinge", beta=0.2),
    dict(loss_type="ipo", beta=0.5, sft_weight=0.7),  # + RPO's NLL term
    dict(loss_type="simpo", beta=2.0, simpo_gamma=0.3),
], ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_logged_metrics_equal_a_direct_computation_with_both_models(tmp_path, tiny_model_dir, other_model_dir, pref_file, both_logps, loads, cfg):
    # 9 pairs in micro-batches of 2 (the last one holds 1), accumulated into one step: the loss is the mean over pairs
    row = run(tmp_path, tiny_model_dir, pref_file, ref_model=str(other_model_dir), per_device_train_batch_size=2,
              gradient_accumulation_steps=5, **cfg)[0]
    expected, tolerance = direct_row(*both_logps, cfg), direct_tolerances(*both_logps, cfg)
    assert row["epoch"] == 1.0
    for key, value in expected.items():
        if key != "nll" or cfg.get("sft_weight"):
            assert row[key] == pytest.approx(value, rel=0, abs=tolerance[key] + 1e-7), key  # 1e-7: float32 of the mean
    assert 0 < expected["rewards/accuracies"] < 1 or cfg["loss_type"] == "simpo"  # the two models really disagree
    assert len(loads) == (1 if cfg["loss_type"] == "simpo" else 2)  # simpo is reference-free: nothing else loaded


@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_shared_prompt_rows_give_the_log_probs_of_separate_rows(tmp_path, pref_file, tokenizer, arch):
    from alignkit.models import load_causal_lm
    from alignkit.testing import make_tiny_model

    model = load_causal_lm(str(make_tiny_model(tmp_path / arch, arch=arch, hidden_size=32, num_layers=2))).eval()
    assert dpo.supports_custom_masks(model)
    pairs = dpo.build_pairs(str(pref_file), "train", tokenizer, DPOConfig(dataset=str(pref_file)), "train", {})
    with torch.no_grad():
        shared, lengths = dpo.sequence_logps(model, dpo.collate(pairs, tokenizer.pad_token_id, shared=True))
        separate, _ = dpo.sequence_logps(model, dpo.collate(pairs, tokenizer.pad_token_id, shared=False))
    assert torch.allclose(shared, separate, rtol=1e-5, atol=1e-4)
    assert lengths.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]


def test_chosen_nll_is_the_per_token_negative_log_likelihood():
    from alignkit.losses import chosen_nll

    got = chosen_nll(torch.tensor([-6.0, -1.5]), torch.tensor([3, 1]))
    assert got.tolist() == pytest.approx([2.0, 1.5])


# ---------------------------------------------------------------------------------------------- reference handling


def test_precomputed_reference_gives_the_same_losses_and_frees_the_model(tmp_path, tiny_model_dir, other_model_dir, pref_file, loads, monkeypatch):
    common = dict(ref_model=str(other_model_dir), learning_rate=1e-3, max_steps=3, per_device_train_batch_size=4,
                  lr_scheduler_type="constant", eval_dataset=str(pref_file))
    live = run(tmp_path / "live", tiny_model_dir, pref_file, **common)
    original_train = dpo.train
    alive_during_training = []

    def checking_train(stage, cfg):
        gc.collect()
        alive_during_training.extend(ref() is not None for ref in loads)
        return original_train(stage, cfg)

    monkeypatch.setattr(dpo, "train", checking_train)
    loads.clear()
    cached = run(tmp_path / "cached", tiny_model_dir, pref_file, precompute_ref_log_probs=True, **common)
    assert alive_during_training == [True, False]  # the policy, and the reference already freed
    assert [r["step"] for r in live] == [r["step"] for r in cached]
    for a, b in zip(live, cached):  # step 1 is at the starting weights (= lr 0); steps 2 and 3 after updates
        for key in a:
            if "loss" in key or "rewards" in key:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_lora_reference_is_the_base_model_with_the_adapter_disabled(tmp_path, tiny_model_dir, pref_file, loads, tokenizer):
    from alignkit.models import LoraSettings, apply_lora, load_causal_lm

    row = run(tmp_path, tiny_model_dir, pref_file, use_peft=True)[0]
    assert len(loads) == 1  # no second copy of the model
    assert row["loss"] == pytest.approx(math.log(2), rel=1e-6)  # fresh adapters: policy = base model

    cfg = DPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(pref_file))
    pairs = dpo.build_pairs(str(pref_file), "train", tokenizer, cfg, "train", {})
    batch = dpo.collate(pairs, tokenizer.pad_token_id)
    model = apply_lora(load_causal_lm(str(tiny_model_dir)), LoraSettings())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # a trained adapter: the policy now differs from the base model
        policy = dpo.sequence_logps(model, batch)[0]
        base = dpo.sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)[0]
    reference = dpo.adapter_disabled_reference(model, batch)
    assert torch.allclose(reference, base, atol=1e-5)
    assert not torch.allclose(policy, base, atol=1e-2)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_resume_is_exact(tmp_path, tiny_model_dir, pref_file):
    common = dict(learning_rate=1e-3, max_steps=4, per_device_train_batch_size=3, save_steps=2, beta=0.5)
    straight = run(tmp_path / "straight", tiny_model_dir, pref_file, **common)
    run(tmp_path / "resumed", tiny_model_dir, pref_file, **common)
    again = run(tmp_path / "resumed", tiny_model_dir, pref_file, resume_from_checkpoint=str(tmp_path / "resumed/out/checkpoints/step-2"), **common)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(straight, again):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert straight[-1]["loss"] != straight[0]["loss"]


def test_bad_flags_fail_before_loading_anything(tmp_path, pref_file, loads):
    from typer.testing import CliRunner

    from alignkit.cli import app

    for bad, message in [(dict(loss_type="kto"), "--loss_type"), (dict(label_smoothing=0.5), "label_smoothing"),
                         (dict(beta=0.0), "--beta"), (dict(dataset=""), "--dataset is required")]:
        with pytest.raises(ValueError, match=message):
            dpo.run_dpo(DPOConfig(**{"dataset": str(pref_file), "output_dir": str(tmp_path), **bad}))
    assert loads == []
    result = CliRunner().invoke(app, ["dpo", "--dataset", str(pref_file), "--loss_type", "nope"])
    assert result.exit_code == 2 and "loss_type" in result.output


# ---------------------------------------------------------------------------------------------- learning


def test_dpo_teaches_the_preferred_answer_after_sft(tmp_path):
    """SFT briefly on 'which number is larger' (exact match ≈ 0.35), then DPO on larger-over-smaller pairs.

    Held-out pairs are unseen number pairs. "More likely under sampling" is measured exactly: at temperature 1
    the sampler draws a response y with probability π(y | x) = exp(Σ log-probs), so the mean of that over the
    held-out prompts is the rate at which samples are the chosen (or the rejected) answer, without sampling noise.
    Plain DPO on these near-identical pairs lowers π(chosen) too (it pushes both down, the rejected faster), so
    this run adds RPO's NLL term (--sft_weight 1); docs/dpo.md has the plain-DPO numbers.

    Measured on the current code (2026-12-01; one thread, the shared 2-core AMD EPYC; 11 seeds: 42 and 1–10,
    each setting the tiny model's init, the SFT and the DPO seed; `tests/learning.py dpo`; 1–4 min a run):
    held-out accuracy min 0.865, median 0.91, max 0.965 (a plateau from step 30; π = π_ref gives 0, chance
    0.5); π(chosen) after/before min 1.041, median 1.09, max 1.197; π(rejected) after/before min 0.615, median
    0.766, max 0.835. Bounds: accuracy ≥ 0.75 (worst 0.865); π(chosen) must not fall, > 1.0 (worst 1.041):
    that is the property --sft_weight adds (plain DPO lowers it, docs/dpo.md), so it is not loosened further;
    π(rejected) < 0.95 × before (worst 0.835; it was 0.9 until seed 1 gave 0.835; an unchanged model gives 1).
    Seed 42 with ATEN_CPU_CAPABILITY=default: 0.935, ×1.079, ×0.615 (native: the same).
    """
    result = dpo_after_sft(tmp_path, seed=42)
    assert result["accuracy"] >= 0.75, result  # held-out preference accuracy of the implicit reward
    assert result["chosen_after"] > result["chosen_before"], result  # measured 0.097 -> 0.105 (seed 42)
    assert result["rejected_after"] < 0.95 * result["rejected_before"], result  # measured 0.014 -> 0.009
