"""UG-Sep: user tokens never see candidates, reuse path == full per-candidate path, compensation is group-only."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.rankmixer import RankMixerConfig, ReLUMoEConfig
from models.tokenmixer_large import SparseMoEConfig, TokenMixerLargeConfig
from models.ugsep import UGSepBackbone, UGSepConfig, flops_per_candidate
from tests.models.leaf_reference import BackboneSpec, as_weights, backbone

T_U, T_G, D = 3, 3, 12

VARIANTS = {
    "tml": dict(backbone="tokenmixer_large"),
    "tml_post_heads": dict(
        backbone="tokenmixer_large",
        tokenmixer_large=TokenMixerLargeConfig(
            num_tokens=6,
            dim=D,
            num_layers=3,
            heads=4,
            norm="post",
            expansion=2.0,
            residual_every=2,
            aux_layers=(0,),
            down_init_std=0.2,
        ),
    ),
    "tml_moe": dict(
        backbone="tokenmixer_large",
        tokenmixer_large=TokenMixerLargeConfig(
            num_tokens=6,
            dim=D,
            num_layers=2,
            expansion=2.0,
            aux_layers=(0,),
            down_init_std=0.2,
            moe=SparseMoEConfig(num_experts=3, top_k=2),
        ),
    ),
    "rankmixer": dict(backbone="rankmixer"),
    "rankmixer_moe": dict(
        backbone="rankmixer",
        rankmixer=RankMixerConfig(
            num_tokens=6, dim=D, num_layers=2, moe=ReLUMoEConfig(num_experts=3, expert_expansion=1.0)
        ),
    ),
}


def tiny_config(variant: str = "tml", use_compensation: bool = True) -> UGSepConfig:
    base = dict(
        num_user_tokens=T_U,
        use_compensation=use_compensation,
        tokenmixer_large=TokenMixerLargeConfig(
            num_tokens=6, dim=D, num_layers=4, expansion=2.0, residual_every=2, aux_layers=(0, 1), down_init_std=0.2
        ),
        rankmixer=RankMixerConfig(num_tokens=6, dim=D, num_layers=2, expansion=2.0),
    )
    base.update(VARIANTS[variant])
    return UGSepConfig(**base)


def make_model(variant: str = "tml", use_compensation: bool = True, seed: int = 0) -> UGSepBackbone:
    torch.manual_seed(seed)
    model = UGSepBackbone(tiny_config(variant, use_compensation))
    # Eval mode: the MoE variants then use their inference routing (sparse dispatch).
    return model.eval()


def inputs(b: int = 2, n: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, T_U, D, generator=gen), torch.randn(b, n, T_G, D, generator=gen)


ALL = [(v, c) for v in VARIANTS for c in (True, False)]


@pytest.mark.parametrize("variant,comp", ALL)
def test_reuse_path_equals_full_per_candidate_path(variant, comp):
    model = make_model(variant, comp)
    x_user, x_group = inputs()
    full = model(x_user, x_group)
    fast = model.forward_group(model.forward_user(x_user), x_group)
    assert fast.tokens.shape == full.tokens.shape == (2, 4, 6, D)
    torch.testing.assert_close(fast.tokens, full.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.pooled, full.pooled, atol=1e-5, rtol=1e-5)
    assert len(fast.shallow_logits) == len(full.shallow_logits)
    for a, b in zip(fast.shallow_logits, full.shallow_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(0, 2**16))
def test_reuse_equals_full_for_any_batch_and_candidate_count(b, n, seed):
    model = make_model("tml")
    x_user, x_group = inputs(b, n, seed)
    fast = model.forward_group(model.forward_user(x_user), x_group).tokens
    torch.testing.assert_close(fast, model(x_user, x_group).tokens, atol=1e-5, rtol=1e-5)


def leaf_backbone(model: UGSepBackbone, x_user: torch.Tensor, x_group: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The independent float64 recomputation (tests/models/leaf_reference.py), one candidate at a time:
    final tokens (B, N, T, D) and shallow logits (B, N, tasks) each."""
    cfg = model.cfg
    spec = BackboneSpec(
        cfg.backbone_config,
        cfg.backbone == "tokenmixer_large",
        "backbone",
        True,
        "compensation" if cfg.use_compensation else None,
    )
    w = as_weights(model)
    b, n = x_group.shape[:2]
    outs = [
        [backbone(w, spec, torch.cat([x_user[i], x_group[i, j]]).double(), T_U) for j in range(n)] for i in range(b)
    ]
    final = torch.stack([torch.stack([outs[i][j][0] for j in range(n)]) for i in range(b)])
    shallow = [
        torch.stack([torch.stack([outs[i][j][1][k] for j in range(n)]) for i in range(b)])
        for k in range(len(outs[0][0][1]))
    ]
    return final, shallow


@pytest.mark.parametrize("variant,comp", ALL)
def test_reuse_path_equals_the_leaf_weight_reference(variant, comp):
    model = make_model(variant, comp)
    x_user, x_group = inputs(2, 3)
    fast = model.forward_group(model.forward_user(x_user), x_group)
    tokens, shallow = leaf_backbone(model, x_user, x_group)
    torch.testing.assert_close(fast.tokens.double(), tokens, atol=1e-5, rtol=1e-5)
    assert len(fast.shallow_logits) == len(shallow)
    for got, want in zip(fast.shallow_logits, shallow):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_candidate_perturbation_leaves_user_tokens_unchanged_in_the_masked_paths(variant):
    """The reference path recomputes the user tokens for every candidate with the group tokens IN its
    input, behind the mask; so does the leaf recomputation. Neither may let the candidates leak in."""
    model = make_model(variant)
    x_user, x_group = inputs()
    other_group = x_group + torch.randn_like(x_group)
    ref, ref_other = model(x_user, x_group), model(x_user, other_group)
    assert torch.equal(ref.tokens[:, :, :T_U], ref_other.tokens[:, :, :T_U])
    assert not torch.allclose(ref.tokens[:, :, T_U:], ref_other.tokens[:, :, T_U:])
    leaf, leaf_other = leaf_backbone(model, x_user, x_group)[0], leaf_backbone(model, x_user, other_group)[0]
    torch.testing.assert_close(leaf[:, :, :T_U], leaf_other[:, :, :T_U], atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", ["tml", "tml_post_heads", "rankmixer"])
def test_compensation_reaches_group_tokens_but_never_user_tokens(variant):
    with_comp, without = make_model(variant, True), make_model(variant, False)
    without.load_state_dict(with_comp.state_dict(), strict=False)  # same backbone weights
    x_user, x_group = inputs()
    a, b = with_comp(x_user, x_group).tokens, without(x_user, x_group).tokens
    assert torch.equal(a[:, :, :T_U], b[:, :, :T_U])
    assert not torch.allclose(a[:, :, T_U:], b[:, :, T_U:])
    with_comp.train()
    out = with_comp.forward_group(with_comp.forward_user(x_user), x_group)
    out.tokens[:, :, :T_U].square().sum().backward()
    for p in with_comp.compensation.parameters():
        assert p.grad is None or not p.grad.any()


@pytest.mark.parametrize("variant", ["tml", "rankmixer_moe"])
def test_batch_independence_and_candidate_permutation_equivariance(variant):
    model = make_model(variant)
    x_user, x_group = inputs(3, 5)
    out = model.forward_group(model.forward_user(x_user), x_group).tokens
    alone = model.forward_group(model.forward_user(x_user[1:2]), x_group[1:2]).tokens
    torch.testing.assert_close(alone, out[1:2], atol=1e-5, rtol=1e-5)
    perm = torch.tensor([3, 0, 4, 2, 1])
    permuted = model.forward_group(model.forward_user(x_user), x_group[:, perm]).tokens
    torch.testing.assert_close(permuted, out[:, perm], atol=1e-5, rtol=1e-5)


def test_states_take_selects_groups():
    model = make_model("tml")
    x_user, x_group = inputs(3, 2)
    states = model.forward_user(x_user)
    rows = torch.tensor([2, 0])
    torch.testing.assert_close(
        model.forward_group(states.take(rows), x_group[rows]).tokens,
        model.forward_group(states, x_group).tokens[rows],
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize("variant", ["tml", "tml_moe", "rankmixer", "rankmixer_moe"])
def test_gradients_reach_every_parameter_through_the_reuse_path(variant):
    model = make_model(variant).train()
    x_user, x_group = inputs(8, 6)
    out = model.forward_group(model.forward_user(x_user), x_group)
    loss = out.pooled.square().sum() + sum(s.sum() for s in out.shallow_logits) + out.aux.total()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_state_dict_round_trip():
    model = make_model("tml_moe", seed=3)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    clone = make_model("tml_moe", seed=4)
    clone.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x_user, x_group = inputs()
    assert torch.equal(model(x_user, x_group).tokens, clone(x_user, x_group).tokens)


def test_bad_shapes_and_config_are_named():
    model = make_model("tml")
    x_user, x_group = inputs()
    with pytest.raises(ValueError, match="x_group"):
        model.forward_group(model.forward_user(x_user), x_group[:, :, :2])
    with pytest.raises(ValueError, match="x_user"):
        model.forward_user(x_user[:, :2])
    with pytest.raises(ValueError, match="states hold 2 groups"):
        model.forward_group(model.forward_user(x_user), x_group[:1])
    with pytest.raises(ValueError, match="num_user_tokens=6"):
        UGSepConfig(num_user_tokens=6, tokenmixer_large=TokenMixerLargeConfig(num_tokens=6, dim=D))


def test_configs_load_from_plain_dicts():
    from components.config_loader import from_dict, to_dict

    cfg = from_dict(
        UGSepConfig,
        {
            "num_user_tokens": 2,
            "backbone": "tokenmixer_large",
            "tokenmixer_large": {
                "num_tokens": 6,
                "dim": 12,
                "heads": None,
                "aux_layers": [0],
                "moe": {"num_experts": 4, "top_k": 1},
            },
            "rankmixer": {"num_tokens": 6, "dim": 12, "moe": {"num_experts": 2}},
        },
    )
    assert cfg.tokenmixer_large.aux_layers == (0,) and cfg.tokenmixer_large.moe.alpha == 4.0
    assert from_dict(UGSepConfig, to_dict(cfg)) == cfg


def test_flops_per_candidate_amortises_the_user_side():
    cfg = tiny_config("tml", use_compensation=False)  # T=6, D=12, H=6, L=4, expansion 2, 2 aux heads
    # A mixed position is 12 wide (6 user columns, 6 group), hidden 24: gate/up 2*12*48, down 2*24*12.
    # Each side's first layer sees only its own 6 columns; the down projection runs whole on both.
    mix_side = 6 * (2 * 6 * 48 + 2 * 24 * 12)
    revert_per_token = 6 * 12 * 24  # SwiGLU: gate+up 2*d*2h + down 2*h*d
    user, group, heads = mix_side + T_U * revert_per_token, mix_side + T_G * revert_per_token, 2 * 2 * 12 * 2
    assert flops_per_candidate(cfg, 1) == 4 * (group + user) + heads
    assert flops_per_candidate(cfg, 64) == 4 * (group + user / 64) + heads
    with_comp = tiny_config("tml", use_compensation=True)
    extra = 2 * T_G * T_U * 12 + 4 * T_G * 12 * 12  # route + value + gate
    assert flops_per_candidate(with_comp, 64) == flops_per_candidate(cfg, 64) + 4 * extra
