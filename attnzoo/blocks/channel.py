"""Channel attention: reweight the channels of a feature map (SE, ECA, ...)."""

from __future__ import annotations

import math
from typing import Annotated, Literal, get_args

import torch
from pydantic import Field, field_validator
from torch import nn

from ..attention_maps import record
from ..registry import register_block
from ._layers import ConvBnAct, check_odd, reduced_channels
from .base import BlockConfig, Site


class SqueezeExcite(nn.Module):
    """SE (Hu et al., 1709.01507): GAP -> FC C->C/r -> ReLU -> FC -> sigmoid -> scale.

    The FCs are 1x1 convs with bias, the same maps as ``nn.Linear`` on pooled
    features (and timm's ``SEModule`` layout: ``fc1``, ``fc2``).
    """

    def __init__(self, channels: int, reduction: float = 16, min_channels: int = 1,
                 divisor: int = 1) -> None:
        super().__init__()
        hidden = reduced_channels(channels, reduction, min_channels, divisor)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))
        record(self, "", w, kind="channel")
        return x * w


@register_block
class SEConfig(BlockConfig):
    """Squeeze-and-Excitation, https://arxiv.org/abs/1709.01507"""

    type: Literal["se"]
    reduction: float = Field(16, ge=0.0625, le=1024,
                             description="Reduction ratio r of the bottleneck FC.")
    min_channels: int = Field(1, ge=1, le=4096, description="Lower bound on the hidden width C/r.")
    divisor: int = Field(1, ge=1, le=256,
                         description="Round C/r to a multiple of this (timm uses 8).")

    module = SqueezeExcite


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """ECA's adaptive kernel size: t = int(|log2(C) / gamma + b / gamma|), made odd
    by rounding up (the paper's |.|_odd as its reference code computes it)."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class EfficientChannelAttention(nn.Module):
    """ECA (Wang et al., 1910.03151): GAP -> 1-D conv over channels (no reduction,
    kernel from ``eca_kernel_size``) -> sigmoid -> scale."""

    def __init__(self, channels: int, gamma: float = 2, b: float = 1,
                 kernel_size: int | None = None) -> None:
        super().__init__()
        k = kernel_size or eca_kernel_size(channels, gamma, b)
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3)).unsqueeze(1)                      # (N, 1, C)
        y = torch.sigmoid(self.conv(y).transpose(1, 2).unsqueeze(-1))  # (N, C, 1, 1)
        record(self, "", y, kind="channel")
        return x * y


@register_block
class ECAConfig(BlockConfig):
    """Efficient Channel Attention, https://arxiv.org/abs/1910.03151"""

    type: Literal["eca"]
    gamma: float = Field(2, gt=0, le=64, description="gamma of the kernel-size formula.")
    b: float = Field(1, ge=-64, le=64, description="b of the kernel-size formula.")
    kernel_size: int | None = Field(
        None, ge=1, le=31,
        description="Fixed odd kernel size; derived from C by the formula if unset."
    )

    module = EfficientChannelAttention

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, k: int | None) -> int | None:
        return k if k is None else check_odd(k, purpose="keep C channels")


# --- Selective Kernel (SK) -------------------------------------------------------------

class SelectiveKernel(nn.Module):
    """SK convolution (Li et al., 1903.06586): split, fuse, select.

    Split: M branches with different receptive fields (kernel k realised as a 3x3 conv
    with dilation (k-1)/2 when ``dilate``). Fuse: U = sum of the branches, s = GAP(U),
    z = ReLU(BN(W s)) with d = max(C/r, L) units. Select: per channel, a softmax over the
    M branches of A_m z; output = sum_m a_m * U_m.

    ``split_input`` feeds each branch 1/M of the input channels (timm's SK-ResNets); the
    paper gives every branch the whole input.
    """

    def __init__(self, channels: int, out_channels: int | None = None, stride: int = 1,
                 kernel_sizes: tuple[int, ...] = (3, 5), dilate: bool = True, groups: int = 32,
                 reduction: float = 16, min_channels: int = 32, split_input: bool = False,
                 dilation: int = 1) -> None:
        super().__init__()
        out_channels = out_channels or channels
        num_branches = len(kernel_sizes)
        if num_branches < 1:
            raise ValueError("SK needs at least one branch (kernel_sizes is empty)")
        if split_input and channels % num_branches:
            raise ValueError(f"split_input: {channels} input channels do not split evenly "
                             f"into {num_branches} branches")
        in_per_branch = channels // num_branches if split_input else channels
        if in_per_branch % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide the branch's {in_per_branch} input "
                             f"and {out_channels} output channels")
        self.num_branches = num_branches
        self.split_input = split_input
        self.branches = nn.ModuleList()
        for k in kernel_sizes:
            kernel, dil = (3, dilation * (k - 1) // 2) if dilate else (k, dilation)
            # one SK path: a (dilated) grouped conv, BN and ReLU, as the paper's
            # "efficient grouped convolutions, Batch Normalization and ReLU in sequence"
            self.branches.append(ConvBnAct(in_per_branch, out_channels, kernel, stride=stride,
                                           dilation=dil, groups=groups))
        hidden = reduced_channels(out_channels, reduction, min_channels)
        self.fc_reduce = nn.Conv2d(out_channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc_select = nn.Conv2d(hidden, out_channels * num_branches, 1, bias=False)

    def branch_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The branches' outputs U_m stacked on dim 1: (N, M, C, H, W)."""
        inputs = x.chunk(self.num_branches, dim=1) if self.split_input else [x] * len(
            self.branches)
        return torch.stack([branch(xi) for branch, xi in zip(self.branches, inputs,
                                                              strict=True)], dim=1)

    def branch_weights(self, u: torch.Tensor) -> torch.Tensor:
        """Select: softmax over the M branches, per channel: (N, M, C, 1, 1)."""
        s = u.sum(1).mean((2, 3), keepdim=True)               # fuse, then GAP
        z = self.act(self.bn(self.fc_reduce(s)))
        logits = self.fc_select(z)
        n = logits.shape[0]
        return logits.view(n, self.num_branches, -1, 1, 1).softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.branch_outputs(x)
        weights = self.branch_weights(u)
        record(self, "", weights, kind="other")
        return (u * weights).sum(1)


@register_block
class SKConfig(BlockConfig):
    """Selective Kernel convolution, https://arxiv.org/abs/1903.06586

    Meant to ``replace`` a 3x3 conv: it takes the replaced conv's stride (and dilation)
    and maps its input channels to its output channels.
    """

    type: Literal["sk"]
    kernel_sizes: tuple[Annotated[int, Field(ge=1, le=31)], ...] = Field(
        (3, 5), min_length=1, max_length=8,
        description="Kernel size of each branch (M = number of branches); the "
        "paper's M=2: 3x3 and 5x5.")
    dilate: bool = Field(True, description="Realise a kxk branch as a 3x3 conv with "
                         "dilation (k-1)/2, as the paper does for 5x5.")
    groups: int = Field(32, ge=1, le=1024, description="Groups G of each branch conv (the paper's "
                        "cardinality, 32 in SKNet-50).")
    reduction: float = Field(16, ge=0.0625, le=1024,
                             description="Reduction ratio r: d = max(C/r, L).")
    min_channels: int = Field(32, ge=1, le=4096, description="Lower bound L on the width d of z.")
    split_input: bool = Field(False, description="Give each branch 1/M of the input "
                              "channels (timm's SK-ResNets) instead of all of them (paper).")

    module = SelectiveKernel

    @field_validator("kernel_sizes")
    @classmethod
    def _odd_kernels(cls, kernels: tuple[int, ...]) -> tuple[int, ...]:
        if not kernels:
            raise ValueError("kernel_sizes needs at least one kernel")
        bad = [k for k in kernels if k < 3 or k % 2 == 0]
        if bad:
            raise ValueError(f"kernel sizes must be odd and >= 3, got {bad}")
        return kernels

    def build(self, site: Site) -> nn.Module:
        replaced = site.replaced
        dilation = replaced.dilation[0] if isinstance(replaced, nn.Conv2d) else 1
        return SelectiveKernel(site.channels, site.output_channels, stride=site.stride,
                               dilation=dilation, **self.module_kwargs())


# --- Gated Channel Transformation (GCT) ------------------------------------------------

class GatedChannelTransform(nn.Module):
    """GCT (Yang et al., 1909.11519).

    Embedding s_c = alpha_c * ||x_c||_2 (l2 mode; l1: alpha_c * sum |x_c|). Channel
    normalisation s_hat = sqrt(C) * s / ||s||_2 (l1: C * s / ||s||_1). Gating
    out = x * (1 + tanh(gamma * s_hat + beta)). With gamma = beta = 0, as initialised,
    the block is the identity.
    """

    def __init__(self, channels: int, epsilon: float = 1e-5, mode: str = "l2") -> None:
        super().__init__()
        if mode not in ("l1", "l2"):
            raise ValueError(f"GCT mode must be 'l1' or 'l2', got {mode!r}")
        self.mode = mode
        self.epsilon = epsilon
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def reset_identity_(self) -> None:
        nn.init.zeros_(self.gamma)
        nn.init.zeros_(self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "l2":
            s = (x.pow(2).sum((2, 3), keepdim=True) + self.epsilon).sqrt() * self.alpha
            # sqrt(C) / ||s||_2 == 1 / sqrt(mean_c s^2)
            s_hat = s * (s.pow(2).mean(1, keepdim=True) + self.epsilon).rsqrt()
        else:
            s = x.abs().sum((2, 3), keepdim=True) * self.alpha
            s_hat = s / (s.abs().mean(1, keepdim=True) + self.epsilon)
        gate = 1 + torch.tanh(self.gamma * s_hat + self.beta)
        record(self, "", gate, kind="channel")
        return x * gate

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, epsilon={self.epsilon}"


@register_block
class GCTConfig(BlockConfig):
    """Gated Channel Transformation, https://arxiv.org/abs/1909.11519"""

    type: Literal["gct"]
    epsilon: float = Field(1e-5, gt=0, le=1, description="Small constant inside the norms.")
    mode: Literal["l2", "l1"] = Field("l2", description="Norm of the embedding and of "
                                      "the channel normalisation (the paper's default: l2).")

    module = GatedChannelTransform
    residual = True


# --- Global Second-order Pooling (GSoP-Net1) -------------------------------------------

class GlobalSecondOrderPooling(nn.Module):
    """GSoP channel attention (Gao et al., 1811.12006), the block of GSoP-Net1.

    ReLU -> 1x1 conv to d channels (+BN, ReLU) -> d x d covariance over the H*W positions
    -> BN on its rows -> row-wise conv (a grouped conv with a d x 1 kernel, ``row_expansion``
    outputs per row) -> 1x1 conv to C -> sigmoid -> scale the input.
    """

    def __init__(self, channels: int, reduced_channels: int = 128, reduce_stride: int = 1,
                 row_expansion: int = 4, row_act: str = "none") -> None:
        super().__init__()
        d = reduced_channels
        self.pre_act = nn.ReLU()  # not in place: the block scales the pre-ReLU input
        self.reduce = nn.Conv2d(channels, d, 1, stride=reduce_stride, bias=True)
        self.reduce_bn = nn.BatchNorm2d(d)
        self.reduce_act = nn.ReLU(inplace=True)
        self.row_bn = nn.BatchNorm2d(d)
        self.row_conv = nn.Conv2d(d, row_expansion * d, (d, 1), groups=d, bias=True)
        self.row_act = nn.LeakyReLU(0.1, inplace=True) if row_act == "leaky_relu" else (
            nn.Identity())
        self.fc = nn.Conv2d(row_expansion * d, channels, 1, bias=True)

    @staticmethod
    def covariance(z: torch.Tensor) -> torch.Tensor:
        """(N, d, H, W) -> (N, d, d): the covariance of the d channels over H*W positions
        (normalised by H*W)."""
        z = z.flatten(2)
        z = z - z.mean(2, keepdim=True)
        return z @ z.transpose(1, 2) / z.shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.reduce_act(self.reduce_bn(self.reduce(self.pre_act(x))))
        cov = self.row_bn(self.covariance(z).unsqueeze(-1))  # (N, d, d, 1): a row per channel
        w = torch.sigmoid(self.fc(self.row_act(self.row_conv(cov))))   # (N, C, 1, 1)
        record(self, "", w, kind="channel")
        return x * w


@register_block
class GSoPConfig(BlockConfig):
    """Global Second-order Pooling block (GSoP-Net1), https://arxiv.org/abs/1811.12006"""

    type: Literal["gsop"]
    reduced_channels: int = Field(128, ge=1, le=4096, description="Channels d after the 1x1 "
                                  "reduction: the covariance is d x d.")
    reduce_stride: int = Field(1, ge=1, le=16, description="Stride of the 1x1 reduction (the "
                               "authors' code uses 2 in the first stage of ResNet-50).")
    row_expansion: int = Field(4, ge=1, le=64, description="Outputs of the row-wise conv per "
                               "covariance row (4d in all).")
    row_act: Literal["none", "leaky_relu"] = Field(
        "none", description="Activation after the row-wise conv: none, as the authors' "
        "released code, or LeakyReLU(0.1).")

    module = GlobalSecondOrderPooling


# --- FcaNet: multi-spectral channel attention -------------------------------------------

# FcaNet's frequency rankings, as (u, v) in a 7x7 DCT space (the paper's ImageNet
# ablation): "top" = best single-frequency accuracy first, "bot" = worst first,
# "low" = lowest frequencies first (zig-zag).
_FCA_FREQUENCIES: dict[str, tuple[tuple[int, int], ...]] = {
    "top": ((0, 0), (0, 1), (6, 0), (0, 5), (0, 2), (1, 0), (1, 2), (4, 0), (5, 0), (1, 6),
            (3, 0), (0, 4), (0, 6), (0, 3), (3, 5), (2, 2), (4, 6), (6, 3), (3, 3), (5, 3),
            (5, 5), (2, 1), (6, 1), (5, 2), (5, 4), (3, 2), (3, 1), (4, 1), (2, 3), (2, 0),
            (6, 5), (1, 3)),
    "low": ((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (2, 1), (1, 2), (2, 2), (0, 3),
            (3, 0), (4, 0), (0, 4), (1, 3), (3, 1), (0, 5), (1, 4), (2, 3), (3, 2), (4, 1),
            (5, 0), (0, 6), (1, 5), (2, 4), (3, 3), (4, 2), (5, 1), (6, 0), (1, 6), (2, 5),
            (3, 4), (4, 3)),
    "bot": ((6, 6), (1, 4), (3, 4), (3, 6), (2, 6), (4, 3), (1, 1), (2, 4), (4, 4), (4, 5),
            (5, 6), (1, 5), (4, 2), (6, 2), (2, 5), (5, 1), (6, 4), (1, 3), (6, 5), (2, 0),
            (2, 3), (4, 1), (3, 1), (3, 2), (5, 4), (5, 2), (6, 1), (2, 1), (5, 5), (5, 3),
            (3, 3), (6, 3)),
}
FcaSelection = Literal[
    "top1", "top2", "top4", "top8", "top16", "top32",
    "bot1", "bot2", "bot4", "bot8", "bot16", "bot32",
    "low1", "low2", "low4", "low8", "low16", "low32",
]
FCA_SELECTIONS: tuple[str, ...] = get_args(FcaSelection)


def fca_frequencies(selection: str) -> tuple[tuple[int, int], ...]:
    """The (u, v) frequencies, in 7x7 DCT space, of a selection such as ``"top16"``."""
    if selection not in FCA_SELECTIONS:
        raise ValueError(f"unknown frequency selection {selection!r}; choose one of "
                         f"{', '.join(FCA_SELECTIONS)}")
    return _FCA_FREQUENCIES[selection[:3]][: int(selection[3:])]


def dct_basis(freq: int, size: int) -> torch.Tensor:
    """The orthonormal DCT-II basis vector of frequency ``freq`` over ``size`` points:
    cos(pi * freq * (n + 1/2) / size) * sqrt((1 if freq == 0 else 2) / size)."""
    n = torch.arange(size, dtype=torch.float64)
    scale = math.sqrt((1 if freq == 0 else 2) / size)
    return torch.cos(math.pi * freq * (n + 0.5) / size) * scale


def multispectral_filters(channels: int, size: tuple[int, int],
                          frequencies: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """(C, H, W) pooling weights: channel group i uses the 2-D DCT basis of frequency i,
    scaled from 7x7 space to the H x W map (u * H//7, v * W//7) as FcaNet does."""
    h, w = size
    groups = len(frequencies)
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} frequency groups")
    sh, sw = max(1, h // 7), max(1, w // 7)
    filters = torch.empty(channels, h, w, dtype=torch.float64)
    per_group = channels // groups
    for i, (u, v) in enumerate(frequencies):
        fu, fv = u * sh, v * sw
        if fu >= h or fv >= w:
            raise ValueError(f"frequency ({u}, {v}) does not fit a {h}x{w} feature map; "
                             "pick a selection of lower frequencies or a larger dct_size")
        filters[i * per_group:(i + 1) * per_group] = torch.outer(dct_basis(fu, h),
                                                                 dct_basis(fv, w))
    return filters.float()


class MultiSpectralChannelAttention(nn.Module):
    """FcaNet (Qin et al., 2012.11879): SE whose squeeze is a multi-spectral DCT pooling.

    The channels are split into groups; group i is pooled with the 2-D DCT basis of
    frequency i (frequency (0, 0) is GAP times sqrt(H*W)). Then FC C->C/r (no bias),
    ReLU, FC back, sigmoid, scale. A map whose size differs from ``dct_size`` is first
    adaptively average-pooled to it, as the authors' code does.
    """

    def __init__(self, channels: int, dct_size: tuple[int, int], reduction: float = 16,
                 frequencies: str = "top16") -> None:
        super().__init__()
        self.dct_size = (int(dct_size[0]), int(dct_size[1]))
        self.frequencies = frequencies
        self.register_buffer(
            "dct_filters",
            multispectral_filters(channels, self.dct_size, fca_frequencies(frequencies)),
            persistent=False,
        )
        hidden = reduced_channels(channels, reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The multi-spectral descriptor: (N, C, H, W) -> (N, C, 1, 1)."""
        if tuple(x.shape[-2:]) != self.dct_size:  # a static shape check, not data
            x = nn.functional.adaptive_avg_pool2d(x, self.dct_size)
        return (x * self.dct_filters).sum((2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(self.act(self.fc1(self.pool(x)))))
        record(self, "", w, kind="channel")
        return x * w

    def extra_repr(self) -> str:
        return f"dct_size={self.dct_size}, frequencies={self.frequencies!r}"


@register_block
class FcaConfig(BlockConfig):
    """FcaNet multi-spectral channel attention, https://arxiv.org/abs/2012.11879"""

    type: Literal["fca"]
    reduction: float = Field(16, ge=0.0625, le=1024,
                             description="Reduction ratio r of the FC bottleneck.")
    frequencies: FcaSelection = Field(
        "top16", description="Frequency selection: top|bot|low followed by 1, 2, 4, 8, 16 "
        "or 32 (the paper's best: top16).")
    dct_size: tuple[Annotated[int, Field(ge=1, le=256)],
                    Annotated[int, Field(ge=1, le=256)]] | None = Field(
        None, description="(H, W) of the DCT bases; the feature map's size at the site, as "
        "the builder probes it at the model's input size, when unset.")

    module = MultiSpectralChannelAttention

    def build(self, site: Site) -> nn.Module:
        size = self.dct_size or (tuple(site.size) if site.size else None)
        if size is None or len(size) != 2:
            raise ValueError("fca needs the feature map's (H, W): give dct_size, or insert "
                             "it where the builder probes a 2-D map")
        if site.output_channels != site.channels:
            raise ValueError("fca keeps its channel count")
        return MultiSpectralChannelAttention(site.channels, size, self.reduction,
                                             self.frequencies)
