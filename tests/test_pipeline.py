"""`alignkit pipeline`: recipe validation, fingerprints, the gold judge, and recipes/demo.yaml end to end with --quick
(a tiny random model, a few steps per stage): artifacts, report numbers, skipping, rerunning from the changed stage,
and resuming a run SIGKILLed mid-PPO to the same weights."""

from __future__ import annotations

import dataclasses
import json
import os
import re
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
    ("model: x\nsft:\n  max_steps: [3\n  batch_size: 2\n", ["recipe.yaml:4", "not valid YAML"]),
    ("- data\n- sft\n", ["recipe.yaml", "must be a mapping of keys", "got list"]),
])
def test_recipe_errors_name_file_line_and_key(tmp_path, text, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert all(part in str(caught.value) for part in expected), str(caught.value)


def test_recipes_and_config_files_are_read_by_one_reader(tmp_path):
    """config.read_yaml gives recipes and --config files the same file:line errors and the line of every nested key."""
    from alignkit.config import ConfigError, load_config, read_yaml
    from alignkit.config import SFTConfig

    path = tmp_path / "recipe.yaml"
    path.write_text("model: x\n\nsft:\n  max_steps: 3\n  nested:\n    deep: 1\n")
    assert read_yaml(str(path))[1] == {"model": 1, "sft": 3, "sft.max_steps": 4, "sft.nested": 5, "sft.nested.deep": 6}
    path.write_text("max_steps: [3\nlearning_rate: 1\n")
    with pytest.raises(ConfigError) as from_config:
        load_config(SFTConfig, str(path))
    with pytest.raises(RecipeError) as from_recipe:
        load_recipe(path)
    assert str(from_config.value) == str(from_recipe.value) and str(from_recipe.value).startswith(f"{path}:2: not valid YAML")


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


def test_mixed_precision_reaches_every_training_stage_and_their_fingerprints(tmp_path):
    """The recipe's mixed_precision is each training stage's --mixed_precision (the demo asks for auto); changing it
    reruns the training stages and what reads them, never the data stage; a value outside the choices is refused
    naming the file, line and key."""
    from alignkit.config import DPOConfig, PPOConfig, RMConfig, SFTConfig
    from alignkit.pipeline.stages import train_config

    demo = load_recipe(DEMO)
    assert demo.mixed_precision == "auto"
    bf16 = dataclasses.replace(demo, mixed_precision="bf16")
    for cls, stage in ((SFTConfig, "sft"), (RMConfig, "rm"), (PPOConfig, "ppo"), (DPOConfig, "dpo")):
        assert train_config(cls, bf16, tmp_path, stage, False).mixed_precision == "bf16", stage
    before, after = fingerprints(demo), fingerprints(bf16)
    assert {s for s in before if before[s] != after[s]} == set(before) - {"data"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nmixed_precision: half\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:2: 'mixed_precision' is 'half'; valid: no, bf16, fp16, auto"):
        load_recipe(bad)


def _recorded(run: Path, recipe, status: dict | None = None) -> None:
    """stage.json for every stage of `recipe` as a finished run leaves it (status 'done' unless given)."""
    from alignkit.pipeline.fingerprint import write_stage

    for stage, value in fingerprints(recipe).items():
        write_stage(run, stage, {"fingerprint": value, "status": (status or {}).get(stage, "done")})


def test_plan_for_from_only_force_and_interrupted_stages(tmp_path):
    """The runner's decisions (no model): --from reruns that stage and all later ones, --only one stage, --force
    even what is up to date; a stage left 'running' with the same fingerprint resumes (training) or reruns."""
    from alignkit.pipeline.fingerprint import plan

    recipe = load_recipe(DEMO)
    order = list(STAGE_DIRS)
    _recorded(tmp_path, recipe)
    acting = lambda decided: [s for s in order if decided.actions[s] != "skip"]  # noqa: E731
    assert acting(plan(recipe, tmp_path)) == []
    assert acting(plan(recipe, tmp_path, start="rm")) == ["rm", "ppo", "dpo", "eval", "report"]
    assert acting(plan(recipe, tmp_path, only="dpo")) == []  # up to date: --only alone does not rerun it
    assert acting(plan(recipe, tmp_path, only="dpo", force=True)) == ["dpo"]
    assert acting(plan(recipe, tmp_path, force=True)) == order
    _recorded(tmp_path, recipe, status={"ppo": "running", "eval": "running"})
    decided = plan(recipe, tmp_path)
    assert {s: decided.actions[s] for s in acting(decided)} == {"ppo": "resume", "eval": "run"}
    assert plan(recipe, tmp_path, force=True).actions["ppo"] == "run"  # --force starts it afresh
    _recorded(tmp_path, recipe)
    changed = dataclasses.replace(recipe, rm=dataclasses.replace(recipe.rm, max_steps=recipe.rm.max_steps + 1))
    assert acting(plan(changed, tmp_path)) == ["rm", "ppo", "eval", "report"]
    assert acting(plan(changed, tmp_path, only="rm")) == ["rm"]
    with pytest.raises(ValueError, match="ppo needs rm"):
        plan(changed, tmp_path, only="ppo")  # its input is not done with this recipe
    with pytest.raises(ValueError, match="--from juggle: not a stage"):
        plan(recipe, tmp_path, start="juggle")


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
    assert "Loading weights" not in result.stdout + result.stderr  # stages are quiet as every command without --verbose
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


def judge_reply(body: dict, always_a: bool = False) -> dict:
    """A stand-in judge's chat completion: prefers the longer answer (or always says "A")."""
    text = body["messages"][1]["content"]
    first = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
    second = text.split("Answer B:\n")[1].split("\n\nWhich answer")[0]
    verdict = "A" if always_a or len(first) > len(second) else "B"
    return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": verdict}}]}


def mock_openai(always_a: bool = False, seen: list | None = None):
    """The official client over an in-memory transport that answers as `judge_reply`."""
    import httpx
    import openai

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        (seen if seen is not None else []).append((request.url.path, body))
        return httpx.Response(200, json=judge_reply(body, always_a))

    return openai.OpenAI(base_url="http://judge/v1", api_key="k", max_retries=0, http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def test_llm_judge_asks_both_orders_and_drops_position_bias():
    from alignkit.pipeline.judges import llm_preferences

    items = [{"prompt": "p", "responses": ["short", "a longer one", "mid size"]}]
    seen = []
    rows = llm_preferences(items, "http://judge/v1", "m", None, client=mock_openai(seen=seen))
    assert len(seen) == 6 and {path for path, _ in seen} == {"/v1/chat/completions"}  # 3 pairs × 2 orders
    assert all(body["model"] == "m" and body["temperature"] == 0 for _, body in seen)
    assert {(r["chosen"], r["rejected"]) for r in rows} == {("a longer one", "short"), ("mid size", "short"), ("a longer one", "mid size")}
    assert llm_preferences(items, "http://judge/v1", "m", None, client=mock_openai(always_a=True)) == []  # "A" in both orders: no preference


@pytest.fixture
def judge_server():
    """A stand-in OpenAI-compatible judge on loopback (http.server): /v1/chat/completions answers as `judge_reply`."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, self.headers.get("Authorization"), body))
            payload = json.dumps(judge_reply(body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    server.shutdown()
    server.server_close()


def test_compare_stage_with_an_llm_judge_over_http(tiny_model_dir, tmp_path, judge_server, monkeypatch):
    """The compare stage with `judge: llm`: the official openai client posts every pair in both orders to the endpoint
    on loopback (with the key from compare.llm_api_key_env), and the judge's preferences (longer wins) become the rows."""
    from alignkit.pipeline.recipe import recipe_from_dict
    from alignkit.pipeline.stages import read_rows, stage_compare, write_rows

    url, requests = judge_server
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "sft")
    write_rows([{"prompt": f"What is {i} + {i}?", "completion": str(2 * i)} for i in range(4)], run / "data" / "prompts.jsonl")
    monkeypatch.setenv("JUDGE_KEY", "secret")
    recipe = recipe_from_dict({"model": "tiny", "compare": {"judge": "llm", "llm_base_url": url, "llm_model": "judge-m", "llm_api_key_env": "JUDGE_KEY",
                                                            "samples_per_prompt": 3, "max_new_tokens": 6, "heldout_fraction": 0.25}})
    result = stage_compare(recipe, run, resume=False)
    samples = read_rows(run / "compare" / "samples.jsonl")
    distinct_pairs = sum(len(set(s["responses"])) * (len(set(s["responses"])) - 1) // 2 for s in samples)
    assert len(requests) >= 2 * distinct_pairs > 0 and {(path, key) for path, key, _ in requests} == {("/v1/chat/completions", "Bearer secret")}
    rows = read_rows(run / "compare" / "pairs_train.jsonl") + read_rows(run / "compare" / "pairs_heldout.jsonl")
    assert result["judge"] == "llm" and result["pairs"] == len(rows) > 0
    # the judge's rule, both orders agreeing (judge_preference is w for the pair in sampling order: 1 or 0, never a split ½)
    assert all(len(r["chosen"]) > len(r["rejected"]) and r["judge_preference"] in (0.0, 1.0) for r in rows)


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


# ---------------------------------------------------------------------------------------------
# `alignkit serve RUN/<stage>`: a stage's directory names its model


@pytest.fixture
def finished_run(tmp_path):
    """A pipeline run's layout without models being trained: sft and rm done, ppo cut off before its model was saved."""
    from alignkit.pipeline.fingerprint import write_json_atomic, write_stage

    run = tmp_path / "run"
    write_json_atomic(run / "pipeline.json", {"running": {"ppo": "x"}})
    write_json_atomic(run / "recipe.json", {"model": "tiny"})
    for stage in ("sft", "rm"):
        write_json_atomic(run / stage / "config.json", {"model_type": "llama"})
        write_stage(run, stage, {"fingerprint": "x", "status": "done"})
    write_stage(run, "ppo", {"fingerprint": "x", "status": "running"})
    (run / "eval").mkdir()
    return run


def test_a_stage_directory_resolves_to_its_model(finished_run):
    from alignkit.runs import resolve_model

    run = finished_run
    assert resolve_model(str(run / "sft")) == str(run / "sft")
    assert resolve_model(str(run / "base")) == str(run / "quick-model")  # --quick: the tiny model the run built
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id passes through
    assert resolve_model("smollm2-135m-instruct") == "smollm2-135m-instruct"
    for name, message in ((run, "is a pipeline run, not a model"), (run / "ppo", "no model yet (status: running)"),
                          (run / "dpo", "no model yet (status: not run)"), (run / "rm", "reward model"),
                          (run / "eval", "makes no model"), (run / "nowhere" / "x", "no such directory")):
        with pytest.raises(ValueError, match=re.escape(message)):
            resolve_model(str(name))


def test_model_is_a_positional_alias_of_model_name_or_path(finished_run):
    """`alignkit serve MODEL` fills --model_name_or_path; giving both, differently, is refused (exit 2)."""
    import typer
    from typer.testing import CliRunner

    from alignkit.flags import command_from
    from alignkit.serve.config import ServeConfig

    built = []
    app = typer.Typer()
    app.command("serve")(command_from(ServeConfig, built.append))
    app.command("other")(lambda: None)  # two commands: typer then expects the command name first
    assert CliRunner().invoke(app, ["serve", str(finished_run / "sft"), "--port", "0"]).exit_code == 0
    assert CliRunner().invoke(app, ["serve", "--model_name_or_path", "m"]).exit_code == 0
    assert [c.model_name_or_path for c in built] == [str(finished_run / "sft"), "m"]
    refused = CliRunner().invoke(app, ["serve", "a", "--model_name_or_path", "b"])
    assert refused.exit_code == 2 and "give one" in refused.output and len(built) == 2


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["chat"], ["generate", "--prompt", "hi"]])
def test_serving_a_stage_without_a_model_is_refused_before_loading(finished_run, command):
    result = subprocess.run([sys.executable, "-m", "alignkit.cli", command[0], str(finished_run / "ppo"), *command[1:]],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "stage ppo of pipeline run" in result.stderr and "no model yet" in result.stderr


# ---------------------------------------------------------------------------------------------
# the reward model as PPO's reward: scored as it was trained and normalized


@pytest.mark.parametrize("use_chat_template", ["auto", "no"])
def test_ppo_reward_path_tokenizes_as_the_reward_model_was_trained(tokenizer, use_chat_template):
    """tokenize_reply(prompt_text(conversation), response) == tokenize_example(conversation + response): the ids the RM
    trained and was normalized on (chat template: the turn closed by the template, '<|im_end|>\\n'; separator: + eos)."""
    from alignkit.data.tokenize import Formatting, prompt_text, tokenize_example, tokenize_reply

    fmt = Formatting(use_chat_template)
    conversations = [[{"role": "user", "content": "What is 2 + 3?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"}]]
    for messages in conversations:
        for response in ("5", " five, I think.\n", "", "a<|im_end|>"):
            expected = tokenize_example({"messages": [*messages, {"role": "assistant", "content": response}]}, tokenizer, fmt)[0]
            assert tokenize_reply(prompt_text(tokenizer, messages, fmt), response, tokenizer, fmt) == expected, (messages, response)


def test_rm_normalized_on_sft_responses_scores_zero_through_ppos_reward_path(tiny_model_dir, tmp_path):
    """The pipeline's rm stage normalizes on RUN/compare/sft_responses.jsonl; PPO scores the same responses through
    RewardModelScorer (prompt as formatted for the policy + response). Their mean must be 0 up to float32 rounding of
    the same sequences batched differently: |mean| ≤ 1e-4·(1 + std of the raw scores). (The former readout, prompt +
    response + eos, was off by −1.5 on the demo's reward model.)"""
    from alignkit.config import RMConfig
    from alignkit.data.tokenize import Formatting, prompt_text
    from alignkit.models import load_tokenizer
    from alignkit.pipeline.stages import write_rows
    from alignkit.rl.rewards import RewardModelScorer
    from alignkit.train.rm import run_rm

    pairs = [{"prompt": f"What is {i} + {i}?", "chosen": str(2 * i), "rejected": f"I think {i}"} for i in range(8)]
    responses = [{"prompt": f"What is {i} + {i}?", "completion": answer} for i in range(6) for answer in (str(2 * i), f"maybe {i} or so", f" {i}{i}\n")]
    write_rows(pairs, tmp_path / "pairs.jsonl")
    write_rows(responses, tmp_path / "sft_responses.jsonl")
    run_rm(RMConfig(model_name_or_path=str(tiny_model_dir), dataset=str(tmp_path / "pairs.jsonl"), normalize_dataset=str(tmp_path / "sft_responses.jsonl"),
                    output_dir=str(tmp_path / "rm"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, progress=False, logging_steps=1))
    normalization = json.loads((tmp_path / "rm" / "reward_normalization.json").read_text())
    tokenizer = load_tokenizer(str(tmp_path / "rm"))
    prompts = [prompt_text(tokenizer, [{"role": "user", "content": r["prompt"]}], Formatting()) for r in responses]
    scores = RewardModelScorer(str(tmp_path / "rm"), batch_size=5)(prompts, [r["completion"] for r in responses], finished=[False] * len(responses))
    assert abs(sum(scores) / len(scores)) <= 1e-4 * (1 + normalization["std"]), (scores, normalization)
    assert max(scores) - min(scores) > 1e-3  # the scores vary: a zero mean is not a constant model
