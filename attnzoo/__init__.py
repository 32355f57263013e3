"""attnzoo: a declarative model zoo of attention mechanisms for vision.

    import attnzoo
    model = attnzoo.create_model("resnet50_cbam")
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import ValidationError
from torch import nn

from .blocks.base import Site
from .builder import build_model, convert_sync_batchnorm, reattach_blocks
from .errors import AttnZooError, SpecError, WeightsError
from .registry import block_configs, get_block_config
from .spec import ModelSpec, format_validation_error
from .timm_registry import register_zoo_with_timm
from .zoo import list_models, load_spec

__version__ = "0.1.0"


def create_model(
    model: str | os.PathLike[str] | dict[str, Any] | ModelSpec,
    pretrained: bool | str = False,
    num_classes: int | None = None,
    *,
    revision: str | None = None,
    features_only: bool = False,
    out_indices: Any = None,
    feature_cls: Any = None,
    **backbone_args: Any,
) -> nn.Module:
    """Build a model from a zoo name, a YAML spec (path, text or dict), a ModelSpec,
    a saved folder, or ``"hf-hub:org/repo[@revision]"``.

    Args:
        model: what to build.
        pretrained: ``True`` loads the zoo model's default weights, a string picks a
            tag (``"in1k"`` or ``"resnet50_se.in1k"``). Weights are safetensors, pinned
            and checked against their sha256 before loading.
        num_classes: size of the classifier; the spec's (or backbone's) when None.
        revision: Hub revision for ``hf-hub:`` sources (or write ``@rev``).
        features_only: return the feature maps instead of logits, wrapped as timm does
            for the backbone (``out_indices``, ``feature_cls``: as in timm).
        **backbone_args: forwarded to the backbone factory (e.g. ``drop_path_rate``).

    Returns:
        An instance of the backbone's own class with the spec's blocks inserted, the
        validated spec on ``model.attnzoo_spec``.
    """
    if isinstance(model, str | os.PathLike) and (
        str(model).startswith("hf-hub:") or os.path.isdir(model)
    ):
        from . import hub

        if hub.is_pretrained_source(str(model)):
            built = hub.create_from_source(str(model), revision=revision,
                                           num_classes=num_classes, **backbone_args)
            return _features(built, features_only, out_indices, feature_cls)
    spec = load_spec(model)
    if pretrained:
        from . import hub

        # Parameters on meta, the verified file's tensors assigned: no wasted init.
        built = hub.create_pretrained(spec, pretrained, num_classes, **backbone_args)
    else:
        built = build_model(spec, num_classes=num_classes, **backbone_args)
    return _features(built, features_only, out_indices, feature_cls)


def _features(model: nn.Module, features_only: bool, out_indices: Any, feature_cls: Any
              ) -> nn.Module:
    if not features_only:
        return model
    from .timm_registry import features_model

    return features_model(model, out_indices=out_indices, feature_cls=feature_cls)


def list_blocks() -> list[str]:
    """Names of every registered block type."""
    return list(block_configs())


def create_block(type: str, channels: int, **cfg: Any) -> nn.Module:  # noqa: A002
    """Build one block on its own, e.g. ``create_block("se", 64, reduction=8)``.

    ``cfg`` holds the block's config fields; ``size=(H, W)`` gives the spatial size
    for blocks that need it (FcaNet's DCT).
    """
    config_cls = get_block_config(type)
    size = cfg.pop("size", None)
    try:
        config = config_cls.model_validate({"type": type, **cfg})
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, f"block {type!r}")) from None
    try:
        return config.build(Site(channels=channels, size=tuple(size) if size else None))
    except (ValueError, TypeError) as exc:
        raise SpecError(f"block {type!r} cannot be built for {channels} channels"
                        f"{f' at size {tuple(size)}' if size else ''}: {exc}") from None


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str], **kwargs: Any):
    """Write ``attnzoo.yaml``, ``model.safetensors`` and a model card to ``directory``."""
    from . import hub

    return hub.save_pretrained(model, directory, **kwargs)


def push_to_hub(model: nn.Module, repo_id: str, **kwargs: Any):
    """Save the model to a temporary folder and upload it to the Hub as ``repo_id``."""
    from . import hub

    return hub.push_to_hub(model, repo_id, **kwargs)


__all__ = [
    "AttnZooError", "ModelSpec", "SpecError", "WeightsError", "__version__",
    "convert_sync_batchnorm", "create_block", "create_model", "list_blocks", "list_models",
    "load_spec", "push_to_hub", "reattach_blocks", "save_pretrained",
]

# Every zoo spec becomes a timm model name (reads the spec files; builds nothing).
register_zoo_with_timm()
