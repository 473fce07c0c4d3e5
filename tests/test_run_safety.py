"""Runs are never clobbered or mixed: the output-dir guard, --overwrite_output_dir, config fingerprints in
checkpoints, `latest` with none, --save_total_limit, weights_only loading, non-finite steps (stop or
--skip_nonfinite), atomic writes (a failing eval keeps the previous predictions)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignkit import atomic
from alignkit.cli import app
from alignkit.config import PPOConfig, SFTConfig
from alignkit.data import tasks
from alignkit.data.formats import write_jsonl
from alignkit.train.checkpoint import NonFiniteError, checkpoints, prepare_output_dir


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = tasks.make_mixture(["reversal", "arithmetic"], "train", 4, seed=1)
    path = tmp_path_factory.mktemp("safety-data") / "train.jsonl"
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], path)
    return path


def sft_args(model_dir, data_file, output_dir, *extra) -> list[str]:
    return ["sft", "--model_name_or_path", str(model_dir), "--dataset", str(data_file), "--output_dir", str(output_dir),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--max_length", "128",
            "--logging_steps", "1", "--no_progress", *extra]


def run_sft(**settings) -> list[dict]:
    from alignkit.train.sft import run_sft as run

    run(SFTConfig(**{"progress": False, "max_length": 128, "per_device_train_batch_size": 4, "logging_steps": 1, **settings}))
    return [json.loads(line) for line in Path(settings["output_dir"], "metrics.jsonl").read_text().splitlines()]


def test_guard_refuses_another_runs_outputs_before_loading_and_overwrite_removes_them(tiny_model_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = CliRunner().invoke(app, sft_args(tiny_model_dir, data_file, out, "--save_steps", "1"))
    assert first.exit_code == 0, first.output
    assert (out / "checkpoints" / "step-2").is_dir()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    import alignkit.train.sft as sft

    monkeypatch.setattr(sft, "load_causal_lm", lambda *a, **k: pytest.fail("a model loaded before the guard refused"))
    again = CliRunner().invoke(app, sft_args(tiny_model_dir, data_file, out))
    assert again.exit_code == 2 and "Traceback" not in again.output, again.output
    message = " ".join(again.output.split())
    assert str(out) in message and "--overwrite_output_dir" in message and "--resume_from_checkpoint" in message, message
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched

    monkeypatch.undo()
    overwritten = CliRunner().invoke(app, sft_args(tiny_model_dir, data_file, out, "--overwrite_output_dir", "--max_steps", "1"))
    assert overwritten.exit_code == 0, overwritten.output
    assert not (out / "checkpoints").exists()  # the old run's checkpoints went with it
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_output_dir_that_is_a_file_is_refused(tiny_model_dir, data_file, tmp_path):
    path = tmp_path / "afile"
    path.write_text("mine")
    for command in (sft_args(tiny_model_dir, data_file, path),
                    ["ppo", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data_file), "--reward_fn", "builtin:exact_match",
                     "--output_dir", str(path), "--no_progress"]):
        result = CliRunner().invoke(app, command)
        output = " ".join(result.output.split())
        assert result.exit_code == 2 and str(path) in output and "file" in output and "Traceback" not in output, output
    with pytest.raises(ValueError, match="is a file, not a directory"):  # the guard itself, for callers that skip the CLI
        prepare_output_dir(SFTConfig(output_dir=str(path), overwrite_output_dir=True))
    assert path.read_text() == "mine"


def test_unrelated_files_do_not_block_and_are_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_output_dir(SFTConfig(output_dir=str(tmp_path))) is None
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="another run's outputs"):
        prepare_output_dir(SFTConfig(output_dir=str(tmp_path)))
    prepare_output_dir(SFTConfig(output_dir=str(tmp_path), overwrite_output_dir=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_refuses_other_settings_naming_them_and_latest_without_checkpoint_starts_fresh(tiny_model_dir, data_file, tmp_path, caplog):
    out = str(tmp_path / "out")
    run_sft(model_name_or_path=str(tiny_model_dir), dataset=str(data_file), output_dir=out, max_steps=2, save_steps=1, learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"learning_rate: was 0\.001, now 0\.002") as error:
        prepare_output_dir(SFTConfig(model_name_or_path=str(tiny_model_dir), dataset=str(data_file), output_dir=out, max_steps=2,
                                     per_device_train_batch_size=4, max_length=128, learning_rate=2e-3, resume_from_checkpoint="latest"))
    assert "step-2" in str(error.value)
    # knobs that do not change the math may differ
    same = SFTConfig(model_name_or_path=str(tiny_model_dir), dataset=str(data_file), output_dir=out, max_steps=2, per_device_train_batch_size=4,
                     max_length=128, learning_rate=1e-3, logging_steps=1, resume_from_checkpoint="latest", save_steps=5, progress=False)
    assert prepare_output_dir(same).name == "step-2"
    # `latest` with no checkpoint: says so and starts fresh; a directory holding another run's config still refuses
    fresh = tmp_path / "fresh"
    with caplog.at_level(logging.WARNING):
        assert prepare_output_dir(SFTConfig(output_dir=str(fresh), resume_from_checkpoint="latest")) is None
    assert f"no checkpoint in {fresh / 'checkpoints'}: starting fresh" in caplog.text
    for path in checkpoints(out):
        shutil.rmtree(path)
    with pytest.raises(ValueError, match="other settings.*learning_rate"):
        prepare_output_dir(SFTConfig(**{**same.__dict__, "learning_rate": 5e-3}))


def test_save_total_limit_and_weights_only(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    run_sft(model_name_or_path=str(tiny_model_dir), dataset=str(data_file), output_dir=str(out), max_steps=3, save_steps=1, save_total_limit=1,
            learning_rate=1e-3)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]
    state = json.loads((out / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["config"]["learning_rate"] == 1e-3 and len(state["fingerprint"]) == 16

    class Payload:  # a checkpoint from elsewhere: unpickling it would run code
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"optimizer": Payload(), "scheduler": {}}, out / "checkpoints" / "step-3" / "optimizer.pt")
    with pytest.raises(ValueError, match=r"optimizer\.pt cannot be loaded safely \(tensors only, weights_only=True\): Weights only load failed"):
        run_sft(model_name_or_path=str(tiny_model_dir), dataset=str(data_file), output_dir=str(out), max_steps=3, save_steps=1,
                save_total_limit=1, learning_rate=1e-3, resume_from_checkpoint="latest")


@pytest.fixture(scope="module")
def poisoned(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A model whose input embeddings of the word "Zanzibar" are inf (untied from the output layer, so
    only rows that contain the word go non-finite), and 4 rows of which one contains it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("poisoned")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": "Say hi.", "completion": "hi"}, {"prompt": "Name a colour.", "completion": "red"},
            {"prompt": "Where is Zanzibar?", "completion": "Africa"}, {"prompt": "Count to two.", "completion": "one two"}]
    clean = {i for r in rows if "Zanzibar" not in r["prompt"] for i in tokenizer(r["prompt"] + " " + r["completion"])["input_ids"]}
    bad = sorted(set(tokenizer(" Zanzibar")["input_ids"]) - clean)
    assert bad
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    with torch.no_grad():
        model.get_input_embeddings().weight[bad] = float("inf")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(rows, root / "rows.jsonl")
    return root / "model", root / "rows.jsonl"


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped_and_counted(poisoned, tmp_path):
    model_dir, rows = poisoned
    settings = dict(model_name_or_path=str(model_dir), dataset=str(rows), max_steps=4, per_device_train_batch_size=1, save_steps=1,
                    learning_rate=1e-3, use_chat_template="no")
    with pytest.raises(NonFiniteError, match=r"step (\d+): loss nan") as error:
        run_sft(output_dir=str(tmp_path / "stop"), **settings)
    bad_step = int(re.search(r"step (\d+)", str(error.value)).group(1))
    last = f"checkpoints/step-{bad_step - 1}" if bad_step > 1 else "no checkpoint"
    assert last in str(error.value), error.value

    metrics = run_sft(output_dir=str(tmp_path / "skip"), skip_nonfinite=True, **settings)
    assert [r["nonfinite_skipped"] for r in metrics] == [int(r["step"] >= bad_step) for r in metrics]
    assert [r["loss"] is None for r in metrics] == [r["step"] == bad_step for r in metrics]  # the skipped step's loss is not averaged in
    assert all(r["loss"] > 0 for r in metrics if r["step"] != bad_step)
    from safetensors.torch import load_file

    final = load_file(str(tmp_path / "skip" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for name, t in final.items() if "embed_tokens" not in name)  # no NaN reached the weights


def test_failing_eval_leaves_the_previous_results_intact(tiny_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "--model_name_or_path", str(tiny_model_dir), "--tasks", "arithmetic", "--limit", "2", "--max_new_tokens", "2",
            "--output", str(out), "--no_progress"]
    good = CliRunner().invoke(app, args)
    assert good.exit_code == 0, good.output
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert files["eval.predictions.jsonl"] and "eval.md" in files
    bad = CliRunner().invoke(app, [*args[:4], "arithmetc", *args[5:]])
    assert bad.exit_code == 2 and "arithmetc" in bad.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # byte for byte, and no stray files


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "rows.jsonl"
    atomic.write_jsonl(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic.write_jsonl(path, rows())
    assert path.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(tmp_path / "ckpt") as folder:
            (folder / "x").write_text("partial")
            raise RuntimeError("killed mid-save")
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_ppo_guard_runs_before_models_load(tmp_path, monkeypatch):
    import alignkit.rl.ppo as ppo

    (tmp_path / "config.yaml").write_text("seed: 1\n")
    monkeypatch.setattr(ppo, "training_device", lambda: pytest.fail("setup went on after the guard should have refused"))
    with pytest.raises(ValueError, match="another run's outputs"):
        ppo.run_ppo(PPOConfig(dataset="builtin:arithmetic:4", reward_fn="builtin:exact_match", output_dir=str(tmp_path)))


def test_ppo_nonfinite_update_stops_or_is_skipped_and_counted(tiny_model_dir, tmp_path):
    """A reward of NaN makes every advantage NaN, so the first PPO update's loss is not finite: the run stops
    naming iteration 1; with --skip_nonfinite every update is skipped, counted, and the weights never move."""
    from safetensors.torch import load_file

    from alignkit.config import PPOConfig
    from alignkit.rl.ppo import run_ppo

    write_jsonl([{"prompt": f"Say {w}."} for w in ("hi", "yes", "no", "red")], tmp_path / "prompts.jsonl")
    (tmp_path / "reward.py").write_text("def nan(prompts, responses, **kw):\n    return [float('nan')] * len(responses)\n")
    settings = dict(model_name_or_path=str(tiny_model_dir), dataset=str(tmp_path / "prompts.jsonl"), reward_fn=f"{tmp_path / 'reward.py'}:nan",
                    max_steps=2, rollout_batch_size=4, mini_batch_size=2, num_ppo_epochs=1, max_new_tokens=4, learning_rate=1e-2,
                    whiten_advantages=False, progress=False)
    with pytest.raises(NonFiniteError, match=r"step 1: loss nan"):
        run_ppo(PPOConfig(output_dir=str(tmp_path / "stop"), **settings))
    run_ppo(PPOConfig(output_dir=str(tmp_path / "skip"), skip_nonfinite=True, **settings))
    rows = [json.loads(line) for line in open(tmp_path / "skip" / "metrics.jsonl")]
    assert [r["nonfinite_skipped"] for r in rows] == [2, 2]  # 4 responses / minibatches of 2, one epoch
    before, after = load_file(str(Path(tiny_model_dir) / "model.safetensors")), load_file(str(tmp_path / "skip" / "model.safetensors"))
    assert all(torch.equal(before[name], after[name]) for name in before if name in after)
