"""Map the weights of a timm model onto the zoo model that is the same network.

Only zoo models listed in ``TIMM_EQUIVALENTS`` have a timm twin; for each, a
list of regex renames (and an optional transform) turns timm's state-dict keys
into attnzoo's. The result loads strictly; a test per entry checks outputs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import WeightsError
from .registry import did_you_mean

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TimmEquivalent:
    """A timm model that is the same network as a zoo model."""

    timm_name: str
    renames: list[tuple[str, str]] = field(default_factory=list)
    transform: Callable[[StateDict], StateDict] | None = None
    timm_args: Mapping[str, Any] = field(default_factory=dict)


# timm's SK-ResNets are ResNets whose 3x3 conv (conv1 of BasicBlock, conv2 of Bottleneck)
# is a SelectiveKernel with conv-BN-ReLU paths, and whose other convs are ConvNormAct
# (conv + bn in one module). attnzoo's specs replace that conv with `sk` and the BN after
# it with `identity`. Order matters: ConvNormAct's `.bn.` goes to bnN before the SK
# attention's own `attn.bn` is lifted into the sk module.
_SK_RESNET_RENAMES = [
    (r"^(layer\d+\.\d+)\.conv(\d)\.conv\.", r"\1.conv\2."),
    (r"^(layer\d+\.\d+)\.conv(\d)\.bn\.", r"\1.bn\2."),
    (r"^(layer\d+\.\d+\.conv\d)\.paths\.", r"\1.branches."),
    (r"^(layer\d+\.\d+\.conv\d)\.attn\.", r"\1."),
]

# timm's ResNet built with ``block_args=dict(attn_layer=...)`` holds the attention in
# the `se` slot of each block: after the last BN, before the add (attnzoo's `residual`).
_SE_SLOT = (r"^(layer\d+\.\d+)\.se\.", r"\1.bn3.attnzoo_after.")


def _zero_cbam_mlp_biases(state_dict: StateDict) -> StateDict:
    """timm's CBAM channel MLP has no biases, the paper's has; zero biases compute the
    same function, so the zoo model (biases on, as in the paper) loads strictly."""
    out = dict(state_dict)
    for key, weight in state_dict.items():
        if re.search(r"\.channel\.fc[12]\.weight$", key):
            out.setdefault(key[: -len("weight")] + "bias", weight.new_zeros(weight.shape[0]))
    return out


TIMM_EQUIVALENTS: dict[str, TimmEquivalent] = {
    # Selective Kernel: timm skresnet18/34 (split input, d = max(C/8, 16)) and
    # skresnext50_32x4d (the paper's SKNet-50).
    "resnet18_sk": TimmEquivalent("skresnet18", renames=_SK_RESNET_RENAMES),
    "resnet34_sk": TimmEquivalent("skresnet34", renames=_SK_RESNET_RENAMES),
    "resnet50_sk": TimmEquivalent("skresnext50_32x4d", renames=_SK_RESNET_RENAMES),
    # timm's SE-ResNet-50 puts SE in the `se` slot of each bottleneck: after bn3,
    # before the add -- attnzoo's `residual` site.
    "resnet50_se": TimmEquivalent("seresnet50", renames=[_SE_SLOT]),
    "resnet50_eca": TimmEquivalent("resnet50", renames=[_SE_SLOT],
                                   timm_args={"block_args": {"attn_layer": "eca"}}),
    # timm's CbamModule: spatial conv and BN in one ConvNormAct (`spatial.conv.conv`,
    # `spatial.conv.bn`), attnzoo's in `spatial.conv` and `spatial.bn`.
    "resnet50_cbam": TimmEquivalent(
        "resnet50",
        renames=[(r"\.se\.spatial\.conv\.conv\.", ".se.spatial.conv."),
                 (r"\.se\.spatial\.conv\.bn\.", ".se.spatial.bn."), _SE_SLOT],
        transform=_zero_cbam_mlp_biases,
        timm_args={"block_args": {"attn_layer": "cbam"}},
    ),
    # VOLO-D1: attnzoo's `outlook` replaces timm's OutlookAttention at the same path and
    # keeps its parameter names (v, attn, proj), so the keys need no rename.
    "volo_d1": TimmEquivalent("volo_d1_224"),
    # ViT-S/16 with multi_head_attention in place of timm's Attention: same qkv/proj
    # layout and names, and timm's q_norm/k_norm are Identity (no parameters): no rename.
    "vit_small_mha": TimmEquivalent("vit_small_patch16_224"),
    # ResNeSt-50: timm's resnest50d built with plain 3x3 convs (radix 0), whose conv2 the
    # zoo's split_attention replaces (bn2, act2: identity). The block keeps timm's
    # SplitAttn names (conv, bn0, fc1, bn1, fc2), so the keys need no rename.
    "resnest50": TimmEquivalent("resnest50d"),
    # timm networks whose attention layers the zoo's blocks replace at the same paths,
    # with timm's parameter names: halo_attention for HaloAttn, effective_se for
    # EffectiveSEModule.
    "halonet50": TimmEquivalent("halonet50ts"),
    "vovnet39_ese": TimmEquivalent("ese_vovnet39b"),
}


def from_timm(name: str, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """timm state dict -> state dict of the zoo model ``name`` (same tensors, new keys)."""
    if name not in TIMM_EQUIVALENTS:
        raise WeightsError(f"zoo model {name!r} has no timm equivalent"
                           f"{did_you_mean(name, TIMM_EQUIVALENTS)}; known: "
                           f"{', '.join(sorted(TIMM_EQUIVALENTS))}")
    eq = TIMM_EQUIVALENTS[name]
    rules = [(re.compile(p), r) for p, r in eq.renames]
    out: StateDict = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in rules:
            new = pattern.sub(repl, new)
        if new in out:
            raise WeightsError(f"from_timm({name!r}): keys collide on {new!r}")
        out[new] = value
    return eq.transform(out) if eq.transform else out
