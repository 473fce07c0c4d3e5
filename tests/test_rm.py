"""Reward model: the logged loss equals an independent computation with plain transformers; pad == eos;
K-way rankings and ties; learning a synthetic task; normalization; `alignkit score`; bad input; backbones."""

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignkit.config import RMConfig
from alignkit.data import tasks
from alignkit.data.formats import DataError, Row, write_jsonl
from alignkit.data.preferences import preference_example, tokenize_preference
from alignkit.data.tokenize import Formatting
from alignkit.reward_model import RewardModel, init_head, load_reward_model
from alignkit.train.rm import collate, rm_loss, run_rm

PAIRS = [
    {"prompt": "Which number is larger, 3 or 5?", "chosen": "5", "rejected": "3"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}], "chosen": "Hi!", "rejected": "Hello there, how are you doing today?", "margin": 0.5},
    {"chosen": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
     "rejected": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Lyon, I think"}]},
]
RANKINGS = [
    {"prompt": "Sort: 3 1 2", "responses": ["1 2 3", "1 3 2", "3 2 1"]},
    {"prompt": "Name a colour.", "responses": ["red", "blue", "a car", "7"], "ranks": [1, 1, 2, 3]},
    {"prompt": "Which number is larger, 8 or 2?", "chosen": "8", "rejected": "2"},
]


def run(tmp_path, model_dir, data, **overrides):
    settings = dict(
        model_name_or_path=str(model_dir), dataset=str(data), output_dir=str(tmp_path / "out"), max_steps=1,
        per_device_train_batch_size=16, learning_rate=0.0, logging_steps=1, progress=False, max_length=256,
    )
    settings.update(overrides)
    row = run_rm(RMConfig(**settings))
    return row, [json.loads(line) for line in open(settings["output_dir"] + "/metrics.jsonl")]


def direct(model_dir, rows, margin_scale=1.0, center=0.0):
    """Loss and metrics from the plain transformers model, one unpadded sequence at a time (its own
    forward reads the last token: the chat template ends a turn with a newline, not the pad id).
    Also the rewards and pair differences, which set the comparison's tolerances."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    losses, accuracies, margins, all_rewards, diffs = [], [], [], [], []
    for row in rows:
        if "responses" in row:
            prompt, replies = [{"role": "user", "content": row["prompt"]}], row["responses"]
            ranks = row.get("ranks", list(range(len(replies))))
            pairs = [(i, j) if ranks[i] < ranks[j] else (j, i) for i in range(len(replies)) for j in range(i + 1, len(replies)) if ranks[i] != ranks[j]]
        elif "prompt" in row:
            prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
            replies, pairs = [row["chosen"], row["rejected"]], [(0, 1)]
        else:
            prompt, replies, pairs = row["chosen"][:-1], [row["chosen"][-1]["content"], row["rejected"][-1]["content"]], [(0, 1)]
        rewards = []
        for reply in replies:
            ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=True, return_dict=True)["input_ids"]
            with torch.no_grad():
                rewards.append(model(torch.tensor([ids])).logits[0, 0].double().item())
        m = row.get("margin", 0.0) * margin_scale
        per_pair = [-math.log(1 / (1 + math.exp(-(rewards[b] - rewards[w] - m)))) + center * (rewards[b] + rewards[w]) ** 2 for b, w in pairs]
        losses.append(sum(per_pair) / len(pairs))
        accuracies.append(sum(rewards[b] > rewards[w] for b, w in pairs) / len(pairs))
        margins.append(sum(rewards[b] - rewards[w] for b, w in pairs) / len(pairs))
        all_rewards.append(rewards)
        diffs += [rewards[b] - rewards[w] for b, w in pairs]
    n = len(rows)
    # each prompt weighs 1, each of its K responses 1/K; the spread is two-pass (mean first), which
    # does not cancel the way E[r²] − E[r]² does when the rewards sit far from 0
    mean = sum(sum(r) / len(r) for r in all_rewards) / n
    variance = sum(sum((x - mean) ** 2 for x in r) / len(r) for r in all_rewards) / n
    return ({"loss": sum(losses) / n, "accuracy": sum(accuracies) / n, "margin": sum(margins) / n,
             "reward_mean": mean, "reward_std": math.sqrt(variance)}, [x for r in all_rewards for x in r], diffs)


def metric_tolerances(rewards, diffs, center):
    """Absolute tolerances from the scale of the rewards. alignkit's rewards come from a batched,
    padded or shared-prompt float32 forward, the direct ones from one sequence at a time: different
    reduction orders, so each reward may differ by a few float32 ulps of the largest activations;
    1e-5·max|r| (~100 ulps) bounds that on any CPU and thread count. Every metric is a Lipschitz
    function of the rewards: the mean and the std (|Δstd| ≤ max|Δr|) move by at most δ, a pair
    difference by 2δ, −log σ(d) by 2δ, c·(r_w + r_l)² by 2c·|r_w + r_l|·2δ; accuracy is exact when
    no pair difference lies within 2δ of 0 (asserted)."""
    delta = 1e-5 * max(abs(r) for r in rewards)
    assert min(abs(d) for d in diffs) > 2 * delta, "a pair too close to a tie for an exact accuracy"
    largest = max(abs(r) for r in rewards)
    return {"loss": 2 * delta + 4 * center * 2 * largest * delta, "accuracy": 1e-6, "margin": 2 * delta,
            "reward_mean": delta, "reward_std": delta}


@pytest.mark.parametrize("rows, center", [(PAIRS, 0.0), (PAIRS, 0.1), (RANKINGS, 0.0)], ids=["pairs", "pairs-centred", "rankings"])
def test_logged_step_one_loss_equals_direct_computation(tmp_path, tiny_model_dir, rows, center):
    data = tmp_path / "prefs.jsonl"
    write_jsonl(rows, data)
    last, logged = run(tmp_path, tiny_model_dir, data, eval_dataset=str(data), center_rewards_coefficient=center)
    expected, rewards, diffs = direct(tmp_path / "out", rows, center=center)  # lr 0: the saved model is the initial one
    tolerance = metric_tolerances(rewards, diffs, center)
    for key, value in expected.items():
        assert logged[0][key] == pytest.approx(value, rel=0, abs=tolerance[key]), key
        assert logged[1][f"eval_{key}"] == pytest.approx(value, rel=0, abs=tolerance[key]), key
    assert "reward_sq" not in logged[0] and "reward_shift" not in logged[1]
    assert last["loss"] == pytest.approx(expected["loss"], rel=0, abs=tolerance["loss"])


def test_reward_std_is_exact_far_from_zero(tiny_model_dir, tokenizer):
    """Rewards at 300 ± ~0.1 (a shifted head), summed over two micro-batches as the loop sums them:
    sqrt(E[r²] − E[r]²) in float32 is noise there (E[r²] ≈ 9e4 has an ulp of 0.008, the variance is
    ~0.01); the logged std must equal the two-pass std of the same rewards. Tolerance: the rewards of
    the two micro-batches and of the full batch differ by a few ulps of 300 (3e-5 each), and the std
    moves by at most max|Δr|; 8 ulps also covers the float32 sums."""
    from alignkit.train.rm import RewardShift, add_reward_std

    rm, _ = load_reward_model(str(tiny_model_dir))
    init_head(rm.model, 1)
    rm.base.config.reward_offset = 300.0
    prefs = [preference_example(Row(r, f"t:{i}")) for i, r in enumerate(RANKINGS)]
    examples = [tokenize_preference(p, tokenizer, Formatting()) for p in prefs]
    shift, totals = RewardShift(), {}
    with torch.no_grad():
        for chunk in ([examples[0]], examples[1:]):
            _, metrics = rm_loss(rm, collate(chunk, tokenizer.pad_token_id, shared=True), shift=shift)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0) + value.float() / len(examples)
        batch = collate(examples, tokenizer.pad_token_id, shared=True)
        rewards = rm(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["last"]).double()
    row = add_reward_std({k: v.item() for k, v in totals.items()})
    groups = batch["response_group"]
    mean = torch.stack([rewards[groups == g].mean() for g in range(len(examples))]).mean()
    std = torch.stack([((rewards[groups == g] - mean) ** 2).mean() for g in range(len(examples))]).mean().sqrt().item()
    assert 0.01 < std < 1, std  # the regime the test is about
    assert row["reward_std"] == pytest.approx(std, rel=0, abs=8 * 2.0**-15)  # float32 spacing in [256, 512)


def test_pad_equal_to_eos_reads_the_last_real_token(tiny_model_dir, tokenizer):
    """Separator format: every response ends with eos, which is also the pad id. The reward must be read
    at that eos (from the attention mask), in padded flat batches and in shared-prompt rows alike."""
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    rm, _ = load_reward_model(str(tiny_model_dir))
    init_head(rm.model, 0)
    rows = [Row({"prompt": "Which number is larger, 3 or 5?", "chosen": "5", "rejected": "3"}, "t:1"),
            Row({"prompt": "A much longer prompt that makes the other rows padded", "responses": ["a b c d e f", "x", "y z"]}, "t:2")]
    examples = [tokenize_preference(preference_example(r), tokenizer, Formatting("no", " = ")) for r in rows]
    alone = []
    for e in examples:
        for k in range(len(e.response_ids)):
            sequence = e.sequence(k)
            assert sequence[-1] == tokenizer.eos_token_id
            with torch.no_grad():  # no padding at all: the hidden state of the final token
                hidden = rm.model.model(torch.tensor([sequence])).last_hidden_state[0, -1]
                alone.append(rm.model.score(hidden)[0].item())
    for shared in (False, True):
        batch = collate(examples, tokenizer.pad_token_id, shared)
        with torch.no_grad():
            rewards = rm(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "last") if k in batch})
        assert rewards.tolist() == pytest.approx(alone, abs=1e-5), shared
    # transformers' own pooling (last token that is not the pad id) reads the token before the eos
    with torch.no_grad():
        theirs = rm.model(torch.tensor([examples[0].sequence(0)])).logits[0, 0].item()
    assert theirs != pytest.approx(alone[0], abs=1e-4)


def test_rankings_with_ties_make_the_right_pairs_and_indices(tokenizer):
    ranked = preference_example(Row({"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [2, 1, 2, 3]}, "t:1"))
    assert sorted(ranked.pairs) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]  # the tie (0, 2) gives no pair
    listed = preference_example(Row({"prompt": "p", "responses": ["a", "b", "c"], "margin": 1.5}, "t:2"))
    assert listed.pairs == [(0, 1), (0, 2), (1, 2)] and listed.margin == 1.5
    examples = [tokenize_preference(p, tokenizer, Formatting()) for p in (listed, ranked)]
    batch = collate(examples, tokenizer.pad_token_id, shared=True)
    assert batch["better"].tolist() == [0, 0, 1] + [3 + b for b, _ in ranked.pairs]
    assert batch["worse"].tolist() == [1, 2, 2] + [3 + w for _, w in ranked.pairs]
    assert batch["group"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert batch["margin"].tolist() == [1.5] * 3 + [0.0] * 5
    assert len(batch["last"]) == 7


def test_accuracy_and_margin_metrics_are_direct_counts(tiny_model_dir, tokenizer):
    rm, _ = load_reward_model(str(tiny_model_dir))
    init_head(rm.model, 1)
    prefs = [preference_example(Row(r, f"t:{i}")) for i, r in enumerate(RANKINGS)]
    examples = [tokenize_preference(p, tokenizer, Formatting()) for p in prefs]
    batch = collate(examples, tokenizer.pad_token_id, shared=True)
    with torch.no_grad():
        loss, metrics = rm_loss(rm, batch)
        rewards = rm(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["last"]).tolist()
    accuracy, margin, start = 0.0, 0.0, 0
    for p in prefs:
        r = rewards[start : start + len(p.responses)]
        accuracy += sum(r[b] > r[w] for b, w in p.pairs) / len(p.pairs)
        margin += sum(r[b] - r[w] for b, w in p.pairs) / len(p.pairs)
        start += len(p.responses)
    assert metrics["accuracy"].item() == pytest.approx(accuracy)
    assert metrics["margin"].item() == pytest.approx(margin, abs=1e-5)


def test_learns_comparison_to_high_held_out_accuracy_and_saves_a_loadable_model(tmp_path, tiny_model_dir):
    """A random tiny model learns to prefer the larger number; the test pairs are unseen items.

    Before: the accuracy of step 1 (the fresh head on its first 32 pairs, fixed by the seed: 0.53 for 42;
    0.34–0.75 over 10 seeds). The mean over steps 1–40 that this used to read is already a training
    outcome (0.72–0.85 over 10 seeds, 7 of them above the old bound 0.8). After: held-out accuracy measured
    over 10 seeds (42, 1–9; one thread): min 0.98, median 0.99, max 1.0; the bound 0.9 is well below."""
    last, rows = run(tmp_path, tiny_model_dir, "builtin_pref:comparison:2000", eval_dataset="builtin_pref:comparison:200",
                     max_steps=120, per_device_train_batch_size=32, learning_rate=3e-3, lr_scheduler_type="cosine",
                     warmup_ratio=0.05, logging_steps=1, use_chat_template="no", separator=" = ")
    assert rows[0]["step"] == 1 and rows[0]["accuracy"] < 0.8 and last["eval_accuracy"] >= 0.9, last
    out = tmp_path / "out"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.architectures == ["LlamaForSequenceClassification"]
    ours, _ = load_reward_model(str(out))
    ids = AutoTokenizer.from_pretrained(out)("Which number is larger, 3 or 5? = 5")["input_ids"]  # ends in a digit
    with torch.no_grad():
        assert model(torch.tensor([ids])).logits[0, 0].item() == pytest.approx(ours(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item(), abs=1e-5)


def test_normalization_centres_the_dataset_and_score_reports_agreement(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from alignkit.cli import app

    demos = tmp_path / "demos.jsonl"
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in tasks.make_task("comparison", "train", 30)], demos)
    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(tasks.make_preferences("comparison", "test", 20) + RANKINGS[:2], prefs)
    run(tmp_path, tiny_model_dir, "builtin_pref:comparison:64", max_steps=3, learning_rate=1e-3, normalize_dataset=str(demos))
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["reward_offset"] == pytest.approx(-config["reward_mean"]) and config["reward_std"] > 0

    runner = CliRunner()
    scored = tmp_path / "scored.jsonl"
    result = runner.invoke(app, ["score", "--reward_model", str(tmp_path / "out"), "--dataset", str(demos), "--output", str(scored), "--no_progress"])
    assert result.exit_code == 0, result.output
    rewards = [json.loads(line)["reward"] for line in open(scored)]
    assert len(rewards) == 30 and abs(sum(rewards) / 30) < 1e-4

    result = runner.invoke(app, ["score", "--reward_model", str(tmp_path / "out"), "--dataset", str(prefs), "--output", str(scored), "--no_progress"])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in open(scored)]
    assert all(r["agrees"] == (r["reward_chosen"] > r["reward_rejected"]) for r in out[:20])
    ranked = out[21]  # ranks [1, 1, 2, 3]
    r = ranked["rewards"]
    assert ranked["agrees"] == pytest.approx(sum(r[b] > r[w] for b, w in [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]) / 5)
    accuracy = (sum(r["agrees"] for r in out[:20]) + out[20]["agrees"] + ranked["agrees"]) / 22
    assert f"agrees with {accuracy:.1%}" in result.output


@pytest.mark.parametrize("row, field, reason", [
    ({"prompt": "p", "responses": ["only one"]}, "responses", "bad 'responses'"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}, "ranks", "all ties"),
    ({"prompt": "p", "chosen": "a"}, "rejected", "missing field 'rejected'"),
])
def test_bad_rows_name_file_line_and_field_or_are_counted(tmp_path, tiny_model_dir, row, field, reason):
    data = tmp_path / "bad.jsonl"
    write_jsonl(PAIRS[:1] + [row] + PAIRS[:1], data)
    with pytest.raises(DataError, match=rf"bad.jsonl:2: field '{field}'.*--skip_invalid"):
        run(tmp_path, tiny_model_dir, data)
    run(tmp_path, tiny_model_dir, data, skip_invalid=True)
    report = json.loads((tmp_path / "out/data_report.json").read_text())["train"]
    assert report["prompts"] == 2 and report["invalid_skipped"] == {reason: 1}


def test_resume_is_exact(tmp_path, tiny_model_dir):
    data = "builtin_pref:comparison:64"
    common = dict(learning_rate=1e-3, max_steps=4, per_device_train_batch_size=8, save_steps=2)
    _, straight = run(tmp_path / "a", tiny_model_dir, data, **common)
    run(tmp_path / "b", tiny_model_dir, data, **common)
    _, again = run(tmp_path / "b", tiny_model_dir, data, resume_from_checkpoint=str(tmp_path / "b/out/checkpoints/step-2"), **common)
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in straight], rel=1e-6)


def test_lora_saves_a_merged_model_that_scores_like_the_trained_one(tmp_path, tiny_model_dir):
    last, _ = run(tmp_path, tiny_model_dir, "builtin_pref:comparison:64", eval_dataset="builtin_pref:comparison:40",
                  max_steps=4, learning_rate=1e-2, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    out = tmp_path / "out"
    assert not (out / "adapter_config.json").exists()
    AutoModelForSequenceClassification.from_pretrained(out)  # a plain model: no base path needed
    from alignkit.evaluate.score import score_file

    summary = score_file(str(out), "builtin_pref:comparison:40", str(tmp_path / "scored.jsonl"), split="test", progress=False)
    assert summary["accuracy"] == pytest.approx(last["eval_accuracy"])
    assert summary["mean_reward"] == pytest.approx(last["eval_reward_mean"], rel=1e-4)


def test_encoder_backbone_trains_normalizes_and_ignores_padding(tmp_path, tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    last, rows = run(tmp_path, tmp_path / "bert", "builtin_pref:comparison:32", max_steps=2, learning_rate=1e-3,
                     normalize_dataset="builtin_pref:comparison:16", use_chat_template="no")
    assert math.isfinite(rows[-1]["loss"]) and "normalize_mean" in last
    rm, head_is_new = load_reward_model(str(tmp_path / "out"))
    assert not head_is_new and isinstance(rm, RewardModel) and not rm.decoder
    rm.eval()
    short, long = [5, 6, 7], [5, 6, 7, 8, 9, 10, 11]
    ids = torch.tensor([short + [tokenizer.pad_token_id] * 4, long])
    mask = torch.tensor([[1] * 3 + [0] * 4, [1] * 7])
    with torch.no_grad():
        batched = rm(ids, mask)
        assert batched[0].item() == pytest.approx(rm(torch.tensor([short]), torch.ones(1, 3, dtype=torch.long)).item(), abs=1e-5)


def test_self_instruct_pairs_split_by_instruction(shared_data):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "self_instruct_preferences.py"
    spec = importlib.util.spec_from_file_location("self_instruct_preferences", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    predictions = shared_data / "self_instruct" / "predictions"
    train, test, demos, clipped = script.build(predictions, ["text-davinci-003", "davinci"], 52, 400, seed=0)
    assert len(train) + len(test) == 252 and len(test) >= 52
    assert not {r["prompt"].split("\n\n")[0] for r in train} & {r["prompt"].split("\n\n")[0] for r in test}
    assert all(len(r["chosen"]) <= 400 and len(r["rejected"]) <= 400 and r["chosen"] != r["rejected"] for r in train + test)
    assert clipped["davinci"] > 200 and len(demos) == len(train)
    ranked, _, _, _ = script.build(predictions, ["text-davinci-003", "text-davinci-002", "davinci"], 52, 400, seed=0)
    assert all(len(r["responses"]) == 3 for r in ranked)
    [preference_example(Row(r, f"x:{i}")) for i, r in enumerate(ranked + train)]  # valid rows


def test_a_lora_sft_output_is_merged_into_a_fresh_reward_model(tmp_path, tiny_model_dir, tokenizer):
    from alignkit.models import LoraSettings, apply_lora, load_causal_lm

    torch.manual_seed(0)
    peft_model = apply_lora(load_causal_lm(str(tiny_model_dir)), LoraSettings(r=4, dropout=0.0))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter: B != 0 changes the weights
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    rm, head_is_new = load_reward_model(str(tmp_path / "adapter"))
    assert head_is_new and rm.decoder
    ids = torch.tensor([tokenizer("Which number is larger, 3 or 5?")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(rm.model.model(ids).last_hidden_state, merged.model(ids).last_hidden_state, atol=1e-5)
