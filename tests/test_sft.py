"""SFT trainer: the logged loss equals an independent computation; accumulation, packing, resume."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.config import SFTConfig
from alignkit.data import tasks
from alignkit.data.formats import write_jsonl
from alignkit.data.tokenize import Formatting, tokenize_example
from alignkit.train.loop import find_checkpoint
from alignkit.train.sft import collate, pack_examples, SFTExample, sft_loss
from learning import sft_learns_comparison


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = tasks.make_mixture(["reversal", "arithmetic"], "train", 8, seed=1)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], path)
    return path


def run(tmp_path, model_dir, data, **overrides):
    from alignkit.train.sft import run_sft

    settings = dict(
        model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(tmp_path / "out"), max_steps=1,
        per_device_train_batch_size=16, learning_rate=0.0, logging_steps=1, progress=False, max_length=128,
    )
    settings.update(overrides)
    run_sft(SFTConfig(**settings))
    return [json.loads(line) for line in open(settings["output_dir"] + "/metrics.jsonl")]


def direct_loss(model_dir, data, prompt_loss_weight):
    """Σ w·CE / Σ w over the whole file, from full logits of the plain transformers model."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    total, weight_sum = 0.0, 0.0
    for line in open(data):
        row = json.loads(line)
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        ids, weights = tokenize_example({"messages": messages}, tokenizer, Formatting(prompt_loss_weight=prompt_loss_weight))
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        for t in range(1, len(ids)):
            total += -weights[t] * log_probs[t - 1, ids[t]].item()
            weight_sum += weights[t]
    return total / weight_sum


@pytest.mark.parametrize("prompt_loss_weight", [0.0, 0.5, 1.0])
def test_logged_step_one_loss_equals_direct_computation(tmp_path, tiny_model_dir, data_file, prompt_loss_weight):
    rows = run(tmp_path, tiny_model_dir, data_file, prompt_loss_weight=prompt_loss_weight, eval_dataset=str(data_file))
    expected = direct_loss(tiny_model_dir, data_file, prompt_loss_weight)
    assert rows[0]["step"] == 1
    assert math.isclose(rows[0]["loss"], expected, rel_tol=1e-5)
    assert math.isclose(rows[1]["eval_loss"], expected, rel_tol=1e-5)  # lr 0: the model did not move


def test_prompt_weights_change_the_loss_as_defined(tmp_path, tiny_model_dir, data_file):
    losses = {w: run(tmp_path / str(w), tiny_model_dir, data_file, prompt_loss_weight=w)[0]["loss"] for w in (0.0, 0.5, 1.0)}
    assert len(set(losses.values())) == 3
    # 0.5 lies between masked and full weighting
    assert min(losses[0.0], losses[1.0]) < losses[0.5] < max(losses[0.0], losses[1.0])


def test_packed_loss_equals_unpacked_loss(tiny_model_dir, tokenizer, data_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    examples = []
    for line in open(data_file):
        row = json.loads(line)
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        examples.append(SFTExample(*tokenize_example({"messages": messages}, tokenizer, Formatting(prompt_loss_weight=0.3))))
    packed = pack_examples(examples, max_length=128)
    assert len(packed) < len(examples)
    with torch.no_grad():
        unpacked_sum, _ = sft_loss(model, collate(examples, tokenizer.pad_token_id))
        packed_sum, _ = sft_loss(model, collate(packed, tokenizer.pad_token_id))
    weight_sum = sum(sum(e.weights) for e in examples)
    assert sum(sum(e.weights) for e in packed) == pytest.approx(weight_sum)
    assert packed_sum.item() / weight_sum == pytest.approx(unpacked_sum.item() / weight_sum, rel=1e-5)
    # cross-contamination would change it: the same rows packed with one shared position range differ
    leaky = [SFTExample(e.input_ids, e.weights, list(range(len(e.input_ids)))) for e in packed]
    with torch.no_grad():
        leaky_sum, _ = sft_loss(model, collate(leaky, tokenizer.pad_token_id))
    assert abs(leaky_sum.item() - packed_sum.item()) / weight_sum > 1e-3


def test_packed_training_logs_the_unpacked_loss(tmp_path, tiny_model_dir, data_file):
    plain = run(tmp_path / "plain", tiny_model_dir, data_file)
    packed = run(tmp_path / "packed", tiny_model_dir, data_file, packing=True)
    assert packed[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_model_dir, data_file):
    common = dict(learning_rate=1e-3, max_steps=2, lr_scheduler_type="constant", max_grad_norm=0.0)
    big = run(tmp_path / "big", tiny_model_dir, data_file, per_device_train_batch_size=8, gradient_accumulation_steps=1, **common)
    small = run(tmp_path / "small", tiny_model_dir, data_file, per_device_train_batch_size=1, gradient_accumulation_steps=8, **common)
    for a, b in zip(big, small):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["tokens"] == b["tokens"]
    w_big = load_file(str(tmp_path / "big/out/model.safetensors"))
    w_small = load_file(str(tmp_path / "small/out/model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    for name in w_big:
        # Adam normalizes each gradient, so summation-order noise shows up at ~0.1% of the 2e-3 update
        assert torch.allclose(w_big[name], w_small[name], atol=2e-5), name
    assert any(not torch.equal(w_big[n], start[n]) for n in w_big)  # the step really moved the weights


def test_resume_is_exact(tmp_path, tiny_model_dir, data_file):
    common = dict(learning_rate=1e-3, max_steps=4, per_device_train_batch_size=4, save_steps=2, warmup_ratio=0.5)
    straight = run(tmp_path / "straight", tiny_model_dir, data_file, **common)
    first = run(tmp_path / "resumed", tiny_model_dir, data_file, **{**common, "max_steps": 4, "save_steps": 2})
    checkpoint = tmp_path / "resumed/out/checkpoints/step-2"
    assert (checkpoint / "trainer_state.json").exists()
    assert find_checkpoint("latest", str(tmp_path / "resumed/out")) == tmp_path / "resumed/out/checkpoints/step-4"
    again = run(tmp_path / "resumed", tiny_model_dir, data_file, resume_from_checkpoint=str(checkpoint), **common)
    assert [r["step"] for r in again] == [1, 2, 3, 4]  # rows after the checkpoint were rewritten
    for a, b in zip(straight, again):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    w1 = load_file(str(tmp_path / "straight/out/model.safetensors"))
    w2 = load_file(str(tmp_path / "resumed/out/model.safetensors"))
    assert all(torch.allclose(w1[n], w2[n], atol=1e-7) for n in w1)
    assert first[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-6)


def test_saved_model_reloads_with_plain_transformers(tmp_path, tiny_model_dir, data_file):
    run(tmp_path, tiny_model_dir, data_file, learning_rate=1e-3)
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "config.yaml", "metrics.jsonl"):
        assert (out / name).exists(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    trained = load_file(str(out / "model.safetensors"))
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])


def test_sft_learns_a_task_and_generalizes_to_held_out_items(tmp_path):
    """A random tiny model learns 'which number is larger' from 2,000 examples; test items are unseen pairs.

    Measured over 10 seeds (42, 0–8: the tiny model's init seed and --seed; 42 is model seed 0 with --seed 42;
    `tests/learning.py sft`), one thread, the shared 2-core AMD EPYC (AVX2), 2026-12-01: held-out exact match
    min 0.82, median 0.895–0.90 (the first five were recorded as min/median/max only), max 0.94; seeds 2, 4–7,
    run now: 0.92, 0.82, 0.89, 0.88, 0.93. Last logged loss / first: min 0.012, median ≈ 0.02, max 0.029.
    Untrained exact match 0.00 for every seed. Seed 42 with ATEN_CPU_CAPABILITY=default: 0.90, loss ratio
    0.030. Bounds: exact match ≥ 0.7 (worst seed 0.82; a model that learned the answer format but guesses
    which number is larger would score about 0.5, so the bound stays above that); loss ratio < 0.1 (worst
    0.029); untrained < 0.1."""
    result = sft_learns_comparison(tmp_path, seed=42)
    assert result["loss_ratio"] < 0.1, result
    assert result["exact_match_before"] < 0.1 and result["exact_match_after"] >= 0.7, result
