"""Map the weights of a timm model, or of an author's released checkpoint, onto the
zoo model that is the same network.

Only zoo models listed in ``TIMM_EQUIVALENTS`` have a timm twin; for each, a
list of regex renames (and an optional transform) turns timm's state-dict keys
into attnzoo's. The result loads strictly; a test per entry checks outputs.

``OFFICIAL_RELEASES`` does the same for the checkpoints the papers' authors released
(CBAM, ECA-Net, SimAM, GCT, FcaNet, ...): ``from_official(zoo_model, state_dict)``
renames the authors' keys (a ``module.`` prefix from DataParallel is dropped),
reshapes their Linear layers to the zoo's 1x1 convs and checks the tensors the zoo
computes itself (FcaNet's DCT filters). Reading the pickled checkpoint is left to
``tools/convert_official.py``; the package never unpickles.
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


def _from_timm_cbam(state_dict: StateDict) -> StateDict:
    """timm's CBAM channel MLP has no biases, the paper's has; zero biases compute the
    same function, so the zoo model (biases on, as in the paper) loads strictly.
    timm's spatial conv takes (mean, max), the zoo's (the released code's) takes
    (max, mean): its two input channels are swapped."""
    out = dict(state_dict)
    for key, weight in state_dict.items():
        if re.search(r"\.channel\.fc[12]\.weight$", key):
            out.setdefault(key[: -len("weight")] + "bias", weight.new_zeros(weight.shape[0]))
        elif re.search(r"\.spatial\.conv\.weight$", key):
            out[key] = weight.flip(1)
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
    # No ECA entry: timm's ECA takes its kernel from the paper's rule (5, 5, 5, 7 by
    # stage in a ResNet-50), the zoo's resnet50_eca the released model's 3, 5, 5, 7.
    # timm's CbamModule: spatial conv and BN in one ConvNormAct (`spatial.conv.conv`,
    # `spatial.conv.bn`), attnzoo's in `spatial.conv` and `spatial.bn`; its spatial
    # conv's two input channels are in the other order (see _from_timm_cbam).
    "resnet50_cbam": TimmEquivalent(
        "resnet50",
        renames=[(r"\.se\.spatial\.conv\.conv\.", ".se.spatial.conv."),
                 (r"\.se\.spatial\.conv\.bn\.", ".se.spatial.bn."), _SE_SLOT],
        transform=_from_timm_cbam,
        timm_args={"block_args": {"attn_layer": "cbam"}},
    ),
    # VOLO-D1: attnzoo's `outlook` replaces timm's OutlookAttention at the same path and
    # keeps its parameter names (v, attn, proj), so the keys need no rename.
    "volo_d1": TimmEquivalent("volo_d1_224"),
    # ViT-S/16 with multi_head_attention in place of timm's Attention: same qkv/proj
    # layout and names, and timm's q_norm/k_norm are Identity (no parameters): no rename.
    "vit_small_mha": TimmEquivalent("vit_small_patch16_224"),
    # timm's SE/ECA ResNets and ResNeXts: a timm ResNet built with
    # block_args=dict(attn_layer=...), the attention in the `se` slot (after bn3, before
    # the add: the zoo's `residual` site). timm's SE is C/16 rounded to a multiple of 8
    # and its ECA kernel the paper's rule: at these widths (multiples of 128) the zoo's
    # se (reduction 16) and eca (gamma 2, b 1) have the same shapes.
    "resnext50_32x4d_se": TimmEquivalent("seresnext50_32x4d", renames=[_SE_SLOT]),
    "resnext26d_32x4d_se": TimmEquivalent("seresnext26d_32x4d", renames=[_SE_SLOT]),
    "resnext26t_32x4d_se": TimmEquivalent("seresnext26t_32x4d", renames=[_SE_SLOT]),
    "resnext101_32x4d_se": TimmEquivalent("seresnext101_32x4d", renames=[_SE_SLOT]),
    "resnext101_32x8d_se": TimmEquivalent("seresnext101_32x8d", renames=[_SE_SLOT]),
    "resnext101_64x4d_se": TimmEquivalent("seresnext101_64x4d", renames=[_SE_SLOT]),
    "resnext101d_32x8d_se": TimmEquivalent("seresnext101d_32x8d", renames=[_SE_SLOT]),
    "resnextaa101d_32x8d_se": TimmEquivalent("seresnextaa101d_32x8d", renames=[_SE_SLOT]),
    "resnextaa201d_32x8d_se": TimmEquivalent("seresnextaa201d_32x8d", renames=[_SE_SLOT]),
    "resnet152d_se": TimmEquivalent("seresnet152d", renames=[_SE_SLOT]),
    "resnext152_64x4d_se": TimmEquivalent("senet154", renames=[_SE_SLOT]),
    "resnet26t_eca": TimmEquivalent("ecaresnet26t", renames=[_SE_SLOT]),
    "resnet50d_eca": TimmEquivalent("ecaresnet50d", renames=[_SE_SLOT]),
    "resnet50t_eca": TimmEquivalent("ecaresnet50t", renames=[_SE_SLOT]),
    "resnet101d_eca": TimmEquivalent("ecaresnet101d", renames=[_SE_SLOT]),
    "resnet269d_eca": TimmEquivalent("ecaresnet269d", renames=[_SE_SLOT]),
    "resnetlight_eca": TimmEquivalent("ecaresnetlight", renames=[_SE_SLOT]),
    # timm's SE/ECA ByobNets: resnet33ts / resnext26ts with attn_layer set, the attention
    # in each bottleneck's `attn` slot (an Identity in the plain network), which the zoo
    # replaces at the same path: no rename.
    "resnet33ts_se": TimmEquivalent("seresnet33ts"),
    "resnet33ts_eca": TimmEquivalent("eca_resnet33ts"),
    "resnext26ts_se": TimmEquivalent("seresnext26ts"),
    "resnext26ts_eca": TimmEquivalent("eca_resnext26ts"),
    # VOLO-D1 (384) to D5: as volo_d1, outlook in place of timm's OutlookAttention.
    "volo_d1_384px": TimmEquivalent("volo_d1_384"),
    "volo_d2": TimmEquivalent("volo_d2_224"),
    "volo_d2_384px": TimmEquivalent("volo_d2_384"),
    "volo_d3": TimmEquivalent("volo_d3_224"),
    "volo_d3_448px": TimmEquivalent("volo_d3_448"),
    "volo_d4": TimmEquivalent("volo_d4_224"),
    "volo_d4_448px": TimmEquivalent("volo_d4_448"),
    "volo_d5": TimmEquivalent("volo_d5_224"),
    "volo_d5_448px": TimmEquivalent("volo_d5_448"),
    "volo_d5_512px": TimmEquivalent("volo_d5_512"),
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


# --- the authors' released checkpoints ------------------------------------------------


@dataclass(frozen=True)
class OfficialRelease:
    """An author's released checkpoint of a network that a zoo model reproduces."""

    paper: str                       # short name for tools/convert_official.py
    repo: str                        # the authors' repository
    checkpoint: str                  # the released file, as the README names it
    renames: list[tuple[str, str]] = field(default_factory=list)
    transform: Callable[[StateDict], StateDict] | None = None
    notes: str = ""


def _linear_to_conv(pattern: str) -> Callable[[StateDict], StateDict]:
    """A transform that reshapes the (out, in) weights of keys matching ``pattern`` to
    the (out, in, 1, 1) of the zoo's 1x1 convs (same function on pooled features)."""
    rx = re.compile(pattern)

    def transform(state_dict: StateDict) -> StateDict:
        return {k: v[:, :, None, None] if rx.search(k) and v.dim() == 2 else v
                for k, v in state_dict.items()}

    return transform


def _check_fca_dct(state_dict: StateDict) -> StateDict:
    """FcaNet stores its fixed DCT filters as a buffer (``att.dct_layer.weight``); the
    zoo computes them. Check each against the zoo's top16 filters for its (C, H, W),
    then drop it."""
    from .blocks.channel import fca_frequencies, multispectral_filters

    out = {}
    for key, value in state_dict.items():
        if key.endswith(".dct_filters"):
            channels, h, w = value.shape
            expected = multispectral_filters(channels, (h, w), fca_frequencies("top16"))
            if not torch.allclose(value.float(), expected, atol=1e-5):
                raise WeightsError(f"from_official: {key} is not FcaNet's top16 DCT filters "
                                   f"for {channels} channels at {h}x{w} (another frequency "
                                   "selection or map size than the zoo model's)")
            continue
        out[key] = value
    return _linear_to_conv(r"\.bn3\.attnzoo_after\.fc[12]\.weight$")(out)


# Key layouts, from the authors' model definitions (see OFFICIAL_RELEASES).
_RESNET_BLOCK = r"^(layer\d+\.\d+)"
_CBAM_RENAMES = [
    (_RESNET_BLOCK + r"\.cbam\.ChannelGate\.mlp\.1\.", r"\1.bn3.attnzoo_after.channel.fc1."),
    (_RESNET_BLOCK + r"\.cbam\.ChannelGate\.mlp\.3\.", r"\1.bn3.attnzoo_after.channel.fc2."),
    (_RESNET_BLOCK + r"\.cbam\.SpatialGate\.spatial\.conv\.",
     r"\1.bn3.attnzoo_after.spatial.conv."),
    (_RESNET_BLOCK + r"\.cbam\.SpatialGate\.spatial\.bn\.", r"\1.bn3.attnzoo_after.spatial.bn."),
]
_ECA_RENAMES = [(_RESNET_BLOCK + r"\.eca\.", r"\1.bn3.attnzoo_after.")]
# GCT's PyTorch ResNet (maskrcnn-benchmark layout): each conv is Sequential(GCT, conv),
# the stem is `stem.conv1` / `stem.bn1`, the shortcut Sequential(GCT, conv, BN).
# Applied in order: the shortcut conv and BN move down one index before the GCTs move.
_GCT_RENAMES = [
    (r"^stem\.conv1\.0\.", "conv1.attnzoo_before."),
    (r"^stem\.conv1\.1\.", "conv1."),
    (r"^stem\.bn1\.", "bn1."),
    (_RESNET_BLOCK + r"\.(conv\d)\.0\.", r"\1.\2.attnzoo_before."),
    (_RESNET_BLOCK + r"\.(conv\d)\.1\.", r"\1.\2."),
    (_RESNET_BLOCK + r"\.downsample\.0\.(alpha|gamma|beta)$",
     r"\1.downsample.0.attnzoo_before.\2"),
    (_RESNET_BLOCK + r"\.downsample\.1\.weight$", r"\1.downsample.0.weight"),
    (_RESNET_BLOCK + r"\.downsample\.2\.", r"\1.downsample.1."),
]
_FCA_RENAMES = [
    (_RESNET_BLOCK + r"\.att\.fc\.0\.", r"\1.bn3.attnzoo_after.fc1."),
    (_RESNET_BLOCK + r"\.att\.fc\.2\.", r"\1.bn3.attnzoo_after.fc2."),
    (_RESNET_BLOCK + r"\.att\.dct_layer\.weight$", r"\1.bn3.attnzoo_after.dct_filters"),
]
_GSOP_RENAMES = [
    (_RESNET_BLOCK + r"\.conv_for_DR\.", r"\1.bn3.attnzoo_after.reduce."),
    (_RESNET_BLOCK + r"\.bn_for_DR\.", r"\1.bn3.attnzoo_after.reduce_bn."),
    (_RESNET_BLOCK + r"\.row_bn\.", r"\1.bn3.attnzoo_after.row_bn."),
    (_RESNET_BLOCK + r"\.row_conv_group\.", r"\1.bn3.attnzoo_after.row_conv."),
    (_RESNET_BLOCK + r"\.fc_adapt_channels\.", r"\1.bn3.attnzoo_after.fc."),
]

OFFICIAL_RELEASES: dict[str, OfficialRelease] = {
    # MODELS/model_resnet.py: ResidualNet("ImageNet", 50, 1000, "CBAM"); CBAM in
    # `cbam` after bn3, its channel MLP a Sequential(Flatten, Linear, ReLU, Linear).
    "resnet50_cbam": OfficialRelease(
        "cbam", "Jongchan/attention-module", "RESNET50_CBAM_new_name_wrap.pth",
        renames=_CBAM_RENAMES,
        transform=_linear_to_conv(r"\.channel\.fc[12]\.weight$"),
        notes="ACC@1 77.622 / ACC@5 93.948 in the authors' README"),
    # models/eca_resnet.py: eca_resnet50(k_size=[3, 5, 5, 7]); ECA in `eca` after bn3.
    "resnet50_eca": OfficialRelease(
        "eca", "BangguWu/ECANet", "eca_resnet50_k3557.pth.tar", renames=_ECA_RENAMES,
        notes="top-1 77.48 / top-5 93.68 in the authors' README"),
    "resnet101_eca": OfficialRelease(
        "eca101", "BangguWu/ECANet", "eca_resnet101_k3357.pth.tar", renames=_ECA_RENAMES,
        notes="top-1 78.65 / top-5 94.34 in the authors' README"),
    # networks/imagenet/resnet.py: resnet50(attention_module=simam, e_lambda=0.1);
    # conv2 becomes Sequential(conv2, simam), which has no parameters.
    "resnet50_simam": OfficialRelease(
        "simam", "ZjjConan/SimAM", "SimAM-R50 (imagenet-resnet50-simam-param0.1)",
        renames=[(_RESNET_BLOCK + r"\.conv2\.0\.", r"\1.conv2.")],
        notes="top-1 77.45 / top-5 93.66 in the authors' README"),
    # PyTorch/resnet.py (maskrcnn-benchmark ResNet, stride in the 1x1 conv).
    "resnet50_gct": OfficialRelease(
        "gct", "z-x-yang/GCT", "GCT-ResNet50 (PyTorch, model_best.pth.tar)",
        renames=_GCT_RENAMES, notes="top-1 77.2 in the authors' PyTorch README"),
    # model/fcanet.py: fcanet50() on torchvision's ResNet, attention in `att` after bn3.
    "resnet50_fca": OfficialRelease(
        "fcanet", "cfzd/FcaNet", "fca50.pth", renames=_FCA_RENAMES, transform=_check_fca_dct,
        notes="top-1 78.52 reported, 78.57 evaluated in the authors' README"),
    # torchvision/models/resnet.py of the GSoP repo, GSoP_mode=1; the authors released
    # no checkpoint, but networks trained with their code convert.
    "resnet50_gsop": OfficialRelease(
        "gsop", "ZilinGao/Global-Second-order-Pooling-Convolutional-Networks",
        "a GSoP-Net1 ResNet-50 trained with the authors' code", renames=_GSOP_RENAMES),
}


def official_model(paper: str) -> str:
    """The zoo model of a release named by ``paper`` (``"cbam"``) or by zoo name."""
    if paper in OFFICIAL_RELEASES:
        return paper
    for name, release in OFFICIAL_RELEASES.items():
        if release.paper == paper:
            return name
    known = sorted({r.paper for r in OFFICIAL_RELEASES.values()} | set(OFFICIAL_RELEASES))
    raise WeightsError(f"no official release known for {paper!r}"
                       f"{did_you_mean(paper, known)}; known: {', '.join(known)}")


def _add_batch_counts(state_dict: StateDict) -> StateDict:
    """Checkpoints from before PyTorch 0.4.1 have no BN ``num_batches_tracked``: add 0."""
    out = dict(state_dict)
    for key in state_dict:
        if key.endswith(".running_mean"):
            out.setdefault(key[: -len("running_mean")] + "num_batches_tracked",
                           torch.tensor(0, dtype=torch.long))
    return out


def from_official(name: str, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """An author's released state dict -> the state dict of the zoo model ``name`` (or
    of the release named by its paper, e.g. ``"cbam"``). A ``module.`` prefix
    (DataParallel) is dropped; the result loads strictly."""
    name = official_model(name)
    release = OFFICIAL_RELEASES[name]
    rules = [(re.compile(p), r) for p, r in release.renames]
    out: StateDict = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"from_official({name!r}): {key!r} is not a tensor "
                               f"({type(value).__name__}); pass the model's state dict")
        new = key[len("module."):] if key.startswith("module.") else key
        for pattern, repl in rules:
            new = pattern.sub(repl, new)
        if new in out:
            raise WeightsError(f"from_official({name!r}): keys collide on {new!r}")
        out[new] = value
    if release.transform:
        out = release.transform(out)
    return _add_batch_counts(out)
