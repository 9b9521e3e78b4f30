"""TokenMixer-Large: block math, residual schedule, shallow heads, sparse MoE == dense reference."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.layers import AuxLosses, token_mix, token_revert
from models.tokenmixer_large import (
    SparseMoEConfig,
    SparsePerTokenMoE,
    TokenMixerLarge,
    TokenMixerLargeConfig,
    flops_per_sample,
)


def tiny_config(**overrides) -> TokenMixerLargeConfig:
    base = dict(num_tokens=4, dim=8, num_layers=3, expansion=2.0, residual_every=2, aux_layers=(0,), num_tasks=2)
    base.update(overrides)
    return TokenMixerLargeConfig(**base)


def moe_config(**overrides) -> TokenMixerLargeConfig:
    return tiny_config(moe=SparseMoEConfig(num_experts=4, top_k=2, expert_expansion=1.0), **overrides)


def _rms(x, norm):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _swiglu(ffn, x):
    gate, up = torch.einsum("btd,tdh->bth", x, ffn.gate_up.weight).chunk(2, dim=-1)
    return torch.einsum("bth,thd->btd", F.silu(gate) * up, ffn.down.weight)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("heads", [None, 2])
def test_block_matches_paper_formula(norm, heads):
    torch.manual_seed(0)
    cfg = tiny_config(norm=norm, heads=heads, down_init_std=0.5)
    block = TokenMixerLarge(cfg).blocks[0]
    with torch.no_grad():
        block.mix_norm.weight.uniform_(0.5, 1.5)
        block.rev_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 4, 8)
    h = cfg.num_mix_heads
    hm = token_mix(x, h)
    if norm == "post":
        hn = _rms(_swiglu(block.mix_ffn, hm) + hm, block.mix_norm)
        expected = _rms(_swiglu(block.rev_ffn, token_revert(hn, h, 4)) + x, block.rev_norm)
    else:
        hn = hm + _swiglu(block.mix_ffn, _rms(hm, block.mix_norm))
        expected = x + _swiglu(block.rev_ffn, _rms(token_revert(hn, h, 4), block.rev_norm))
    torch.testing.assert_close(block(x, AuxLosses()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "layers,every,expected", [(4, 2, (1,)), (6, 3, (2,)), (3, 3, ()), (4, 1, (0, 1, 2)), (5, 2, (1, 3)), (4, 0, ())]
)
def test_residual_schedule_never_on_last_block(layers, every, expected):
    assert tiny_config(num_layers=layers, residual_every=every, aux_layers=()).residual_layers == expected


@pytest.mark.parametrize("layers", [4, 5])
def test_forward_adds_inter_layer_residual_exactly_where_scheduled(layers):
    torch.manual_seed(1)
    cfg = tiny_config(num_layers=layers, residual_every=2, aux_layers=(0, 1), down_init_std=0.3)
    model = TokenMixerLarge(cfg)
    x = torch.randn(3, 4, 8)
    h, skip, shallow = x, x, []
    for i, block in enumerate(model.blocks):
        h = block(h, AuxLosses())
        if (i + 1) % 2 == 0 and i != layers - 1:
            h = skip = h + skip
        if i in (0, 1):
            shallow.append(model.aux_heads[str(i)](h.mean(-2)))
    out = model(x)
    torch.testing.assert_close(out.tokens, model.final_norm(h), atol=1e-5, rtol=1e-5)
    assert len(out.shallow_logits) == 2 and out.shallow_logits[0].shape == (3, 2)
    for got, want in zip(out.shallow_logits, shallow):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**16))
def test_sparse_moe_equals_dense_reference(batch, experts, top_k, seed):
    top_k = min(top_k, experts)
    torch.manual_seed(seed)
    moe = SparsePerTokenMoE(3, 8, SparseMoEConfig(num_experts=experts, top_k=top_k), down_init_std=0.2)
    x = torch.randn(batch, 2, 3, 8, requires_grad=True)
    sparse, dense = moe(x), moe.forward_dense_reference(x)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    grads_sparse = torch.autograd.grad(sparse.square().sum(), [x, *moe.parameters()])
    grads_dense = torch.autograd.grad(dense.square().sum(), [x, *moe.parameters()])
    for a, b in zip(grads_sparse, grads_dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    sub = moe(x[:, :, 1:], slice(1, 3))  # a token slice routes with those positions' weights
    torch.testing.assert_close(sub, dense[:, :, 1:], atol=1e-5, rtol=1e-5)


def test_moe_routes_top_k_with_alpha_scale_and_balance_loss():
    torch.manual_seed(3)
    cfg = SparseMoEConfig(num_experts=4, top_k=2, load_balance_weight=1.0)
    moe = SparsePerTokenMoE(2, 8, cfg, down_init_std=0.2)
    aux = AuxLosses()
    ids, weights = moe._route(moe.router(torch.randn(64, 2, 8)), aux)
    assert ids.shape == (64, 2, 2) and (ids[..., 0] != ids[..., 1]).all()
    assert cfg.alpha == 2.0 and (weights <= 2.0).all() and (weights > 0).all()
    # E * sum_e f_e P_e is 1 for perfectly uniform routing and >= ~1 otherwise.
    assert 0.9 < float(aux.losses["load_balance"].detach()) < 4.0
    moe.eval()
    eval_aux = AuxLosses()
    moe(torch.randn(4, 2, 8), aux=eval_aux)
    assert not eval_aux.losses


@pytest.mark.parametrize("make", [tiny_config, moe_config])
def test_gradients_reach_every_parameter(make):
    torch.manual_seed(4)
    model = TokenMixerLarge(make(down_init_std=0.1))
    out = model(torch.randn(64, 4, 8))
    loss = out.pooled.square().sum() + sum(s.sum() for s in out.shallow_logits) + out.aux.total()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 5))
def test_shapes_and_batch_independence(batch):
    torch.manual_seed(5)
    model = TokenMixerLarge(moe_config(down_init_std=0.2)).eval()
    x = torch.randn(batch, 4, 8)
    out = model(x)
    assert out.tokens.shape == (batch, 4, 8) and out.pooled.shape == (batch, 8)
    torch.testing.assert_close(model(x[-1:]).tokens, out.tokens[-1:], atol=1e-5, rtol=1e-5)


def test_flops_per_sample_counts_every_matmul():
    cfg = tiny_config(aux_layers=(0,))
    swiglu = lambda width: 6 * width * 2 * width  # expansion 2
    assert flops_per_sample(cfg) == 3 * (4 * swiglu(8) + 4 * swiglu(8)) + 2 * 8 * 2
    moe = moe_config(heads=2, aux_layers=())  # mix width 16, experts of hidden = width
    per_pos = lambda w: 2 * w * 4 + 3 * 6 * w * w  # router + (shared + 2 routed) experts
    assert flops_per_sample(moe) == 3 * (2 * per_pos(16) + 4 * per_pos(8))


def test_state_dict_round_trip():
    torch.manual_seed(6)
    model = TokenMixerLarge(moe_config()).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    clone = TokenMixerLarge(moe_config()).eval()
    clone.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(3, 4, 8)
    assert torch.equal(model(x).tokens, clone(x).tokens)


def test_config_and_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="heads=3"):
        tiny_config(heads=3)
    with pytest.raises(ValueError, match="aux_layers"):
        tiny_config(aux_layers=(2,))
    with pytest.raises(ValueError, match="top_k"):
        tiny_config(moe=SparseMoEConfig(num_experts=2, top_k=3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, 8\)"):
        TokenMixerLarge(tiny_config())(torch.randn(2, 5, 8))


@pytest.mark.parametrize("make", [tiny_config, moe_config])
def test_inference_mode_equals_training_graph_output(make):
    torch.manual_seed(8)
    model = TokenMixerLarge(make(down_init_std=0.3)).eval()
    x = torch.randn(5, 4, 8)
    with_grad = model(x).tokens
    with torch.inference_mode():
        fast = model(x).tokens
    torch.testing.assert_close(fast, with_grad.detach(), atol=1e-5, rtol=1e-5)
