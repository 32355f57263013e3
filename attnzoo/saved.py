"""The saved-model folder: ``attnzoo.yaml`` (the spec plus ``weights: {file, sha256}``),
``model.safetensors`` and a model card ``README.md``.

:func:`save_pretrained` writes one; ``create_model(folder)`` (or ``"hf-hub:<repo>"``
once pushed) rebuilds the model from the spec and loads the weights after checking
their sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from ._version import __version__ as _attnzoo_version
from .atomic import FolderLock, interrupted_save, open_regular, write_file, write_folder
from .errors import AttnZooError, SpecError, WeightsError
from .hub_cache import hub_cache_dir, in_hub_cache
from .inserted import INSERT_FILE, card_text, is_inserted, record_text
from .loading import WeightsPlan
from .provenance import derived_from, weights_state
from .safe_weights import (
    PICKLE_SUFFIXES,
    TORCH_DTYPES,
    check_weights_file_name,
    read_verified,
    refuse_pickle,
)
from .spec import ModelSpec
from .zoo import SPEC_FILE, saved_spec_path

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"


_DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_WRITE_CHUNK = 16 << 20


def _safetensors_chunks(tensors: dict[str, torch.Tensor], metadata: dict[str, str]
                        ) -> Iterator[bytes | memoryview]:
    """The bytes of a safetensors file holding ``tensors`` (contiguous CPU tensors), in
    pieces: the header (padded to 8 bytes, as safetensors pads it), then each tensor,
    widest dtype first so that every tensor starts aligned."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key in order:
        t = tensors[key]
        if t.dtype not in _DTYPE_NAMES:
            raise AttnZooError(f"cannot save tensor {key!r}: safetensors has no {t.dtype}")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    yield len(raw).to_bytes(8, "little") + raw
    for key in order:
        if tensors[key].numel():
            data = memoryview(tensors[key].reshape(-1).view(torch.uint8).numpy())
            for i in range(0, len(data), _WRITE_CHUNK):
                yield data[i:i + _WRITE_CHUNK]


def _tensor_writer(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                   result: dict[str, str]) -> Callable[[BinaryIO], None]:
    """A writer of the safetensors bytes of ``state_dict`` that puts their sha256 in
    ``result["sha256"]`` (hashed while writing: no second pass over the file)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}

    def write(f: BinaryIO) -> None:
        digest = hashlib.sha256()
        for chunk in _safetensors_chunks(tensors, {"format": "pt", **(metadata or {})}):
            f.write(chunk)
            digest.update(chunk)
        result["sha256"] = digest.hexdigest()

    return write


def write_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike[str],
                      metadata: dict[str, str] | None = None) -> str:
    """Write tensors as a safetensors file, all or nothing (a temp file renamed over
    ``path``; the mode ``open()`` would give), and return the file's sha256."""
    result: dict[str, str] = {}
    write_file(path, _tensor_writer(state_dict, metadata, result))
    return result["sha256"]


def _refuse_hub_cache(out: Path) -> None:
    if in_hub_cache(out):
        raise AttnZooError(
            f"{out}: is in the Hugging Face Hub cache ({hub_cache_dir()}); refusing to save "
            "there: the cache holds the Hub's files as downloaded, and a pinned hf-hub: "
            "load must only ever return the Hub's bytes. Save into a folder of your own.")


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str], *,
                    license: str | None = None, metrics: dict[str, float] | None = None,
                    source: dict[str, Any] | None = None, tags: list[str] | None = None,
                    repo_id: str | None = None) -> Path:
    """Write ``attnzoo.yaml``, ``model.safetensors`` and a model card ``README.md``.

    ``create_model(directory)`` (or ``"hf-hub:<repo>"`` once pushed) rebuilds the model
    from the spec and loads the weights after checking their sha256.

    The save is all or nothing: each file is written to a temp file in the folder and
    renamed over the old one, ``attnzoo.yaml`` last (a link in the folder is replaced,
    never written through); saves into one folder take turns (a lock on the folder).
    An interrupted save leaves the old model, the new one, or a folder that loading
    refuses as "an interrupted save". The Hub cache is refused as a target.

    Args:
        model: a model built by attnzoo (it carries ``attnzoo_spec``).
        directory: created if missing; its model files are replaced.
        license: license of the weights (default: the spec's, or the loaded weights').
        metrics: measured metrics, name -> value, for the card.
        source: provenance (where the weights come from, how they were made).
        tags: extra tags for the card.
        repo_id: the Hub repo, for the card's usage snippet.
    """
    spec: ModelSpec | None = getattr(model, "attnzoo_spec", None)
    if not isinstance(spec, ModelSpec) and is_inserted(model):
        return _save_inserted(model, Path(directory))
    if not isinstance(spec, ModelSpec):
        raise AttnZooError("save_pretrained saves models built by attnzoo.create_model "
                           "or changed by attnzoo.insert (the model has neither "
                           "attnzoo_spec nor attnzoo_insertions)")
    unrecorded = getattr(model, "attnzoo_unrecorded_args", None)
    if unrecorded:  # the saved spec would rebuild a different network
        raise AttnZooError(
            f"cannot save: the model was built with backbone args {unrecorded} that are not "
            "plain YAML values, so the saved spec could not rebuild it; pass plain values "
            "(numbers, strings, lists) or set them in the spec's backbone.args")
    loaded = getattr(model, "attnzoo_weights", None) or {}
    state = weights_state(model)
    license = license or spec.license or loaded.get("license")
    if state == "loaded":  # the very weights that were loaded: their record holds
        metrics = metrics if metrics is not None else loaded.get("metrics") or {}
        source = source if source is not None else loaded.get("source") or {}
    else:  # new weights: what they come from, and only the caller's metrics
        metrics, source = metrics or {}, source or {}
    history: dict[str, Any] = {}
    if state == "random":
        history["init"] = "random"
    elif state == "loaded" and loaded.get("derived_from"):
        history["derived_from"] = loaded["derived_from"]
    elif state != "loaded" and loaded:
        history["derived_from"] = {"model": spec.name, **derived_from(loaded)}
    update: dict[str, Any] = {}
    n_classes = getattr(model, "num_classes", None)
    if isinstance(n_classes, int) and n_classes != spec.num_classes:
        update["num_classes"] = n_classes  # a replaced head must be rebuilt the same
    if license and license != spec.license:
        update["license"] = license
    spec = spec.model_copy(update=update) if update else spec

    out = Path(directory)
    _refuse_hub_cache(out)
    written: dict[str, str] = {}
    weights: dict[str, Any] = {"file": WEIGHTS_FILE}

    def write_card(f: BinaryIO) -> None:  # after the weights: it shows their sha256
        weights["sha256"] = written["sha256"]
        weights.update(history)
        if source:
            weights["source"] = source
        if metrics:
            weights["metrics"] = {k: float(v) for k, v in metrics.items()}
        card = model_card(model, spec, weights, license=license, tags=tags, repo_id=repo_id)
        f.write(str(card).encode("utf-8"))

    def write_spec(f: BinaryIO) -> None:  # the commit record: written last
        text = spec.to_yaml() + yaml.safe_dump({"weights": weights}, sort_keys=False, width=100)
        f.write(text.encode("utf-8"))

    tensors = _tensor_writer(model.state_dict(), {"attnzoo_version": _attnzoo_version,
                                                  "attnzoo_model": spec.name}, written)
    write_folder(out, [(WEIGHTS_FILE, tensors), (CARD_FILE, write_card), (SPEC_FILE, write_spec)])
    return out


def _save_inserted(model: nn.Module, out: Path) -> Path:
    """``save_pretrained`` of a model that ``attnzoo.insert`` changed (see
    :mod:`attnzoo.inserted`): its weights, ``attnzoo_insert.yaml`` last, and a card."""
    _refuse_hub_cache(out)
    written: dict[str, str] = {}

    def weights() -> dict[str, str]:
        return {"file": WEIGHTS_FILE, "sha256": written["sha256"]}

    tensors = _tensor_writer(model.state_dict(), {"attnzoo_version": _attnzoo_version,
                                                  "attnzoo_inserted_into": type(model).__name__},
                             written)
    write_folder(out, [
        (WEIGHTS_FILE, tensors),
        (CARD_FILE, lambda f: f.write(card_text(model, weights()).encode("utf-8"))),
        (INSERT_FILE, lambda f: f.write(record_text(model, weights()).encode("utf-8")))])
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
    provenance = []
    if weights.get("init") == "random":
        provenance.append("- **random initialisation**: these weights were never loaded or "
                          "trained")
    if weights.get("derived_from"):
        provenance.append("- derived from: " + ", ".join(
            f"{k} `{v}`" for k, v in weights["derived_from"].items())
            + " (fine-tuned or otherwise changed since)")
    provenance += [f"- {k}: {v}" for k, v in (weights.get("source") or {}).items()]
    lines += ["", "## Provenance", "", *(provenance or ["- not recorded"])]
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


def _identity(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _check_folder(folder: Path, spec_path: Path) -> None:
    """Refuse an interrupted save, and a spec file that is not a regular file inside the
    folder (links resolved), before anything of it is read. Call holding the lock."""
    problem = interrupted_save(folder, SPEC_FILE)
    if problem:
        raise WeightsError(problem)
    if os.path.lexists(spec_path):
        try:
            open_regular(spec_path, SpecError, within=folder).close()
        except OSError as exc:
            raise SpecError(f"cannot read spec file {spec_path}: {exc.strerror}") from None
        return
    pickles = sorted(p.name for p in folder.iterdir()
                     if p.name.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        refuse_pickle(folder / pickles[0], f"{folder} (no {SPEC_FILE}; holds "
                      f"{', '.join(pickles)})", content=False)
    if os.path.lexists(folder / INSERT_FILE):
        raise WeightsError(f"{folder}: holds attnzoo blocks inserted into a model of your "
                           f"own or another library ({INSERT_FILE}), not a spec; load it with "
                           "attnzoo.load_inserted(<a new instance of that model>, folder)")
    raise WeightsError(f"{folder}: no {SPEC_FILE}; an attnzoo folder is written by "
                       "attnzoo.save_pretrained (timm checkpoints: tools/convert_timm.py)")


def folder_weights(folder: str | os.PathLike[str]) -> tuple[ModelSpec, WeightsPlan]:
    """The spec of a saved folder (given as the folder or as its ``attnzoo.yaml``) and
    the plan to load its verified weights (the file that ``weights:`` names, beside
    the ``attnzoo.yaml``).

    Reads stay inside the folder (links resolved; a Hub cache snapshot folder may link
    into its repo's blobs) and take only regular files. The folder is read under its
    lock, shared: a save into it either finishes before or starts after; a folder saved
    again between reading the spec and the weights is refused, not mixed."""
    spec_path = saved_spec_path(folder)
    folder = spec_path.parent
    with FolderLock(folder, exclusive=False):
        _check_folder(folder, spec_path)
        spec, info = read_saved_spec(spec_path)
        seen = _identity(spec_path)
    path, sha256 = folder / info["file"], info.get("sha256")
    where = f"{folder} ({info['file']})"

    def read() -> dict[str, torch.Tensor]:
        with FolderLock(folder, exclusive=False):
            _check_folder(folder, spec_path)
            if _identity(spec_path) != seen:
                raise WeightsError(f"{folder}: was saved again while it was being loaded; "
                                   "load it again")
            return read_verified(path, sha256, where, within=folder)

    return spec, saved_weights_plan(path, info, where, {"folder": str(folder)}, read=read)


def saved_weights_plan(path: Path, info: dict[str, Any], where: str,
                       loaded_from: dict[str, Any],
                       read: Callable[[], dict[str, torch.Tensor]] | None = None
                       ) -> WeightsPlan:
    """How to load the weights file that an ``attnzoo.yaml``'s ``weights`` section
    (``info``) records: verified against its sha256 (by ``read``, when given); a new
    head on request."""
    return WeightsPlan(
        where=where, read=read or (lambda: read_verified(path, info.get("sha256"), where)),
        record={**{k: v for k, v in info.items() if k != "file"}, "loaded_from": loaded_from},
        new_head_on_request=True)
