"""The saved-model folder: ``attnzoo.yaml`` (the spec plus ``weights: {file, sha256}``),
``model.safetensors`` and a model card ``README.md``.

:func:`save_pretrained` writes one; ``create_model(folder)`` (or ``"hf-hub:<repo>"``
once pushed) rebuilds the model from the spec and loads the weights after checking
their sha256.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from ._version import __version__ as _attnzoo_version
from .errors import AttnZooError, WeightsError
from .loading import WeightsPlan
from .safe_weights import (
    PICKLE_SUFFIXES,
    check_weights_file_name,
    read_verified,
    refuse_pickle,
    sha256_file,
)
from .spec import ModelSpec
from .zoo import SPEC_FILE, saved_spec_path

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"


def write_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike[str],
                      metadata: dict[str, str] | None = None) -> str:
    """Write tensors as safetensors (contiguous, shared storage split) and return the
    file's sha256."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors = {}
    for key, value in state_dict.items():
        t = value.detach().cpu().contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and (ident in seen or t.untyped_storage().nbytes() != t.nbytes):
            t = t.clone()  # tied or viewed tensors: safetensors stores each one whole
        seen.add(ident)
        tensors[key] = t
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    return sha256_file(path)


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str], *,
                    license: str | None = None, metrics: dict[str, float] | None = None,
                    source: dict[str, Any] | None = None, tags: list[str] | None = None,
                    repo_id: str | None = None) -> Path:
    """Write ``attnzoo.yaml``, ``model.safetensors`` and a model card ``README.md``.

    ``create_model(directory)`` (or ``"hf-hub:<repo>"`` once pushed) rebuilds the model
    from the spec and loads the weights after checking their sha256.

    Args:
        model: a model built by attnzoo (it carries ``attnzoo_spec``).
        directory: created if missing; files in it are overwritten.
        license: license of the weights (default: the spec's, or the loaded weights').
        metrics: measured metrics, name -> value, for the card.
        source: provenance (where the weights come from, how they were made).
        tags: extra tags for the card.
        repo_id: the Hub repo, for the card's usage snippet.
    """
    spec: ModelSpec | None = getattr(model, "attnzoo_spec", None)
    if not isinstance(spec, ModelSpec):
        raise AttnZooError("save_pretrained saves models built by attnzoo.create_model "
                           "(the model has no attnzoo_spec)")
    unrecorded = getattr(model, "attnzoo_unrecorded_args", None)
    if unrecorded:  # the saved spec would rebuild a different network
        raise AttnZooError(
            f"cannot save: the model was built with backbone args {unrecorded} that are not "
            "plain YAML values, so the saved spec could not rebuild it; pass plain values "
            "(numbers, strings, lists) or set them in the spec's backbone.args")
    loaded = getattr(model, "attnzoo_weights", None) or {}
    license = license or spec.license or loaded.get("license")
    metrics = metrics if metrics is not None else loaded.get("metrics") or {}
    source = source if source is not None else loaded.get("source") or {}
    update: dict[str, Any] = {}
    n_classes = getattr(model, "num_classes", None)
    if isinstance(n_classes, int) and n_classes != spec.num_classes:
        update["num_classes"] = n_classes  # a replaced head must be rebuilt the same
    if license and license != spec.license:
        update["license"] = license
    spec = spec.model_copy(update=update) if update else spec

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    sha = write_safetensors(model.state_dict(), out / WEIGHTS_FILE,
                            {"attnzoo_version": _attnzoo_version, "attnzoo_model": spec.name})
    weights: dict[str, Any] = {"file": WEIGHTS_FILE, "sha256": sha}
    if source:
        weights["source"] = source
    if metrics:
        weights["metrics"] = {k: float(v) for k, v in metrics.items()}
    text = spec.to_yaml() + yaml.safe_dump({"weights": weights}, sort_keys=False, width=100)
    (out / SPEC_FILE).write_text(text, encoding="utf-8")
    card = model_card(model, spec, weights, license=license, tags=tags, repo_id=repo_id)
    card.save(out / CARD_FILE)
    return out


def model_card(model: nn.Module, spec: ModelSpec, weights: dict[str, Any], *,
               license: str | None = None, tags: list[str] | None = None,
               repo_id: str | None = None) -> ModelCard:
    """The model card: Hub metadata (library_name attnzoo, tags, license) and a body
    with the spec, provenance and metrics."""
    blocks = getattr(model, "attnzoo_blocks", [])
    block_types = sorted({b.block_type for b in blocks})
    all_tags = ["attnzoo", "pytorch", "safetensors", "image-classification", *block_types,
                *spec.tags, *(tags or [])]
    data = ModelCardData(library_name="attnzoo", license=license, tags=all_tags,
                         model_name=spec.name, pipeline_tag="image-classification",
                         metrics=sorted(weights.get("metrics", {})) or None)
    params = sum(p.numel() for p in model.parameters())
    target = f"hf-hub:{repo_id}" if repo_id else "path/to/this/folder"
    lines = [
        f"# {spec.name}", "", spec.description or "", "",
        f"An [attnzoo](https://github.com/attnzoo/attnzoo) model: the "
        f"`{spec.backbone.source}:{spec.backbone.name}` backbone with {len(blocks)} inserted "
        f"attention block(s) ({', '.join(block_types) or 'none'}); {params:,} parameters.",
    ]
    if spec.paper:
        lines += ["", f"Paper: {spec.paper}"]
    lines += ["", "## Usage", "", "```python", "import attnzoo", "",
              f'model = attnzoo.create_model("{target}")', "```", "",
              "The weights are checked against the sha256 in `attnzoo.yaml` before loading.",
              "", "## Spec", "", "```yaml", spec.to_yaml().rstrip(), "```", "",
              "## Weights", "", f"- file: `{weights['file']}`, sha256 `{weights['sha256']}`",
              f"- license: {license or 'not stated'}"]
    source = weights.get("source") or {}
    lines += ["", "## Provenance", ""]
    lines += [f"- {k}: {v}" for k, v in source.items()] or ["- not recorded"]
    metrics = weights.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return ModelCard(content)


def read_saved_spec(path: str | os.PathLike[str]) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec and the ``weights`` section of an ``attnzoo.yaml``."""
    path = Path(path)
    # a stranger's file: the spec reader's strict loader, every other key validated
    spec, weights = ModelSpec.read_yaml(path)
    if not isinstance(weights, dict) or "sha256" not in weights:
        raise WeightsError(f"{path}: no `weights: {{file, sha256}}` section; it was not "
                           "written by attnzoo.save_pretrained")
    file = str(weights.get("file", WEIGHTS_FILE))
    try:
        check_weights_file_name(file)
    except ValueError as exc:
        raise WeightsError(f"{path}: weights.file: {exc}; attnzoo never unpickles") from None
    return spec, {**weights, "file": file}


def folder_weights(folder: str | os.PathLike[str]) -> tuple[ModelSpec, WeightsPlan]:
    """The spec of a saved folder (given as the folder or as its ``attnzoo.yaml``) and
    the plan to load its verified weights (the file that ``weights:`` names, beside
    the ``attnzoo.yaml``)."""
    spec_path = saved_spec_path(folder)
    folder = spec_path.parent
    if not spec_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir()
                         if p.name.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            refuse_pickle(folder / pickles[0], f"{folder} (no {SPEC_FILE}; holds "
                          f"{', '.join(pickles)})")
        raise WeightsError(f"{folder}: no {SPEC_FILE}; an attnzoo folder is written by "
                           "attnzoo.save_pretrained (timm checkpoints: tools/convert_timm.py)")
    spec, info = read_saved_spec(spec_path)
    return spec, saved_weights_plan(folder / info["file"], info, f"{folder} ({info['file']})",
                                    {"folder": str(folder)})


def saved_weights_plan(path: Path, info: dict[str, Any], where: str,
                       loaded_from: dict[str, Any]) -> WeightsPlan:
    """How to load the weights file that an ``attnzoo.yaml``'s ``weights`` section
    (``info``) records: verified against its sha256; a new head on request."""
    return WeightsPlan(
        where=where, read=lambda: read_verified(path, info.get("sha256"), where),
        record={**{k: v for k, v in info.items() if k != "file"}, "loaded_from": loaded_from},
        new_head_on_request=True)
