"""Product-key memory core, MSN gate and LMN: exactness against brute force, grads, stats."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagCollection, PoolingType

from models.memory import LMN, MSN, LMNConfig, MSNConfig, PKMConfig, ProductKeyMemory, pkm_topk


def tiny_pkm(**overrides) -> PKMConfig:
    base = dict(input_dim=12, num_slots=64, key_dim=8, num_heads=2, topk=4, value_dim=6)
    return PKMConfig(**{**base, **overrides})


def value_weight(pkm: ProductKeyMemory) -> torch.Tensor:
    """The (num_slots, value_dim) value table, read where TorchRec keeps it."""
    return pkm.values.embedding_bags[pkm.cfg.table_name].weight


def dense_reference(pkm: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """Brute force over all S slots: score every product key, top-k, softmax, weighted sum."""
    cfg = pkm.cfg
    q = pkm.query(x).view(-1, cfg.num_heads, cfg.key_dim)
    q1, q2 = q.chunk(2, -1)
    if cfg.use_norm:
        q1, q2 = torch.nn.functional.normalize(q1, dim=-1), torch.nn.functional.normalize(q2, dim=-1)
    keys = pkm.sub_keys()
    s1 = torch.einsum("bhd,hnd->bhn", q1, keys[:, 0])
    s2 = torch.einsum("bhd,hnd->bhn", q2, keys[:, 1])
    full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # (B, H, S), slot = i1 * n + i2
    scores, idx = full.topk(cfg.topk, -1)
    w = torch.softmax(scores * pkm.log_scale.exp(), -1)
    return (value_weight(pkm)[idx] * w[..., None]).sum((1, 2))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 9), k=st.integers(1, 9), h=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_pkm_topk_equals_brute_force(n, k, h, seed):
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    q1, q2 = torch.randn(5, h, 3, generator=g), torch.randn(5, h, 3, generator=g)
    keys1, keys2 = torch.randn(h, n, 3, generator=g), torch.randn(h, n, 3, generator=g)
    scores, idx = pkm_topk(q1, q2, keys1, keys2, k)
    s1, s2 = torch.einsum("bhd,hnd->bhn", q1, keys1), torch.einsum("bhd,hnd->bhn", q2, keys2)
    # (a) against the k*k candidate set built from each half's top-k
    t1, i1 = s1.topk(k, -1)
    t2, i2 = s2.topk(k, -1)
    cand = (t1[..., :, None] + t2[..., None, :]).flatten(-2)
    torch.testing.assert_close(scores, cand.topk(k, -1).values)
    # (b) against all n*n slots: the product trick is exact for every k
    full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)
    best, best_idx = full.topk(k, -1)
    torch.testing.assert_close(scores, best)
    assert torch.equal(idx.sort(-1).values, best_idx.sort(-1).values)
    torch.testing.assert_close(full.gather(-1, idx), scores)  # indices point at their scores


@pytest.mark.parametrize("overrides", [{}, {"use_norm": False}, {"key_expansion": 5}, {"topk": 8}])
def test_pkm_read_equals_dense_reference(overrides):
    torch.manual_seed(0)
    pkm = ProductKeyMemory(tiny_pkm(**overrides))
    x = torch.randn(7, 12)
    torch.testing.assert_close(pkm(x), dense_reference(pkm, x), atol=1e-5, rtol=1e-5)
    assert pkm(torch.randn(2, 3, 12)).shape == (2, 3, 6)


def test_gradients_reach_keys_values_and_query_net():
    torch.manual_seed(1)
    pkm = ProductKeyMemory(tiny_pkm(key_expansion=4, topk=3))
    with torch.inference_mode():  # a serving-style read first must not poison later training
        pkm(torch.randn(2, 12))
    pkm(torch.randn(16, 12)).pow(2).sum().backward()
    for name, p in pkm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    values = set(map(id, pkm.value_parameters()))
    assert values == {id(value_weight(pkm))}
    assert values.isdisjoint(map(id, pkm.key_query_parameters()))
    assert len(pkm.key_query_parameters()) + 1 == len(list(pkm.parameters()))


def test_value_table_is_a_weighted_torchrec_table_with_gradient_only_in_rows_read():
    """Training shards the values with TorchRec and updates them sparsely (fused row-wise optimiser),
    so they must be one weighted SUM table of an EmbeddingBagCollection, named by the config."""
    torch.manual_seed(6)
    pkm = ProductKeyMemory(tiny_pkm(num_slots=256, table_name="t_test_value"))
    table = pkm.value_tables()
    assert isinstance(table, EmbeddingBagCollection) and table.is_weighted()
    (config,) = table.embedding_bag_configs()
    assert (config.name, config.num_embeddings, config.embedding_dim) == ("t_test_value", 256, 6)
    assert config.pooling == PoolingType.SUM
    assert pkm.value_parameters() == [value_weight(pkm)] == list(table.parameters())
    assert "values.embedding_bags.t_test_value.weight" in pkm.state_dict()
    x = torch.randn(3, 12)
    pkm(x).pow(2).sum().backward()
    read = torch.zeros(256, dtype=torch.bool)
    read[pkm.lookup(x)[0].flatten()] = True
    assert 0 < read.sum() <= 3 * 2 * 4  # rows x heads x top-k
    row_grad = value_weight(pkm).grad.abs().sum(1)  # unsharded: a dense (S, vd) gradient
    assert (row_grad[read] > 0).all() and (row_grad[~read] == 0).all()


@pytest.mark.parametrize("overrides", [{}, {"key_expansion": 5}])
def test_pkm_gradients_equal_dense_reference(overrides):
    """The per-sample weights carry the gradient to the query net, keys and scale through the softmax."""
    torch.manual_seed(7)
    pkm = ProductKeyMemory(tiny_pkm(**overrides))
    x, target = torch.randn(9, 12), torch.randn(9, 6)
    grads = []
    for read in (pkm, lambda x: dense_reference(pkm, x)):
        pkm.zero_grad(set_to_none=True)
        (read(x) - target).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in pkm.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-5, msg=name)


def test_value_table_initialisation_and_device():
    """Values are N(0, 1) like every embedding table (models/embedding_init.py); "meta" defers them."""
    torch.manual_seed(8)
    weight = value_weight(ProductKeyMemory(tiny_pkm(num_slots=4096, value_dim=64)))
    assert abs(weight.mean().item()) < 0.01 and abs(weight.std().item() - 1.0) < 0.01
    lazy = ProductKeyMemory(tiny_pkm(), device="meta")
    assert value_weight(lazy).is_meta and not lazy.query.weight.is_meta


def test_empty_read():
    pkm = ProductKeyMemory(tiny_pkm())
    assert pkm(torch.randn(0, 12)).shape == (0, 6) and pkm(torch.randn(2, 0, 12)).shape == (2, 0, 6)


def test_usage_stats_grow_and_reset():
    torch.manual_seed(2)
    pkm = ProductKeyMemory(tiny_pkm(num_slots=256, topk=2))
    with torch.no_grad():
        pkm(torch.randn(4, 12))
        few = pkm.usage_stats()
        pkm(torch.randn(400, 12))
        many = pkm.usage_stats()
    assert few["reads"] == 4 and many["reads"] == 404
    assert 0 < few["hit_fraction"] < many["hit_fraction"] <= 1
    assert 0 < few["entropy"] < many["entropy"] <= torch.log(torch.tensor(256.0)).item() + 1e-9
    assert 0 < many["normalized_entropy"] <= 1
    pkm.reset_usage()
    assert pkm.usage_stats() == {"reads": 0.0, "entropy": 0.0, "normalized_entropy": 0.0, "hit_fraction": 0.0}


def test_million_slot_read_shapes():
    cfg = PKMConfig(input_dim=16, num_slots=1024**2, key_dim=16, num_heads=4, topk=8, value_dim=4)
    pkm = ProductKeyMemory(cfg)
    with torch.no_grad():
        out = pkm(torch.randn(32, 16))
    assert out.shape == (32, 4) and torch.isfinite(out).all()
    assert int(pkm.slot_hits.sum()) == 32 * 4 * 8


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="perfect square"):
        PKMConfig(num_slots=1000)
    with pytest.raises(ValueError, match="topk"):
        PKMConfig(num_slots=64, topk=9)
    with pytest.raises(ValueError, match="hidden_dim"):
        LMNConfig(hidden_dim=32, memory=tiny_pkm())
    with pytest.raises(ValueError, match="memory input"):
        ProductKeyMemory(tiny_pkm())(torch.randn(3, 5))
    for bad in ("items", "t_a.b"):  # a ModuleDict attribute crashes TorchRec; dots split module paths
        with pytest.raises(ValueError, match="table_name"):
            tiny_pkm(table_name=bad)


def test_msn_gate_range_and_broadcasting():
    torch.manual_seed(3)
    msn = MSN(MSNConfig(token_dim=8, memory=tiny_pkm(), gate_init_std=3.0))
    b, n, t = 3, 4, 5
    tokens, group_tokens = torch.randn(b, t, 8), torch.randn(b, n, t, 8)
    gate = msn.gate(torch.randn(b, t, 12))
    assert gate.shape == (b, t, 8) and (gate > 0).all() and (gate < 2).all()
    pooled = torch.randn(b, 12)
    torch.testing.assert_close(msn(tokens, pooled), tokens * msn.gate(pooled)[:, None])
    assert msn(group_tokens, pooled).shape == (b, n, t, 8)
    per_token = torch.randn(b, t, 12)
    torch.testing.assert_close(msn(group_tokens, per_token), group_tokens * msn.gate(per_token)[:, None])
    assert msn(group_tokens, torch.randn(b, n, t, 12)).shape == (b, n, t, 8)
    with pytest.raises(ValueError, match="does not broadcast"):
        msn(tokens, torch.randn(b, t + 1, 12))
    msn(group_tokens, per_token).sum().backward()
    assert value_weight(msn.memory).grad.abs().sum() > 0


def test_msn_gate_starts_near_identity():
    msn = MSN(MSNConfig(token_dim=8, memory=tiny_pkm()))
    gate = msn.gate(torch.randn(10, 12))
    assert (gate - 1).abs().max() < 0.1


def test_lmn_memory_learns_next_behaviour_transitions():
    """Sequences follow a fixed item -> next-item map; the memory loss must learn it (the
    successor is not in the query, so only the memory's slots can supply it)."""
    torch.manual_seed(4)
    lmn = LMN(LMNConfig(item_dim=8, user_dim=4, token_dim=6, hidden_dim=12, memory=tiny_pkm(num_slots=256, topk=4)))
    table, successor = torch.randn(16, 8), torch.randperm(16)
    start = torch.randint(0, 16, (8,))
    ids = [start]
    for _ in range(9):
        ids.append(successor[ids[-1]])
    items, user = table[torch.stack(ids, 1)], torch.randn(8, 4)  # (8, 10, 8)
    mask = torch.arange(10)[None] >= torch.randint(0, 6, (8, 1))
    opt = torch.optim.Adam(
        [
            {"params": lmn.memory.value_parameters(), "lr": 5e-2},
            {"params": [p for p in lmn.parameters() if p is not value_weight(lmn.memory)], "lr": 1e-2},
        ]
    )
    losses = []
    for _ in range(40):
        loss = lmn.memory_loss(items, user, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_lmn_memory_loss_targets_the_successor_of_valid_pairs_only():
    lmn = LMN(LMNConfig(item_dim=2, user_dim=1, token_dim=2, hidden_dim=12, memory=tiny_pkm(num_slots=256, topk=4)))
    with torch.no_grad():  # a read that ignores the memory and returns exactly the query's own item
        lmn.recon_head.weight.zero_()
        lmn.recon_head.bias.zero_()
    items = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [3.0, 0.0]]])  # event 0 is padding
    mask = torch.tensor([[False, True, True]])
    # Predicting 0 for the one valid pair (1 -> 2): error (3^2 + 0^2) / 2; the padded pair is ignored.
    assert lmn.memory_loss(items, torch.zeros(1, 1), mask).item() == pytest.approx(4.5)


def test_lmn_user_and_group_tokens():
    torch.manual_seed(5)
    lmn = LMN(LMNConfig(item_dim=8, user_dim=4, token_dim=6, hidden_dim=12, memory=tiny_pkm()))
    user, recent, cand = torch.randn(2, 4), torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, True], [False, True, True]])
    with torch.no_grad():
        u = lmn.user_token(user, recent, mask)
        g = lmn.group_tokens(user, cand)
        perm = torch.tensor([4, 2, 0, 1, 3])
        torch.testing.assert_close(lmn.group_tokens(user, cand[:, perm]), g[:, perm])
        # Masked recent items do not affect the USER token.
        other = recent.clone()
        other[1, 0] = 100.0
        torch.testing.assert_close(lmn.user_token(user, other, mask), u)
    assert u.shape == (2, 6) and g.shape == (2, 5, 6)
