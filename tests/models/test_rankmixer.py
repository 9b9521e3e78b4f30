"""RankMixer: semantic tokenizer, block math, ReLU Sparse-MoE with a learning inference router."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.layers import AuxLosses, token_mix
from models.rankmixer import (
    FeatureGroup,
    RankMixer,
    RankMixerConfig,
    ReLUMoEConfig,
    SemanticTokenizer,
    TokenizerConfig,
    rankmixer_flops_per_sample,
)


def tiny_config(**overrides) -> RankMixerConfig:
    base = dict(num_tokens=4, dim=8, num_layers=2, expansion=2.0)
    base.update(overrides)
    return RankMixerConfig(**base)


def moe_config(**moe) -> RankMixerConfig:
    return tiny_config(moe=ReLUMoEConfig(**{"num_experts": 4, "expert_expansion": 1.0, **moe}))


def tokenizer_config(use_global_token: bool = True) -> TokenizerConfig:
    groups = (
        FeatureGroup("profile", 3, "user"),
        FeatureGroup("item", 5, "group"),
        FeatureGroup("history", 2, "user"),
        FeatureGroup("cross", 4, "group"),
    )
    return TokenizerConfig(groups=groups, dim=8, use_global_token=use_global_token)


def features(b: int = 2, n: int = 3) -> dict[str, torch.Tensor]:
    return {
        "profile": torch.randn(b, 3),
        "history": torch.randn(b, 2),
        "item": torch.randn(b, n, 5),
        "cross": torch.randn(b, n, 4),
    }


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_sides_order_and_broadcast():
    torch.manual_seed(0)
    tok = SemanticTokenizer(tokenizer_config())
    feats = features()
    user, group, everything = tok(feats, "user"), tok(feats, "group"), tok(feats)
    assert tok.cfg.num_tokens("user") == 2 and tok.cfg.num_tokens("group") == 3  # global token is group-side
    assert user.shape == (2, 2, 8) and group.shape == (2, 3, 3, 8) and everything.shape == (2, 3, 5, 8)
    torch.testing.assert_close(everything[:, :, :2], user.unsqueeze(1).expand(2, 3, 2, 8))
    torch.testing.assert_close(everything[:, :, 2:], group)
    torch.testing.assert_close(user[:, 0], tok.group_mlps["profile"](feats["profile"]))


def test_user_tokens_ignore_group_features_and_global_token_reads_everything():
    torch.manual_seed(1)
    tok = SemanticTokenizer(tokenizer_config())
    feats = features()
    other = dict(feats, item=torch.randn(2, 3, 5))
    assert torch.equal(tok(feats, "user"), tok(other, "user"))
    moved_profile = dict(feats, profile=torch.randn(2, 3))
    assert not torch.allclose(tok(feats, "group")[..., 0, :], tok(moved_profile, "group")[..., 0, :])
    assert torch.equal(tok(feats, "group")[..., 1:, :], tok(moved_profile, "group")[..., 1:, :])


def test_all_user_groups_make_a_user_global_token():
    cfg = TokenizerConfig(groups=(FeatureGroup("a", 3, "user"),), dim=8, use_global_token=True)
    assert cfg.global_side == "user" and cfg.num_tokens("user") == 2
    assert SemanticTokenizer(cfg)({"a": torch.randn(4, 3)}).shape == (4, 2, 8)


def test_tokenizer_errors_name_the_group():
    tok = SemanticTokenizer(tokenizer_config())
    feats = features()
    with pytest.raises(KeyError, match="cross"):
        tok({k: v for k, v in feats.items() if k != "cross"}, "group")
    with pytest.raises(ValueError, match="'item' expects last dim 5"):
        tok(dict(feats, item=torch.randn(2, 3, 6)), "group")
    with pytest.raises(ValueError, match="unique"):
        TokenizerConfig(groups=(FeatureGroup("a", 1), FeatureGroup("a", 2)), dim=4)


# ---------------------------------------------------------------- dense backbone
def test_block_matches_post_ln_formula():
    torch.manual_seed(2)
    block = RankMixer(tiny_config()).blocks[0]
    x = torch.randn(5, 4, 8)
    s = F.layer_norm(token_mix(x, 4) + x, (8,), block.mix_norm.weight, block.mix_norm.bias)
    up, down = block.ffn.up, block.ffn.down
    pffn = torch.stack(
        [F.gelu(s[:, t] @ up.weight[t] + up.bias[t]) @ down.weight[t] + down.bias[t] for t in range(4)], dim=1
    )
    expected = F.layer_norm(pffn + s, (8,), block.ffn_norm.weight, block.ffn_norm.bias)
    torch.testing.assert_close(block(x, AuxLosses()), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3))
def test_shapes_any_leading_dims_and_batch_independence(b, n):
    torch.manual_seed(3)
    model = RankMixer(tiny_config())
    x = torch.randn(b, n, 4, 8)
    out = model(x)
    assert out.tokens.shape == (b, n, 4, 8) and out.pooled.shape == (b, n, 8) and out.shallow_logits == ()
    torch.testing.assert_close(model(x[:1, :1]).tokens, out.tokens[:1, :1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_config, moe_config])
def test_gradients_reach_every_parameter(make):
    torch.manual_seed(4)
    model = RankMixer(make())
    out = model(torch.randn(16, 4, 8))
    (out.pooled.square().sum() + out.aux.total()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_config_errors():
    with pytest.raises(ValueError, match="must divide dim"):
        tiny_config(num_tokens=3)
    with pytest.raises(ValueError, match="target_active_ratio"):
        moe_config(target_active_ratio=0.0)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, 8\)"):
        RankMixer(tiny_config())(torch.randn(2, 3, 8))


def test_flops_formula_matches_paper_estimate():
    cfg = RankMixerConfig(num_tokens=16, dim=768, num_layers=2, expansion=2.0)
    assert rankmixer_flops_per_sample(cfg) == 4 * 2 * 2 * 16 * 768**2  # ~ 4kLTD^2


# ---------------------------------------------------------------- sparse MoE
def test_sparse_inference_equals_dense_experts_on_active_gates():
    torch.manual_seed(5)
    model = RankMixer(moe_config()).eval()
    moe = model.blocks[0].ffn
    x = torch.randn(6, 4, 8)
    gates = F.relu(moe.router_infer(x))
    assert 0 < (gates > 0).float().mean() < 1
    torch.testing.assert_close(moe.experts_sparse(x, gates), moe.experts_dense(x, gates), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe(x, aux=AuxLosses()), moe.experts_dense(x, gates), atol=1e-5, rtol=1e-5)


def _train_moe(distill_weight: float, steps: int = 150) -> tuple[float, float]:
    """Short training on a synthetic regression; returns (eval active ratio, final l1 coef)."""
    torch.manual_seed(6)
    model = RankMixer(
        tiny_config(
            num_layers=1,
            moe=ReLUMoEConfig(
                num_experts=4, expert_expansion=1.0, target_active_ratio=0.4, distill_weight=distill_weight
            ),
        )
    )
    head = torch.nn.Linear(8, 1)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(steps):
        x = torch.randn(32, 4, 8)
        y = torch.sin(x[:, 0, :2].sum(-1, keepdim=True)) + x[:, 3, :1] * x[:, 1, 1:2]
        out = model(x)
        loss = F.mse_loss(head(out.pooled), y) + out.aux.total()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moe = model.blocks[0].ffn
    model.eval()
    with torch.no_grad():
        x = torch.randn(256, 4, 8)
        s = model.blocks[0].mix_norm(token_mix(x, 4) + x)
        active = (F.relu(moe.router_infer(s)) > 0).float().mean().item()
    return active, float(moe.l1_coef)


def test_inference_router_learns_and_stays_near_target():
    active, _ = _train_moe(distill_weight=1.0)
    assert 0.25 < active < 0.6  # target 0.4 (training-time ratio is what the controller steers)


def test_without_distillation_the_inference_router_collapses():
    active, _ = _train_moe(distill_weight=0.0)
    assert active < 0.1


def test_state_dict_round_trip_keeps_adaptive_l1_coefficient():
    torch.manual_seed(7)
    model = RankMixer(moe_config())
    model(torch.randn(8, 4, 8))  # one training forward moves the coefficient
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    clone = RankMixer(moe_config())
    clone.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert float(clone.blocks[0].ffn.l1_coef) == float(model.blocks[0].ffn.l1_coef) != 0.01
    x = torch.randn(3, 4, 8)
    assert torch.equal(model.eval()(x).tokens, clone.eval()(x).tokens)
