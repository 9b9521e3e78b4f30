"""Honest baselines on the group batch: DLRM-MLP, DCNv2 and DIN.

Every model maps a ``GroupBatch`` to logits (B, N, tasks) for tasks ("engage", "like"),
with padded candidate slots set to 0. Features are shared by all three (``FeatureArch``):
user side = user id embedding, user dense features, mean of the most recent behaviour
tokens; candidate side = item id, year, mean tag embedding, genre multi-hot projection.

User side once per group: the first layer over ``concat(user, candidate)`` is written as
``W_u user + W_c candidate`` (``SplitLinear``), which is the same function, and the user
half runs at batch B instead of B·N. DIN's attention depends on the candidate, so only the
sequence-side projection of its activation unit is shared.

Papers: DLRM arXiv 1906.00091 (MLP variant as in RankMixer's baseline); DCNv2 arXiv
2008.13535 (stacked/parallel, low-rank cross); DIN arXiv 1706.06978 (activation unit, Dice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from models.batch import NUM_ACTIONS, NUM_GENRES, NUM_USER_DENSE, NUM_YEAR_BUCKETS, GroupBatch
from models.cross import CrossNetwork, SplitLinear
from models.embedding_init import embedding
from models.id_rows import IdRows
from models.layers import masked_mean

NUM_TASKS = len(GroupBatch.TASKS)


# ---------------------------------------------------------------- features
@dataclass(frozen=True)
class FeatureConfig:
    """Embedding width and how much of the behaviour sequence the summary sees."""

    emb_dim: int = 32
    # The user-side sequence summary is the mean over the most recent ``recent_len`` events.
    recent_len: int = 64
    # Add an action-bucket embedding to every behaviour token.
    use_actions: bool = True


def _check_range(name: str, ids: Tensor, size: int) -> None:
    if not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= size:
        raise ValueError(
            f"{name} holds index {low if low < 0 else high} outside its table [0, {size}); "
            "map unknown ids to 1 (OOV) before the model"
        )


class FeatureArch(nn.Module):
    """Embeddings and projections shared by the baselines (TorchRec's SparseArch + DenseArch role)."""

    def __init__(
        self, num_items: int, num_users: int, num_tags: int, user_dense_dim: int, config: FeatureConfig
    ) -> None:
        super().__init__()
        if min(num_items, num_users, num_tags) < 2:
            raise ValueError(
                f"tables need >= 2 rows (0 pad, 1 OOV): num_items={num_items}, "
                f"num_users={num_users}, num_tags={num_tags}"
            )
        if config.recent_len < 1:
            raise ValueError(f"features.recent_len={config.recent_len} must be >= 1")
        d = config.emb_dim
        self.config = config
        self.num_items, self.num_users, self.num_tags = num_items, num_users, num_tags
        self.user_dense_dim = user_dense_dim
        self.item_emb = embedding(num_items, d, padding_idx=0)  # shared by sequence and candidates
        self.user_emb = embedding(num_users, d)
        # Rare ids read the shared OOV row (models/id_rows.py); identity until training sets it.
        self.item_rows, self.user_rows = IdRows(num_items, "item"), IdRows(num_users, "user")
        self.action_emb = embedding(NUM_ACTIONS, d, padding_idx=0) if config.use_actions else None
        self.year_emb = embedding(NUM_YEAR_BUCKETS, d)
        self.tag_emb = embedding(num_tags, d, padding_idx=0)
        self.genre_proj = nn.Linear(NUM_GENRES, d)
        self.dense_proj = nn.Linear(user_dense_dim, d) if user_dense_dim else None
        self.user_dim = d * (3 if user_dense_dim else 2)
        self.cand_dim = 4 * d

    def validate(self, batch: GroupBatch) -> None:
        """Raise ValueError naming the field when the batch does not fit the tables."""
        _check_range("cand_item", batch.cand_item, self.num_items)
        _check_range("seq_item", batch.seq_item, self.num_items)
        _check_range("seq_action", batch.seq_action, NUM_ACTIONS)
        _check_range("cand_year", batch.cand_year, NUM_YEAR_BUCKETS)
        _check_range("cand_tags", batch.cand_tags, self.num_tags)
        if batch.user_dense.shape[-1] != self.user_dense_dim:
            raise ValueError(
                f"user_dense has {batch.user_dense.shape[-1]} features, model built "
                f"for user_dense_dim={self.user_dense_dim}"
            )
        if batch.cand_genres.shape[-1] != NUM_GENRES:
            raise ValueError(f"cand_genres width {batch.cand_genres.shape[-1]} != NUM_GENRES={NUM_GENRES}")
        _check_range("seq_len", batch.seq_len, batch.seq_item.shape[1] + 1)

    def recent_tokens(self, batch: GroupBatch, window: int) -> tuple[Tensor, Tensor]:
        """The last ``window`` positions of the left-padded sequence: tokens (B, W, d), valid mask (B, W)."""
        items = batch.seq_item[:, -window:]  # (B, W)
        width = items.shape[1]
        tokens = self.item_emb(self.item_rows(items))  # (B, W, d)
        if self.action_emb is not None:
            tokens = tokens + self.action_emb(batch.seq_action[:, -window:])
        # Valid events are the rightmost seq_len positions (left padding, most recent last).
        start = width - batch.seq_len.clamp(max=width)  # (B,)
        mask = torch.arange(width, device=items.device) >= start.unsqueeze(1)  # (B, W)
        return tokens, mask

    def user_side(self, batch: GroupBatch) -> Tensor:
        """(B, user_dim): user id, dense features and the recent-sequence mean; once per group."""
        tokens, mask = self.recent_tokens(batch, self.config.recent_len)
        seq_mean = masked_mean(tokens, mask, 1)  # (B, d)
        parts = [self.user_emb(self.user_rows(batch.user_id % self.num_users)), seq_mean]
        if self.dense_proj is not None:
            parts.append(self.dense_proj(batch.user_dense))
        return torch.cat(parts, dim=-1)

    def candidate_item(self, batch: GroupBatch) -> Tensor:
        """(B, N, d): the candidate item id embedding (DIN's attention query)."""
        return self.item_emb(self.item_rows(batch.cand_item))

    def candidate_side(self, batch: GroupBatch) -> Tensor:
        """(B, N, cand_dim): item id, year, mean tag embedding and genre projection."""
        tags = masked_mean(self.tag_emb(batch.cand_tags), batch.cand_tags != 0, 2)  # (B, N, d)
        return torch.cat(
            [self.candidate_item(batch), self.year_emb(batch.cand_year), tags, self.genre_proj(batch.cand_genres)],
            dim=-1,
        )


def _relu_tower(dims: tuple[int, ...], dropout: float) -> nn.Sequential:
    """Linear+ReLU(+Dropout) over consecutive ``dims`` (empty when len(dims) < 2)."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
    return nn.Sequential(*layers)


def _mask_padding(logits: Tensor, batch: GroupBatch) -> Tensor:
    return logits.masked_fill(~batch.cand_mask.unsqueeze(-1), 0.0)  # (B, N, tasks)


# ---------------------------------------------------------------- DLRM-MLP
@dataclass(frozen=True)
class DLRMConfig:
    """DLRM-MLP: concatenated features -> ReLU MLP -> task logits."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.0
    lr: float = 1e-3  # recommended Adam learning rate


class DLRMMLP(nn.Module):
    """The MLP baseline of RankMixer's comparison; the first layer's user half runs per group."""

    def __init__(
        self,
        num_items: int,
        config: DLRMConfig | None = None,
        *,
        num_users: int = 1 << 16,
        num_tags: int = 1024,
        user_dense_dim: int = NUM_USER_DENSE,
    ) -> None:
        super().__init__()
        self.config = config = config or DLRMConfig()
        if not config.hidden:
            raise ValueError("DLRMConfig.hidden needs at least one layer")
        self.features = FeatureArch(num_items, num_users, num_tags, user_dense_dim, config.features)
        self.first = SplitLinear(self.features.user_dim, self.features.cand_dim, config.hidden[0])
        self.tower = _relu_tower(config.hidden, config.dropout)
        self.head = nn.Linear(config.hidden[-1], NUM_TASKS)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, batch: GroupBatch) -> Tensor:
        self.features.validate(batch)
        user = self.features.user_side(batch)  # (B, Du)
        hidden = self.dropout(torch.relu(self.first(user, self.features.candidate_side(batch))))
        return _mask_padding(self.head(self.tower(hidden)), batch)


# ---------------------------------------------------------------- DCNv2
@dataclass(frozen=True)
class DCNConfig:
    """DCNv2: cross network ``x_{l+1} = x0 * (W x_l + b) + x_l`` beside/before a deep tower."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    num_cross_layers: int = 3
    # None = full-rank W (D x D); r = low-rank W = U Vᵀ with U, V of shape (D, r).
    cross_rank: int | None = None
    structure: Literal["stacked", "parallel"] = "parallel"
    hidden: tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    lr: float = 1e-3


class DCNv2(nn.Module):
    """DCNv2 (stacked: cross -> deep; parallel: cross ‖ deep) with per-group user halves."""

    def __init__(
        self,
        num_items: int,
        config: DCNConfig | None = None,
        *,
        num_users: int = 1 << 16,
        num_tags: int = 1024,
        user_dense_dim: int = NUM_USER_DENSE,
    ) -> None:
        super().__init__()
        self.config = config = config or DCNConfig()
        if config.structure not in ("stacked", "parallel") or not config.hidden:
            raise ValueError(
                f"DCNConfig: structure={config.structure!r} must be 'stacked' or 'parallel' "
                f"and hidden={config.hidden} non-empty"
            )
        self.features = FeatureArch(num_items, num_users, num_tags, user_dense_dim, config.features)
        user_dim, cand_dim = self.features.user_dim, self.features.cand_dim
        self.cross = CrossNetwork(user_dim, cand_dim, config.num_cross_layers, config.cross_rank)
        if config.structure == "parallel":
            self.deep_first: nn.Module = SplitLinear(user_dim, cand_dim, config.hidden[0])
            head_in = user_dim + cand_dim + config.hidden[-1]
        else:
            self.deep_first = nn.Linear(user_dim + cand_dim, config.hidden[0])
            head_in = config.hidden[-1]
        self.deep = _relu_tower(config.hidden, config.dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(head_in, NUM_TASKS)

    def forward(self, batch: GroupBatch) -> Tensor:
        self.features.validate(batch)
        user = self.features.user_side(batch)  # (B, Du)
        cand = self.features.candidate_side(batch)  # (B, N, Dc)
        x0 = torch.cat([user.unsqueeze(1).expand(-1, cand.shape[1], -1), cand], dim=-1)  # (B, N, D)
        crossed = self.cross(user, cand, x0)
        if self.config.structure == "parallel":
            deep = self.deep(self.dropout(torch.relu(self.deep_first(user, cand))))
            out = torch.cat([crossed, deep], dim=-1)
        else:
            out = self.deep(self.dropout(torch.relu(self.deep_first(crossed))))
        return _mask_padding(self.head(out), batch)


# ---------------------------------------------------------------- DIN
class Dice(nn.Module):
    """DIN's data-adaptive activation ``p x + (1 - p) α x``, ``p = σ((x - E[x]) / sqrt(Var[x] + ε))``.

    Statistics come from valid rows only (``mask``), so padding never shifts them; eval
    uses running statistics like BatchNorm.
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mean, var = self.running_mean, self.running_var
        if self.training:
            rows = x.reshape(-1, x.shape[-1]) if mask is None else x[mask]  # (M, dim)
            if rows.shape[0] > 1:
                mean, var = rows.mean(0), rows.var(0, unbiased=False)
                with torch.no_grad():
                    self.running_mean.lerp_(mean.detach(), self.momentum)
                    self.running_var.lerp_(var.detach(), self.momentum)
        p = torch.sigmoid((x - mean) / torch.sqrt(var + self.eps))
        return x * (p + (1 - p) * self.alpha)


class PReLULast(nn.Module):
    """PReLU with one slope per feature of the LAST dim (nn.PReLU puts channels on dim 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((dim,), 0.25))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return torch.where(x >= 0, x, self.alpha * x)


class ActTower(nn.Module):
    """Activation -> [Linear -> activation]*; activations see the valid-row ``mask``."""

    def __init__(self, dims: tuple[int, ...], activation: Literal["dice", "prelu"], dropout: float) -> None:
        super().__init__()
        if activation not in ("dice", "prelu"):
            raise ValueError(f"activation={activation!r}; expected 'dice' or 'prelu'")
        make = Dice if activation == "dice" else PReLULast
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(make(d) for d in dims)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.dropout(self.acts[0](x, mask))
        for linear, act in zip(self.linears, self.acts[1:]):
            x = self.dropout(act(linear(x), mask))
        return x


@dataclass(frozen=True)
class DINConfig:
    """DIN: candidate-specific attention pooling of the behaviour sequence (no softmax, as in the paper)."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    attention_hidden: tuple[int, ...] = (80, 40)
    hidden: tuple[int, ...] = (200, 80)
    activation: Literal["dice", "prelu"] = "dice"
    # Attention covers the most recent events only: its cost is B·N·L·d.
    max_attn_len: int = 200
    dropout: float = 0.0
    lr: float = 1e-3


class DIN(nn.Module):
    """Deep Interest Network with the activation unit over ``[s, c, s - c, s * c]``.

    The unit's first layer ``W [s; c; s-c; s*c]`` is reparametrised as ``A s + C c + X (s*c)``
    (same function class): ``A s`` runs once per group, ``C c`` once per candidate.
    """

    def __init__(
        self,
        num_items: int,
        config: DINConfig | None = None,
        *,
        num_users: int = 1 << 16,
        num_tags: int = 1024,
        user_dense_dim: int = NUM_USER_DENSE,
    ) -> None:
        super().__init__()
        self.config = config = config or DINConfig()
        if not config.attention_hidden or not config.hidden or config.max_attn_len < 1:
            raise ValueError("DINConfig: attention_hidden and hidden need >= 1 layer, max_attn_len >= 1")
        self.features = FeatureArch(num_items, num_users, num_tags, user_dense_dim, config.features)
        d, h = config.features.emb_dim, config.attention_hidden
        self.att_seq = nn.Linear(d, h[0])
        self.att_cand = nn.Linear(d, h[0], bias=False)
        self.att_cross = nn.Linear(d, h[0], bias=False)
        self.att_tower = ActTower(h, config.activation, 0.0)
        self.att_out = nn.Linear(h[-1], 1)
        self.first = SplitLinear(self.features.user_dim, self.features.cand_dim + d, config.hidden[0])
        self.tower = ActTower(config.hidden, config.activation, config.dropout)
        self.head = nn.Linear(config.hidden[-1], NUM_TASKS)

    def attention_pool(self, seq: Tensor, seq_mask: Tensor, query: Tensor, cand_mask: Tensor) -> Tensor:
        """``seq`` (B, L, d), ``query`` (B, N, d) -> interest vector (B, N, d) per candidate."""
        pair_mask = cand_mask.unsqueeze(2) & seq_mask.unsqueeze(1)  # (B, N, L)
        hidden = (
            self.att_seq(seq).unsqueeze(1)  # (B, 1, L, h) once per group
            + self.att_cand(query).unsqueeze(2)  # (B, N, 1, h)
            + self.att_cross(seq.unsqueeze(1) * query.unsqueeze(2))
        )  # (B, N, L, h)
        scores = self.att_out(self.att_tower(hidden, pair_mask)).squeeze(-1)  # (B, N, L)
        weights = scores * pair_mask.to(scores.dtype)  # unnormalised, padding contributes 0
        return torch.einsum("bnl,bld->bnd", weights, seq)

    def forward(self, batch: GroupBatch) -> Tensor:
        self.features.validate(batch)
        seq, seq_mask = self.features.recent_tokens(batch, self.config.max_attn_len)
        query = self.features.candidate_item(batch)  # (B, N, d)
        interest = self.attention_pool(seq, seq_mask, query, batch.cand_mask)
        cand = torch.cat([self.features.candidate_side(batch), interest], dim=-1)  # (B, N, Dc + d)
        hidden = self.tower(self.first(self.features.user_side(batch), cand), batch.cand_mask)
        return _mask_padding(self.head(hidden), batch)


# ---------------------------------------------------------------- registry
BASELINES: dict[str, tuple[type[nn.Module], type]] = {
    "dlrm_mlp": (DLRMMLP, DLRMConfig),
    "dcnv2": (DCNv2, DCNConfig),
    "din": (DIN, DINConfig),
}


def build_baseline(name: str, num_items: int, config: object | None = None, **sizes: int) -> nn.Module:
    """``build_baseline("din", num_items, DINConfig(...), num_users=..., num_tags=..., user_dense_dim=...)``."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
    model_cls, config_cls = BASELINES[name]
    if config is not None and not isinstance(config, config_cls):
        raise TypeError(f"baseline {name!r} takes a {config_cls.__name__}, got {type(config).__name__}")
    return model_cls(num_items, config, **sizes)
