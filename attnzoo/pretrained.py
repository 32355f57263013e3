"""``create_model``: resolve what to build and which weights, build, load, wrap.

Each step lives in its own module below this one: :mod:`attnzoo.zoo` says what the
argument names, :mod:`attnzoo.manifests`, :mod:`attnzoo.saved` and :mod:`attnzoo.hub`
find the spec and the weights, :mod:`attnzoo.builder` builds, :mod:`attnzoo.loading`
verifies and assigns the tensors, :mod:`attnzoo.features` wraps for ``features_only``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbone import backbone_weights, starting_as_identity
from .builder import build_model
from .convert import from_timm
from .errors import WeightsError
from .features import as_features
from .hub import hub_download, hub_weights
from .hub_trust import remember, resolve_hub_file
from .loading import WeightsPlan, build_init, load_checked, load_weights, reading
from .manifests import resolve_zoo_weights, weights_dir
from .provenance import remember_weights
from .safe_weights import read_verified
from .saved import folder_weights
from .spec import ModelSpec
from .zoo import classify_source, load_spec


@dataclass
class Resolved:
    """What ``create_model`` builds (``spec``) and which weights it loads (``weights``,
    None for random initialisation)."""

    spec: ModelSpec
    weights: WeightsPlan | None


def create_model(
    model: str | os.PathLike[str] | dict[str, Any] | ModelSpec,
    pretrained: bool | str | None = None,
    num_classes: int | None = None,
    *,
    pretrained_backbone: bool | str | None = None,
    revision: str | None = None,
    require_pinned: bool | None = None,
    features_only: bool = False,
    out_indices: Any = None,
    feature_cls: Any = None,
    **backbone_args: Any,
) -> nn.Module:
    """Build a model from a zoo name, a YAML spec (path, text or dict), a ModelSpec,
    a saved folder, or ``"hf-hub:org/repo[@revision]"``.

    Args:
        model: what to build. Zoo names win over folders of the same name; a folder is
            taken when given as a ``PathLike``, an absolute path or a path with a
            separator (``"./my_model"``).
        pretrained: for zoo names and specs, ``True`` loads the zoo model's default
            weights and a string picks a tag (``"in1k"`` or ``"resnet50_se.in1k"``);
            ``None``/``False`` builds with random weights. For a saved folder or a Hub
            repo, ``None``/``True`` loads its weights and ``False`` builds its spec
            with random weights (architecture only). Weights are safetensors, checked
            against their sha256 before loading.
        num_classes: size of the classifier; the spec's (or backbone's) when None. A
            pretrained model gets a new, randomly initialised head when it differs.
        pretrained_backbone: start a zoo model or spec from its backbone's ImageNet
            weights, with every inserted block starting as the identity: ``True`` takes
            timm's default tag for the backbone (``resnet50`` -> ``timm/resnet50.a1_in1k``),
            a string another tag (``"tv_in1k"``) or ``"hf-hub:org/repo[@rev]"``.
        revision: Hub revision for ``hf-hub:`` sources (or write ``@rev``).
        require_pinned: refuse Hub files whose revision and sha256 no manifest pins
            (default: ``$ATTNZOO_REQUIRE_PINNED``); otherwise they are verified against
            the sha256 the Hub records for them, trusted on first use.
        features_only: return the feature maps instead of logits, wrapped as timm does
            for the backbone (``out_indices``, ``feature_cls``: as in timm).
        **backbone_args: forwarded to the backbone factory (e.g. ``drop_path_rate``).

    Returns:
        An instance of the backbone's own class with the spec's blocks inserted, the
        validated spec on ``model.attnzoo_spec`` and, when weights were loaded, where
        they came from on ``model.attnzoo_weights``.
    """
    resolved = resolve(model, pretrained, revision, pretrained_backbone=pretrained_backbone,
                       require_pinned=require_pinned)
    with reading(resolved.weights) as weights:
        built = build_model(resolved.spec, num_classes, init=build_init(weights), **backbone_args)
        load_weights(built, weights, resolved.spec, num_classes, backbone_args)
    remember_weights(built)
    return as_features(built, features_only, out_indices, feature_cls)


def resolve(model: Any, pretrained: bool | str | None = None, revision: str | None = None, *,
            pretrained_backbone: bool | str | None = None,
            require_pinned: bool | None = None) -> Resolved:
    """The spec that ``model`` names and the weights that ``pretrained`` (or
    ``pretrained_backbone``) picks for it."""
    kind = classify_source(model)
    if pretrained_backbone:
        if pretrained or kind in ("folder", "hub"):
            raise WeightsError("pretrained_backbone= starts a zoo model or spec from its "
                               "backbone's weights; it cannot be combined with pretrained= "
                               "or a saved model")
        spec = starting_as_identity(load_spec(model))
        return Resolved(spec, backbone_weights(spec, pretrained_backbone,
                                               require_pinned=require_pinned))
    if revision is not None and kind != "hub":
        raise WeightsError(f"revision={revision!r} is for 'hf-hub:' sources; {model!s:.128} "
                           f"is a {_KIND_NAMES[kind]}")
    if kind in ("folder", "hub"):
        if isinstance(pretrained, str):
            raise WeightsError(f"pretrained={pretrained!r}: a saved folder or Hub repo has "
                               "one set of weights; pass True (the default) or False")
        spec, plan = (folder_weights(model) if kind == "folder"
                      else hub_weights(str(model), revision))
        return Resolved(spec, None if pretrained is False else plan)
    spec = load_spec(model)
    return Resolved(spec, zoo_weights(spec, pretrained, require_pinned=require_pinned)
                    if pretrained else None)


_KIND_NAMES = {"spec": "ModelSpec", "dict": "spec dict", "folder": "saved folder",
               "file": "spec file", "text": "YAML spec", "zoo": "zoo model", "hub": "Hub repo"}


def zoo_weights(spec: ModelSpec, pretrained: bool | str, *,
                require_pinned: bool | None = None) -> WeightsPlan:
    """The zoo weights that ``pretrained`` picks for ``spec``: the file is found
    (downloaded if needed) now; the plan's reader returns its verified state dict in
    attnzoo's layout. A Hub entry without a pinned revision and sha256 is resolved
    through the Hub's own record (:mod:`attnzoo.hub_trust`)."""
    tag, entry = resolve_zoo_weights(spec.name, pretrained)
    where = f"weights {spec.name}.{tag}"
    record = {"tag": tag, **entry.model_dump(exclude_defaults=True)}
    trusted = None
    if entry.repo is None:
        if entry.sha256 is None:
            raise WeightsError(f"{where}: the embedded file {entry.file} has no sha256 in "
                               f"weights/{spec.name}.yaml; attnzoo loads verified files only")
        path, sha256 = weights_dir() / entry.file, entry.sha256
    elif entry.pinned:
        path = hub_download(entry.repo, entry.file, entry.revision, where)
        sha256 = entry.sha256
    else:
        trusted = resolve_hub_file(entry.repo, entry.file, entry.revision, where,
                                   require_pinned=require_pinned)
        path = hub_download(entry.repo, entry.file, trusted.commit, where)
        sha256 = trusted.sha256
        record.update(revision=trusted.commit, sha256=sha256, resolved_from=trusted.revision)
    where = f"{where} ({entry.file})"

    def read() -> dict[str, torch.Tensor]:
        # an embedded file stays in the manifests folder (links resolved)
        state = read_verified(path, sha256, where,
                              within=weights_dir() if entry.repo is None else None)
        if trusted is not None:
            remember(trusted)
        if entry.format == "timm":
            state = from_timm(spec.name, state)
        return state

    return WeightsPlan(where, read, record, num_classes=entry.num_classes)


def load_zoo_weights(model: nn.Module, spec: ModelSpec, pretrained: bool | str) -> None:
    """Load the zoo weights that ``pretrained`` picks for ``spec`` into an existing
    ``model`` (copying into its tensors). On any problem a WeightsError is raised and
    the model is left untouched. ``create_model(..., pretrained=...)`` is the fast
    way to build and load in one go."""
    plan = zoo_weights(spec, pretrained)
    load_checked(model, plan.read(), plan.where,
                 allow_new_head=plan.allows_new_head(model, None))
    model.attnzoo_weights = dict(plan.record)
    remember_weights(model)


__all__ = ["Resolved", "create_model", "load_zoo_weights", "resolve", "zoo_weights"]
