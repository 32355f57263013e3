"""Attention as the survey defines it (attnzoo/blocks/sequence.py): ``attention`` and
``multi_head_attention``.

``multi_head_attention`` is checked against ``torch.nn.MultiheadAttention`` and timm's ViT
``Attention`` given the same weights; every scoring function of ``attention`` against its
formula written out here, position by position; the hard modes against their definition
(one-hot forward, softmax gradient); and the zoo spec ``vit_small_mha`` against timm's
``vit_small_patch16_224``.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import Attention as TimmAttention
from torch import nn

import attnzoo
from attnzoo import SpecError
from attnzoo.blocks.base import Site
from attnzoo.blocks.sequence import MultiHeadAttention, timm_attention_settings
from attnzoo.convert import from_timm
from attnzoo.registry import get_block_config
from tests._helpers.modules import randomize_

CHANNELS, HEADS = 16, 4
NQ, NK = 5, 7


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- multi_head_attention vs torch.nn.MultiheadAttention -----------------------------


def mha_pair(bias: bool = True) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    """An attnzoo block and an nn.MultiheadAttention holding the same random weights."""
    ref = randomize_(nn.MultiheadAttention(CHANNELS, HEADS, bias=bias, batch_first=True)).eval()
    ours = attnzoo.create_block("multi_head_attention", CHANNELS, num_heads=HEADS,
                                qkv_bias=bias, proj_bias=bias).eval()
    state = {"qkv.weight": ref.in_proj_weight, "proj.weight": ref.out_proj.weight}
    if bias:
        state |= {"qkv.bias": ref.in_proj_bias, "proj.bias": ref.out_proj.bias}
    ours.load_state_dict(state, strict=True)
    return ours, ref


def padding(batch: int, n: int, lengths: list[int]) -> torch.Tensor:
    """(B, n) key padding mask, True on the padding (nn.MultiheadAttention's convention)."""
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]


def future(n_query: int, n_key: int) -> torch.Tensor:
    """(Nq, Nk) boolean causal mask, True where key j > query i (may not attend)."""
    return torch.ones(n_query, n_key, dtype=torch.bool).triu(diagonal=1)


# Each case: (kwargs for both modules, extra kwargs for nn.MultiheadAttention only).
# nn.MultiheadAttention takes is_causal only as a hint next to an explicit attn_mask.
MASK_CASES = {
    "none": lambda nk: ({}, {}),
    "key_padding_bool": lambda nk: ({"key_padding_mask": padding(2, nk, [nk, 3])}, {}),
    "key_padding_float": lambda nk: ({"key_padding_mask": torch.randn(2, nk)}, {}),
    "attn_mask_bool": lambda nk: ({"attn_mask": future(NQ, nk)}, {}),
    "attn_mask_float": lambda nk: ({"attn_mask": torch.randn(NQ, nk)}, {}),
    "attn_mask_per_head": lambda nk: ({"attn_mask": (torch.rand(2 * HEADS, NQ, nk) > 0.6)
                                       & ~torch.eye(NQ, nk, dtype=torch.bool)}, {}),
    "causal": lambda nk: ({"is_causal": True}, {"attn_mask": future(NQ, nk)}),
    "causal_and_padding": lambda nk: ({"is_causal": True,
                                       "key_padding_mask": padding(2, nk, [nk, 4])},
                                      {"attn_mask": future(NQ, nk)}),
}


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_mha_equals_torch_multihead_attention(case, cross):
    ours, ref = mha_pair()
    n_key = NK if cross else NQ
    query = torch.randn(2, NQ, CHANNELS)
    key, value = (torch.randn(2, NK, CHANNELS), torch.randn(2, NK, CHANNELS)) if cross \
        else (query, query)
    kwargs, ref_extra = MASK_CASES[case](n_key)
    expected, expected_weights = ref(query, key, value, **kwargs, **ref_extra)
    args = (query, key, value) if cross else (query,)
    # the fused path (scaled_dot_product_attention) and the explicit one
    out = ours(*args, **kwargs)
    out_w, weights = ours(*args, **kwargs, need_weights=True)
    assert max_diff(out, expected) <= 1e-5
    assert max_diff(out_w, expected) <= 1e-5
    assert weights.shape == (2, NQ, n_key)
    assert max_diff(weights, expected_weights) <= 1e-6
    _, per_head = ours(*args, **kwargs, need_weights=True, average_attn_weights=False)
    _, ref_per_head = ref(query, key, value, **kwargs, **ref_extra, average_attn_weights=False)
    assert per_head.shape == (2, HEADS, NQ, n_key)
    assert max_diff(per_head, ref_per_head) <= 1e-6


def test_mha_without_biases_equals_torch():
    ours, ref = mha_pair(bias=False)
    assert ours.qkv.bias is None and ours.proj.bias is None
    x = torch.randn(2, NQ, CHANNELS)
    assert max_diff(ours(x), ref(x, x, x, need_weights=False)[0]) <= 1e-5


def test_mha_gradients_equal_torch():
    ours, ref = mha_pair()
    x = torch.randn(2, NQ, CHANNELS, requires_grad=True)
    mask = padding(2, NQ, [NQ, 2])
    grad_out = torch.randn(2, NQ, CHANNELS)
    (ours(x, key_padding_mask=mask) * grad_out).sum().backward()
    ours_grads = (x.grad.clone(), ours.qkv.weight.grad, ours.proj.weight.grad)
    x.grad = None
    (ref(x, x, x, key_padding_mask=mask)[0] * grad_out).sum().backward()
    ref_grads = (x.grad, ref.in_proj_weight.grad, ref.out_proj.weight.grad)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mha_masked_keys_get_zero_weight_and_do_not_change_the_output():
    ours, _ = mha_pair()
    x = torch.randn(2, NQ, CHANNELS)
    mask = padding(2, NQ, [NQ, 3])
    out, weights = ours(x, key_padding_mask=mask, need_weights=True)
    assert (weights[mask[:, None, :].expand_as(weights)] == 0).all()
    changed = x.clone()
    changed[1, 3:] = torch.randn(NQ - 3, CHANNELS)  # only the padded keys of sample 1
    assert max_diff(ours(changed, key_padding_mask=mask)[1, :3], out[1, :3]) <= 1e-6


def test_mha_on_a_feature_map_is_mha_on_its_positions():
    ours, _ = mha_pair()
    x = torch.randn(2, CHANNELS, 3, 4)
    tokens = x.flatten(2).transpose(1, 2)
    out = ours(x)
    assert out.shape == x.shape
    assert max_diff(out.flatten(2).transpose(1, 2), ours(tokens)) <= 1e-6


def test_mha_dropout_only_in_training():
    block = attnzoo.create_block("multi_head_attention", CHANNELS, num_heads=HEADS,
                                 dropout=0.5)
    x = torch.randn(2, NQ, CHANNELS)
    torch.testing.assert_close(block.eval()(x), block(x))
    assert max_diff(block.train()(x), block.eval()(x)) > 1e-3


def test_mha_mask_conventions_are_each_others_inverse():
    ours, ref = mha_pair()
    sdpa = attnzoo.create_block("multi_head_attention", CHANNELS, num_heads=HEADS,
                                mask_convention="sdpa").eval()
    sdpa.load_state_dict(ours.state_dict())
    x = torch.randn(2, NQ, CHANNELS)
    hidden = future(NQ, NQ)
    expected = ref(x, x, x, attn_mask=hidden)[0]
    assert max_diff(sdpa(x, attn_mask=~hidden), expected) <= 1e-5
    assert max_diff(sdpa(x, attn_mask=~hidden.expand(2, HEADS, NQ, NQ)), expected) <= 1e-5
    assert max_diff(ours(x, attn_mask=hidden[None, None]), expected) <= 1e-5
    pad = padding(2, NQ, [NQ, 2])  # key padding keeps nn.MultiheadAttention's meaning
    assert max_diff(sdpa(x, key_padding_mask=pad), ref(x, x, x, key_padding_mask=pad)[0]) \
        <= 1e-5


@pytest.mark.parametrize("shape", [(NQ, NQ + 1), (2 * HEADS + 1, NQ, NQ), (3, 1, NQ, NQ),
                                   (2, HEADS - 1, NQ, NQ), (NQ,)])
def test_mha_refuses_a_mask_of_the_wrong_shape(shape):
    ours, _ = mha_pair()
    with pytest.raises(ValueError, match="attn_mask must be"):
        ours(torch.randn(2, NQ, CHANNELS), attn_mask=torch.zeros(shape, dtype=torch.bool))


# --- multi_head_attention in place of timm's Attention --------------------------------


def timm_pair(**timm_kwargs) -> tuple[nn.Module, TimmAttention]:
    """A timm Attention and the multi_head_attention that the builder puts in its place."""
    peer = randomize_(TimmAttention(48, **timm_kwargs)).eval()
    config = get_block_config("multi_head_attention").model_validate(
        {"type": "multi_head_attention"})
    ours = config.build(Site(channels=48, replaced=peer)).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def test_mha_takes_the_settings_of_the_timm_attention_it_replaces():
    ours, peer = timm_pair(num_heads=3, qkv_bias=False, proj_bias=True, attn_drop=0.1)
    assert (ours.num_heads, ours.qkv.bias, ours.dropout) == (3, None, 0.1)
    assert ours.mask_convention == "sdpa"
    assert ours.proj.bias is not None
    x = torch.randn(2, 9, 48)
    assert max_diff(ours(x), peer(x)) <= 1e-5


@pytest.mark.parametrize("kwargs", [{"qk_norm": True}, {"scale_norm": True}],
                         ids=["qk_norm", "scale_norm"])
def test_mha_refuses_to_replace_a_timm_attention_it_cannot_reproduce(kwargs):
    with pytest.raises(ValueError, match="norm"):
        timm_attention_settings(TimmAttention(48, num_heads=4, norm_layer=nn.LayerNorm,
                                              **kwargs))


def test_in_place_of_timm_attention_masks_mean_what_timm_means():
    """timm's ViT blocks call ``attn(x, attn_mask=..., is_causal=...)`` with the
    scaled_dot_product_attention convention (boolean True = may attend)."""
    ours, peer = timm_pair(num_heads=4, qkv_bias=True)
    x = torch.randn(2, 9, 48)
    allowed = torch.rand(9, 9) > 0.5
    allowed.fill_diagonal_(True)
    float_mask = torch.randn(2, 1, 9, 9)
    for kwargs in ({"attn_mask": allowed}, {"attn_mask": allowed.expand(2, 4, 9, 9)},
                   {"attn_mask": float_mask}, {"is_causal": True}):
        assert max_diff(ours(x, **kwargs), peer(x, **kwargs)) <= 1e-5, kwargs
        assert max_diff(ours(x, **kwargs, need_weights=True)[0], peer(x, **kwargs)) <= 1e-5


# --- attention: the scoring functions written out --------------------------------------


def explicit_scores(block: nn.Module, score: str, q: torch.Tensor, k: torch.Tensor
                    ) -> torch.Tensor:
    """s(q_i, k_j) for every query i and key j, one pair at a time."""
    s = torch.empty(q.shape[0], q.shape[1], k.shape[1])
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            for j in range(k.shape[1]):
                qi, kj = q[b, i], k[b, j]
                if score == "additive":   # v^T tanh(W_q q + W_k k)
                    w_q, w_k = block.score.query_proj.weight, block.score.key_proj.weight
                    s[b, i, j] = block.score.v.weight[0] @ torch.tanh(w_q @ qi + w_k @ kj)
                elif score == "dot":      # q . k
                    s[b, i, j] = qi @ kj
                elif score == "scaled_dot":  # q . k / sqrt(d)
                    s[b, i, j] = qi @ kj / math.sqrt(kj.numel())
                else:                     # bilinear k^T W q
                    s[b, i, j] = kj @ block.score.weight @ qi
    return s


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return x @ layer.weight.t() + layer.bias


SCORES = ["additive", "dot", "scaled_dot", "bilinear"]


@pytest.mark.parametrize("score", SCORES)
def test_attention_with_projections_equals_its_formula(score):
    block = randomize_(attnzoo.create_block("attention", 12, score=score, dim=8,
                                            key_channels=6, value_channels=10)).eval()
    x_q, x_k, x_v = torch.randn(2, 3, 12), torch.randn(2, 4, 6), torch.randn(2, 4, 10)
    q, k, v = linear(x_q, block.q_proj), linear(x_k, block.k_proj), linear(x_v, block.v_proj)
    weights = explicit_scores(block, score, q, k).softmax(dim=-1)
    expected = linear(torch.einsum("bij,bjc->bic", weights, v), block.out_proj)
    out, got_weights = block(x_q, x_k, x_v, need_weights=True)
    torch.testing.assert_close(got_weights, weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.shape == x_q.shape


@pytest.mark.parametrize("score", ["additive", "bilinear"])
def test_plain_attention_uses_the_inputs_as_queries_keys_and_values(score):
    block = randomize_(attnzoo.create_block("attention", 5, score=score, projections=False,
                                            key_channels=3, score_dim=4)).eval()
    assert not any(isinstance(m, nn.Linear) for m in (block.q_proj, block.k_proj))
    query, keys = torch.randn(2, 3, 5), torch.randn(2, 6, 3)
    weights = explicit_scores(block, score, query, keys).softmax(dim=-1)
    out, got_weights = block(query, keys, need_weights=True)
    torch.testing.assert_close(got_weights, weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, weights @ keys, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("mode", ["soft", "hard_argmax", "hard_sample"])
def test_weights_sum_to_one_and_masked_keys_get_exactly_zero(score, mode):
    block = randomize_(attnzoo.create_block("attention", 8, score=score, mode=mode)).train()
    x = torch.randn(3, 6, 8)
    pad = padding(3, 6, [6, 4, 1])
    causal = future(6, 6)
    for kwargs, hidden in (({}, torch.zeros(3, 6, 6, dtype=torch.bool)),
                           ({"key_padding_mask": pad}, pad[:, None, :].expand(3, 6, 6)),
                           ({"is_causal": True}, causal.expand(3, 6, 6)),
                           ({"attn_mask": causal}, causal.expand(3, 6, 6)),
                           ({"key_padding_mask": pad, "is_causal": True},
                            pad[:, None, :] | causal)):
        _, weights = block(x, **kwargs, need_weights=True)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 6), atol=1e-6, rtol=0)
        assert (weights[hidden] == 0).all(), kwargs


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("mode", ["hard_argmax", "hard_sample"])
def test_hard_modes_are_one_hot_with_the_softmax_gradient(score, mode):
    """Straight-through: the forward pass is one-hot, the backward pass the softmax's, so
    every parameter that makes the scores still learns."""
    hard = randomize_(attnzoo.create_block("attention", 8, score=score, mode=mode)).train()
    soft = attnzoo.create_block("attention", 8, score=score).train()
    soft.load_state_dict(hard.state_dict())
    x = torch.randn(2, 5, 8)
    grad_weights = torch.randn(2, 5, 5)
    _, weights = hard(x, need_weights=True)
    assert ((weights == 0) | (weights == 1)).all()
    assert (weights.sum(-1) == 1).all()
    if mode == "hard_argmax":
        _, soft_weights = soft(x, need_weights=True)
        assert torch.equal(weights.argmax(-1), soft_weights.argmax(-1))
    (weights * grad_weights).sum().backward()
    (soft(x, need_weights=True)[1] * grad_weights).sum().backward()
    score_params = ["q_proj.weight", "k_proj.weight"] + [
        f"score.{n}" for n, _ in hard.score.named_parameters()]
    hard_params, soft_params = dict(hard.named_parameters()), dict(soft.named_parameters())
    for name in score_params:
        assert hard_params[name].grad.abs().max() > 0, name
        torch.testing.assert_close(hard_params[name].grad, soft_params[name].grad)
    # the output still reaches the values' projection
    hard.zero_grad()
    hard(x).square().sum().backward()
    assert hard.v_proj.weight.grad.abs().max() > 0
    assert hard.q_proj.weight.grad.abs().max() > 0


def test_hard_sample_draws_keys_from_the_softmax():
    block = attnzoo.create_block("attention", 1, score="dot", projections=False,
                                 mode="hard_sample").train()
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    query = torch.ones(n, 1, 1)
    keys = probs.log().view(1, 4, 1).expand(n, 4, 1)  # score_j = log p_j, softmax = p
    _, weights = block(query, keys, need_weights=True)
    freq = weights[:, 0].sum(0) / n
    # 4 standard deviations of a frequency over 20000 draws is at most 0.014
    torch.testing.assert_close(freq, probs, atol=0.014, rtol=0)
    # in eval it is the argmax, deterministic
    _, eval_weights = block.eval()(query[:3], keys[:3], need_weights=True)
    assert (eval_weights[:, 0].argmax(-1) == 3).all()


def test_attention_on_a_feature_map_keeps_its_shape():
    block = attnzoo.create_block("attention", 8, score="additive").eval()
    x = torch.randn(2, 8, 3, 4)
    out = block(x)
    assert out.shape == x.shape
    assert max_diff(out.flatten(2).transpose(1, 2), block(x.flatten(2).transpose(1, 2))) \
        <= 1e-6


# --- configs ---------------------------------------------------------------------------


def test_both_blocks_are_registered_and_built_by_create_block():
    assert {"attention", "multi_head_attention"} <= set(attnzoo.list_blocks())
    mha = attnzoo.create_block("multi_head_attention", 24, num_heads=6)
    assert isinstance(mha, MultiHeadAttention) and mha.num_heads == 6 and mha.head_dim == 4
    assert attnzoo.create_block("multi_head_attention", 24).num_heads == 8  # Vaswani et al.
    assert mha.mask_convention == "multihead_attention"
    attention = attnzoo.create_block("attention", 24)
    assert attention.mode == "soft" and type(attention.score).__name__ == "DotScore"
    assert attention.score.scaled


@pytest.mark.parametrize("block_type, cfg", [
    ("attention", {"score": "cosine"}),
    ("attention", {"mode": "hard"}),
    ("attention", {"dim": 0}),
    ("attention", {"dim": 8, "projections": False}),
    ("attention", {"score": "dot", "projections": False, "key_channels": 4}),
    ("attention", {"temperature": 2.0}),
    ("multi_head_attention", {"num_heads": 5}),
    ("multi_head_attention", {"num_heads": 0}),
    ("multi_head_attention", {"dropout": 1.0}),
    ("multi_head_attention", {"qkv_bias": "maybe"}),
    ("multi_head_attention", {"heads": 4}),
    ("multi_head_attention", {"mask_convention": "timm"}),
])
def test_bad_configs_are_spec_errors(block_type, cfg):
    with pytest.raises(SpecError):
        attnzoo.create_block(block_type, 16, **cfg)


# --- vit_small_mha: timm's ViT-S/16 with multi_head_attention ---------------------------


@pytest.fixture(scope="module")
def vit_pair() -> tuple[nn.Module, nn.Module]:
    """timm's vit_small_patch16_224 (random init) and vit_small_mha holding its weights,
    both at 64x64 (ViT's position embedding is sized for its input)."""
    torch.manual_seed(0)
    peer = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64).eval()
    model = attnzoo.create_model("vit_small_mha", img_size=64).eval()
    model.load_state_dict(from_timm("vit_small_mha", peer.state_dict()), strict=True)
    return model, peer


def test_vit_small_mha_replaces_every_attention(vit_pair):
    model, peer = vit_pair
    assert type(model) is type(peer)
    assert len(model.attnzoo_blocks) == 12
    attns = [blk.attn for blk in model.blocks]
    assert all(isinstance(a, MultiHeadAttention) for a in attns)
    assert all(a.num_heads == 6 and a.qkv.bias is not None for a in attns)
    assert not any(isinstance(m, TimmAttention) for m in model.modules())
    assert model.state_dict().keys() == peer.state_dict().keys()


def test_vit_small_mha_gives_timm_logits(vit_pair):
    model, peer = vit_pair
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert max_diff(model(x), peer(x)) <= 1e-5


def test_vit_small_mha_with_an_attention_mask_gives_timm_logits(vit_pair):
    model, peer = vit_pair
    x = torch.randn(1, 3, 64, 64)
    tokens = 1 + 16  # class token + 4x4 patches
    allowed = torch.ones(tokens, tokens, dtype=torch.bool)
    allowed[:, 5:9] = False  # no token may look at four of the patches
    with torch.no_grad():
        assert max_diff(model(x, attn_mask=allowed), peer(x, attn_mask=allowed)) <= 1e-5
