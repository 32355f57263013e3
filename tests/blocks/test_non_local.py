"""The non-local family (attnzoo/blocks/non_local.py): Non-Local, DNL, GCNet's global
context, CCNet's criss-cross attention and A^2-Nets' double attention.

Each block is checked against its paper's formula written out here with an explicit
affinity matrix (or against the timm module that implements the same thing, given the
same weights). What these blocks share with the self-attention blocks (one set of ops at
every map size, export and compile, ONNX, training, the zoo specs' figures and
zero_init) is tested once for both families, in test_self_attention.py.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import GlobalContext
from torch.utils._python_dispatch import TorchDispatchMode

import attnzoo
from tests._helpers.blocks import block, conv1x1
from tests._helpers.modules import live_batchnorm_, randomize_

X = torch.randn(2, 64, 9, 7)

RESIDUAL_BLOCKS = ["non_local", "disentangled_non_local", "criss_cross", "double_attention"]

# the papers' own init is the identity (zero BN weight, gamma = 0): no zero_init needed
PAPER_IDENTITY_SPECS = ["resnet50_nl", "resnet50_dnl", "resnet50_cca"]


def bn_eval(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def maxpool2x2(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, C, H*W) at even H, W -> (N, C, H*W/4): max over each 2x2 cell."""
    n, c, _ = x.shape
    cells = x.reshape(n, c, h // 2, 2, w // 2, 2)
    return cells.amax(dim=(3, 5)).reshape(n, c, -1)


# --- Non-Local --------------------------------------------------------------------------


@pytest.mark.parametrize("subsample", [False, True])
def test_non_local_equals_embedded_gaussian_formula(subsample):
    nl = randomize_(block("non_local", 16, subsample=subsample))
    x = torch.randn(2, 16, 6, 4)
    flat = x.flatten(2)
    theta, phi, g = (conv1x1(flat, m) for m in (nl.theta, nl.phi, nl.g))
    if subsample:
        phi, g = maxpool2x2(phi, 6, 4), maxpool2x2(g, 6, 4)
    f = torch.exp(torch.einsum("nci,ncj->nij", theta, phi))     # e^(theta_i^T phi_j)
    y = torch.einsum("nij,ncj->nci", f / f.sum(-1, keepdim=True), g)
    z = bn_eval(conv1x1(y, nl.out_conv), nl.out_norm) + flat
    torch.testing.assert_close(nl(x), z.view_as(x), atol=1e-4, rtol=1e-4)
    assert nl.theta.out_channels == 8  # C/2


def test_non_local_scaled_divides_by_sqrt_of_inner_width():
    nl = randomize_(block("non_local", 16, subsample=False, scaled=True))
    x = torch.randn(1, 16, 3, 5)
    flat = x.flatten(2)
    theta, phi, g = (conv1x1(flat, m) for m in (nl.theta, nl.phi, nl.g))
    a = (torch.einsum("nci,ncj->nij", theta, phi) / 8 ** 0.5).softmax(-1)
    z = bn_eval(conv1x1(torch.einsum("nij,ncj->nci", a, g), nl.out_conv), nl.out_norm) + flat
    torch.testing.assert_close(nl(x), z.view_as(x), atol=1e-4, rtol=1e-4)


# --- Disentangled Non-Local -------------------------------------------------------------


def test_disentangled_non_local_equals_whitened_pairwise_plus_unary():
    dnl = randomize_(block("disentangled_non_local", 16))
    x = torch.randn(2, 16, 5, 4)
    flat = x.flatten(2)
    q, k, v = (conv1x1(flat, m) for m in (dnl.theta, dnl.phi, dnl.g))
    q = q - q.mean(-1, keepdim=True)
    k = k - k.mean(-1, keepdim=True)
    tau = 0.05 * 8 ** 0.5
    pairwise = (torch.einsum("nci,ncj->nij", q, k) / tau).softmax(-1)
    unary = conv1x1(flat, dnl.unary).softmax(-1)                # (N, 1, HW): over positions j
    y = torch.einsum("nij,ncj->nci", pairwise + unary, v)       # same values for both terms
    z = bn_eval(conv1x1(y, dnl.out_conv), dnl.out_norm) + flat
    torch.testing.assert_close(dnl(x), z.view_as(x), atol=1e-4, rtol=1e-4)


# --- Global context (GCNet) -------------------------------------------------------------


def test_global_context_equals_timm_add_fusion():
    ours = attnzoo.create_block("global_context", 64)
    torch.nn.init.normal_(ours.fc2.weight)  # make the transform non-trivial
    ours.norm.eps = 1e-6  # timm's LayerNorm2d eps; GCNet's reference uses nn.LayerNorm's 1e-5
    peer = GlobalContext(64, fuse_add=True, fuse_scale=False, rd_ratio=1 / 16)
    peer.load_state_dict({
        "conv_attn.weight": ours.attn.weight, "conv_attn.bias": ours.attn.bias,
        "mlp_add.fc1.weight": ours.fc1.weight, "mlp_add.fc1.bias": ours.fc1.bias,
        "mlp_add.norm.weight": ours.norm.weight.flatten(),
        "mlp_add.norm.bias": ours.norm.bias.flatten(),
        "mlp_add.fc2.weight": ours.fc2.weight, "mlp_add.fc2.bias": ours.fc2.bias,
    })
    torch.testing.assert_close(ours(X), peer(X), atol=1e-5, rtol=1e-5)


def test_global_context_starts_as_identity():
    torch.testing.assert_close(attnzoo.create_block("global_context", 64)(X), X)


# --- Criss-cross ------------------------------------------------------------------------


def criss_cross_reference(cca, x: torch.Tensor) -> torch.Tensor:
    """One pass as a full HW x HW softmax, masked to each position's row and column."""
    n, c, h, w = x.shape
    flat = x.flatten(2)
    q, k, v = (conv1x1(flat, m) for m in (cca.query, cca.key, cca.value))
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    allowed = (rows[:, None] == rows[None, :]) | (cols[:, None] == cols[None, :])
    assert (allowed.sum(1) == h + w - 1).all()          # the position itself counted once
    logits = torch.einsum("nci,ncj->nij", q, k).masked_fill(~allowed, float("-inf"))
    out = torch.einsum("nij,ncj->nci", logits.softmax(-1), v)
    return (cca.gamma * out + flat).view(n, c, h, w)


def test_criss_cross_equals_attention_over_row_and_column():
    cca = randomize_(block("criss_cross", 16))
    assert cca.query.out_channels == 2 and cca.value.out_channels == 16   # C/8 and C
    x = torch.randn(2, 16, 5, 7)
    expected = criss_cross_reference(cca, criss_cross_reference(cca, x))   # R = 2, shared
    torch.testing.assert_close(cca(x), expected, atol=1e-4, rtol=1e-4)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_criss_cross_never_materialises_an_hw_by_hw_matrix():
    h = w = 24
    cca = block("criss_cross", 8)
    x = torch.randn(1, 8, h, w, requires_grad=True)
    with _LargestTensor() as probe:
        cca(x).sum().backward()
    assert probe.largest <= h * w * (h + w)   # the row+column logits
    assert probe.largest < (h * w) ** 2 / 10


# --- A^2 (double attention) -------------------------------------------------------------


def test_double_attention_equals_gather_and_distribute():
    a2 = randomize_(block("double_attention", 16))
    x = torch.randn(2, 16, 5, 3)
    flat = x.flatten(2)
    a = conv1x1(flat, a2.features)                                    # (N, m, HW)
    b = conv1x1(flat, a2.gather_maps).softmax(-1)                      # over positions
    v = conv1x1(flat, a2.distribute_maps).softmax(1)                  # over descriptors
    g = torch.einsum("nmp,nkp->nmk", a, b)                            # G = A softmax(B)^T
    z = torch.einsum("nmk,nkp->nmp", g, v)
    expected = flat + conv1x1(z, a2.reconstruct)
    torch.testing.assert_close(a2(x), expected.view_as(x), atol=1e-5, rtol=1e-5)
    assert a2.features.out_channels == 8 and a2.gather_maps.out_channels == 8


# --- residual blocks: the identity at init ----------------------------------------------


@pytest.mark.parametrize("name", RESIDUAL_BLOCKS)
def test_residual_blocks_reset_to_the_identity(name):
    m = randomize_(block(name, 16)).train()
    x = torch.randn(2, 16, 6, 6)
    assert not torch.allclose(m(x), x)
    m.reset_identity_()
    torch.testing.assert_close(m(x), x)
    assert attnzoo.registry.get_block_config(name).residual


@pytest.mark.parametrize("name", ["non_local", "disentangled_non_local", "criss_cross"])
def test_papers_that_say_so_start_as_the_identity(name):
    m = block(name, 16).train()
    x = torch.randn(2, 16, 6, 6)
    torch.testing.assert_close(m(x), x)


# --- zoo specs --------------------------------------------------------------------------


def test_non_local_family_sits_after_every_other_block_of_res3_and_res4():
    model = attnzoo.create_model("resnet50_nl")
    assert [b.name for b in model.attnzoo_blocks] == [
        "layer2.1.attnzoo_after", "layer2.3.attnzoo_after",
        "layer3.1.attnzoo_after", "layer3.3.attnzoo_after", "layer3.5.attnzoo_after"]


@pytest.mark.parametrize("name", PAPER_IDENTITY_SPECS)
def test_zoo_spec_as_shipped_gives_the_bare_backbone_logits(name):
    model = attnzoo.create_model(name)
    assert not any(ins.zero_init for ins in model.attnzoo_spec.insert)
    bare = live_batchnorm_(timm.create_model("resnet50"), var=(0.5, 1.5))
    model.load_state_dict(bare.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), bare.eval()(x), atol=1e-5, rtol=1e-5)
