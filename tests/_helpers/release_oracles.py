"""The authors' released networks as plain functions of a state dict, written from
their released code's equations (F.conv2d, F.batch_norm, ...), for tests that compare
zoo models with them: tests/test_fidelity.py and tests/test_convert_official.py.

Nothing here builds a zoo module. A state dict is read through a *naming*: a dict from
logical names to key templates (``{p}`` is a block prefix such as ``layer2.3``), so that
one oracle reads the zoo's keys (``ZOO_*``) or the authors' (``*_RELEASE``). The
``*_release_state`` functions make random state dicts with the authors' key names and
shapes, as their model definitions have them.

Sources (read for the equations and names, nothing copied):
  CBAM   Jongchan/attention-module MODELS/{cbam,model_resnet}.py
  ECA    BangguWu/ECANet models/{eca_module,eca_resnet}.py
  SimAM  ZjjConan/SimAM networks/imagenet/resnet.py, simam_module.py
  GCT    z-x-yang/GCT PyTorch/{GCT,resnet}.py (maskrcnn-benchmark ResNet)
  FcaNet cfzd/FcaNet model/{fcanet,layer}.py (torchvision ResNet)
  GSoP   ZilinGao/Global-Second-order-Pooling-Convolutional-Networks torchvision/models/resnet.py
  CCNet  speedinghzl/CCNet networks/ccnet.py (+ the pure-PyTorch CrissCrossAttention)
  DNL    yinmh17/DNL-Semantic-Segmentation model/seg/nets/nonlocalnowd.py, torchcv backbones
  BiSeNet yu-changqian/TorchSeg model/bisenet/cityscapes.bisenet.R18/network.py, seg_oprs.py
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

StateDict = Mapping[str, torch.Tensor]
EPS = 1e-5
LAYERS_50 = (3, 4, 6, 3)
LAYERS_101 = (3, 4, 23, 3)
PLANES = (64, 128, 256, 512)


# --- primitives ----------------------------------------------------------------------


def conv(sd: StateDict, name: str, x: torch.Tensor, stride: int = 1, padding: int = 0,
         dilation: int = 1, groups: int = 1) -> torch.Tensor:
    """``name``'s conv weight (and bias, if the state dict has one); a 2-D weight (a
    Linear's) is used as a 1x1 conv."""
    w = sd[f"{name}.weight"]
    if w.dim() == 2:
        w = w[:, :, None, None]
    return F.conv2d(x, w, sd.get(f"{name}.bias"), stride, padding, dilation, groups)


def bn(sd: StateDict, name: str, x: torch.Tensor, train: bool, eps: float = EPS
       ) -> torch.Tensor:
    """BatchNorm from ``name``'s tensors: batch statistics in training mode, running
    ones in eval mode (the running buffers are not updated)."""
    return F.batch_norm(x, sd[f"{name}.running_mean"].clone(), sd[f"{name}.running_var"].clone(),
                        sd[f"{name}.weight"], sd[f"{name}.bias"], train, 0.1, eps)


def key(naming: Mapping[str, str], logical: str, p: str = "") -> str:
    return naming[logical].format(p=p)


# --- ResNet-50 (torchvision layout), with hooks where the releases put attention -----

TORCHVISION = {
    "stem_conv": "conv1", "stem_bn": "bn1", "fc": "fc",
    "conv1": "{p}.conv1", "conv2": "{p}.conv2", "conv3": "{p}.conv3",
    "bn1": "{p}.bn1", "bn2": "{p}.bn2", "bn3": "{p}.bn3",
    "down_conv": "{p}.downsample.0", "down_bn": "{p}.downsample.1",
}

Hook = Callable[[StateDict, str, torch.Tensor, bool], torch.Tensor]


def resnet(sd: StateDict, x: torch.Tensor, *, train: bool, naming: Mapping[str, str] | None = None,
           layers: tuple[int, ...] = LAYERS_50, stage_strides: tuple[int, ...] = (1, 2, 2, 2),
           stride_in_1x1: bool = False, after_conv2: Hook | None = None,
           after_bn3: Hook | None = None, before_conv: Hook | None = None) -> torch.Tensor:
    """ImageNet ResNet with bottlenecks: 7x7/2 stem, 3x3/2 max-pool, four stages, global
    average pooling, fc. The first block of stage i has stride ``stage_strides[i]`` in
    its 3x3 conv (or its 1x1 with ``stride_in_1x1``) and a 1x1 conv + BN shortcut (also
    wherever the width changes). Hooks: ``after_conv2(sd, p, y, train)`` between conv2
    and bn2, ``after_bn3`` between bn3 and the add, ``before_conv(sd, name, x, train)``
    on the input of every conv (``name``: a logical conv name: "stem", "{p}.conv1", ...,
    "{p}.down")."""
    n = {**TORCHVISION, **(naming or {})}
    pre = before_conv or (lambda _sd, _name, t, _train: t)
    y = F.conv2d(pre(sd, "stem", x, train), sd[key(n, "stem_conv") + ".weight"], None, 2, 3)
    y = F.relu(bn(sd, key(n, "stem_bn"), y, train))
    y = F.max_pool2d(y, 3, 2, 1)
    inplanes = 64
    for i, (blocks, stride) in enumerate(zip(layers, stage_strides, strict=True)):
        planes = PLANES[i]
        for j in range(blocks):
            p = f"layer{i + 1}.{j}"
            s = stride if j == 0 else 1
            s1, s3 = (s, 1) if stride_in_1x1 else (1, s)
            out = F.relu(bn(sd, key(n, "bn1", p), F.conv2d(
                pre(sd, f"{p}.conv1", y, train), sd[key(n, "conv1", p) + ".weight"], None, s1),
                train))
            out = F.conv2d(pre(sd, f"{p}.conv2", out, train), sd[key(n, "conv2", p) + ".weight"],
                           None, s3, 1)
            if after_conv2 is not None:
                out = after_conv2(sd, p, out, train)
            out = F.relu(bn(sd, key(n, "bn2", p), out, train))
            out = bn(sd, key(n, "bn3", p), F.conv2d(
                pre(sd, f"{p}.conv3", out, train), sd[key(n, "conv3", p) + ".weight"]), train)
            if after_bn3 is not None:
                out = after_bn3(sd, p, out, train)
            if j == 0 and (s != 1 or inplanes != planes * 4):
                shortcut = bn(sd, key(n, "down_bn", p), F.conv2d(
                    pre(sd, f"{p}.down", y, train), sd[key(n, "down_conv", p) + ".weight"],
                    None, s), train)
            else:
                shortcut = y
            y = F.relu(out + shortcut)
            inplanes = planes * 4
    y = y.mean((2, 3))
    return F.linear(y, sd[key(n, "fc") + ".weight"], sd[key(n, "fc") + ".bias"])


# --- the releases' attention, as hooks -------------------------------------------------

_AFTER_BN3 = "{p}.bn3.attnzoo_after"
ZOO_CBAM = {"fc1": _AFTER_BN3 + ".channel.fc1", "fc2": _AFTER_BN3 + ".channel.fc2",
            "sconv": _AFTER_BN3 + ".spatial.conv", "sbn": _AFTER_BN3 + ".spatial.bn"}
CBAM_RELEASE = {"fc1": "{p}.cbam.ChannelGate.mlp.1", "fc2": "{p}.cbam.ChannelGate.mlp.3",
                "sconv": "{p}.cbam.SpatialGate.spatial.conv",
                "sbn": "{p}.cbam.SpatialGate.spatial.bn"}


def cbam_hook(naming: Mapping[str, str]) -> Hook:
    """CBAM as released: ChannelGate (a shared MLP Linear-ReLU-Linear on the avg- and
    max-pooled vectors, summed, sigmoid), then SpatialGate: ChannelPool = cat(max, mean)
    over channels, 7x7 conv (no bias) + BN (eps 1e-5, momentum 0.01), sigmoid."""

    def hook(sd: StateDict, p: str, x: torch.Tensor, train: bool) -> torch.Tensor:
        def mlp(v: torch.Tensor) -> torch.Tensor:
            return conv(sd, key(naming, "fc2", p), F.relu(conv(sd, key(naming, "fc1", p), v)))

        att = mlp(F.avg_pool2d(x, x.shape[-2:])) + mlp(F.max_pool2d(x, x.shape[-2:]))
        x = x * torch.sigmoid(att)
        pooled = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], dim=1)
        s = bn(sd, key(naming, "sbn", p), conv(sd, key(naming, "sconv", p), pooled, padding=3),
               train)
        return x * torch.sigmoid(s)

    return hook


ZOO_ECA = {"conv": "{p}.bn3.attnzoo_after.conv"}
ECA_RELEASE = {"conv": "{p}.eca.conv"}


def eca_hook(naming: Mapping[str, str], kernels: tuple[int, ...]) -> Hook:
    """eca_layer: GAP, Conv1d(1, 1, k, padding (k-1)/2, no bias) along the channels,
    sigmoid, scale; k from ``kernels`` by stage (the released model's k_size list)."""

    def hook(sd: StateDict, p: str, x: torch.Tensor, train: bool) -> torch.Tensor:
        k = kernels[int(p[len("layer")]) - 1]
        w = sd[key(naming, "conv", p) + ".weight"]
        assert tuple(w.shape) == (1, 1, k), f"{p}: ECA kernel {tuple(w.shape)}, released {k}"
        y = F.conv1d(x.mean((2, 3)).unsqueeze(1), w, padding=(k - 1) // 2)   # (N, 1, C)
        return x * torch.sigmoid(y).transpose(1, 2).unsqueeze(-1)

    return hook


def simam(x: torch.Tensor, e_lambda: float) -> torch.Tensor:
    """simam_module: n = h*w - 1; y = (x - mu)^2 / (4 (sum (x - mu)^2 / n + lambda)) + 0.5;
    x * sigmoid(y)."""
    n = x.shape[2] * x.shape[3] - 1
    d = (x - x.mean(dim=[2, 3], keepdim=True)).pow(2)
    return x * torch.sigmoid(d / (4 * (d.sum(dim=[2, 3], keepdim=True) / n + e_lambda)) + 0.5)


SIMAM_RELEASE = {"conv2": "{p}.conv2.0"}   # conv2 = Sequential(conv2, simam)


def gct(sd: StateDict, name: str, x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """GCT, l2 mode: embedding = sqrt(sum x^2 + eps) * alpha; norm = gamma /
    sqrt(mean_c embedding^2 + eps); x * (1 + tanh(embedding * norm + beta))."""
    embedding = (x.pow(2).sum((2, 3), keepdim=True) + eps).pow(0.5) * sd[f"{name}.alpha"]
    norm = sd[f"{name}.gamma"] / (embedding.pow(2).mean(dim=1, keepdim=True) + eps).pow(0.5)
    return x * (1.0 + torch.tanh(embedding * norm + sd[f"{name}.beta"]))


ZOO_GCT = {"stem": "conv1.attnzoo_before", "conv": "{p}.attnzoo_before",
           "down": "{p}.downsample.0.attnzoo_before"}
GCT_RELEASE_GCT = {"stem": "stem.conv1.0", "conv": "{p}.0", "down": "{p}.downsample.0"}
GCT_RELEASE = {"stem_conv": "stem.conv1.1", "stem_bn": "stem.bn1",
               "conv1": "{p}.conv1.1", "conv2": "{p}.conv2.1", "conv3": "{p}.conv3.1",
               "down_conv": "{p}.downsample.1", "down_bn": "{p}.downsample.2"}


def gct_hook(naming: Mapping[str, str]) -> Hook:
    """GCT before every conv (the release wraps each conv as Sequential(GCT, conv))."""

    def hook(sd: StateDict, name: str, x: torch.Tensor, train: bool) -> torch.Tensor:
        if name == "stem":
            return gct(sd, naming["stem"], x)
        if name.endswith(".down"):
            return gct(sd, naming["down"].format(p=name[: -len(".down")]), x)
        return gct(sd, naming["conv"].format(p=name), x)

    return hook


FCA_SIZES = {64: 56, 128: 28, 256: 14, 512: 7}   # c2wh of fcanet.py, by planes
FCA_TOP16 = ((0, 0), (0, 1), (6, 0), (0, 5), (0, 2), (1, 0), (1, 2), (4, 0), (5, 0), (1, 6),
             (3, 0), (0, 4), (0, 6), (0, 3), (3, 5), (2, 2))   # get_freq_indices('top16')
ZOO_FCA = {"fc1": "{p}.bn3.attnzoo_after.fc1", "fc2": "{p}.bn3.attnzoo_after.fc2"}
FCA_RELEASE = {"fc1": "{p}.att.fc.0", "fc2": "{p}.att.fc.2", "dct": "{p}.att.dct_layer"}


def fca_dct_filter(channels: int, size: int) -> torch.Tensor:
    """MultiSpectralDCTLayer.get_dct_filter for top16 at size x size: frequencies scaled
    by size // 7; build_filter(pos, freq, POS) = cos(pi freq (pos + 1/2) / POS) / sqrt(POS),
    times sqrt(2) for freq > 0."""
    def basis(pos: int, freq: int, n: int) -> float:
        value = math.cos(math.pi * freq * (pos + 0.5) / n) / math.sqrt(n)
        return value if freq == 0 else value * math.sqrt(2)

    out = torch.zeros(channels, size, size)
    part = channels // len(FCA_TOP16)
    for i, (u, v) in enumerate(FCA_TOP16):
        u, v = u * (size // 7), v * (size // 7)
        for tx in range(size):
            for ty in range(size):
                out[i * part:(i + 1) * part, tx, ty] = basis(tx, u, size) * basis(ty, v, size)
    return out


def fca_hook(naming: Mapping[str, str], dct: Callable[[str, int, int], torch.Tensor]) -> Hook:
    """MultiSpectralAttentionLayer: adaptive-avg-pool to the DCT size if the map differs,
    y = sum(x * dct, (2, 3)), Linear (no bias) - ReLU - Linear - sigmoid, scale.
    ``dct(p, channels, size)`` gives the block's DCT filters."""

    def hook(sd: StateDict, p: str, x: torch.Tensor, train: bool) -> torch.Tensor:
        size = FCA_SIZES[x.shape[1] // 4]
        pooled = x if x.shape[-1] == size else F.adaptive_avg_pool2d(x, (size, size))
        y = (pooled * dct(p, x.shape[1], size).to(x)).sum((2, 3))
        y = F.linear(F.relu(F.linear(y, sd[key(naming, "fc1", p) + ".weight"].flatten(1))),
                     sd[key(naming, "fc2", p) + ".weight"].flatten(1))
        return x * torch.sigmoid(y)[:, :, None, None]

    return hook


GSOP_SITES = ("layer1.2", "layer2.3", "layer3.5", "layer4.2")   # GSoP-Net1 in the zoo
ZOO_GSOP = {name: f"{_AFTER_BN3}.{name}"
            for name in ("reduce", "reduce_bn", "row_bn", "row_conv", "fc")}
GSOP_RELEASE = {"reduce": "{p}.conv_for_DR", "reduce_bn": "{p}.bn_for_DR",
                "row_bn": "{p}.row_bn", "row_conv": "{p}.row_conv_group",
                "fc": "{p}.fc_adapt_channels"}


def gsop_hook(naming: Mapping[str, str], sites: tuple[str, ...] = GSOP_SITES) -> Hook:
    """Bottleneck.chan_att of the GSoP release: ReLU (not in place), 1x1 conv to d with
    bias (stride 2 when planes == 64), BN, ReLU, covariance x I_hat x^T with
    I_hat = -1/M^2 + I/M, (N, d, d, 1), row BN, row-wise conv (groups d, kernel (d, 1),
    4d outputs), 1x1 conv to C, sigmoid; out = x * att, on the ``sites`` blocks."""

    def hook(sd: StateDict, p: str, x: torch.Tensor, train: bool) -> torch.Tensor:
        if p not in sites:
            return x
        stride = 2 if x.shape[1] // 4 == 64 else 1
        z = F.relu(bn(sd, key(naming, "reduce_bn", p),
                      conv(sd, key(naming, "reduce", p), F.relu(x), stride=stride), train))
        n, d, h, w = z.shape
        m = h * w
        z = z.reshape(n, d, m)
        i_hat = (-1.0 / m / m) * torch.ones(m, m, dtype=z.dtype) + (1.0 / m) * torch.eye(
            m, dtype=z.dtype)
        cov = z.bmm(i_hat.expand(n, m, m)).bmm(z.transpose(1, 2)).view(n, d, d, 1)
        cov = bn(sd, key(naming, "row_bn", p), cov, train)
        rows = conv(sd, key(naming, "row_conv", p), cov, groups=d)
        return x * torch.sigmoid(conv(sd, key(naming, "fc", p), rows))

    return hook


# --- random state dicts with the authors' key names and shapes --------------------------


def _conv_w(out_c: int, in_c: int, k: int = 1, gen: torch.Generator | None = None
            ) -> torch.Tensor:
    return torch.randn(out_c, in_c, k, k, generator=gen, dtype=torch.float64) / math.sqrt(
        in_c * k * k)


def _bn(prefix: str, c: int, gen: torch.Generator, small: bool = False,
        batch_count: bool = True) -> dict[str, torch.Tensor]:
    lo, hi = (0.2, 0.5) if small else (0.5, 1.5)
    out = {f"{prefix}.weight": torch.empty(c, dtype=torch.float64).uniform_(lo, hi, generator=gen),
           f"{prefix}.bias": torch.randn(c, generator=gen, dtype=torch.float64) * 0.1,
           f"{prefix}.running_mean": torch.randn(c, generator=gen, dtype=torch.float64) * 0.1,
           f"{prefix}.running_var": torch.empty(c, dtype=torch.float64).uniform_(
               0.5, 1.5, generator=gen)}
    if batch_count:
        out[f"{prefix}.num_batches_tracked"] = torch.tensor(0)
    return out


def resnet50_release_state(naming: Mapping[str, str] | None = None, seed: int = 0,
                           batch_count: bool = True) -> dict[str, torch.Tensor]:
    """Random weights (float64) for a torchvision-layout ResNet-50 under ``naming``."""
    n = {**TORCHVISION, **(naming or {})}
    gen = torch.Generator().manual_seed(seed)
    sd = {key(n, "stem_conv") + ".weight": _conv_w(64, 3, 7, gen),
          **_bn(key(n, "stem_bn"), 64, gen, batch_count=batch_count)}
    inplanes = 64
    for i, blocks in enumerate(LAYERS_50):
        planes = PLANES[i]
        for j in range(blocks):
            p = f"layer{i + 1}.{j}"
            sd[key(n, "conv1", p) + ".weight"] = _conv_w(planes, inplanes, 1, gen)
            sd[key(n, "conv2", p) + ".weight"] = _conv_w(planes, planes, 3, gen)
            sd[key(n, "conv3", p) + ".weight"] = _conv_w(planes * 4, planes, 1, gen)
            for b, c in (("bn1", planes), ("bn2", planes), ("bn3", planes * 4)):
                sd.update(_bn(key(n, b, p), c, gen, small=b == "bn3", batch_count=batch_count))
            if j == 0:
                sd[key(n, "down_conv", p) + ".weight"] = _conv_w(planes * 4, inplanes, 1, gen)
                sd.update(_bn(key(n, "down_bn", p), planes * 4, gen, batch_count=batch_count))
            inplanes = planes * 4
    sd[key(n, "fc") + ".weight"] = torch.randn(1000, 2048, generator=gen,
                                               dtype=torch.float64) / math.sqrt(2048)
    sd[key(n, "fc") + ".bias"] = torch.randn(1000, generator=gen, dtype=torch.float64) * 0.1
    return sd


def blocks_50() -> list[tuple[str, int]]:
    """(prefix, planes) of every ResNet-50 bottleneck."""
    return [(f"layer{i + 1}.{j}", PLANES[i]) for i, n in enumerate(LAYERS_50) for j in range(n)]


def randn(*shape: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


# --- segmentation networks ----------------------------------------------------------------


def criss_cross(sd: StateDict, name: str, x: torch.Tensor) -> torch.Tensor:
    """CrissCrossAttention (CCNet, pure-PyTorch release): query/key 1x1 to C/8, value 1x1
    to C; energy_H over each column with -inf on the diagonal (the pixel itself is
    counted in its row only), energy_W over each row; one softmax over [H; W];
    out_H + out_W, times gamma, plus x."""
    q, k, v = (conv(sd, f"{name}.{t}", x) for t in ("query", "key", "value"))
    h = x.shape[2]
    energy_h = torch.einsum("ncij,ncrj->nijr", q, k)             # (N, H, W, H): column
    energy_h = energy_h.masked_fill(torch.eye(h, dtype=torch.bool).view(1, h, 1, h),
                                    float("-inf"))
    energy_w = torch.einsum("ncij,ncis->nijs", q, k)             # (N, H, W, W): row
    att = torch.softmax(torch.cat([energy_h, energy_w], dim=3), dim=3)
    out_h = torch.einsum("nijr,ncrj->ncij", att[..., :h], v)
    out_w = torch.einsum("nijs,ncis->ncij", att[..., h:], v)
    return sd[f"{name}.gamma"] * (out_h + out_w) + x


def dilated_resnet50(sd: StateDict, x: torch.Tensor, train: bool, prefix: str,
                     first_full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The releases' dilated ResNet-50 ("deep base"): 3x3/2 64, 3x3 64, 3x3 128 convs
    with BN-ReLU, 3x3/2 max-pool with ceil_mode; res2, res3 (stride 2), res4 and res5
    at stride 1 dilated by 2 and 4. A dilated stage's first block has the stage's
    rate (``first_full``, CCNet) or the previous stage's (torchcv's _nostride_dilate:
    the conv that had the stride gets rate / 2). Returns (res4, res5). Keys: timm's
    deep-stem ResNet under ``prefix``."""
    c = f"{prefix}conv1"
    y = F.relu(bn(sd, f"{c}.1", conv(sd, f"{c}.0", x, stride=2, padding=1), train))
    y = F.relu(bn(sd, f"{c}.4", conv(sd, f"{c}.3", y, padding=1), train))
    y = F.relu(bn(sd, f"{prefix}bn1", conv(sd, f"{c}.6", y, padding=1), train))
    y = F.max_pool2d(y, 3, 2, 1, ceil_mode=True)
    rates = (1, 1, 2, 4)
    strides = (1, 2, 1, 1)
    feats = []
    inplanes = 128
    for i, blocks in enumerate(LAYERS_50):
        planes = PLANES[i]
        for j in range(blocks):
            p = f"{prefix}layer{i + 1}.{j}"
            rate = rates[i] if (j > 0 or first_full or i < 2) else max(1, rates[i] // 2)
            s = strides[i] if j == 0 else 1
            out = F.relu(bn(sd, f"{p}.bn1", conv(sd, f"{p}.conv1", y), train))
            out = F.relu(bn(sd, f"{p}.bn2", conv(sd, f"{p}.conv2", out, stride=s, padding=rate,
                                                dilation=rate), train))
            out = bn(sd, f"{p}.bn3", conv(sd, f"{p}.conv3", out), train)
            if j == 0 and (s != 1 or inplanes != planes * 4):
                y = F.relu(out + bn(sd, f"{p}.downsample.1",
                                    conv(sd, f"{p}.downsample.0", y, stride=s), train))
            else:
                y = F.relu(out + y)
            inplanes = planes * 4
        feats.append(y)
    return feats[2], feats[3]


def conv_bn_act(sd: StateDict, name: str, x: torch.Tensor, train: bool, act: str,
                padding: int = 1) -> torch.Tensor:
    y = bn(sd, f"{name}.bn", conv(sd, f"{name}.conv", x, padding=padding), train)
    return F.leaky_relu(y, 0.01) if act == "leaky_relu" else F.relu(y)


def context_head_net(sd: StateDict, x: torch.Tensor, train: bool, attention: Callable,
                     act: str, first_full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """CCNet's ResNet + RCCAModule + dsn, or DNL's NonLocalNet_nowd (same layout): head
    conva (3x3, no bias, BN-act) -> attention -> convb -> cat([x, y]) -> bottleneck
    (3x3 BN-act, Dropout2d(0.1), 1x1 with bias); dsn on res4 (3x3 [bias in CCNet]
    BN-act, Dropout2d, 1x1). Dropout is the identity here (eval, or p = 0 in training
    tests). Both outputs upsampled to the input with align_corners=True."""
    res4, res5 = dilated_resnet50(sd, x, train, "encoder.", first_full)
    y = conv_bn_act(sd, "head.reduce", res5, train, act)
    y = conv_bn_act(sd, "head.refine", attention(y), train, act)
    y = conv_bn_act(sd, "head.fuse", torch.cat([res5, y], 1), train, act)
    logits = conv(sd, "head.classifier", y)
    aux = conv(sd, "aux_head.classifier", conv_bn_act(sd, "aux_head.conv", res4, train, act))
    size = x.shape[-2:]
    return (F.interpolate(logits, size, mode="bilinear", align_corners=True),
            F.interpolate(aux, size, mode="bilinear", align_corners=True))


# --- BiSeNet (TorchSeg R18), on the zoo's key names ---------------------------------------


def cbr(sd: StateDict, name: str, x: torch.Tensor, train: bool, stride: int = 1,
        relu: bool = True) -> torch.Tensor:
    """TorchSeg's ConvBnRelu (conv without bias, 'same' padding) from a zoo ConvBNReLU
    Sequential (``name.0`` conv, ``name.1`` BN)."""
    k = sd[f"{name}.0.weight"].shape[-1]
    y = bn(sd, f"{name}.1", conv(sd, f"{name}.0", x, stride=stride, padding=k // 2), train)
    return F.relu(y) if relu else y


def bisenet_r18(sd: StateDict, x: torch.Tensor, train: bool,
                context_path: Callable[[torch.Tensor], list[torch.Tensor]]):
    """TorchSeg's BiSeNet (cityscapes.bisenet.R18) forward. ``context_path(x)`` gives
    the ResNet-18's (1/16, 1/32) features. Returns the main head's logits (eval) or
    (main, aux on the 1/16 refinement, aux on the 1/8 refinement) in training; every
    upsampling bilinear with align_corners=True."""
    spatial = x
    for i, stride in enumerate((2, 2, 2, 1)):
        spatial = cbr(sd, f"spatial_path.{i}", spatial, train, stride)
    c16, c32 = context_path(x)
    ctx = "context_head."
    global_context = cbr(sd, ctx + "global_context", F.adaptive_avg_pool2d(c32, 1), train)
    last = F.interpolate(global_context, size=c32.shape[2:], mode="bilinear", align_corners=True)

    def arm(name: str, fm: torch.Tensor) -> torch.Tensor:
        fm = cbr(sd, ctx + f"reduce{name}", fm, train)
        att = bn(sd, ctx + f"arm{name}.bn", conv(sd, ctx + f"arm{name}.conv",
                                                 F.adaptive_avg_pool2d(fm, 1)), train)
        return fm * torch.sigmoid(att)

    outs = []
    for name, fm, nxt in (("32", c32, c16.shape[2:]), ("16", c16, spatial.shape[2:])):
        fm = arm(name, fm) + last
        last = cbr(sd, ctx + f"refine{name}",
                   F.interpolate(fm, size=nxt, mode="bilinear", align_corners=True), train)
        outs.append(last)
    fm = cbr(sd, "ffm.proj", torch.cat([spatial, last], 1), train)
    se = torch.sigmoid(conv(sd, "ffm.fc2", F.relu(conv(sd, "ffm.fc1",
                                                       F.adaptive_avg_pool2d(fm, 1)))))
    fused = fm + fm * se

    def head(name: str, fm: torch.Tensor, scale: int) -> torch.Tensor:
        y = conv(sd, f"{name}.classifier", cbr(sd, f"{name}.conv", fm, train))
        return F.interpolate(y, scale_factor=scale, mode="bilinear", align_corners=True)

    main = head("head", fused, 8)
    if not train:
        return main
    return main, head("aux_head16", outs[0], 16), head("aux_head8", outs[1], 8)


# --- STN (the paper's SVHN localisation net) and PAN's FPA (the paper) -------------------


def stn(sd: StateDict, x: torch.Tensor) -> torch.Tensor:
    """Spatial transformer as the paper (and the PyTorch tutorial): the localisation net
    on the input as it is (5x5 conv, 2x2 max-pool, ReLU, twice; FC-ReLU, FC-ReLU, FC to
    theta), affine_grid, bilinear grid_sample with zeros outside."""
    y = F.relu(F.max_pool2d(conv(sd, "features.0", x, padding=2), 2))
    y = F.relu(F.max_pool2d(conv(sd, "features.3", y, padding=2), 2)).flatten(1)
    y = F.relu(F.linear(y, sd["fc.1.weight"], sd["fc.1.bias"]))
    y = F.relu(F.linear(y, sd["fc.3.weight"], sd["fc.3.bias"]))
    theta = F.linear(y, sd["theta.weight"], sd["theta.bias"]).view(-1, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def fpa(sd: StateDict, x: torch.Tensor, train: bool, pool: str = "avg") -> torch.Tensor:
    """Feature Pyramid Attention as the paper describes it: master 1x1 conv-BN-ReLU;
    pyramid of 2x2 pooling (average or max) then 7x7, 5x5, 3x3 conv-BN-ReLU, each level
    refined by a second conv of its kernel, merged coarse to fine by upsampling and
    addition (bilinear); global branch GAP -> 1x1 conv-BN-ReLU; master * pyramid + global."""
    pool_fn = F.avg_pool2d if pool == "avg" else F.max_pool2d
    levels, y = [], x
    for i in range(3):
        y = cbr(sd, f"down.{i}", pool_fn(y, 2), train)
        levels.append(cbr(sd, f"lateral.{i}", y, train))
    att = levels[2]
    for level in (levels[1], levels[0]):
        att = level + F.interpolate(att, size=level.shape[2:], mode="bilinear",
                                    align_corners=False)
    att = F.interpolate(att, size=x.shape[2:], mode="bilinear", align_corners=False)
    return cbr(sd, "master", x, train) * att + cbr(sd, "global_branch",
                                                    x.mean((2, 3), keepdim=True), train)
