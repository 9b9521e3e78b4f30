"""Token mixing, per-token layers, RMSNorm and grouped expert dispatch against plain references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.layers import (
    AuxLosses,
    ExpertDispatch,
    PerTokenFFN,
    PerTokenLinear,
    PerTokenSwiGLU,
    RMSNorm,
    per_token_matmul,
    token_mix,
    token_revert,
)


@st.composite
def mix_shapes(draw):
    batch = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, 6))
    heads = draw(st.integers(1, 6))
    dim = heads * draw(st.integers(1, 4))
    return batch, tokens, heads, dim


@settings(max_examples=25, deadline=None)
@given(mix_shapes(), st.integers(0, 2**16))
def test_revert_inverts_mix_for_any_heads(shape, seed):
    batch, tokens, heads, dim = shape
    x = torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))
    mixed = token_mix(x, heads)
    assert mixed.shape == (batch, heads, tokens * dim // heads)
    assert torch.equal(token_revert(mixed, heads, tokens), x)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 3))
def test_mix_with_h_equal_t_is_its_own_inverse_and_matches_spec(batch, tokens, per_head):
    x = torch.randn(batch, tokens, tokens * per_head)
    mixed = token_mix(x, tokens)
    spec = x.view(batch, tokens, tokens, per_head).transpose(1, 2).reshape(batch, tokens, tokens * per_head)
    assert torch.equal(mixed, spec)
    assert torch.equal(token_mix(mixed, tokens), x)
    assert torch.equal(token_revert(mixed, tokens), x)


def test_mixed_token_h_holds_slice_h_of_every_token():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # T=3, D=4, H=2 -> slices of 2
    mixed = token_mix(x, 2)
    assert torch.equal(mixed[:, 1], torch.cat([x[:, t, 2:4] for t in range(3)], dim=-1))


def test_mix_rejects_heads_not_dividing_width():
    with pytest.raises(ValueError, match="heads=3"):
        token_mix(torch.randn(2, 4, 8), 3)
    with pytest.raises(ValueError, match="mixed tokens"):
        token_revert(torch.randn(2, 4, 8), 2)


def test_per_token_matmul_matches_loop_with_leading_dims():
    x, w, b = torch.randn(2, 3, 4, 5), torch.randn(4, 5, 6), torch.randn(4, 6)
    expected = torch.stack([x[..., t, :] @ w[t] + b[t] for t in range(4)], dim=-2)
    torch.testing.assert_close(per_token_matmul(x, w, b), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        per_token_matmul(torch.randn(2, 3, 7), w)


def _modules(tokens: int, dim: int) -> list[torch.nn.Module]:
    return [PerTokenLinear(tokens, dim, dim), PerTokenFFN(tokens, dim, 2 * dim), PerTokenSwiGLU(tokens, dim, 2 * dim)]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_changing_one_tokens_weights_changes_only_that_token(index):
    torch.manual_seed(0)
    module = _modules(4, 6)[index]
    x = torch.randn(5, 4, 6)
    before = module(x)
    with torch.no_grad():
        for p in module.parameters():
            p[2] += torch.randn_like(p[2])  # every per-token parameter has T leading
    after = module(x)
    changed = (after - before).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False, False, True, False]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_token_slice_uses_the_weights_of_those_positions(index):
    torch.manual_seed(1)
    module = _modules(5, 4)[index]
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(module(x[:, 1:4], slice(1, 4)), module(x)[:, 1:4], atol=1e-6, rtol=1e-6)


def test_swiglu_matches_formula_and_small_down_init():
    torch.manual_seed(2)
    module = PerTokenSwiGLU(3, 8, 64, down_init_std=0.01)
    x = torch.randn(4, 3, 8)
    gate_w, up_w = module.gate_up.weight.split(64, dim=-1)
    expected = torch.stack(
        [(F.silu(x[:, t] @ gate_w[t]) * (x[:, t] @ up_w[t])) @ module.down.weight[t] for t in range(3)], dim=1
    )
    torch.testing.assert_close(module(x), expected, atol=1e-6, rtol=1e-5)
    assert 0.007 < module.down.weight.std().item() < 0.013


def test_rmsnorm_matches_reference():
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16) * 4
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 2**16))
def test_dispatch_grouped_matmul_equals_per_assignment_loop(num_assign, num_groups, seed):
    gen = torch.Generator().manual_seed(seed)
    rows, weight = torch.randn(7, 3, generator=gen), torch.randn(num_groups, 3, 2, generator=gen)
    groups = torch.randint(0, num_groups, (num_assign,), generator=gen)
    src = torch.randint(0, 7, (num_assign,), generator=gen)
    scale = torch.rand(num_assign, generator=gen)
    plan = ExpertDispatch.build(groups, src, num_groups)
    out = plan.combine(torch.bmm(plan.permute(rows), weight), scale, num_rows=7)
    expected = torch.zeros(7, 2)
    for g, s, w in zip(groups.tolist(), src.tolist(), scale):
        expected[s] += w * (rows[s] @ weight[g])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert plan.capacity == int(torch.bincount(groups).max())


def test_aux_losses_add_and_merge():
    aux, other = AuxLosses(), AuxLosses()
    assert aux.total() == 0.0
    aux.add("a", torch.tensor(1.0))
    aux.add("a", torch.tensor(2.0))
    other.add("b", torch.tensor(0.5))
    other.metrics["m"] = 0.1
    aux.merge(other)
    assert float(aux.total()) == pytest.approx(3.5) and aux.metrics == {"m": 0.1}


def test_inference_fast_path_equals_autograd_path():
    torch.manual_seed(3)
    ffn, norm = PerTokenSwiGLU(3, 8, 16, down_init_std=0.3), RMSNorm(8)
    x = torch.randn(4, 3, 8)
    with_grad = ffn(norm(x))
    assert with_grad.requires_grad
    with torch.inference_mode():
        fast = ffn(norm(x))  # in-place activation and scaling
    torch.testing.assert_close(fast, with_grad.detach(), atol=1e-6, rtol=1e-6)


def test_dispatch_gather_returns_caller_order():
    groups, src = torch.tensor([2, 0, 2, 1, 0]), torch.tensor([0, 1, 2, 3, 4])
    rows = torch.arange(5, dtype=torch.float32).unsqueeze(-1)
    plan = ExpertDispatch.build(groups, src, 3)
    assert torch.equal(plan.gather(plan.permute(rows)), rows)
