"""Flags: one declaration per flag, every value checked before any model or data loads, aliases, -h, --version,
the JSON result line. In-process with typer's CliRunner (fast); a couple of end-to-end cases in a real process."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import typing

import pytest
from typer.testing import CliRunner

from alignkit.cli import GenerateConfig, MergeConfig, ScoreConfig, TasksConfig, app
from alignkit.config import DPOConfig, PPOConfig, RMConfig, SFTConfig, ConfigError, check_value, coerce, load_config
from alignkit.data.flan_mixture import FlanConfig
from alignkit.data.self_instruct import SelfInstructConfig
from alignkit.evaluate.config import EvalConfig, HHHConfig, SensitivityConfig, WinRateConfig
from alignkit.serve.config import ChatConfig, FeedbackExportConfig, ServeConfig

MISSING_MODEL = "no/such-model-dir"  # loading it would fail with a different message: the flag error must come first
ALL_CONFIGS = [SFTConfig, RMConfig, DPOConfig, PPOConfig, GenerateConfig, MergeConfig, ScoreConfig, TasksConfig, FlanConfig,
               SelfInstructConfig, EvalConfig, SensitivityConfig, WinRateConfig, HHHConfig, ChatConfig, ServeConfig, FeedbackExportConfig]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model or tokenizer fails the test loudly."""
    from alignkit import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    for name in ("load_causal_lm", "load_tokenizer", "resolve_model_path"):
        monkeypatch.setattr(models, name, refuse)


@pytest.fixture
def paths(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    return a_file, a_dir


def issue_examples(a_file, a_dir):
    """(args, flag named in the message, the allowed values / what is wrong, also in the message)."""
    sft = ["sft", "--model_name_or_path", MISSING_MODEL, "--dataset", "missing.jsonl", "--output_dir", str(a_dir / "out")]
    gen = ["generate", "--model_name_or_path", MISSING_MODEL, "--prompt", "hi"]
    return [
        (sft + ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size", ">= 1"),
        (["sft", "--model_name_or_path", MISSING_MODEL, "--dataset", "missing.jsonl", "--output_dir", str(a_file)], "--output_dir", "existing file"),
        (sft + ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps", ">= 1"),
        (sft + ["--learning_rate", "-1e-4"], "--learning_rate", "> 0"),
        (sft + ["--lr_scheduler_type", "bogus"], "--lr_scheduler_type", "linear | cosine"),
        (sft + ["--max_steps", "0"], "--max_steps", "-1"),
        (sft + ["--mixed_precision", "fp32"], "--mixed_precision", "no | bf16 | fp16 | auto"),
        (sft + ["--eval_steps", "5"], "--eval_steps", "--eval_dataset"),
        (sft + ["--report_to", "mlflow"], "--report_to", "none | tensorboard | wandb"),
        (sft + ["--torch_dtype", "int8"], "--torch_dtype", "float32 | bfloat16 | float16 | auto"),
        (gen + ["--temperature", "-1"], "--temperature", ">= 0"),
        (gen + ["--top_p", "0"], "--top_p", "(0, 1]"),
        (gen + ["--max_new_tokens", "0"], "--max_new_tokens", ">= 1"),
        (["ppo", "--model_name_or_path", MISSING_MODEL, "--dataset", "p.jsonl", "--reward_fn", "builtin:sentiment",
          "--advantage_estimator", "grpo"], "--num_samples_per_prompt", ">= 2"),
        (["ppo", "--model_name_or_path", MISSING_MODEL, "--dataset", "p.jsonl", "--reward_fn", "builtin:sentiment",
          "--ptx_coef", "0.5"], "--ptx_coef", "--ptx_dataset"),
        (["score", "--reward_model", MISSING_MODEL, "--dataset", "missing.jsonl", "--output", str(a_dir)], "--output", "is a directory"),
        (["data", "tasks", "--output", str(a_dir)], "--output", "is a directory"),
        (["data", "tasks", "--output", str(a_dir / "t.jsonl"), "--tasks", "arithmetic,bogus"], "--tasks", "reversal"),
        (["eval", "--model_name_or_path", MISSING_MODEL, "--tasks", "arithmetic", "--output", str(a_file / "eval.json")], "--output", "is a file"),
        (["eval", "--model_name_or_path", MISSING_MODEL, "--tasks", "arithmetic", "--framing", "fancy"], "--framing", "chat | multiturn"),
        (["eval", "winrate", "--model_name_or_path", MISSING_MODEL, "--ref_model", MISSING_MODEL, "--dataset", "p.jsonl",
          "--judge", "builtin:exact_match", "--kl_samples", "0"], "--kl_samples", ">= 1"),
        (["feedback", "export", "--feedback_db", str(a_file), "--output", str(a_dir / "prefs.jsonl")], "--feedback_db", "not an SQLite database"),
        (["chat", "--model_name_or_path", MISSING_MODEL, "--history_strategy", "forget"], "--history_strategy", "truncate | summarize"),
        (["serve", "--model_name_or_path", MISSING_MODEL, "--port", "70000"], "--port", "[0, 65535]"),
        (["data", "self-instruct", "--output_dir", str(a_dir / "si"), "--similarity_threshold", "1.5"], "--similarity_threshold", "(0, 1]"),
    ]


def test_every_issue_example_exits_2_naming_the_flag_before_anything_loads(paths, no_loading):
    for args, flag, allowed in issue_examples(*paths):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error: ") and flag in result.output and allowed in result.output, (args, result.output)
        assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit)), args


def test_ppo_refuses_and_hides_the_supervised_knobs():
    """`ppo` never reads the epoch / micro-batch / accumulation / eval knobs, so it neither lists nor accepts them."""
    supervised = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                  "eval_dataset", "eval_steps")
    assert not set(supervised) & {f.name for f in dataclasses.fields(PPOConfig)}
    assert set(supervised) <= {f.name for f in dataclasses.fields(SFTConfig)}
    ppo_help, sft_help = invoke("ppo", "--help").output, invoke("sft", "--help").output
    assert "--rollout_batch_size" in ppo_help and "per_device_train_batch_size" not in ppo_help and "eval_dataset" not in ppo_help
    assert "per_device_train_batch_size" in sft_help  # the same check on a command that has it: the test can fail
    for flag, value in [("--eval_dataset", "missing.jsonl"), ("--per_device_train_batch_size", "0"),
                        ("--gradient_accumulation_steps", "7"), ("--num_train_epochs", "-3")]:
        result = invoke("ppo", "--dataset", "p.jsonl", "--reward_fn", "builtin:sentiment", flag, value)
        assert result.exit_code == 2 and "No such option" in result.output and flag in result.output, result.output


def test_yaml_syntax_error_names_file_and_line(tmp_path, no_loading):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: train.jsonl\nlearning_rate: 1e-5\nmax_steps: [3,\n")
    result = invoke("sft", "--model_name_or_path", MISSING_MODEL, "--config", str(path))
    assert result.exit_code == 2 and f"error: {path}:" in result.output and "not valid YAML" in result.output, result.output
    line = int(result.output.split(f"{path}:")[1].split(":")[0])
    assert line in (3, 4)  # the parser notices at the unclosed list or at the end of the file after it


def test_yaml_bad_value_names_file_line_and_key(tmp_path, no_loading):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: train.jsonl\nmax_steps: two\n")
    result = invoke("sft", "--model_name_or_path", MISSING_MODEL, "--config", str(path))
    assert result.exit_code == 2 and f"error: {path}:2: key 'max_steps': must be a whole number, got 'two'" in result.output, result.output
    path.write_text("dataset: train.jsonl\n\nlearning_rate: -1\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: key 'learning_rate': -1.0 is out of range; must be > 0"):
        load_config(SFTConfig, str(path))
    path.write_text("dataset: train.jsonl\nlerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: unknown key 'lerning_rate'.*learning_rate"):
        load_config(SFTConfig, str(path))
    path.write_text("dataset: train.jsonl\nbf16: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: key 'bf16': must be true or false"):
        load_config(SFTConfig, str(path))
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(SFTConfig, str(path))


def test_yaml_values_are_coerced_and_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset_name: train.jsonl\nlearning_rate: 1e-4\nbf16: true\nsplit: validation\nmax_steps: 5\n")
    cfg = load_config(SFTConfig, str(path), {"max_steps": 9})
    assert (cfg.dataset, cfg.learning_rate, cfg.mixed_precision, cfg.dataset_split, cfg.max_steps) == ("train.jsonl", 1e-4, "bf16", "validation", 9)
    assert coerce("x", 3.0, int) == 3 and coerce("x", "yes", bool) is True
    for value, kind in [(True, int), (2.5, int), ("maybe", bool), ("x", float), ([1], int)]:
        with pytest.raises(ConfigError):
            coerce("x", value, kind)


@pytest.fixture
def captured(monkeypatch):
    """Replace the trainers, the scorer and the evaluator by recorders; return what each was called with."""
    import alignkit.evaluate.runner as runner
    import alignkit.evaluate.sensitivity as sensitivity
    import alignkit.evaluate.score as score
    import alignkit.rl.ppo as ppo
    import alignkit.train.sft as sft

    calls = {}
    monkeypatch.setattr(sft, "run_sft", lambda cfg: calls.setdefault("sft", cfg) and {"loss": 1.25, "step": 3, "eval_loss": None})
    monkeypatch.setattr(ppo, "run_ppo", lambda cfg: calls.setdefault("ppo", cfg) and {"score": 0.5})
    monkeypatch.setattr(score, "score_file", lambda *a: calls.setdefault("score", a) and {"rows": 0, "mean_reward": 0.0})
    monkeypatch.setattr(runner, "run_eval", lambda cfg: calls.setdefault("eval", cfg))
    monkeypatch.setattr(sensitivity, "run_sensitivity", lambda cfg: calls.setdefault("sensitivity", cfg))
    return calls


def test_each_alias_sets_its_field(tmp_path, captured):
    """A test per alias: each one changes the resolved config away from the default (so an ignored alias fails)."""
    out = str(tmp_path / "out")
    base = ["sft", "--output_dir", out, "--no_progress"]
    sft_cases = [
        (["--dataset_name", "d.jsonl"], "dataset", "d.jsonl"),
        (["--dataset", "d.jsonl", "--bf16"], "mixed_precision", "bf16"),
        (["--dataset", "d.jsonl", "--split", "validation"], "dataset_split", "validation"),
        (["--dataset", "d.jsonl", "--batch_size", "3"], "per_device_train_batch_size", 3),
        (["--dataset", "d.jsonl", "--gradient_checkpointing"], "gradient_checkpointing", True),
        (["--dataset", "d.jsonl", "--torch_dtype", "bfloat16"], "torch_dtype", "bfloat16"),
        (["--dataset", "d.jsonl", "--report_to", "tensorboard"], "report_to", "tensorboard"),
    ]
    for args, name, value in sft_cases:
        if name == "report_to":
            pytest.importorskip("tensorboard")
        captured.clear()
        result = invoke(*base, *args)
        assert result.exit_code == 0, (args, result.output)
        assert getattr(captured["sft"], name) == value != getattr(SFTConfig(), name), args

    result = invoke("score", "--reward_model", "rm", "--dataset_name", "d.jsonl", "--output", str(tmp_path / "s.jsonl"),
                    "--batch_size", "5", "--split", "test")
    assert result.exit_code == 0, result.output
    assert captured["score"][:5] == ("rm", "d.jsonl", str(tmp_path / "s.jsonl"), "test", 5)

    result = invoke("eval", "--task", "arithmetic", "--dataset_split", "validation", "--per_device_eval_batch_size", "2",
                    "--output", str(tmp_path / "e.json"))
    assert result.exit_code == 0, result.output
    assert (captured["eval"].tasks, captured["eval"].split, captured["eval"].batch_size) == ("arithmetic", "validation", 2)
    result = invoke("eval", "sensitivity", "--tasks", "rte", "--output", str(tmp_path / "s.json"))
    assert result.exit_code == 0 and captured["sensitivity"].task == "rte", result.output


def test_a_switch_and_its_flag_must_agree(captured):
    result = invoke("sft", "--dataset", "d.jsonl", "--bf16", "--mixed_precision", "no")
    assert result.exit_code == 2 and "--bf16 means --mixed_precision bf16" in result.output
    assert "sft" not in captured


def test_final_metrics_are_one_json_line_on_stdout(tmp_path, captured):
    result = invoke("sft", "--dataset", "d.jsonl", "--output_dir", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == {"loss": 1.25, "step": 3}  # None values dropped
    assert f"saved to {tmp_path / 'out'}" in result.stderr  # a diagnostic: not on stdout
    result = invoke("ppo", "--dataset", "p.jsonl", "--reward_fn", "builtin:sentiment", "--output_dir", str(tmp_path / "ppo"))
    assert result.exit_code == 0 and json.loads(result.stdout) == {"score": 0.5}, result.output


def test_verbose_turns_on_transformers_progress_bars(captured, tmp_path):
    from transformers.utils import logging as hf_logging

    args = ["sft", "--dataset", "d.jsonl", "--output_dir", str(tmp_path / "out")]
    assert invoke(*args).exit_code == 0
    assert not hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.ERROR
    assert invoke(*args, "--verbose").exit_code == 0
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.INFO
    assert invoke(*args).exit_code == 0  # back to quiet
    assert not hf_logging.is_progress_bar_enabled()


def test_help_everywhere_and_version():
    from alignkit import __version__

    for command in (["sft"], ["ppo"], ["generate"], ["score"], ["merge"], ["data", "tasks"], ["data", "flan"], ["data", "self-instruct"],
                    ["eval"], ["eval", "winrate"], ["eval", "hhh"], ["eval", "sensitivity"], ["chat"], ["serve"], ["feedback", "export"]):
        result = invoke(*command, "-h")
        assert result.exit_code == 0 and "Usage:" in result.output, (command, result.output)
    top = invoke("-h")
    assert top.exit_code == 0 and "sft" in top.output and "eval" in top.output
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"alignkit {__version__}\n"


def test_feedback_export_refuses_a_missing_or_non_sqlite_db_and_accepts_a_real_one(tmp_path):
    result = invoke("feedback", "export", "--feedback_db", str(tmp_path / "none.db"), "--output", str(tmp_path / "p.jsonl"))
    assert result.exit_code == 2 and "--feedback_db" in result.output and "no such feedback database" in result.output
    real = tmp_path / "real.db"
    sqlite3.connect(real).close()  # an empty database file has no header yet: must pass the check
    from alignkit.serve.config import check_sqlite

    check_sqlite("feedback_db", str(real), must_exist=True)
    with sqlite3.connect(real) as db:
        db.execute("create table t (x)")
    check_sqlite("feedback_db", str(real), must_exist=True)


def test_every_declaration_is_complete_and_its_default_allowed():
    """Each field of each command's config has help text, and its default passes its own checks."""
    for cls in ALL_CONFIGS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), (cls.__name__, f.name)
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            coerce(f.name, default, hints[f.name])
            if f.metadata.get("path") != "input_file":
                check_value(f, default)


def test_the_flag_error_wins_in_a_real_process(tmp_path):
    """End to end: exit code 2, the message on stderr, no traceback, and the model (which does not exist) never loads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "1000"}
    for args, flag in [(["sft", "--model_name_or_path", MISSING_MODEL, "--dataset", "d.jsonl", "--learning_rate", "-1e-4"], "--learning_rate"),
                       (["generate", "--model_name_or_path", MISSING_MODEL, "--prompt", "hi", "--top_p", "0"], "--top_p")]:
        done = subprocess.run([sys.executable, "-m", "alignkit.cli", *args], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2 and done.stderr.startswith(f"error: {flag}: ") and "Traceback" not in done.stderr, done.stderr
        assert done.stdout == ""


def test_torch_dtype_names_reach_the_loaded_weights(tiny_model_dir):
    import torch

    from alignkit.models import load_causal_lm

    assert next(load_causal_lm(str(tiny_model_dir), dtype="bfloat16").parameters()).dtype == torch.bfloat16
    assert next(load_causal_lm(str(tiny_model_dir), dtype="float32").parameters()).dtype == torch.float32


def test_a_flag_of_the_wrong_type_is_a_usage_error():
    result = invoke("sft", "--dataset", "d.jsonl", "--max_steps", "two")
    assert result.exit_code == 2 and "--max_steps" in result.output and "valid integer" in result.output


def test_range_checks_agree_with_the_interval_definition():
    """check_value against the textbook interval membership, for every combination of open/closed ends."""
    from hypothesis import given
    from hypothesis import strategies as st

    from alignkit.config import knob

    @given(st.floats(-10, 10), st.floats(-10, 10), st.floats(-12, 12), st.booleans(), st.booleans())
    def check(low, high, value, open_low, open_high):
        @dataclasses.dataclass
        class C:
            x: float = knob(0.0, "x", min=low, max=high, min_exclusive=open_low, max_exclusive=open_high)

        inside = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
        try:
            check_value(dataclasses.fields(C)[0], value)
            accepted = True
        except ConfigError as error:
            accepted = False
            assert "out of range; must be in " in str(error)
        assert accepted == inside

    check()
