"""digits_cbam_tiny, the small zoo model of the weight tests (a tiny CNN with 4 CBAM
blocks on 8x8 images): its input, its outputs, and weight manifests for it."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

MODEL = "digits_cbam_tiny"  # small and fast: a tiny CNN with 4 CBAM blocks


def digits_input() -> torch.Tensor:
    return torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def outputs(model: torch.nn.Module) -> torch.Tensor:
    """``model``'s outputs for ``digits_input()``, in eval mode."""
    with torch.no_grad():
        return model.eval()(digits_input())


def write_manifest(folder: Path, tags: dict, default: str, model: str = MODEL) -> None:
    """``folder/<model>.yaml``: a weights manifest with ``tags``, ``default`` the default."""
    (folder / f"{model}.yaml").write_text(
        yaml.safe_dump({"model": model, "default": default, "tags": tags}))
