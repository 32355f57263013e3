"""Shared test set-up: deterministic seeds; no test touches the network."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _attnzoo_home(tmp_path_factory, monkeypatch) -> None:
    """attnzoo's cache (records of Hub files) in a temporary folder: no test writes the
    user's ~/.cache/attnzoo, and no test sees another's records."""
    monkeypatch.setenv("ATTNZOO_HOME", str(tmp_path_factory.mktemp("attnzoo_home")))
    monkeypatch.delenv("ATTNZOO_REQUIRE_PINNED", raising=False)
