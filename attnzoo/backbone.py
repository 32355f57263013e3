"""``pretrained_backbone=``: any zoo model started from its backbone's ImageNet weights.

The backbone's checkpoint is the file that timm's pretrained config names on the Hub
(``timm/resnet50.a1_in1k`` for ``resnet50``), resolved and verified by
:mod:`attnzoo.hub_trust`. Inserted blocks start as the identity (the ``zero_init``
mechanism), so the model computes what the pretrained backbone computes until it is
fine-tuned. Every backbone key must be in the file; modules that a spec *replaces*
(SK's conv, BoT's MHSA) keep their own init, with a warning.
"""

from __future__ import annotations

import inspect
from typing import Any

import timm
import torch
from torch import nn

from .errors import WeightsError, warn_user
from .errors import short_list as _short
from .hub import hub_download, parse_hub_name
from .hub_trust import describe, remember, resolve_hub_file
from .loading import WeightsPlan, classifier_names
from .registry import architecture_backbone, get_architecture
from .safe_weights import read_verified
from .spec import ModelSpec
from .zoo import HUB_PREFIX

StateDict = dict[str, torch.Tensor]


def timm_backbone(spec: ModelSpec) -> tuple[str, str]:
    """(timm model name, module path of that timm model in the built model; "" for the
    whole model) of the spec's backbone."""
    if spec.backbone.source == "timm":
        return spec.backbone.name, ""
    if spec.backbone.source == "torchvision":
        raise WeightsError(
            f"{spec.name}: pretrained_backbone= loads timm checkpoints, and this spec's "
            f"backbone is torchvision's {spec.backbone.name!r}; use timm's model of the same "
            f"name as the backbone (timm's resnet50 takes pretrained_backbone='tv_in1k', "
            "torchvision's own weights), or load torchvision weights into the built model")
    found = architecture_backbone(spec.backbone.name)
    if found is None:
        raise WeightsError(f"{spec.name}: the attnzoo architecture {spec.backbone.name!r} has "
                           "no timm backbone, so pretrained_backbone= does not apply")
    path, arg = found
    name = spec.backbone.args.get(arg)
    if name is None:
        name = inspect.signature(get_architecture(spec.backbone.name)).parameters[arg].default
    return str(name), path


def timm_hub_file(model_name: str, choice: bool | str) -> tuple[str, str, str | None]:
    """(repo, file, revision) of the checkpoint that ``choice`` picks for a timm model:
    True = timm's default tag, ``"tag"`` = that tag, ``"hf-hub:org/repo[@rev]"``."""
    if isinstance(choice, str) and choice.startswith(HUB_PREFIX):
        repo, revision = parse_hub_name(choice)
        return repo, "model.safetensors", revision
    full = model_name if choice is True else f"{model_name}.{choice}"
    try:
        cfg = timm.models.get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError:
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{model_name}.*")]
        have = f"its tags: {', '.join(tags)}" if tags else "timm has no weights for it"
        raise WeightsError(f"pretrained_backbone={choice!r}: no Hub checkpoint of timm's "
                           f"{full!r} ({have}; or pass 'hf-hub:org/repo')")
    repo, _, revision = cfg.hf_hub_id.partition("@")
    return repo, cfg.hf_hub_filename or "model.safetensors", revision or None


def starting_as_identity(spec: ModelSpec) -> ModelSpec:
    """``spec`` with every inserted block (but replacements) starting as the identity."""
    inserts = [ins if ins.zero_init or _replaces(ins)
               else ins.model_copy(update={"zero_init": True}) for ins in spec.insert]
    return spec.model_copy(update={"insert": inserts})


def _replaces(insertion: Any) -> bool:
    return not isinstance(insertion.at, str) and insertion.at.position == "replace"


def backbone_weights(spec: ModelSpec, choice: bool | str, *, require_pinned: bool | None = None
                     ) -> WeightsPlan:
    """The plan that loads the backbone's checkpoint into a build of ``spec``."""
    model_name, path = timm_backbone(spec)
    repo, file, revision = timm_hub_file(model_name, choice)
    where = f"{spec.name}: pretrained backbone {model_name} ({repo}/{file})"
    resolved = resolve_hub_file(repo, file, revision, where, require_pinned=require_pinned)
    local = hub_download(repo, file, resolved.commit, where)

    def read() -> StateDict:
        state = read_verified(local, resolved.sha256, where)
        remember(resolved)
        return state

    record = {"backbone": model_name, **describe(resolved)}
    head = _head_prefixes(model_name)

    def apply(model: nn.Module, state: StateDict, num_classes: int | None) -> None:
        record["not_loaded"] = load_backbone(model, state, where, path, head)

    return WeightsPlan(where, read, record, init="random", apply=apply)


def _head_prefixes(model_name: str) -> list[str]:
    cfg = timm.models.get_pretrained_cfg(model_name)
    names = (cfg.classifier if cfg is not None else None) or "fc"
    return [names] if isinstance(names, str) else list(names)


def _under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes if p)


def load_backbone(model: nn.Module, state: StateDict, where: str, path: str,
                  head: list[str]) -> list[str]:
    """Copy a timm checkpoint into the backbone of ``model`` (at module ``path``).

    Every backbone tensor of the model must be in the file with its shape; the
    inserted blocks keep their (identity) init; the file's tensors of replaced
    modules are left out with a warning, and so is its classifier when the model's
    has another shape. Returns the model keys that did not come from the file. The
    model is untouched when anything does not fit.
    """
    target = model.get_submodule(path) if path else model
    prefix = f"{path}." if path else ""
    blocks = [b.name[len(prefix):] for b in getattr(model, "attnzoo_blocks", [])
              if b.name.startswith(prefix)]
    replaced = [b.site[len(prefix):] for b in getattr(model, "attnzoo_blocks", [])
                if b.position == "replace" and b.site.startswith(prefix)]
    heads = (classifier_names(target) or head) if not path else head
    expected = target.state_dict()
    own = [k for k in expected if not _under(k, blocks)]
    missing = [k for k in own if k not in state and not _under(k, heads)]
    wrong = [k for k in own if k in state and state[k].shape != expected[k].shape
             and not _under(k, heads)]
    extra = [k for k in state if k not in expected and not _under(k, replaced + heads)]
    problems = [f"missing from the file: {_short(missing)}" if missing else "",
                "shape mismatch: " + _short([f"{k} (file {tuple(state[k].shape)}, model "
                                             f"{tuple(expected[k].shape)})" for k in wrong])
                if wrong else "",
                f"not in the model: {_short(extra)}" if extra else ""]
    if any(problems):
        raise WeightsError(f"{where}: the checkpoint does not fit the backbone: "
                           + "; ".join(p for p in problems if p))
    load = {k: v for k, v in state.items() if k in expected and not _under(k, blocks)
            and v.shape == expected[k].shape}
    new_head = sorted(k for k in own if _under(k, heads) and k not in load)
    dropped = sorted(k for k in state if _under(k, replaced))
    if dropped:
        warn_user(f"{where}: modules replaced by the spec keep their own initialisation; "
                  f"the checkpoint's {_short(dropped)} were not loaded")
    if new_head:
        warn_user(f"{where}: the classifier was not loaded (another number of classes), it "
                  f"keeps its random initialisation: {_short(new_head)}")
    with torch.no_grad():
        target.load_state_dict(load, strict=False)
    return sorted({*new_head, *(k for k in expected if _under(k, blocks))})


__all__ = ["backbone_weights", "load_backbone", "starting_as_identity", "timm_backbone",
           "timm_hub_file"]
