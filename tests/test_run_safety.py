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


def test_resume_refuses_a_dataset_whose_contents_changed(tiny_model_dir, data_file, tmp_path):
    """Same --dataset path, one row edited to the same size (size and mtime alone could miss it): refused,
    naming the dataset; the untouched file resumes. A data set's bytes are hashed once per run."""
    from alignkit.train import checkpoint

    data, out = tmp_path / "train.jsonl", str(tmp_path / "out")
    shutil.copy(data_file, data)
    settings = dict(model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=out, max_steps=2, per_device_train_batch_size=4,
                    max_length=128, learning_rate=1e-3, logging_steps=1, progress=False)
    run_sft(**{**settings, "save_steps": 1})
    resume = SFTConfig(**settings, resume_from_checkpoint="latest")
    assert prepare_output_dir(resume).name == "step-2"
    lines = data.read_text().splitlines(keepends=True)
    row = json.loads(lines[1])
    row["completion"] = row["completion"][::-1] if row["completion"][::-1] != row["completion"] else row["completion"].swapcase()
    edited = json.dumps(row) + "\n"
    assert len(edited) == len(lines[1]) and edited != lines[1]
    stat = data.stat()
    data.write_text("".join([lines[0], edited, *lines[2:]]))
    import os

    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same size and mtime: only the bytes tell
    checkpoint._hashed.clear()  # a new process would not have the old digest cached
    with pytest.raises(ValueError, match=r"dataset contents: was 'sha256:[0-9a-f]{16}', now 'sha256:[0-9a-f]{16}'"):
        prepare_output_dir(resume)
    assert checkpoint.data_contents("builtin:comparison:20") == "builtin"
    assert checkpoint.data_contents("no-such-org/no-such-set") == "revision: not in the local hub cache"


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


def test_reward_normalization_failing_mid_write_leaves_the_model_intact(tiny_model_dir, tmp_path, monkeypatch):
    """`rm --normalize_dataset` re-saves the model (config.json; the weights too when the head has a bias): a
    write that dies halfway (the file torn, then an error) leaves the trained model byte for byte; without
    the failure the same call writes the normalization."""
    import transformers.modeling_utils
    from transformers import PretrainedConfig

    from alignkit.config import RMConfig
    from alignkit.models import load_tokenizer
    from alignkit.train import rm

    cfg = RMConfig(model_name_or_path=str(tiny_model_dir), dataset="builtin_pref:comparison:8", output_dir=str(tmp_path / "rm"), max_steps=1,
                   per_device_train_batch_size=4, logging_steps=1, progress=False, normalize_dataset="builtin_pref:comparison:8")
    rm.run_rm(RMConfig(**{**cfg.__dict__, "normalize_dataset": ""}))
    out = Path(cfg.output_dir)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def torn(path, *args, **kwargs):
        Path(path).write_bytes(b"{\"torn")  # a kill halfway through the write
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", lambda tensors, filename, **kw: torn(filename))
    monkeypatch.setattr(PretrainedConfig, "to_json_file", lambda self, path, **kw: torn(path))
    with pytest.raises(RuntimeError, match="killed mid-write"):
        rm.normalize(cfg, load_tokenizer(cfg.output_dir))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before and not list(out.glob(".tmp-*"))
    monkeypatch.undo()
    result = rm.normalize(cfg, load_tokenizer(cfg.output_dir))
    config = json.loads((out / "config.json").read_text())
    assert config["reward_mean"] == result["normalize_mean"] and config["reward_offset"] == -result["normalize_mean"]
    assert json.loads((out / "reward_normalization.json").read_text())["mean"] == result["normalize_mean"] and not list(out.glob(".tmp-*"))


def test_chat_transcripts_are_written_whole_or_not_at_all(tmp_path):
    """A save that fails mid-write (a lone surrogate cannot be encoded: the error comes while writing) leaves
    the previous transcript byte for byte (a plain write_text truncated it first); .jsonl appends keep
    earlier rows, and a row after a torn last line (no newline) starts on its own line."""
    from alignkit.chat.terminal import save_conversation

    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    broken = [*talk, {"role": "user", "content": "x\ud800"}, {"role": "assistant", "content": "y"}]
    for name in ("talk.json", "talk.jsonl"):
        path = tmp_path / name
        save_conversation(talk, str(path))
        saved = path.read_bytes()
        with pytest.raises(UnicodeEncodeError):
            save_conversation(broken, str(path))
        assert path.read_bytes() == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.json", "talk.jsonl"]
    path = tmp_path / "talk.jsonl"
    path.write_bytes(path.read_bytes() + b'{"messages": [')  # torn by an older writer
    save_conversation(talk, str(path))
    lines = path.read_text().splitlines()
    assert lines[0] == lines[2] == json.dumps({"messages": talk}) and lines[1] == '{"messages": ['


def test_hub_ids_fail_at_once_when_the_hub_is_unreachable(monkeypatch, request, tmp_path):
    """No HF_HUB_OFFLINE, and the hub's endpoint refuses connections: a hub model id, a hub data set and a
    LoRA adapter whose base is a hub id are refused at once, naming the id and the reason. Measured on a
    machine without network before the fix: the data set took 43 s (huggingface_hub retries 5 times with
    back-off); after: one probe of the endpoint (< 1 s on a quiet machine), then 0.00 s each. The 10 s bound
    guards against the retries coming back, not speed."""
    import time

    import datasets
    import peft  # noqa: F401  (imports are slow on a loaded machine: not what the bound is about)
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from alignkit import models
    from alignkit.data.formats import DataError, read_rows

    endpoint = "http://127.0.0.1:9"  # the discard port: nothing listens, so a connection is refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    models.hub_unavailable.cache_clear()
    request.addfinalizer(models.hub_unavailable.cache_clear)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "some-org/some-base", "peft_type": "LORA"}))
    calls = [
        (lambda: models.load_causal_lm("some-org/some-model"), FileNotFoundError, "'some-org/some-model'"),
        (lambda: read_rows("some-org/some-dataset", "train"), DataError, "some-org/some-dataset"),
        (lambda: models.merge_adapter(str(adapter), str(tmp_path / "merged")), FileNotFoundError, "'some-org/some-base'"),
    ]
    for call, error, name in calls:
        start = time.monotonic()
        with pytest.raises(error, match=re.escape(name) + r".*the hub cannot be used \(" + re.escape(endpoint) + " did not answer"):
            call()
        assert time.monotonic() - start < 10
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # restored after the data set


def test_fresh_lora_adapters_follow_the_seed(tiny_model_dir, data_file, tmp_path):
    """A fresh LoRA adapter is random: it must be drawn after --seed is applied, so the same command gives the same
    run whatever the process did before (here: the global RNG is moved between the two runs)."""
    settings = dict(model_name_or_path=str(tiny_model_dir), dataset=str(data_file), max_steps=1, use_peft=True, learning_rate=1e-3)
    first = run_sft(output_dir=str(tmp_path / "a"), **settings)
    torch.manual_seed(12345)
    torch.rand(1000)
    second = run_sft(output_dir=str(tmp_path / "b"), **settings)
    assert first[0]["loss"] == second[0]["loss"] and first[0]["grad_norm"] == second[0]["grad_norm"]
