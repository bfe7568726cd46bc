"""Shared fixtures. Slow tests (the real 135M model) run only with --run-slow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PALATE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HH_FILE = SHARED / "data" / "hh-harmless-dev.jsonl"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: loads the real 135M model (run with --run-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hh_file() -> Path:
    if not HH_FILE.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"shared data not found at {HH_FILE} (CI must have ../shared)")
        pytest.skip(f"shared data not found at {HH_FILE}")
    return HH_FILE


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (skipped where absent, an error on CI)."""
    d = SHARED / "data"
    if not (d / "helpful-prompts.jsonl").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"shared data not found at {d} (CI must have ../shared)")
        pytest.skip(f"shared data not found at {d}")
    return d


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): the tiny random Llama with palate's own small tokenizer."""
    from palate.models import tiny_causal_lm

    return tiny_causal_lm(seed=0)


@pytest.fixture(scope="session")
def device():
    """Where model-level tests run: CUDA when a GPU is present, else the CPU. (Trainer tests
    need no fixture: accelerate puts them on the GPU when there is one.)"""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
