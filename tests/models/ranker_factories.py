"""Tiny ``Ranker`` configs and random group batches for the ranker tests (and any test that needs a model).

Sizes are chosen so every variant runs a forward in a few milliseconds on one CPU thread,
while keeping every code path live: LONGER merges (K = 4) with a recent-query window
smaller than the merged sequence, PKM memories with real top-k search, shallow auxiliary
heads, and backbone blocks initialised far from identity (``down_init_std=0.2``) so a
wrong mask or a dropped term shows up in the logits.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from models.batch import NUM_ACTIONS, NUM_GAP_BUCKETS, NUM_GENRES, NUM_YEAR_BUCKETS, GroupBatch
from models.longer import LongerConfig
from models.memory import LMNConfig, PKMConfig
from models.ranker import Ranker, RankerConfig
from models.rankmixer import RankMixerConfig, ReLUMoEConfig
from models.sparse import SparseConfig
from models.tokenmixer_large import SparseMoEConfig, TokenMixerLargeConfig

NUM_ITEMS, NUM_USERS, NUM_TAGS = 64, 50, 20
EMB, DIM = 16, 32
MAX_SEQ = 64  # rows of LONGER's position table: every test keeps L (+ extra padding) below it

TINY_PKM = PKMConfig(num_slots=256, topk=4, key_dim=16, num_heads=2, value_dim=16, track_usage=False)
# Three blocks: the inter-layer residual (after block 1) and a shallow head (block 0) are both live.
TINY_TML = TokenMixerLargeConfig(num_tokens=8, dim=DIM, num_layers=3, expansion=2.0, aux_layers=(0,), down_init_std=0.2)
TINY_RANKMIXER = RankMixerConfig(num_tokens=8, dim=DIM, num_layers=2, expansion=2.0)

_BASE = RankerConfig(
    sparse=SparseConfig(item_vocab=NUM_ITEMS, user_vocab=NUM_USERS, tag_vocab=NUM_TAGS, embedding_dim=EMB),
    dim=DIM,
    tokenmixer_large=TINY_TML,
    rankmixer=TINY_RANKMIXER,
    longer=LongerConfig(
        d_model=DIM,
        num_heads=2,
        num_self_layers=1,
        merge_k=4,
        inner_heads=2,
        num_recent=4,
        max_seq_len=MAX_SEQ,
        action_dim=4,
        gap_dim=4,
    ),
    msn_memory=TINY_PKM,
    lmn=LMNConfig(hidden_dim=16, memory=replace(TINY_PKM, input_dim=16)),
    lmn_window=6,
    head_hidden=16,
    dense_dim=8,
)

# Every variant the ranker tests cover; each is a setting of RankerConfig fields.
VARIANTS: dict[str, RankerConfig] = {
    "tml_longer": _BASE,
    "ugsep": replace(_BASE, use_ugsep=True, use_compensation=True),
    "ugsep_nocomp": replace(_BASE, use_ugsep=True, use_compensation=False),
    "ugsep_msn_lmn": replace(_BASE, use_ugsep=True, use_msn=True, use_lmn=True),
    # Feature groups split into 16 tokens (+ the global one): the papers' token counts.
    "ugsep_16_tokens": replace(_BASE, use_ugsep=True, num_feature_tokens=16),
    "rankmixer_pooling": replace(_BASE, backbone="rankmixer", sequence_encoder="pooling"),
    # No cross network (the single item ⊙ user cross token, no cross logit path) and no dense
    # arch (raw dense features): the layout before both.
    # LONGER's candidate token reads the item's side features too (an ablation; MODELS.md).
    "ugsep_query_side": replace(_BASE, use_ugsep=True, candidate_query="item_side"),
    "tml_no_cross": replace(_BASE, cross_layers=0, cross_logit=False, dense_dim=0),
    "tml_moe": replace(_BASE, tokenmixer_large=replace(TINY_TML, moe=SparseMoEConfig(num_experts=4, top_k=1))),
    "rankmixer_moe": replace(
        _BASE,
        backbone="rankmixer",
        rankmixer=replace(TINY_RANKMIXER, moe=ReLUMoEConfig(num_experts=3, expert_expansion=1.0)),
    ),
}


def tiny_ranker_config(variant: str = "tml_longer") -> RankerConfig:
    """The tiny config of ``variant`` (a key of ``VARIANTS``)."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown ranker variant {variant!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[variant]


def make_ranker(variant: str = "tml_longer", seed: int = 0) -> Ranker:
    """A freshly initialised tiny ranker in eval mode (MoE variants then use inference routing)."""
    torch.manual_seed(seed)
    return Ranker(tiny_ranker_config(variant)).eval()


def random_groups(
    seed: int = 0,
    batch: int = 3,
    cands: int = 4,
    seq: int = 12,
    n_tags: int = 3,
    min_seq_len: int = 0,
    num_items: int = NUM_ITEMS,
    num_users: int = NUM_USERS,
    num_tags: int = NUM_TAGS,
) -> GroupBatch:
    """A random, well-formed group batch: left-padded sequences, right-padded candidates, labels.

    ``seq_len`` is drawn in ``[min_seq_len, seq]`` (0 = a user with no history) and every
    group has at least one real candidate.
    """
    g = torch.Generator().manual_seed(seed)

    def ints(low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=g)

    seq_len = ints(min(min_seq_len, seq), seq + 1, (batch,))
    valid = torch.arange(seq) >= (seq - seq_len).unsqueeze(1)  # (B, L)
    n_real = ints(1, cands + 1, (batch,))
    cand_mask = torch.arange(cands) < n_real.unsqueeze(1)  # (B, N)
    return GroupBatch(
        user_id=ints(2, num_users, (batch,)),
        user_dense=torch.rand(batch, 3, generator=g),
        seq_item=ints(2, num_items, (batch, seq)) * valid,
        seq_action=ints(1, NUM_ACTIONS, (batch, seq)) * valid,
        seq_gap=ints(1, NUM_GAP_BUCKETS, (batch, seq)) * valid,
        seq_len=seq_len,
        cand_item=ints(2, num_items, (batch, cands)) * cand_mask,
        cand_genres=(torch.rand(batch, cands, NUM_GENRES, generator=g) < 0.2).float() * cand_mask.unsqueeze(-1),
        cand_year=ints(0, NUM_YEAR_BUCKETS, (batch, cands)) * cand_mask,
        cand_tags=ints(0, num_tags, (batch, cands, n_tags)) * cand_mask.unsqueeze(-1),
        cand_mask=cand_mask,
        labels=(torch.rand(batch, cands, 2, generator=g) < 0.5).float(),
    )


def learnable_groups(
    seed: int,
    batch: int = 16,
    cands: int = 8,
    seq: int = 24,
    num_clusters: int = 4,
    label_noise: float = 0.0,
    num_items: int = NUM_ITEMS,
) -> GroupBatch:
    """Groups of a task every variant can learn from the sequence alone.

    Items belong to ``item % num_clusters``; a user's whole history comes from one cluster,
    and a candidate is positive (both tasks) iff it belongs to that cluster. Half the
    candidates are positives. User ids and dense features carry no signal. ``label_noise``
    flips that fraction of labels, so a perfect model's BCE stays well above zero.
    """
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, num_clusters, (batch, 1), generator=g)
    per_cluster = (num_items - 2) // num_clusters  # items 2.. of each cluster: 2 + c + K*j, below num_items

    def items_of(clusters: torch.Tensor) -> torch.Tensor:
        j = torch.randint(0, per_cluster, clusters.shape, generator=g)
        item = 2 + clusters + num_clusters * j
        return item - num_clusters * (item >= num_items)  # keep inside the table

    others = (cluster + torch.randint(1, num_clusters, (batch, cands), generator=g)) % num_clusters
    is_pos = torch.arange(cands).expand(batch, cands) < cands // 2
    cand_cluster = torch.where(is_pos, cluster.expand(batch, cands), others)
    cand_item = items_of(cand_cluster)
    labels = (cand_cluster == cluster).float()
    flip = torch.rand(batch, cands, generator=g) < label_noise
    labels = torch.where(flip, 1.0 - labels, labels)
    seq_len = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    valid = torch.arange(seq) >= (seq - seq_len).unsqueeze(1)
    return GroupBatch(
        user_id=torch.randint(2, NUM_USERS, (batch,), generator=g),
        user_dense=torch.rand(batch, 3, generator=g),
        seq_item=items_of(cluster.expand(batch, seq)) * valid,
        seq_action=torch.randint(1, NUM_ACTIONS, (batch, seq), generator=g) * valid,
        seq_gap=torch.randint(1, NUM_GAP_BUCKETS, (batch, seq), generator=g) * valid,
        seq_len=seq_len,
        cand_item=cand_item,
        cand_genres=torch.zeros(batch, cands, NUM_GENRES),
        cand_year=torch.zeros(batch, cands, dtype=torch.long),
        cand_tags=torch.zeros(batch, cands, 3, dtype=torch.long),
        cand_mask=torch.ones(batch, cands, dtype=torch.bool),
        labels=labels.unsqueeze(-1).expand(batch, cands, 2).contiguous(),
    )
