"""Shared fixtures: the embedded models (pulled once per machine into PREFLOOP_HOME) and a quiet env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No hub at run time, wandb never online from tests, no tokenizer fork warnings.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """2-layer random Llama with the real SmolLM2 tokenizer: fast enough for every unit test."""
    from alignment.models import pull_model

    return pull_model("tiny-random")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint, for the few end-to-end tests."""
    from alignment.models import pull_model

    return pull_model("smollm2-135m-instruct")


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty PREFLOOP_HOME, for tests of provisioning itself."""
    home = tmp_path / "prefloop-home"
    monkeypatch.setenv("PREFLOOP_HOME", str(home))
    return home
