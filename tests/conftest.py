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
