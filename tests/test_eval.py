"""`alignkit eval` on a tiny model: k-shot prompts byte for byte as docs/evaluation.md shows them, option
log-likelihoods against an independent forward pass, records against the predictions they summarize,
determinism and --resume, the sensitivity table, HHH and win rate end to end, the CLI and its errors."""

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignkit.evaluate.commands import eval_app
from alignkit.evaluate.prompts import model_context
from alignkit.evaluate.suites import build_suite, builtin_suite

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"

POSITIVE = ["a warm , funny and moving film", "the best movie of the year", "a delight from start to finish",
            "beautifully acted and gorgeous to look at", "smart , sweet and very funny", "an absolute joy",
            "the cast is superb", "it will make you smile", "a triumph of storytelling", "charming and wise"]
NEGATIVE = ["a dull , lifeless mess", "the worst film of the year", "boring from start to finish",
            "badly acted and ugly to look at", "stupid , sour and never funny", "an absolute chore",
            "the cast is wasted", "it will make you yawn", "a failure of storytelling", "tedious and shallow"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from alignkit.models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory) -> Path:
    """A small SST-2 directory in the native format ("LABEL sentence" per line)."""
    root = tmp_path_factory.mktemp("classification")
    sst2 = root / "sst2"
    sst2.mkdir()
    lines = [f"1 {s}" for s in POSITIVE] + [f"0 {s}" for s in NEGATIVE]
    (sst2 / "train.txt").write_text("\n".join(lines[::2] + lines[1::2][:4]) + "\n")
    (sst2 / "dev.txt").write_text("\n".join(lines[1::2][4:] + ["1 what a lovely surprise", "0 what a waste of time"]) + "\n")
    return root


def doc_block(name: str) -> str:
    """The text between <!-- name --> and <!-- /name --> in docs/evaluation.md, inside a ``` fence."""
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {name} -->\n```[a-z]*\n(.*?)\n```\n<!-- /{name} -->", text, re.S)
    assert match, f"docs/evaluation.md has no block {name}"
    return match.group(1)


def test_kshot_prompts_are_byte_for_byte_the_docs_example(tokenizer):
    suite = builtin_suite("arithmetic", seed=0, limit=3)
    example = suite.examples[0]
    item = suite.build(suite.exemplars(example, 2, seed=0), example)
    chat, answer_prefix = model_context(tokenizer, item, "chat")
    assert chat == doc_block("kshot-chat") + "\n" and answer_prefix == ""  # the block ends with the assistant header
    plain, answer_prefix = model_context(tokenizer, item, "plain")
    assert plain == doc_block("kshot-plain") and answer_prefix == " "
    multiturn, _ = model_context(tokenizer, item, "multiturn")
    assert multiturn == doc_block("kshot-multiturn") + "\n"
    # the literal, so that a change of the docs alone cannot pass
    assert plain == "What is 95 - 71?\nAnswer: 24\n\nWhat is 56 - 55?\nAnswer: 1\n\nWhat is 85 + 61?\nAnswer:"


def test_exemplars_are_nested_across_k_and_never_the_query():
    suite = builtin_suite("reversal", seed=0, limit=5)
    five = suite.exemplars(suite.examples[0], 5, seed=0)
    assert suite.exemplars(suite.examples[0], 1, seed=0) == five[:1]
    assert suite.exemplars(suite.examples[0], 5, seed=1) != five
    query = suite.pool[0]  # a query that is itself in the pool is skipped, the next one taken
    assert query not in suite.exemplars(query, len(suite.pool) - 1, seed=0)


def test_flan_items_render_as_flan_few_shot(sst2_dir):
    from alignkit.data import flan

    suite = build_suite("sst2", None, str(sst2_dir), seed=0, limit=None)
    assert suite.kind == "classification" and suite.info["split"] == "validation" and len(suite.pool) == 14
    ts = flan.load_template_set("sst2")
    example = suite.examples[0]
    exemplars = suite.exemplars(example, 3, seed=0)
    for template in (t for t in ts.templates if not t.inverted):
        from alignkit.evaluate.suites import flan_item

        item = flan_item(template, ts, exemplars, example)
        assert item.text() == flan.few_shot(template, exemplars, example, ts)["prompt"]
    assert suite.options(example) == ["negative", "positive"] and suite.label(example) == ["negative", "positive"].index(example["label"])


def test_option_loglikelihoods_match_an_independent_forward(tiny):
    from alignkit.evaluate.classification import continuation_logprobs

    model, tokenizer = tiny
    shared = "Review: it was fine.\nAnswer: positive\n\n" * 6
    pairs = [(shared + f"Review: number {i}\nAnswer:", option) for i in range(4) for option in (" positive", " negative", " not sure at all")]
    pairs += [("Short context", " yes"), ("Short context", " no way")]

    def independent(context, option):
        c = tokenizer(context, add_special_tokens=False)["input_ids"]
        o = tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([c + o])).logits[0].float().log_softmax(-1)
        return sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(o)), len(o)

    expected = [independent(c, o) for c, o in pairs]
    for batch_size in (1, 5):
        got = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size)  # mixed: no shared prefix
        assert [n for _, n in got] == [n for _, n in expected]
        assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], abs=1e-4)
    cached = continuation_logprobs(model, tokenizer, pairs[:12], batch_size=5)  # shared exemplar prefix, KV-cached
    assert [s for s, _ in cached] == pytest.approx([s for s, _ in expected[:12]], abs=1e-4)


def test_eval_records_summarize_predictions_deterministically_and_resume(tiny, sst2_dir, tmp_path):
    from alignkit.evaluate.runner import EvalConfig, run_eval

    model, tokenizer = tiny
    out = tmp_path / "eval.json"
    cfg = EvalConfig(model_name_or_path="tiny", tasks="sst2,arithmetic", shots="0,2", limit=4, output=str(out), dataset=str(sst2_dir),
                     max_new_tokens=6, progress=False)
    payload = run_eval(cfg, model, tokenizer, log=lambda _: None)
    keys = [(r["task"], r["shots"], r["metric"]) for r in payload["records"]]
    assert keys == [("sst2", k, m) for k in (0, 2) for m in ("accuracy", "accuracy_per_token", "auc", "accuracy_calibrated")] + [
        ("arithmetic", 0, "exact_match"), ("arithmetic", 2, "exact_match")]
    assert all(r["n"] == 4 for r in payload["records"])
    predictions = [json.loads(line) for line in out.with_name("eval.predictions.jsonl").read_text().splitlines()]
    for r in payload["records"]:
        mine = [p for p in predictions if (p["task"], p["shots"]) == (r["task"], r["shots"])]
        if r["metric"] == "accuracy_per_token":
            continue
        if r["metric"] == "auc":
            from alignkit.evaluate.metrics import roc_auc

            assert r["value"] == roc_auc([p["option_logprobs"][1] - p["option_logprobs"][0] for p in mine], [p["label"] for p in mine])
            continue
        if r["metric"] == "accuracy_calibrated":  # argmax_c p_c / p_cf,c with p = softmax of the summed log-probs
            for p in mine:
                probs = torch.tensor(p["option_logprobs"]).softmax(0)
                assert p["prediction_calibrated"] == int((probs / torch.tensor(r["p_cf"])).argmax())
            assert r["value"] == pytest.approx(sum(p["prediction_calibrated"] == p["label"] for p in mine) / len(mine))
            continue
        assert r["value"] == pytest.approx(sum(p["correct"] for p in mine) / len(mine))
        if r["metric"] == "accuracy":  # the prediction is the arg max of the options' summed log-probs
            assert all(p["prediction"] == max(range(2), key=lambda c: p["option_logprobs"][c]) for p in mine)
    assert "\nAnswer: " in next(p["context"] for p in predictions if p["task"] == "arithmetic" and p["shots"] == 2)
    assert json.loads(out.read_text())["records"] == payload["records"]
    assert "| sst2 | accuracy |" in out.with_name("eval.md").read_text() and out.with_name("eval.png").stat().st_size > 0

    again = run_eval(cfg, model, tokenizer, log=lambda _: None)
    assert again["records"] == payload["records"]  # deterministic given the seed

    logs = []
    resumed = run_eval(EvalConfig(**{**cfg.__dict__, "resume": True}), model, tokenizer, log=logs.append)
    assert resumed["records"] == payload["records"] and sum("kept from" in line for line in logs) == 4
    with pytest.raises(ValueError, match="other settings"):
        run_eval(EvalConfig(**{**cfg.__dict__, "resume": True, "seed": 1}), model, tokenizer, log=lambda _: None)


def test_classification_by_generation_counts_unparsed_answers(tiny, sst2_dir, tmp_path):
    from alignkit.evaluate.runner import evaluate_unit

    model, tokenizer = tiny
    suite = build_suite("sst2", None, str(sst2_dir), seed=0, limit=4)
    records, predictions = evaluate_unit(model, tokenizer, suite, 1, "chat", method="generate", max_new_tokens=4)
    by_metric = {r["metric"]: r["value"] for r in records}
    assert by_metric["unparsed_rate"] == sum(p["prediction"] is None for p in predictions) / 4
    assert by_metric["accuracy"] == sum(p["correct"] for p in predictions) / 4


def test_sensitivity_returns_one_row_per_condition_with_its_statistics(tiny, sst2_dir, tmp_path):
    from alignkit.evaluate import metrics as M
    from alignkit.evaluate.sensitivity import SensitivityConfig, order_permutations, run_sensitivity

    assert order_permutations(3, 4, seed=0)[0] == (0, 1, 2) and len(set(order_permutations(3, 4, seed=0))) == 4
    assert len(order_permutations(2, 5, seed=0)) == 2  # only 2! orders exist
    model, tokenizer = tiny
    cfg = SensitivityConfig(task="sst2", dataset=str(sst2_dir), output=str(tmp_path / "sens.json"), shots=2, limit=4, n_seeds=3,
                            n_orders=2, templates="sst2-01,sst2-04,sst2-05", progress=False)
    payload = run_sensitivity(cfg, model, tokenizer, log=lambda _: None)
    rows = payload["conditions"]
    assert [(r["factor"], r["name"]) for r in rows] == [
        ("template", "sst2-01"), ("template", "sst2-04"), ("template", "sst2-05"),
        ("exemplars", "seed 0"), ("exemplars", "seed 1"), ("exemplars", "seed 2"), ("order", "(0 1)"), ("order", "(1 0)")]
    assert all(r["n"] == 4 and 0 <= r["accuracy"] <= 1 and len(r["p_cf"]) == 2 for r in rows)
    base = [r for r in rows if (r["template"], r["seed"], tuple(r["order"])) == ("sst2-01", 0, (0, 1))]
    assert len(base) == 3 and len({(r["accuracy"], r["accuracy_calibrated"]) for r in base}) == 1  # scored once, shared
    for summary in payload["summary"]:
        key = "accuracy_calibrated" if summary["calibrated"] else "accuracy"
        expected = M.spread([r[key] for r in rows if r["factor"] == summary["factor"]])
        assert {k: summary[k] for k in expected} == pytest.approx(expected)
    assert [(s["factor"], s["calibrated"]) for s in payload["summary"]] == [
        (f, c) for f in ("template", "exemplars", "order") for c in (False, True)]
    table = Path(cfg.output).with_name("sens.md").read_text()
    assert "| factor | calibrated | mean | std | min | max | range | conditions |" in table


def test_hhh_end_to_end_with_a_fake_model(monkeypatch, tiny, tmp_path):
    import alignkit.generation as generation
    from alignkit.evaluate.hhh import HHHConfig, run_hhh

    def fake_generate_text(model, tokenizer, prompts, params, batch_size=16, progress=""):
        replies = []
        for prompt in prompts:
            if "thinking of right now" in prompt or "breakfast" in prompt:
                replies.append("I don't know, I cannot read your mind.")
            elif "Confidence: NN%" in prompt:
                replies.append("Paris\nConfidence: 90%" if "France" in prompt else "not sure\nConfidence: 50%")
            elif "capital of France" in prompt:
                replies.append("Paris.")
            elif "pipe bomb" in prompt or "Python process" in prompt:
                replies.append("I'm sorry, I can't help with that.")
            elif "Answer:" in prompt:  # the 3-shot helpfulness prompts
                replies.append("Sure.")
            else:
                replies.append("Here you go.")
        return replies

    monkeypatch.setattr(generation, "generate_text", fake_generate_text)
    model, tokenizer = tiny
    payload = run_hhh(HHHConfig(output=str(tmp_path / "hhh.json"), helpfulness_tasks="arithmetic", limit=3, progress=False), model, tokenizer,
                      log=lambda _: None)
    honesty, harm = payload["honesty"], payload["harmlessness"]
    assert honesty["abstention_unknowable"] == pytest.approx(2 / 20) and honesty["accuracy_knowable"] == pytest.approx(1 / 20)
    assert honesty["confidence_stated_rate"] == 1.0 and honesty["n_confidence"] == 20
    assert honesty["ece"] == pytest.approx((1 * 0.1 + 19 * 0.5) / 20)  # 0.9 right; nineteen 0.5 wrong
    assert harm["refusal_harmful"] == pytest.approx(1 / 20) and harm["over_refusal_benign"] == pytest.approx(1 / 20)
    assert payload["helpfulness"]["exact_match"] == 0.0 and payload["helpfulness"]["n"] == 3
    assert payload["records"][0]["shots"] == 3


def test_winrate_and_kl_end_to_end(tiny, tiny_model_dir, tmp_path):
    from alignkit.evaluate.winrate import WinRateConfig, run_winrate, sequence_kl
    from alignkit.models import load_causal_lm
    from alignkit.testing import make_tiny_model

    model, tokenizer = tiny
    other = load_causal_lm(str(make_tiny_model(tmp_path / "other", seed=1))).eval()
    cfg = WinRateConfig(ref_model="other", dataset="builtin:arithmetic:4", judge="builtin:exact_match", output=str(tmp_path / "wr.json"),
                        max_new_tokens=4, progress=False)
    payload = run_winrate(cfg, models=((model, tokenizer), (other, tokenizer)), log=lambda _: None)
    assert payload["summary"]["n"] == 4 and payload["summary"]["consistency"] == 1.0  # a pointwise judge has no position bias
    assert payload["kl"]["kl_k3"] >= 0 and payload["kl"]["n"] == 4
    assert "| win_rate | wins | losses | ties |" in (tmp_path / "wr.md").read_text()
    ids = [tokenizer("What is 2 + 2?", add_special_tokens=False)["input_ids"]] * 2
    same = sequence_kl(model, model, tokenizer, ids, max_new_tokens=5)
    assert same["kl_k1"] == pytest.approx(0.0, abs=1e-5) and same["kl_k3"] == pytest.approx(0.0, abs=1e-5)
    differ = sequence_kl(model, other, tokenizer, ids, max_new_tokens=5, samples=2)
    assert differ["kl_k3"] > 0 and differ["samples_per_prompt"] == 2


def test_winrate_on_prompt_only_rows_reports_mean_scores(tiny, tiny_model_dir, tmp_path):
    """A file of {"prompt"} rows (e.g. held-out RL prompts) and a pointwise judge: the mean score of each
    side is reported too (here: response length in characters, checked against the predictions file)."""
    from alignkit.evaluate.winrate import WinRateConfig, run_winrate
    from alignkit.models import load_causal_lm
    from alignkit.testing import make_tiny_model

    model, tokenizer = tiny
    other = load_causal_lm(str(make_tiny_model(tmp_path / "other", seed=1))).eval()
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n" for w in ("cats", "rain", "tea")))
    (tmp_path / "judge.py").write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n")
    cfg = WinRateConfig(ref_model="other", dataset=str(tmp_path / "prompts.jsonl"), judge=f"{tmp_path / 'judge.py'}:length",
                        output=str(tmp_path / "wr.json"), max_new_tokens=6, temperature=1.0, progress=False, kl=False)
    summary = run_winrate(cfg, models=((model, tokenizer), (other, tokenizer)), log=lambda _: None)["summary"]
    rows = [json.loads(line) for line in (tmp_path / "wr.predictions.jsonl").read_text().splitlines()]
    assert summary["n"] == 3 and [r["reference"] for r in rows] == [None] * 3
    assert summary["mean_score_a"] == pytest.approx(sum(len(r["response_a"]) for r in rows) / 3)
    assert summary["mean_score_b"] == pytest.approx(sum(len(r["response_b"]) for r in rows) / 3)
    assert "mean_score_a" in (tmp_path / "wr.md").read_text()


def test_cli_runs_and_reports_user_errors(tiny_model_dir, sst2_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.json"
    result = runner.invoke(eval_app, ["--model_name_or_path", str(tiny_model_dir), "--tasks", "sst2", "--dataset", str(sst2_dir),
                                      "--shots", "0,1", "--limit", "2", "--output", str(out), "--no_progress"])
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())["records"]
    assert [(r["task"], r["shots"], r["metric"], r["n"]) for r in records if r["metric"] == "accuracy"] == [("sst2", 0, "accuracy", 2), ("sst2", 1, "accuracy", 2)]
    for args, message in [
        (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
        (["--tasks", "sst2"], "--dataset"),
        (["--tasks", "arithmetic", "--shots", "0,x"], "--shots"),
        (["--tasks", "missing.jsonl"], "missing.jsonl: no such file"),
        ([], "--tasks is required"),
    ]:
        result = runner.invoke(eval_app, ["--model_name_or_path", str(tiny_model_dir), "--output", str(tmp_path / "x.json"), *args])
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.output and message in result.output, result.output
    result = runner.invoke(eval_app, ["sensitivity", "--model_name_or_path", str(tiny_model_dir), "--task", "arithmetic", "--output", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and "classification" in result.output


def test_instruction_files_are_read_with_their_references(tmp_path):
    from alignkit.data.formats import DataError
    from alignkit.evaluate.suites import read_instructions

    path = tmp_path / "ui.jsonl"
    rows = [{"id": "t0", "instruction": "Fix the grammar.", "instances": [{"input": "he go home", "output": "He goes home."}]},
            {"id": "t1", "instruction": "Write a haiku about tea.", "instances": [{"input": "", "output": "steam"}, {"input": "green", "output": "leaf"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = read_instructions(str(path))
    assert [(g["prompt"], g["references"]) for g in got] == [("Fix the grammar.\n\nhe go home", ["He goes home."]),
                                                             ("Write a haiku about tea.", ["steam"]), ("Write a haiku about tea.\n\ngreen", ["leaf"])]
    path.write_text(json.dumps({"instruction": "x", "instances": [{"input": "", "output": ""}]}) + "\n")
    with pytest.raises(DataError, match=r"ui.jsonl:1: field 'instances\[0\].output'"):
        read_instructions(str(path))


def test_real_data_sets_load(shared_data):
    suite = build_suite("sst2", None, str(shared_data / "classification"), seed=0, limit=None)
    assert len(suite.examples) == 872 and len(suite.pool) == 6920  # dev evaluated, train as exemplars
    rte = build_suite("rte", None, str(shared_data / "classification"), seed=0, limit=None)
    assert len(rte.examples) == 277 and rte.info["split"] == "validation"
    ui = build_suite(str(shared_data / "self_instruct" / "user_oriented_instructions.jsonl"), None, None, seed=0, limit=None)
    assert len(ui.examples) == 252 and ui.metrics == ("rouge_l", "bleu", "chrf")


def test_task_specs_columns_and_data_roots(tmp_path):
    from alignkit.evaluate.runner import parse_shots
    from alignkit.evaluate.suites import parse_columns, parse_tasks, resolve_source

    assert parse_tasks("sst2, rte=/data/rte ,arithmetic") == [("sst2", None), ("rte", "/data/rte"), ("arithmetic", None)]
    assert parse_columns("text=review, label=stars") == {"text": "review", "label": "stars"} and parse_columns("") is None
    with pytest.raises(ValueError, match="FIELD=COLUMN"):
        parse_columns("text")
    assert parse_shots("5,0,1,1") == [0, 1, 5]
    (tmp_path / "agnews").mkdir()
    assert resolve_source("ag_news", None, str(tmp_path)) == str(tmp_path / "agnews")  # ROOT/agnews for ag_news
    assert resolve_source("sst2", None, str(tmp_path / "file.txt")) == str(tmp_path / "file.txt")  # a source itself
    assert resolve_source("sst2", "given", str(tmp_path)) == "given"


def test_reward_model_judge_scores_pairs_as_the_reward_model_was_trained(tiny_model_dir, tokenizer, tmp_path):
    from alignkit.data.tokenize import Formatting, tokenize_example
    from alignkit.evaluate.winrate import build_judge, reward_model_scorer, win_rate
    from alignkit.reward_model import init_head, load_reward_model, score_sequences

    rm, _ = load_reward_model(str(tiny_model_dir))
    init_head(rm.model, seed=0)
    rm.model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts, a, b = ["What is 2 + 2?", "Name a colour."], ["4", "blue"], ["five", "I like turtles"]
    scores = reward_model_scorer(str(tmp_path / "rm"))(prompts, a)
    reloaded, _ = load_reward_model(str(tmp_path / "rm"))
    ids = [tokenize_example({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}, tokenizer, Formatting())[0]
           for p, r in zip(prompts, a)]
    assert scores == pytest.approx(score_sequences(reloaded, ids, tokenizer.pad_token_id))
    score_b = reward_model_scorer(str(tmp_path / "rm"))(prompts, b)
    result = win_rate(prompts, a, b, build_judge(f"reward_model:{tmp_path / 'rm'}", {}))
    assert [r["score_a"] for r in result["per_prompt"]] == [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(scores, score_b)]
    with pytest.raises(ValueError, match="not a reward model"):
        build_judge(f"reward_model:{tiny_model_dir}", {})
