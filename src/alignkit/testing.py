"""Helpers for tests, benchmarks and quick smoke runs (as `transformers.testing_utils`): not needed to train or serve.

`make_tiny_model` builds a random small model offline in seconds; `alignkit pipeline --quick` (the demo's smoke
run) uses it too, which is why it ships in the package rather than under tests/."""

from __future__ import annotations

from pathlib import Path

import torch

from alignkit.models import builtin_tokenizer_dir, save_model


def make_tiny_model(
    output_dir: str | Path,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """A random small Llama/Qwen2-style model with the built-in model's real tokenizer, saved to `output_dir`.

    Built offline in seconds; tests and benchmarks use it where the real model is too slow.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_dir())
    model_type = {"llama": "llama", "qwen": "qwen2", "qwen2": "qwen2"}[arch]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    output_dir = Path(output_dir)
    save_model(model, tokenizer, output_dir)
    return output_dir
