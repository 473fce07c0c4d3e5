"""`alignkit pipeline`: recipe validation, fingerprints, the gold judge, and recipes/demo.yaml end to end with --quick
(a tiny random model, a few steps per stage): artifacts, report numbers, skipping, rerunning from the changed stage,
and resuming a run SIGKILLed mid-PPO to the same weights."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.pipeline.fingerprint import fingerprints
from alignkit.pipeline.judges import BREVITY_CHARS, BREVITY_WEIGHT, pairs_from_scores, task_gold
from alignkit.pipeline.recipe import RecipeError, load_recipe
from alignkit.rl.ppo import overoptimized

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
STAGE_DIRS = ("data", "sft", "compare", "rm", "ppo", "dpo", "eval", "report")


def pipeline(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignkit.cli", "pipeline", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=1800)


def ran(result: subprocess.CompletedProcess) -> list[str]:
    """Stages the pipeline ran (not skipped), from its progress lines."""
    return [line.split("] ")[1].split(":")[0] for line in result.stdout.splitlines()
            if line.startswith("[") and (": running (" in line or ": resuming (" in line)]


# ---------------------------------------------------------------------------------------------
# recipe, fingerprints, judge: no model


@pytest.mark.parametrize("text, expected", [
    ("model: x\nsft:\n  max_stepz: 3\n", ["recipe.yaml:3", "sft.max_stepz", "max_steps"]),
    ("model: x\nppo:\n  kl_coef: lots\n", ["recipe.yaml:3", "ppo.kl_coef", "expected float"]),
    ("model: x\ncolour: blue\n", ["recipe.yaml:2", "'colour'", "valid keys", "sft"]),
    ("compare:\n  judge: oracle\n", ["recipe.yaml:2", "compare.judge", "gold, llm, human"]),
    ("data:\n  tasks: [arithmetic, juggling]\n", ["recipe.yaml:2", "juggling", "reversal"]),
    ("quick:\n  sft:\n    batch: 2\n", ["recipe.yaml:3", "sft.batch", "batch_size"]),
])
def test_recipe_errors_name_file_line_and_key(tmp_path, text, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert all(part in str(caught.value) for part in expected), str(caught.value)


def test_a_bad_recipe_is_refused_before_any_stage(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(DEMO.read_text().replace("  beta: 0.1", "  beta: [0.1]"))
    result = pipeline(str(recipe), "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "dpo.beta" in result.stderr and "recipe.yaml:" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_directory_holding_something_else_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    result = pipeline(str(DEMO), "--output_dir", str(tmp_path / "run"), "--quick")
    assert result.returncode == 2 and "not a pipeline run" in result.stderr
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "run").iterdir())) == 1


def test_quick_applies_the_overrides():
    full, quick = load_recipe(DEMO), load_recipe(DEMO, quick=True)
    assert full.model == "smollm2-135m-instruct" and quick.model == "tiny"
    assert quick.ppo.max_steps < full.ppo.max_steps and quick.dpo.beta == full.dpo.beta


def test_a_changed_section_changes_its_stage_and_those_downstream_only():
    base = load_recipe(DEMO)
    before = fingerprints(base)
    changed = lambda **sections: fingerprints(dataclasses.replace(base, **sections))  # noqa: E731
    after_dpo = changed(dpo=dataclasses.replace(base.dpo, beta=0.2))
    assert {s for s in before if before[s] != after_dpo[s]} == {"dpo", "eval", "report"}
    after_rm = changed(rm=dataclasses.replace(base.rm, max_steps=7))
    assert {s for s in before if before[s] != after_rm[s]} == {"rm", "ppo", "eval", "report"}
    after_sft = changed(sft=dataclasses.replace(base.sft, learning_rate=1e-4))
    assert {s for s in before if before[s] != after_sft[s]} == set(before) - {"data"}
    assert fingerprints(load_recipe(DEMO)) == before  # a pure function of the recipe


def test_task_gold_matches_its_formula():
    responses = ["81", "81\nand more text", "It is 81, I think.", "", "x" * 200]
    expected = [1 + BREVITY_WEIGHT * (1 - 2 / BREVITY_CHARS), 1 + BREVITY_WEIGHT * (1 - 16 / BREVITY_CHARS),
                BREVITY_WEIGHT * (1 - 18 / BREVITY_CHARS), BREVITY_WEIGHT, 0.0]
    got = task_gold(["What is 40 + 41?"] * 5, responses, completion=["81"] * 5)
    assert got == pytest.approx(expected, abs=1e-12)
    assert task_gold(["q"], ["81"]) == pytest.approx([BREVITY_WEIGHT * (1 - 2 / BREVITY_CHARS)])  # no reference: brevity only


def test_pairs_come_from_strict_orders_only():
    rows = pairs_from_scores("p", ["a", "b", "c", "a"], [1.0, 0.5, 0.5, 0.2])
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("a", "b"), ("a", "c"), ("b", "a"), ("c", "a")]


def test_overoptimization_warning_needs_proxy_up_and_gold_down():
    assert overoptimized([0.1, 0.2, 0.3, 0.4], [0.5, 0.4, 0.45, 0.3])
    assert not overoptimized([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.2, 0.3])  # both rise
    assert not overoptimized([0.4, 0.3, 0.2, 0.1], [0.5, 0.4, 0.3, 0.2])  # both fall
    assert not overoptimized([0.1, 0.2, 0.3], [0.3, 0.2, 0.1])  # fewer iterations than the window
    assert overoptimized([9, 9, 0.1, 0.2, 0.3, 0.4], [0, 0, 0.5, 0.4, 0.45, 0.3])  # only the last window counts


# ---------------------------------------------------------------------------------------------
# end to end, --quick


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline") / "run"
    start = time.perf_counter()
    result = pipeline(str(DEMO), "--output_dir", str(run), "--quick")
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run, result, seconds


def test_quick_run_makes_every_stage_and_its_artifacts(quick_run):
    run, result, _ = quick_run
    assert ran(result) == list(STAGE_DIRS)
    for stage in STAGE_DIRS:
        record = json.loads((run / stage / "stage.json").read_text())
        assert record["status"] == "done" and record["wall_seconds"] > 0 and record["cpu_seconds"] > 0 and record["peak_rss_mb"] > 50
    for name in ("data/sft_train.jsonl", "data/prompts.jsonl", "data/eval.jsonl", "compare/pairs_train.jsonl", "compare/pairs_heldout.jsonl",
                 "compare/sft_responses.jsonl", "rm/reward_normalization.json", "eval/eval.json", "eval/answers.jsonl", "report.md", "report.json",
                 "report/losses.png", "report/ppo.png", "report/gold_vs_proxy.png", "report/temperature.png"):
        assert (run / name).exists(), name
    for model in ("sft", "rm", "ppo", "dpo"):
        assert (run / model / "model.safetensors").exists() and (run / model / "config.json").exists()
    ppo_rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(ppo_rows) == load_recipe(DEMO, quick=True).ppo.max_steps and all("gold_score" in r for r in ppo_rows)


def test_report_numbers_are_this_runs(quick_run):
    run, _, _ = quick_run
    report, evaluation = json.loads((run / "report.json").read_text()), json.loads((run / "eval" / "eval.json").read_text())
    assert report["eval"] == evaluation["models"] and set(evaluation["models"]) == {"base", "sft", "ppo", "dpo"}
    # the gold score recomputed from the saved answers
    rows = [json.loads(line) for line in (run / "eval" / "answers.jsonl").read_text().splitlines()]
    for name in ("base", "sft", "ppo", "dpo"):
        gold = task_gold([r["prompt"] for r in rows], [r[name] for r in rows], completion=[r["reference"] for r in rows])
        assert evaluation["models"][name]["gold_score"] == pytest.approx(sum(gold) / len(gold), abs=1e-12)
    # the markdown table shows the same numbers
    markdown = (run / "report.md").read_text()
    for name, row in evaluation["models"].items():
        assert f"| {name} | {row['exact_match']:.3f} | {row['gold_score']:.3f} | {row['win_rate_vs_sft']:.3f} | {row['kl_to_sft']:.3f} |" in markdown
    # PPO's curve, RM accuracy, DPO margins and the stage costs come from the stage files
    ppo_rows = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["gold_score"] for r in report["ppo"]] == [r["gold_score"] for r in ppo_rows]
    rm_eval = [json.loads(line) for line in (run / "rm" / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in line]
    assert report["rm"]["heldout_accuracy"] == rm_eval[-1]["eval_accuracy"]
    ppo_cost, dpo_cost = (json.loads((run / s / "stage.json").read_text()) for s in ("ppo", "dpo"))
    compute = next(c for c in report["claims"] if "compute" in c["claim"])
    assert compute["ratio"] == pytest.approx(ppo_cost["cpu_seconds"] / dpo_cost["cpu_seconds"])
    assert len(report["claims"]) == 4 and f"{compute['ratio']:.1f}×" in markdown


def test_rerun_skips_finished_stages(quick_run):
    run, _, first_seconds = quick_run
    stamps = {s: json.loads((run / s / "stage.json").read_text())["finished"] for s in STAGE_DIRS}
    start = time.perf_counter()
    result = pipeline(str(DEMO), "--output_dir", str(run), "--quick")
    seconds = time.perf_counter() - start
    assert result.returncode == 0 and ran(result) == [], result.stdout
    assert seconds < first_seconds / 10, (seconds, first_seconds)
    assert {s: json.loads((run / s / "stage.json").read_text())["finished"] for s in STAGE_DIRS} == stamps


def test_a_changed_value_reruns_from_its_stage(quick_run, tmp_path):
    run, _, _ = quick_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = {s: json.loads((copy / s / "stage.json").read_text()) for s in STAGE_DIRS}
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(DEMO.read_text().replace("  beta: 0.1", "  beta: 0.3"))
    result = pipeline(str(recipe), "--output_dir", str(copy), "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ran(result) == ["dpo", "eval", "report"], result.stdout
    after = {s: json.loads((copy / s / "stage.json").read_text()) for s in STAGE_DIRS}
    assert all(after[s] == before[s] for s in ("data", "sft", "compare", "rm", "ppo"))
    assert "beta: 0.3" in (copy / "dpo" / "config.yaml").read_text()


def test_a_run_killed_mid_ppo_resumes_to_the_same_weights(quick_run, tmp_path):
    """The PPO stage is SIGKILLed (pipeline and stage process) right after its 2nd of 4 checkpoints; the rerun resumes
    from that checkpoint and must end on exactly the weights of the uninterrupted run."""
    from safetensors.torch import load_file

    run, _, _ = quick_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("data", "sft", "compare", "rm", "quick-model", "recipe.json", "pipeline.json"):
        (shutil.copytree if (run / name).is_dir() else shutil.copyfile)(run / name, copy / name)
    killed = pipeline(str(DEMO), "--output_dir", str(copy), "--quick", "--only", "ppo", env={"ALIGNKIT_PIPELINE_KILL_AFTER_CHECKPOINT": "2"})
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert json.loads((copy / "ppo" / "stage.json").read_text())["status"] == "running"
    assert (copy / "ppo" / "checkpoints" / "step-2").is_dir() and not (copy / "ppo" / "model.safetensors").exists()
    resumed = pipeline(str(DEMO), "--output_dir", str(copy), "--quick", "--only", "ppo")
    assert resumed.returncode == 0 and "ppo: resuming" in resumed.stdout, resumed.stdout + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    expected, got = load_file(str(run / "ppo" / "model.safetensors")), load_file(str(copy / "ppo" / "model.safetensors"))
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)
    steps = [json.loads(line)["step"] for line in (copy / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


class FakeEndpoint:
    """An OpenAI-compatible /chat/completions stand-in: prefers the longer answer, or always says "A"."""

    def __init__(self, always_a: bool = False):
        self.always_a, self.calls = always_a, 0

    def post(self, url, json):
        import httpx

        self.calls += 1
        text = json["messages"][1]["content"]
        first = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
        second = text.split("Answer B:\n")[1].split("\n\nWhich answer")[0]
        verdict = "A" if self.always_a or len(first) > len(second) else "B"
        return httpx.Response(200, json={"choices": [{"message": {"content": verdict}}]}, request=httpx.Request("POST", url))


def test_llm_judge_asks_both_orders_and_drops_position_bias():
    from alignkit.pipeline.judges import llm_preferences

    items = [{"prompt": "p", "responses": ["short", "a longer one", "mid size"]}]
    endpoint = FakeEndpoint()
    rows = llm_preferences(items, "http://judge/v1", "m", None, client=endpoint)
    assert endpoint.calls == 6  # 3 pairs × 2 orders
    assert {(r["chosen"], r["rejected"]) for r in rows} == {("a longer one", "short"), ("mid size", "short"), ("a longer one", "mid size")}
    assert llm_preferences(items, "http://judge/v1", "m", None, client=FakeEndpoint(always_a=True)) == []  # "A" in both orders: no preference


def test_human_judge_hands_the_samples_to_the_comparison_page(monkeypatch, tmp_path):
    """The compare stage's `judge: human` path: the K samples go to collect_human_comparisons (the web page, tested in
    test_web/test_serve); its preference rows come back unchanged."""
    from alignkit.pipeline import human, judges

    calls = []

    def fake(model_dir, items, store, needed, host="127.0.0.1", port=0, **kwargs):
        calls.append((model_dir, items, Path(store), needed, port))
        return [{"prompt": items[0]["prompt"], "chosen": items[0]["responses"][1], "rejected": items[0]["responses"][0]}]

    monkeypatch.setattr(human, "collect_human_comparisons", fake)
    items = [{"prompt": "p", "completion": "ref", "responses": ["a", "b"]}]
    rows = judges.human_preferences("RUN/sft", items, tmp_path / "human.sqlite", 3, 8008)
    assert rows == [{"prompt": "p", "chosen": "b", "rejected": "a"}]
    assert calls == [("RUN/sft", [{"prompt": "p", "responses": ["a", "b"]}], tmp_path / "human.sqlite", 3, 8008)]


def test_gold_reward_fn_is_logged_and_never_trained_on(tiny_model_dir, tmp_path):
    """Two PPO iterations with and without --gold_reward_fn: the same weights (the gold is log-only), and gold_score is
    the gold function's mean over the iteration's samples (here: the mean response length in characters)."""
    from safetensors.torch import load_file

    from alignkit.config import PPOConfig
    from alignkit.data import tasks
    from alignkit.data.formats import write_jsonl
    from alignkit.rl.ppo import run_ppo

    write_jsonl(tasks.make_mixture(["arithmetic"], "train", 8, seed=0), tmp_path / "prompts.jsonl")
    (tmp_path / "judges.py").write_text("def words(prompts, responses, **columns):\n    return [len(r.split()) for r in responses]\n"
                                        "def chars(prompts, responses, **columns):\n    return [float(len(r)) for r in responses]\n")
    rows = {}
    for name, gold in (("plain", ""), ("gold", f"{tmp_path / 'judges.py'}:chars")):
        run_ppo(PPOConfig(model_name_or_path=str(tiny_model_dir), dataset=str(tmp_path / "prompts.jsonl"), output_dir=str(tmp_path / name),
                          reward_fn=f"{tmp_path / 'judges.py'}:words", gold_reward_fn=gold, max_steps=2, rollout_batch_size=4,
                          mini_batch_size=4, num_ppo_epochs=1, max_new_tokens=6, learning_rate=1e-3, progress=False))
        rows[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    plain, gold = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "gold" / "model.safetensors"))
    assert all((plain[k] == gold[k]).all() for k in plain)
    assert all("gold_score" not in r for r in rows["plain"]) and all(r["gold_score"] > 0 for r in rows["gold"])
    assert [r["score"] for r in rows["plain"]] == [r["score"] for r in rows["gold"]]
