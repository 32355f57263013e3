"""Non-trivial weights for a test, so that no term of a formula and no inserted block
can hide behind a 0 or a 1: random parameters, BatchNorm weights and statistics, and a
peer module's weights copied by order."""

from __future__ import annotations

import torch
from torch import nn


def randomize_(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Random non-trivial values (``std`` times a standard normal) for every parameter,
    so that zeroed gammas, BN weights or biases do not hide a path, and random running
    statistics for every BatchNorm2d; returns the module in eval mode."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return module.eval()


def live_batchnorm_(model: nn.Module, *, bias: tuple[float, float] | None = None,
                    mean: tuple[float, float] | None = None,
                    var: tuple[float, float] | None = None) -> nn.Module:
    """Every BatchNorm2d of ``model`` with a weight drawn from [0.5, 1.5]: timm zero-inits
    the last BN of each residual block, which makes the branch output 0 and hides what
    an inserted block does. ``bias``, ``mean`` and ``var`` are the ranges to draw the
    BN's bias and running statistics from, where a test needs those non-trivial too.
    Returns ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                if bias:
                    m.bias.uniform_(*bias)
                if mean:
                    m.running_mean.uniform_(*mean)
                if var:
                    m.running_var.uniform_(*var)
    return model


def with_random_bn_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with non-trivial BN running statistics, so that a save and
    load that lost buffers would change its outputs."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.uniform_(-0.5, 0.5)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model.eval()


def copy_by_order(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Copy src's tensors into dst in registration order (reshaped where a peer keeps a
    LayerNorm's weight as (C,) and we keep (C, 1, 1))."""
    src_t = list(src.state_dict().values())
    dst_sd = dst.state_dict()
    assert len(src_t) == len(dst_sd)
    dst.load_state_dict({k: s.reshape(v.shape) for (k, v), s in zip(dst_sd.items(), src_t,
                                                                      strict=True)})

