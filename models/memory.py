"""Product-key memories: the PKM core, MSN (memory gate) and LMN (shared behaviour memory).

PKM: Lample et al. 2019, "Large Memory Layers with Product Keys" (arXiv 1907.05242).
MSN: arXiv 2602.07526; LMN: arXiv 2502.05558. Spec and our choices: docs MODELS.md §6.

A PKM read costs O(sqrt(S) * d) instead of O(S * d): the query is split in two halves,
each half scores its own sqrt(S) sub-keys, and the best k of the k*k sums of the two
top-k lists is exactly the top-k over all S = sqrt(S)^2 product keys (any top-k pair
has both halves in their half's top-k).

The value table is a weighted TorchRec ``EmbeddingBagCollection`` (one table, SUM pooling,
the softmax weights as per-sample weights) rather than an ``nn.EmbeddingBag``: training
shards it with DMP and updates it sparsely with a fused row-wise optimiser at the memory's
own learning rate (no dense Adam state for 70M values at 1M slots), applied from outside.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from models.embedding_init import torchrec_init_fn
from models.layers import masked_mean

# The one feature of a value table's KJT: one bag per query, its heads' top-k slots.
SLOT_FEATURE = "pkm_slot"


@dataclass(frozen=True)
class PKMConfig:
    """One product-key memory; ``num_slots`` must be a perfect square."""

    input_dim: int = 64
    num_slots: int = 65_536  # S = n * n, n sub-keys per half
    key_dim: int = 64  # query width per head (two halves of key_dim / 2)
    num_heads: int = 4
    topk: int = 16
    value_dim: int = 64
    use_norm: bool = True  # L2-normalise query halves and sub-keys (anti-collapse)
    key_expansion: int = 0  # > 0: over-parameterised sub-keys = raw (n, r) @ W (r, key_dim/2)
    track_usage: bool = True  # accumulate slot-hit counts for usage statistics
    # TorchRec table name: unique within a model (the planner and the sharded state dict key
    # by it), and ``t_*`` so it never equals an nn.ModuleDict attribute (STACK.md: "items" crashes).
    table_name: str = "t_pkm_value"

    @property
    def num_subkeys(self) -> int:
        return math.isqrt(self.num_slots)

    def __post_init__(self) -> None:
        for name in ("input_dim", "num_slots", "key_dim", "num_heads", "topk", "value_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"PKMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_subkeys**2 != self.num_slots:
            raise ValueError(f"PKMConfig.num_slots={self.num_slots} must be a perfect square")
        if self.key_dim % 2:
            raise ValueError(f"PKMConfig.key_dim={self.key_dim} must be even (two halves)")
        if self.topk > self.num_subkeys:
            raise ValueError(f"PKMConfig.topk={self.topk} exceeds sqrt(num_slots)={self.num_subkeys}")
        if not (self.table_name.startswith("t_") and self.table_name.isidentifier()):
            raise ValueError(f"PKMConfig.table_name={self.table_name!r} must be an identifier starting with 't_'")


@functools.lru_cache(maxsize=64)
def _pair_candidates(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs (i, j) of two descending top-k lists that can reach the joint top-k.

    At least (i+1)(j+1) - 1 other pairs score >= pair (i, j), so only pairs with
    (i+1)(j+1) <= k can be needed: about k * ln k pairs instead of k * k.
    """
    # Cached across calls, so never create them as inference tensors (backward must save them).
    with torch.inference_mode(False):
        i, j = torch.meshgrid(torch.arange(k, device=device), torch.arange(k, device=device), indexing="ij")
        keep = (i + 1) * (j + 1) <= k
        return i[keep], j[keep]


def pkm_topk(
    q1: torch.Tensor, q2: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k product keys. q1, q2 (..., H, d); keys1, keys2 (H, n, d).

    Returns scores (..., H, k) in descending order and slot indices i1 * n + i2 in [0, n*n).
    Exact: equals the top-k of all n*n sums s1[i1] + s2[i2] (up to ties).
    """
    h, n, d = keys1.shape
    if k > n:
        raise ValueError(f"pkm_topk: k={k} exceeds the number of sub-keys n={n}")
    lead = q1.shape[:-2]
    # Both halves and all heads in one batched matmul; contiguous rows keep topk fast.
    q = torch.stack([q1, q2]).reshape(2, -1, h, d).transpose(1, 2).reshape(2 * h, -1, d)  # (2H, B', d)
    keys = torch.stack([keys1, keys2]).reshape(2 * h, n, d)
    # Unsorted selection + a sort of the k survivors is ~1.7x faster than sorted topk on CPU.
    s, i = torch.bmm(q, keys.transpose(1, 2)).topk(k, dim=-1, sorted=False)  # (2H, B', k)
    s, order = s.sort(dim=-1, descending=True)  # the pair pruning below needs sorted lists
    i = i.gather(-1, order)
    s = s.view(2, h, -1, k).transpose(1, 2)  # (2, B', H, k)
    i = i.view(2, h, -1, k).transpose(1, 2)
    ii, jj = _pair_candidates(k, q.device)
    scores, best = (s[0][..., ii] + s[1][..., jj]).topk(k, dim=-1)  # (B', H, k)
    idx = i[0].gather(-1, ii[best]) * n + i[1].gather(-1, jj[best])
    return scores.reshape(*lead, h, k), idx.reshape(*lead, h, k)


class ProductKeyMemory(nn.Module):
    """Multi-head product-key memory: (..., input_dim) -> (..., value_dim), heads summed."""

    def __init__(self, cfg: PKMConfig, device: torch.device | str | None = None) -> None:
        """``device`` places the value table only (default cpu, as SparseArch); "meta" leaves it
        unallocated for DMP to materialise shard by shard (each shard drawn by the same init)."""
        super().__init__()
        self.cfg = cfg
        h, n, half = cfg.num_heads, cfg.num_subkeys, cfg.key_dim // 2
        self.query = nn.Linear(cfg.input_dim, h * cfg.key_dim)
        width = cfg.key_expansion or half
        self.raw_keys = nn.Parameter(torch.randn(h, 2, n, width) / math.sqrt(width))
        self.key_map = nn.Linear(width, half, bias=False) if cfg.key_expansion else None
        # Cosine scores live in [-2, 2]; a learned per-head scale sharpens the softmax.
        init = math.log(math.sqrt(half)) if cfg.use_norm else -math.log(math.sqrt(half))
        self.log_scale = nn.Parameter(torch.full((h, 1), init))
        table = EmbeddingBagConfig(
            name=cfg.table_name,
            embedding_dim=cfg.value_dim,
            num_embeddings=cfg.num_slots,
            feature_names=[SLOT_FEATURE],
            pooling=PoolingType.SUM,
            init_fn=torchrec_init_fn(cfg.value_dim),
        )
        self.values = EmbeddingBagCollection(tables=[table], is_weighted=True, device=torch.device(device or "cpu"))
        self.register_buffer("slot_hits", torch.zeros(cfg.num_slots, dtype=torch.long), persistent=False)
        self.register_buffer("num_reads", torch.zeros((), dtype=torch.long), persistent=False)

    def sub_keys(self) -> torch.Tensor:
        """Sub-keys (H, 2, n, key_dim/2), normalised when ``use_norm``."""
        keys = self.key_map(self.raw_keys) if self.key_map is not None else self.raw_keys
        return F.normalize(keys, dim=-1) if self.cfg.use_norm else keys

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot indices (B', H, k) and softmax weights (B', H, k) for inputs x (B', input_dim)."""
        cfg = self.cfg
        q = self.query(x).view(-1, cfg.num_heads, cfg.key_dim)  # (B', H, dk)
        q1, q2 = q.chunk(2, dim=-1)
        if cfg.use_norm:
            q1, q2 = F.normalize(q1, dim=-1), F.normalize(q2, dim=-1)
        keys = self.sub_keys()
        scores, idx = pkm_topk(q1, q2, keys[:, 0], keys[:, 1], cfg.topk)
        return idx, torch.softmax(scores * self.log_scale.exp(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.input_dim:
            raise ValueError(f"memory input must be (..., {self.cfg.input_dim}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        idx, w = self.lookup(x.reshape(-1, self.cfg.input_dim))
        if self.cfg.track_usage:
            self._count(idx)
        return self.read_values(idx, w).view(*lead, self.cfg.value_dim)

    def read_values(self, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Weighted sum of value rows (B', value_dim) for slots idx and weights w, both (B', H, k).

        One bag per query holds all its heads' H * k slots, so SUM pooling also sums the heads.
        """
        rows, per_row = idx.shape[0], idx.shape[1] * idx.shape[2]  # B', H * k
        if rows == 0:  # TorchRec cannot split an empty lengths tensor: read one empty bag instead
            return self.read_values(idx.new_zeros(1, 0, 0), w.new_zeros(1, 0, 0))[:0]
        # stride and length_per_key given, so that TorchRec never syncs to compute them.
        kjt = KeyedJaggedTensor(
            keys=[SLOT_FEATURE],
            values=idx.reshape(-1),
            weights=w.reshape(-1),
            lengths=torch.full((rows,), per_row, dtype=torch.long, device=idx.device),
            stride=rows,
            length_per_key=[rows * per_row],
        )
        return self.values(kjt)[SLOT_FEATURE]  # (B', vd)

    # ---- parameters and statistics ------------------------------------------------------
    def value_tables(self) -> EmbeddingBagCollection:
        """The value table's module, for the trainer to shard (DMP, EmbeddingBagCollectionSharder)
        with a fused row-wise optimiser at the memory's own learning rate."""
        return self.values

    def value_parameters(self) -> list[nn.Parameter]:
        """The value table's (num_slots, value_dim) weight: its own (higher) learning rate."""
        return list(self.values.parameters())

    def key_query_parameters(self) -> list[nn.Parameter]:
        """Everything except the values (query net, keys, scale)."""
        values = set(map(id, self.value_parameters()))
        return [p for p in self.parameters() if id(p) not in values]

    @torch.no_grad()
    def _count(self, idx: torch.Tensor) -> None:
        flat = idx.reshape(-1)
        self.slot_hits.index_add_(0, flat, torch.ones_like(flat))
        self.num_reads += idx.shape[0]

    def reset_usage(self) -> None:
        self.slot_hits.zero_()
        self.num_reads.zero_()

    def usage_stats(self) -> dict[str, float]:
        """Slot usage since the last reset: entropy (nats, and / log S), fraction of slots hit."""
        hits = self.slot_hits.double()
        total = float(hits.sum())
        p = hits[hits > 0] / max(total, 1.0)
        entropy = float(-(p * p.log()).sum()) if total else 0.0
        return {
            "reads": float(self.num_reads),
            "entropy": entropy,
            "normalized_entropy": entropy / math.log(self.cfg.num_slots) if self.cfg.num_slots > 1 else 0.0,
            "hit_fraction": float((hits > 0).double().mean()),
        }


# ---- MSN: memory read -> multiplicative gate on interaction tokens ---------------------------
@dataclass(frozen=True)
class MSNConfig:
    """MSN: the memory's ``input_dim`` is the width of the user/context query features."""

    token_dim: int = 64
    memory: PKMConfig = field(default_factory=PKMConfig)
    gate_init_std: float = 0.02  # small: the gate starts near 1 (identity)


class MSN(nn.Module):
    """Gate ``2 * sigmoid(W m)`` from a memory read ``m``, multiplied into tokens.

    Context (B, C) is a pooled query (one gate for all tokens); (B, T, C) or (B, N, T, C)
    is per token. Tokens are (B, T, D) or (B, N, T, D); a (B, T, C) context broadcasts
    over the N candidates.
    """

    def __init__(self, cfg: MSNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.memory = ProductKeyMemory(cfg.memory)
        self.gate_proj = nn.Linear(cfg.memory.value_dim, cfg.token_dim)
        nn.init.normal_(self.gate_proj.weight, std=cfg.gate_init_std)
        nn.init.zeros_(self.gate_proj.bias)

    def gate(self, context: torch.Tensor) -> torch.Tensor:
        """Gate values in (0, 2), shape (*context.shape[:-1], token_dim)."""
        return 2.0 * torch.sigmoid(self.gate_proj(self.memory(context)))

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if tokens.dim() not in (3, 4) or tokens.shape[-1] != self.cfg.token_dim:
            raise ValueError(
                f"tokens must be (B, T, {self.cfg.token_dim}) or (B, N, T, "
                f"{self.cfg.token_dim}), got {tuple(tokens.shape)}"
            )
        lead, ctx_lead = tuple(tokens.shape[:-1]), tuple(context.shape[:-1])
        pooled = len(ctx_lead) == 1 and ctx_lead[0] == lead[0]
        shared = len(lead) == 3 and ctx_lead == (lead[0], lead[2])  # user-side per-token query
        if not (pooled or shared or ctx_lead == lead):
            raise ValueError(
                f"context {tuple(context.shape)} does not broadcast to tokens "
                f"{tuple(tokens.shape)}: use (B, C), (B, T, C) or (B, N, T, C)"
            )
        g = self.gate(context)
        if pooled:
            g = g.view(g.shape[0], *([1] * (len(lead) - 1)), -1)  # (B, 1[, 1], D)
        elif shared:
            g = g[:, None]  # (B, 1, T, D): user-side per-token gate shared by candidates
        return tokens * g


# ---- LMN: a large memory of compressed behaviour, shared across users -----------------------
@dataclass(frozen=True)
class LMNConfig:
    """LMN sizes; ``memory.input_dim`` must equal ``hidden_dim`` (the query MLP's output)."""

    item_dim: int = 64
    user_dim: int = 32
    token_dim: int = 64
    hidden_dim: int = 64
    memory: PKMConfig = field(default_factory=PKMConfig)

    def __post_init__(self) -> None:
        if self.memory.input_dim != self.hidden_dim:
            raise ValueError(
                f"LMNConfig.memory.input_dim={self.memory.input_dim} must equal hidden_dim={self.hidden_dim}"
            )


class LMN(nn.Module):
    """Query ``MLP([item; user])`` -> PKM read; a next-behaviour loss trains the slots.

    The memory is written from long-term history: ``memory_loss`` asks the read keyed by
    each behaviour (and the user) to predict the user's NEXT behaviour, over a long window
    of the sequence, so the slots must store transitions the query does not already hold
    (reconstructing the query's own item would only teach an identity map).
    Serving needs only the user profile plus items: ``user_token`` (query = the history
    window + user, all user-side -> a USER token) and ``group_tokens`` (query = candidate
    + user -> one GROUP token per candidate).
    """

    def __init__(self, cfg: LMNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.query_mlp = nn.Sequential(
            nn.Linear(cfg.item_dim + cfg.user_dim, cfg.hidden_dim), nn.GELU(), nn.Linear(cfg.hidden_dim, cfg.hidden_dim)
        )
        self.memory = ProductKeyMemory(cfg.memory)
        self.recon_head = nn.Linear(cfg.memory.value_dim, cfg.item_dim)
        self.user_proj = nn.Linear(cfg.memory.value_dim, cfg.token_dim)
        self.group_proj = nn.Linear(cfg.memory.value_dim, cfg.token_dim)

    def read(self, items: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """Memory reads (B, X, value_dim) for items (B, X, item_dim) of users (B, user_dim)."""
        b, x, e = items.shape
        if e != self.cfg.item_dim or tuple(user.shape) != (b, self.cfg.user_dim):
            raise ValueError(
                f"items must be (B, X, {self.cfg.item_dim}) and user (B, {self.cfg.user_dim}), "
                f"got {tuple(items.shape)} and {tuple(user.shape)}"
            )
        q = torch.cat([items, user[:, None].expand(b, x, -1)], -1)  # (B, X, E + U)
        return self.memory(self.query_mlp(q))

    def memory_loss(self, seq_items: torch.Tensor, user: torch.Tensor, seq_mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error of predicting each valid behaviour's successor (detached) from its read.

        seq_items (B, L, E) oldest first (left-padded), user (B, U), seq_mask (B, L) bool; pairs
        (t, t+1) with both behaviours valid count.
        """
        query, target = seq_items[:, :-1], seq_items[:, 1:].detach()
        pair_mask = seq_mask[:, :-1] & seq_mask[:, 1:]  # (B, L-1)
        err = (self.recon_head(self.read(query, user)) - target).pow(2).mean(-1)  # (B, L-1)
        return (err * pair_mask).sum() / pair_mask.sum().clamp(min=1)

    def user_token(self, user: torch.Tensor, history: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        """USER token (B, token_dim): mean read over the valid items of the history window (B, W, E)."""
        return self.user_proj(masked_mean(self.read(history, user), history_mask, 1))  # (B, vd) -> (B, token_dim)

    def group_tokens(self, user: torch.Tensor, cand_items: torch.Tensor) -> torch.Tensor:
        """GROUP tokens (B, N, token_dim): one read per candidate item (B, N, E)."""
        return self.group_proj(self.read(cand_items, user))
