"""Baselines: shapes, padding invariance, candidate equivariance, shared user half, learning."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.baselines import (
    BASELINES,
    DIN,
    DLRMMLP,
    DCNConfig,
    DCNv2,
    DINConfig,
    DLRMConfig,
    FeatureConfig,
    SplitLinear,
    build_baseline,
)
from models.batch import GroupBatch
from models.task import masked_bce
from tests.models.ranker_factories import random_groups

NUM_ITEMS, NUM_USERS, NUM_TAGS = 64, 50, 20

TINY_FEATURES = FeatureConfig(emb_dim=8, recent_len=4)


def random_batch(
    seed: int = 0, batch: int = 3, cands: int = 5, seq: int = 7, n_tags: int = 3, num_items: int = NUM_ITEMS
) -> GroupBatch:
    """A random, well-formed group batch at the baselines' vocabulary sizes."""
    return random_groups(seed, batch, cands, seq, n_tags, num_items=num_items, num_users=NUM_USERS, num_tags=NUM_TAGS)


def tiny_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = dict(num_users=NUM_USERS, num_tags=NUM_TAGS)
    if name == "dlrm":
        return DLRMMLP(NUM_ITEMS, DLRMConfig(features=TINY_FEATURES, hidden=(16, 8)), **sizes).eval()
    if name == "dcn_parallel":
        return DCNv2(NUM_ITEMS, DCNConfig(features=TINY_FEATURES, num_cross_layers=2, hidden=(16, 8)), **sizes).eval()
    if name == "dcn_stacked_lowrank":
        config = DCNConfig(features=TINY_FEATURES, num_cross_layers=2, cross_rank=4, structure="stacked", hidden=(16,))
        return DCNv2(NUM_ITEMS, config, **sizes).eval()
    activation = "dice" if name == "din_dice" else "prelu"
    config = DINConfig(
        features=TINY_FEATURES, attention_hidden=(8, 4), hidden=(16, 8), activation=activation, max_attn_len=6
    )
    return DIN(NUM_ITEMS, config, **sizes).eval()


VARIANTS = ["dlrm", "dcn_parallel", "dcn_stacked_lowrank", "din_dice", "din_prelu"]
MODELS = {name: tiny_model(name) for name in VARIANTS}
sizes_st = dict(seed=st.integers(0, 10_000), batch=st.integers(1, 4), cands=st.integers(1, 6), seq=st.integers(1, 9))


def left_pad(batch: GroupBatch, extra: int) -> GroupBatch:
    """The same groups with ``extra`` more padding positions on the left of the sequence."""
    pad = torch.zeros(batch.batch_size, extra, dtype=torch.long)
    return replace(batch, **{k: torch.cat([pad, getattr(batch, k)], 1) for k in ("seq_item", "seq_action", "seq_gap")})


def scramble_padding(batch: GroupBatch, seed: int) -> GroupBatch:
    """Random contents in every padded candidate slot (real slots untouched)."""
    other = random_batch(seed + 1, batch.batch_size, batch.num_candidates, batch.seq_item.shape[1])
    pad = ~batch.cand_mask
    changes = {}
    for name in ("cand_item", "cand_year", "cand_tags", "cand_genres"):
        mine, theirs = getattr(batch, name), getattr(other, name)
        theirs = torch.where(theirs == 0, torch.ones_like(theirs), theirs) if name == "cand_item" else theirs
        shaped = pad.view(*pad.shape, *([1] * (mine.dim() - 2)))
        changes[name] = torch.where(shaped, theirs, mine)
    return replace(batch, **changes)


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=10, deadline=None)
@given(**sizes_st)
def test_shapes_and_padded_slots_are_zero(name: str, seed: int, batch: int, cands: int, seq: int) -> None:
    data = random_batch(seed, batch, cands, seq)
    with torch.no_grad():
        logits = MODELS[name](data)
    assert logits.shape == (batch, cands, 2)
    assert torch.isfinite(logits).all()
    assert (logits[~data.cand_mask] == 0).all()


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=10, deadline=None)
@given(extra=st.integers(1, 5), **sizes_st)
def test_padding_invariance(name: str, extra: int, seed: int, batch: int, cands: int, seq: int) -> None:
    data = random_batch(seed, batch, cands, seq)
    with torch.no_grad():
        base = MODELS[name](data)
        padded = MODELS[name](left_pad(data, extra))
        scrambled = MODELS[name](scramble_padding(data, seed))
    torch.testing.assert_close(padded, base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scrambled, base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=10, deadline=None)
@given(**sizes_st)
def test_candidate_permutation_equivariance(name: str, seed: int, batch: int, cands: int, seq: int) -> None:
    data = random_batch(seed, batch, cands, seq)
    perm = torch.randperm(cands, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        base = MODELS[name](data)
        permuted = MODELS[name](data.candidate_slice(perm))
    torch.testing.assert_close(permuted, base[:, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dlrm", "din_dice"])
def test_batch_independence(name: str) -> None:
    data = random_batch(3, batch=4)
    with torch.no_grad():
        full = MODELS[name](data)
        first = MODELS[name](
            replace(
                data, **{f: getattr(data, f)[:1] for f in data.__dataclass_fields__ if getattr(data, f) is not None}
            )
        )
    torch.testing.assert_close(first, full[:1], atol=1e-5, rtol=1e-5)


def test_din_dice_training_mode_ignores_padding() -> None:
    """Dice statistics come from real rows only, so padding cannot move them in training either."""
    data = random_batch(5, batch=4, cands=6, seq=8)
    model = tiny_model("din_dice").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(data)
    model.load_state_dict(before)
    torch.testing.assert_close(model(scramble_padding(left_pad(data, 3), 5)), base, atol=1e-5, rtol=1e-5)


def test_split_linear_equals_linear_over_concat() -> None:
    """The per-group user half is exact: W_u u + W_c c == W [u; c] on every candidate (fp32, 1e-5)."""
    torch.manual_seed(0)
    split = SplitLinear(6, 5, 7)
    full = torch.nn.Linear(11, 7)
    with torch.no_grad():
        full.weight.copy_(torch.cat([split.user.weight, split.cand.weight], dim=1))
        full.bias.copy_(split.user.bias)
    user, cand = torch.randn(3, 6), torch.randn(3, 4, 5)
    concat = torch.cat([user.unsqueeze(1).expand(-1, 4, -1), cand], dim=-1)  # (B, N, 11)
    torch.testing.assert_close(split(user, cand), full(concat), atol=1e-5, rtol=1e-5)


def test_bad_input_names_the_field() -> None:
    data = random_batch(0)
    model = MODELS["dlrm"]
    with pytest.raises(ValueError, match="cand_item"):
        model(replace(data, cand_item=data.cand_item + NUM_ITEMS))
    with pytest.raises(ValueError, match="user_dense"):
        model(replace(data, user_dense=torch.zeros(data.batch_size, 5)))
    with pytest.raises(ValueError, match="cand_tags"):
        model(replace(data, cand_tags=data.cand_tags - 1))
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("xgboost", NUM_ITEMS)
    with pytest.raises(TypeError, match="DINConfig"):
        build_baseline("din", NUM_ITEMS, DLRMConfig())


def synthetic_batch(gen: torch.Generator, batch: int = 32, cands: int = 8, seq: int = 10) -> GroupBatch:
    """Users prefer one item parity and their history shows it: engage = parity match, like = engage & item%3==0."""
    data = random_batch(int(torch.randint(0, 10**6, (1,), generator=gen)), batch, cands, seq)
    pref = data.user_id % 2  # (B,)
    seq_item = (data.seq_item // 2) * 2 + pref.unsqueeze(1)  # history items of the preferred parity
    seq_item = torch.where(data.seq_item > 0, seq_item.clamp(2, NUM_ITEMS - 1), 0)
    engage = (data.cand_item % 2 == pref.unsqueeze(1)).float()
    like = engage * (data.cand_item % 3 == 0).float()
    return replace(data, seq_item=seq_item, labels=torch.stack([engage, like], dim=-1))


@pytest.mark.parametrize("name", ["dlrm_mlp", "dcnv2", "din"])
def test_default_models_learn_a_simple_signal(name: str) -> None:
    torch.manual_seed(0)
    model = build_baseline(name, NUM_ITEMS, num_users=NUM_USERS, num_tags=NUM_TAGS)
    optimizer = torch.optim.Adam(model.parameters(), lr=model.config.lr)
    gen = torch.Generator().manual_seed(1)
    held_out = synthetic_batch(torch.Generator().manual_seed(99), batch=128)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(masked_bce(model(held_out), held_out.labels, held_out.cand_mask).mean())

    initial = eval_loss()
    model.train()
    for _ in range(300):  # engage (item parity vs history parity) takes 150-250 steps to click
        data = synthetic_batch(gen)
        loss = masked_bce(model(data), data.labels, data.cand_mask).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = eval_loss()
    assert final < 0.6 * initial, f"{name}: held-out loss {initial:.3f} -> {final:.3f}"


def test_registry_and_state_dict_round_trip() -> None:
    assert set(BASELINES) == {"dlrm_mlp", "dcnv2", "din"}
    data = random_batch(1)
    for name in BASELINES:
        model = build_baseline(name, NUM_ITEMS, num_users=NUM_USERS, num_tags=NUM_TAGS).eval()
        clone = build_baseline(name, NUM_ITEMS, num_users=NUM_USERS, num_tags=NUM_TAGS).eval()
        clone.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(clone(data), model(data))
