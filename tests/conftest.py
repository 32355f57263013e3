"""Shared test set-up: deterministic seeds, no test touches the network; and the
fixtures several test files use (helper code is in tests/_helpers/).

attnzoo and timm are imported inside the fixtures, after the environment below is
set: huggingface_hub reads it when it is first imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests._helpers.digits import MODEL
from tests._helpers.hub_server import FakeHub, serve_fake_hub
from tests._helpers.modules import with_random_bn_statistics
from tests._helpers.timm_twin import TIMM

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


@pytest.fixture
def fake_hub(monkeypatch, tmp_path) -> Iterator[FakeHub]:
    """A loopback Hub (tests/_helpers/hub_server.py) that huggingface_hub talks to."""
    yield from serve_fake_hub(monkeypatch, tmp_path)


@pytest.fixture
def weights_folder(tmp_path: Path, monkeypatch) -> Path:
    """An empty weights/ folder that the zoo manifests are read from."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("ATTNZOO_WEIGHTS_DIR", str(folder))
    return folder


# --- digits_cbam_tiny, the small model of the weight tests (tests/_helpers/digits.py)


@pytest.fixture
def model() -> torch.nn.Module:
    """digits_cbam_tiny (tests/_helpers/digits.py), randomly initialised, with
    non-trivial BN statistics."""
    import attnzoo

    return with_random_bn_statistics(attnzoo.create_model(MODEL))


@pytest.fixture
def saved(model: torch.nn.Module, tmp_path: Path) -> Path:
    """``model`` saved to a folder, with metrics and provenance."""
    import attnzoo

    return attnzoo.save_pretrained(model, tmp_path / "saved", metrics={"accuracy": 0.5},
                                   source={"trained_by": "a test"})


# --- timm's seresnet50, the twin of resnet50_se (tests/_helpers/timm_twin.py)


@pytest.fixture(scope="module")
def seresnet50() -> torch.nn.Module:
    """timm's seresnet50 (tests/_helpers/timm_twin.py), randomly initialised."""
    import timm

    torch.manual_seed(3)
    model = timm.create_model(TIMM, pretrained=False).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that a mixed-up key shows
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def seresnet50_checkpoint(seresnet50, tmp_path_factory) -> Path:
    """``seresnet50``'s weights in a safetensors file."""
    path = tmp_path_factory.mktemp("timm") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in seresnet50.state_dict().items()}, str(path))
    return path

