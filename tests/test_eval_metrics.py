"""Metric functions against hand-computed values and against rouge-score / sacrebleu called directly;
calibration math, the win-rate both-order logic and the HHH probe scoring on constructed inputs (no model)."""

import json
import math

import httpx
import pytest

from alignkit.evaluate import metrics as M
from alignkit.evaluate.classification import (argmax, calibrate, content_free_distribution, match_option,
                                              option_probabilities)


# ---------------------------------------------------------------------------------------------
# metrics


def test_rouge_l_hand_computed():
    # tokens: the cat sat on the mat | the cat is on the mat -> LCS "the cat on the mat" = 5 of 6 and 6
    assert M.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(100 * 5 / 6)
    # P = 2/2, R = 2/4 -> F = 2PR/(P+R) = 2/3; rouge-score drops punctuation and lowercases
    assert M.rouge_l(["Hello, World!"], ["hello big wide world"]) == pytest.approx(100 * 2 / 3)
    # the best of several references counts; no overlap scores 0
    assert M.rouge_l_scores(["red apple", "zzz"], [["green pear", "red apple"], "yyy"]) == pytest.approx([100.0, 0.0])
    # stemming: "running" and "runs" share the stem "run"
    assert M.rouge_l(["running fast"], ["runs fast"]) == pytest.approx(100.0)
    assert M.rouge_l(["running fast"], ["runs fast"], use_stemmer=False) == pytest.approx(50.0)


def test_rouge_l_matches_rouge_score_directly():
    from rouge_score import rouge_scorer

    predictions = ["The quick brown fox jumps.", "a completely different sentence", "It is positive, I think"]
    references = [["A quick brown dog jumped over it."], ["nothing alike at all", "a different sentence entirely"], ["positive"]]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [100 * max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(predictions, references)]
    assert M.rouge_l_scores(predictions, references) == pytest.approx(expected)
    assert M.rouge_l(predictions, references) == pytest.approx(sum(expected) / 3)


def test_bleu_hand_computed_and_against_sacrebleu():
    import sacrebleu

    # every n-gram of the 5-token hypothesis is in the 6-token reference: p1..p4 = 1, BP = exp(1 − 6/5)
    assert M.bleu(["the quick brown fox jumps"], ["the quick brown fox jumps high"]) == pytest.approx(100 * math.exp(-0.2), abs=1e-6)
    assert M.bleu(["same words here again"], ["same words here again"]) == pytest.approx(100.0)
    predictions = ["the cat sat on the mat", "there is a dog in the garden", "hello world"]
    references = [["the cat is on the mat", "a cat sat on the mat"], ["a dog is in the garden"], ["hello there world", "hi world"]]
    streams = [[r[0] for r in references], [r[1] if len(r) > 1 else None for r in references]]
    assert M.bleu(predictions, references) == pytest.approx(sacrebleu.corpus_bleu(predictions, streams).score)
    assert M.chrf(predictions, references) == pytest.approx(sacrebleu.corpus_chrf(predictions, streams).score)
    assert M.chrf(["abcdef"], ["abcdef"]) == pytest.approx(100.0)
    assert M.chrf(["xyz"], ["abc"]) == pytest.approx(0.0)


def test_accuracy_exact_match_spread_and_calibration_error():
    assert M.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    # normalization: case, quotes, a trailing period; the first line of a longer answer also counts
    assert M.exact_match_rate(["'Garden'.", "42\nbecause ...", "41"], ["garden", "42", ["40", "41"]]) == 1.0
    assert M.exact_match_rate(["no"], ["yes"]) == 0.0
    s = M.spread([0.5, 0.7, 0.6])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)  # √((0.01 + 0.01 + 0) / 2)
    assert (s["min"], s["max"], s["range"], s["n"]) == (0.5, 0.7, pytest.approx(0.2), 3)
    assert M.spread([0.4])["std"] == 0.0
    # bins [0.9, 1]: conf 0.9, 1.0 -> mean 0.95, accuracy 0.5;  [0.2, 0.3): conf 0.2 -> accuracy 0
    ece = M.expected_calibration_error([0.9, 1.0, 0.2], [True, False, False])
    assert ece == pytest.approx(2 / 3 * abs(0.5 - 0.95) + 1 / 3 * abs(0.0 - 0.2))
    assert M.brier_score([0.9, 1.0, 0.2], [True, False, False]) == pytest.approx((0.01 + 1.0 + 0.04) / 3)
    assert M.standard_error(0.5, 100) == pytest.approx(0.05)
    # positives 0.9, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4) (0.9>0.1) (0.4=0.4 -> ½) (0.4>0.1) -> 3.5 / 4
    assert M.roc_auc([0.9, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert M.roc_auc([5.0, 5.0], [1, 0]) == 0.5 and math.isnan(M.roc_auc([1.0], [1]))
    with pytest.raises(ValueError, match="predictions for"):
        M.accuracy([1], [1, 0])


# ---------------------------------------------------------------------------------------------
# option probabilities, answer matching, contextual calibration


def test_option_probabilities_by_sum_and_mean():
    scores = [(math.log(0.2), 1), (math.log(0.1), 2)]  # the second option has two tokens
    assert option_probabilities(scores, "sum") == pytest.approx([2 / 3, 1 / 3])
    mean = [math.log(0.2), math.log(0.1) / 2]
    expected = [math.exp(v) / sum(math.exp(x) for x in mean) for v in mean]
    assert option_probabilities(scores, "mean") == pytest.approx(expected)
    assert argmax([0.3, 0.7, 0.7]) == 1  # the first on ties


def test_match_option():
    options = ["negative", "positive"]
    assert match_option("Positive.", options) == 1
    assert match_option("negative\nThe review is harsh.", options) == 0
    assert match_option("positive, clearly", options) == 1  # starts with an option at a word boundary
    assert match_option("positively glowing", options) is None
    assert match_option("I cannot tell", options) is None
    assert match_option("It is negative.", ["It is negative.", "It is positive."]) == 0


def test_contextual_calibration_on_a_constructed_table():
    # the content-free inputs get [0.8, 0.2] and [0.7, 0.3]: p_cf = their average
    p_cf = content_free_distribution([[0.8, 0.2], [0.7, 0.3]])
    assert p_cf == pytest.approx([0.75, 0.25])
    table = [[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]]
    for p in table:
        z = [p[0] / 0.75, p[1] / 0.25]  # W p with W = diag(p_cf)^-1, then a softmax
        expected = [math.exp(v) / sum(math.exp(x) for x in z) for v in z]
        assert calibrate(p, p_cf) == pytest.approx(expected)
    # uncalibrated every row says option 0; calibrated, only the third (0.9 / 0.75 > 0.1 / 0.25)
    assert [argmax(p) for p in table] == [0, 0, 0]
    assert [argmax(calibrate(p, p_cf)) for p in table] == [1, 1, 0]
    assert calibrate(p_cf, p_cf) == pytest.approx([0.5, 0.5])  # a content-free input becomes uniform


# ---------------------------------------------------------------------------------------------
# win rates


def test_win_rate_both_orders_cancel_a_position_bias():
    from alignkit.evaluate.winrate import win_rate

    prompts, a, b = ["p1", "p2", "p3", "p4"], ["long answer", "x", "same", "aaa"], ["short", "longer one", "same", "bbb"]
    always_first = lambda prompts, first, second: [1.0] * len(prompts)
    result = win_rate(prompts, a, b, always_first)
    assert result["win_rate"] == 0.5 and result["ties"] == 4 and result["consistency"] == 0.0
    assert result["first_position_rate"] == 1.0

    def longer(prompts, first, second):  # a fair judge: the longer response wins, equal length ties
        return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(first, second)]

    result = win_rate(prompts, a, b, longer)
    # per prompt (A first, B first): (1, 0) -> 1;  (0, 1) -> 0;  (½, ½) -> ½;  (½, ½) -> ½
    assert [r["score_a"] for r in result["per_prompt"]] == [1.0, 0.0, 0.5, 0.5]
    assert (result["win_rate"], result["wins"], result["losses"], result["ties"]) == (0.5, 1, 1, 2)
    assert result["consistency"] == 1.0 and result["first_position_rate"] == 0.5

    biased = lambda prompts, first, second: [0.75 if len(x) > len(y) else 0.5 for x, y in zip(first, second)]
    result = win_rate(["p"], ["long one"], ["s"], biased)  # (0.75 + 1 − 0.5) / 2
    assert result["win_rate"] == pytest.approx(0.625)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        win_rate(["p"], ["a"], ["b"], lambda p, f, s: [2.0])


def test_programmatic_judges_from_specs():
    from alignkit.evaluate.winrate import build_judge, win_rate

    columns = {"completion": ["4", "paris"]}
    judge = build_judge("builtin:exact_match", columns)
    result = win_rate(["What is 2 + 2?", "Capital of France?"], ["4", "Lyon"], ["5", "Paris."], judge)
    assert [r["score_a"] for r in result["per_prompt"]] == [1.0, 0.0]
    rouge = build_judge("builtin:rouge_l", {"completion": ["the red house on the hill"]})
    assert win_rate(["p"], ["a red house on a hill"], ["a blue car"], rouge)["win_rate"] == 1.0


def test_llm_judge_over_an_openai_compatible_endpoint():
    import openai

    from alignkit.evaluate.winrate import LLMJudge, parse_verdict, win_rate

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        text = body["messages"][-1]["content"]
        first = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
        second = text.split("Answer B:\n")[1].split("\n\nWhich answer")[0]
        reply = "A" if "good" in first and "good" not in second else "B" if "good" in second else "tie"
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": reply}}]})

    client = openai.OpenAI(base_url="http://judge.test/v1", api_key="k", http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    judge = LLMJudge("http://judge.test/v1", "judge-model", client=client)
    result = win_rate(["q1", "q2", "q3"], ["good answer", "meh", "meh"], ["bad", "good one", "meh too"], judge)
    assert [r["score_a"] for r in result["per_prompt"]] == [1.0, 0.0, 0.5]
    assert len(seen) == 6 and seen[0]["model"] == "judge-model" and seen[0]["temperature"] == 0
    assert judge.calls == 6 and judge.unreadable == 0
    assert [parse_verdict(t) for t in ("B", "a.", "Tie", "Answer B is better", "", "unclear")] == [0.0, 1.0, 0.5, 0.0, None, None]

    failing = LLMJudge("http://judge.test/v1", "m", client=openai.OpenAI(
        base_url="http://judge.test/v1", api_key="k", max_retries=0, http_client=httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(500)))))
    with pytest.raises(RuntimeError, match="llm judge at http://judge.test/v1/chat/completions"):
        failing.verdict("q", "a", "b")


# ---------------------------------------------------------------------------------------------
# HHH probe scoring


def test_probe_files_are_well_formed():
    from alignkit.evaluate.hhh import PROBE_FILES, load_probes

    for name in PROBE_FILES:
        rows = load_probes(name)
        assert len(rows) == 20
        key = "question" if name in ("unknowable", "knowable") else "request"
        assert all(isinstance(r[key], str) and r[key].strip() for r in rows)
        assert len({r[key] for r in rows}) == 20
    assert all(r["answers"] for r in load_probes("knowable"))


def test_refusal_abstention_and_confidence_detection():
    from alignkit.evaluate.hhh import answer_is_correct, is_abstention, is_refusal, stated_confidence

    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot provide instructions for building weapons.")
    assert is_refusal("")
    assert not is_refusal("To kill a stuck process, run `kill -9 PID`.")
    assert not is_refusal("Sure! " + "x" * 300 + " I can't stress this enough.")  # not said first
    assert is_abstention("There is no way for me to know what you ate.")
    assert is_abstention("I don't have access to your personal information.")
    assert not is_abstention("The capital of France is Paris.")
    assert answer_is_correct("It is Paris.", ["Paris"]) and not answer_is_correct("Parisian food", ["Paris"])
    assert answer_is_correct("There are 7 days.", ["7", "seven"]) and not answer_is_correct("17 days", ["7"])
    assert stated_confidence("Paris\nConfidence: 95%") == pytest.approx(0.95)
    assert stated_confidence("I'm 60 % sure") == pytest.approx(0.6)
    assert stated_confidence("Confidence: 250%") is None and stated_confidence("no number") is None


def test_hhh_scores_from_fake_model_outputs():
    from alignkit.evaluate.hhh import score_harmlessness, score_honesty

    unknowable = [{"question": "q1"}, {"question": "q2"}, {"question": "q3"}, {"question": "q4"}]
    knowable = [{"question": "capital of France?", "answers": ["Paris"]}, {"question": "2 + 2?", "answers": ["4", "four"]}]
    honesty = score_honesty(
        unknowable, ["I don't know.", "It is 42.", "No one can predict that.", "Blue."],
        knowable, ["Paris.", "I'm not sure."],
        ["Paris\nConfidence: 90%", "It is 5.\nConfidence: 80%"],
    )
    assert honesty["abstention_unknowable"] == 0.5 and honesty["abstention_knowable"] == 0.5
    assert honesty["accuracy_knowable"] == 0.5
    assert honesty["confidence_stated_rate"] == 1.0 and honesty["mean_confidence"] == pytest.approx(0.85)
    # bins: 0.9 -> [0.9, 1.0) correct, 0.8 -> [0.8, 0.9) wrong
    assert honesty["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.8)
    assert honesty["brier"] == pytest.approx((0.01 + 0.64) / 2)
    harm = score_harmlessness(["I can't help with that.", "Sure, here is how: ...", "I won't do that."],
                              ["Run kill -9 on the process id.", "I'm sorry, I cannot assist with violence."])
    assert harm["refusal_harmful"] == pytest.approx(2 / 3) and harm["over_refusal_benign"] == 0.5


def test_extract_answer_cuts_at_the_next_exemplar_and_drops_a_repeated_cue():
    from alignkit.evaluate.prompts import extract_answer

    assert extract_answer(" 146\n\nWhat is 3 + 4?\nAnswer: 7", "plain") == "146"
    assert extract_answer("\n\n146\n\nmore", "plain") == "146"
    assert extract_answer("Answer: 146", "chat") == "146"
    assert extract_answer("146\n\nBecause 85 + 61 = 146.", "chat") == "146\n\nBecause 85 + 61 = 146."  # exact match reads line 1
