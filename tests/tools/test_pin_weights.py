"""tools/pin_weights.py: it fills a manifest entry's revision and sha256 from the Hub (a
loopback fake), after which the entry loads; a pinned entry is checked, not overwritten."""

from __future__ import annotations

from types import SimpleNamespace

import pin_weights
import pytest
import torch
import yaml

import attnzoo
from attnzoo.errors import WeightsError
from attnzoo.saved import write_safetensors
from tests._helpers.digits import MODEL, outputs


def test_pin_weights_fills_revision_and_sha256_then_the_entry_loads(
        model, fake_hub, weights_folder, tmp_path, monkeypatch) -> None:
    sha = write_safetensors(model.state_dict(), tmp_path / "w.safetensors")
    commit = fake_hub.commit("attnzoo/digits",
                             {"model.safetensors": (tmp_path / "w.safetensors").read_bytes()})

    class FakeApi:  # what HfApi.model_info(files_metadata=True) tells about the repo
        def model_info(self, repo, revision, files_metadata):
            assert (repo, revision, files_metadata) == ("attnzoo/digits", "main", True)
            lfs = SimpleNamespace(sha256=sha)
            return SimpleNamespace(sha=commit, siblings=[
                SimpleNamespace(rfilename="model.safetensors", lfs=lfs)])

    manifest = weights_folder / f"{MODEL}.yaml"
    manifest.write_text("# keep me\n" + yaml.safe_dump(
        {"model": MODEL, "default": "x", "tags": {"x": {"repo": "attnzoo/digits"}}}))
    with pytest.raises(WeightsError, match="not pinned"):
        attnzoo.create_model(MODEL, pretrained=True, require_pinned=True)
    assert pin_weights.pin_manifest(manifest, FakeApi(), check_only=True) != []
    assert pin_weights.pin_manifest(manifest, FakeApi(), check_only=False) == []
    text = manifest.read_text()
    assert text.startswith("# keep me\n")
    entry = yaml.safe_load(text)["tags"]["x"]
    assert (entry["revision"], entry["sha256"]) == (commit, sha)
    assert torch.equal(outputs(attnzoo.create_model(MODEL, pretrained=True)), outputs(model))
    # A pinned entry is checked, not overwritten, when the Hub disagrees.
    sha = "f" * 64
    problems = pin_weights.pin_manifest(manifest, FakeApi(), check_only=False)
    assert len(problems) == 1 and "!=" in problems[0]
    assert yaml.safe_load(manifest.read_text())["tags"]["x"]["sha256"] != sha
