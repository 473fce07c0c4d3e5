"""Shared fixtures: a tiny random model with the real SmolLM2 tokenizer, built offline once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from alignkit.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, num_layers=2)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from alignkit.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data sets are only on developer and CI machines)")
    return path


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the network from tests
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
