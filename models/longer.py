"""LONGER: long-sequence encoder with global tokens, token merge and a user-side KV cache.

Paper: LONGER, arXiv 2505.04421 (spec: docs MODELS.md §5). Pipeline per group:

1. Event features: item embedding ++ action embedding ++ time-gap embedding -> linear,
   plus a learned absolute position counted from the most recent event (so extra left
   padding never shifts a position).
2. Token merge: K adjacent events -> one token, by concat + linear or by a tiny
   InnerTransformer inside each group followed by concat + linear. Groups are aligned
   at the most recent event, again so that left padding cannot shift them.
3. Hybrid attention. Layer 1 is cross-causal: queries = global tokens + the k most
   recent merged tokens, keys/values = all tokens. Layers 2.. are self-causal over
   those m + k tokens.

Mask rule [ours, required for caching]: a key that depends on the candidate is visible
to that candidate only. User-global tokens (CLS, user id, user cross tokens) see every
user-side token; sequence tokens see user-global tokens and sequence tokens at or before
their own position; a candidate sees every user-side token and itself. Hence all
user-side keys/values and outputs are candidate-independent: ``encode_user`` computes
them once (the KV cache) and ``score`` runs only each candidate's own attention.
``forward`` is the readable reference: the complete stack, one candidate at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.batch import NUM_ACTIONS, NUM_GAP_BUCKETS
from models.embedding_init import embedding
from models.layers import masked_mean

USER, CAND, SEQ = 0, 1, 2  # token kinds of the hybrid mask


@dataclass(frozen=True)
class LongerConfig:
    """Sizes of the LONGER encoder (paper main config: merge 8 + InnerTrans + 100 recent)."""

    item_dim: int = 64  # width E of the incoming item embeddings
    d_model: int = 64  # token width D
    num_heads: int = 4
    num_self_layers: int = 2  # self-causal layers after the cross-causal layer 1
    merge_k: int = 8  # events per merged token (1 = no merge)
    merge_mode: Literal["concat", "inner_transformer"] = "inner_transformer"
    inner_heads: int = 2
    num_recent: int = 100  # k most recent merged tokens used as layer-1 queries
    num_cls: int = 1
    max_seq_len: int = 2000  # rows of the position table (events)
    action_dim: int = 8
    gap_dim: int = 8
    ffn_mult: int = 2
    use_checkpoint: bool = False  # torch.utils.checkpoint per block while training

    def __post_init__(self) -> None:
        for name in (
            "item_dim",
            "d_model",
            "num_heads",
            "merge_k",
            "num_recent",
            "num_cls",
            "max_seq_len",
            "ffn_mult",
            "inner_heads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"LongerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_self_layers < 0:
            raise ValueError(f"LongerConfig.num_self_layers must be >= 0, got {self.num_self_layers}")
        if self.d_model % self.num_heads or self.d_model % self.inner_heads:
            raise ValueError(
                f"LongerConfig.d_model={self.d_model} must be divisible by "
                f"num_heads={self.num_heads} and inner_heads={self.inner_heads}"
            )
        if self.merge_mode not in ("concat", "inner_transformer"):
            raise ValueError(
                f"LongerConfig.merge_mode must be 'concat' or 'inner_transformer', got {self.merge_mode!r}"
            )


class LongerBlock(nn.Module):
    """Pre-norm attention block whose queries may be a subset of its keys."""

    def __init__(self, dim: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim)
        self.ffn_norm = nn.RMSNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, h, T, dh)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self._split(self.q_proj(self.attn_norm(x)))

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv_proj(self.attn_norm(x)).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual + output projection of the heads ``attn`` (B, h, T, dh), then the FFN."""
        b, h, t, dh = attn.shape
        x = x + self.out_proj(attn.transpose(1, 2).reshape(b, t, h * dh))  # (B, T, D)
        return x + self.ffn(self.ffn_norm(x))

    def forward(
        self, x: torch.Tensor, q_index: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens ``x[:, q_index]`` attend to all of ``x`` under ``mask`` (B, Q, T), True = visible.

        Returns the query outputs (B, Q, D) and the keys/values (B, h, T, dh) of ``x``.
        """
        xq = x.index_select(1, q_index)  # (B, Q, D)
        k, v = self.key_value(x)
        attn = F.scaled_dot_product_attention(self.query(xq), k, v, attn_mask=mask[:, None])
        return self.finish(xq, attn), k, v

    def forward_cached(
        self, c: torch.Tensor, k_user: torch.Tensor, v_user: torch.Tensor, key_valid: torch.Tensor
    ) -> torch.Tensor:
        """Candidates ``c`` (B, N, D) attend to cached user keys (B, h, Ku, dh) and to themselves.

        One softmax over [user keys ++ own key]; candidates never see each other.
        """
        q = self.query(c)  # (B, h, N, dh)
        k_self, v_self = self.key_value(c)
        scale = 1.0 / math.sqrt(q.shape[-1])
        s_user = (q @ k_user.transpose(-1, -2)) * scale  # (B, h, N, Ku)
        s_user = s_user.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        s_self = (q * k_self).sum(-1, keepdim=True) * scale  # (B, h, N, 1)
        w = torch.softmax(torch.cat([s_user, s_self], -1), dim=-1)
        attn = w[..., :-1] @ v_user + w[..., -1:] * v_self  # (B, h, N, dh)
        return self.finish(c, attn)


class TokenMerge(nn.Module):
    """K adjacent events -> one token: optional InnerTransformer in the group, then concat + linear."""

    def __init__(self, cfg: LongerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.inner = LongerBlock(d, cfg.inner_heads, cfg.ffn_mult) if cfg.merge_mode == "inner_transformer" else None
        self.proj = nn.Linear(cfg.merge_k * d, d)

    def forward(self, groups: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """groups (B, M, K, D) with event validity (B, M, K) -> merged tokens (B, M, D)."""
        b, m, k, d = groups.shape
        if self.inner is not None:
            g = groups.reshape(b * m, k, d)  # (B*M, K, D)
            gv = valid.reshape(b * m, k)
            # Padded events are invisible keys; the diagonal keeps all-padding groups finite.
            eye = torch.eye(k, dtype=torch.bool, device=g.device)
            mask = gv[:, None, :] | eye
            out, _, _ = self.inner(g, torch.arange(k, device=g.device), mask)
            groups = torch.where(gv[..., None], out, 0.0).view(b, m, k, d)
        return self.proj(groups.reshape(b, m, k * d))  # (B, M, D)


@dataclass
class LongerUserState:
    """Everything candidate-independent of one batch of users: the KV cache.

    ``kv[l]`` are the user-side keys/values of layer l (B, h, K_l, dh), layer 1 over
    [user globals ++ all merged tokens], later layers over [user globals ++ k recent].
    ``user_tokens`` (B, G + k, D) are the final outputs of those user-side queries.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    key_valid: list[torch.Tensor]  # per layer (B, K_l) bool
    user_tokens: torch.Tensor  # (B, G + k, D)
    token_valid: torch.Tensor  # (B, G + k) bool
    num_globals: int

    @property
    def batch_size(self) -> int:
        return int(self.user_tokens.shape[0])

    def summary_tokens(self) -> torch.Tensor:
        """Pooled user summary (B, G + 1, D): the global outputs + mean of valid recent outputs."""
        return summarize(self.user_tokens, self.token_valid, self.num_globals)

    def nbytes(self) -> int:
        """Bytes held by the cache (for byte-budgeted LRU caches in serving)."""
        ts = [t for kv in self.kv for t in kv] + self.key_valid + [self.user_tokens, self.token_valid]
        return sum(t.numel() * t.element_size() for t in ts)

    def select(self, rows: torch.Tensor) -> LongerUserState:
        """The state of users ``rows`` (1-D LongTensor), in that order."""
        return replace(
            self,
            kv=[(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.kv],
            key_valid=[m.index_select(0, rows) for m in self.key_valid],
            user_tokens=self.user_tokens.index_select(0, rows),
            token_valid=self.token_valid.index_select(0, rows),
        )

    @staticmethod
    def cat(states: list[LongerUserState]) -> LongerUserState:
        """Stack states of different users; shorter layer-1 key sets get masked filler keys."""
        if not states or len({s.num_globals for s in states}) != 1:
            raise ValueError("LongerUserState.cat needs >= 1 state, all with the same num_globals")
        kv, valid = [], []
        for layer in range(len(states[0].kv)):
            width = max(s.key_valid[layer].shape[1] for s in states)
            pads = [width - s.key_valid[layer].shape[1] for s in states]
            kv.append(
                tuple(torch.cat([F.pad(s.kv[layer][i], (0, 0, 0, p)) for s, p in zip(states, pads)]) for i in (0, 1))
            )
            valid.append(torch.cat([F.pad(s.key_valid[layer], (0, p)) for s, p in zip(states, pads)]))
        return LongerUserState(
            kv,
            valid,
            torch.cat([s.user_tokens for s in states]),
            torch.cat([s.token_valid for s in states]),
            states[0].num_globals,
        )


def summarize(user_tokens: torch.Tensor, token_valid: torch.Tensor, num_globals: int) -> torch.Tensor:
    """(..., G + k, D) user-side outputs -> (..., G + 1, D): globals + mean of the valid recent ones."""
    g = num_globals
    mean = masked_mean(user_tokens[..., g:, :], token_valid[..., g:], -2)  # (..., D)
    return torch.cat([user_tokens[..., :g, :], mean.unsqueeze(-2)], -2)


def hybrid_mask(kind: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, q_index: torch.Tensor) -> torch.Tensor:
    """Visibility (B, Q, T) of tokens (kind, pos: (T,), valid: (B, T)) from queries ``q_index``.

    USER queries see user-side keys; SEQ queries see USER keys and SEQ keys at or before
    their position; CAND queries see user-side keys and themselves.
    """
    qk, qp = kind[q_index, None], pos[q_index, None]  # (Q, 1)
    key_ids = torch.arange(kind.shape[0], device=kind.device)
    user_side = kind[None] != CAND  # (1, T)
    allowed = torch.where(
        qk == USER,
        user_side,
        torch.where(
            qk == CAND,
            user_side | (key_ids[None] == q_index[:, None]),
            (kind[None] == USER) | ((kind[None] == SEQ) & (pos[None] <= qp)),
        ),
    )
    return allowed[None] & valid[:, None, :]  # (B, Q, T)


class LongerEncoder(nn.Module):
    """LONGER sequence encoder: ``encode_user`` once per group, ``score`` per candidate."""

    def __init__(self, cfg: LongerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.action_emb = embedding(NUM_ACTIONS, cfg.action_dim)
        self.gap_emb = embedding(NUM_GAP_BUCKETS, cfg.gap_dim)
        self.event_proj = nn.Linear(cfg.item_dim + cfg.action_dim + cfg.gap_dim, d)
        self.pos_emb = embedding(cfg.max_seq_len, d)  # row 0 = most recent event
        self.merge = TokenMerge(cfg)
        self.cls = nn.Parameter(torch.randn(cfg.num_cls, d) * 0.02)
        self.blocks = nn.ModuleList(LongerBlock(d, cfg.num_heads, cfg.ffn_mult) for _ in range(1 + cfg.num_self_layers))
        self.out_norm = nn.RMSNorm(d)

    # ---- inputs -------------------------------------------------------------------------
    def _check_inputs(
        self,
        seq_emb: torch.Tensor,
        seq_action: torch.Tensor,
        seq_gap: torch.Tensor,
        seq_len: torch.Tensor,
        user_globals: torch.Tensor | None,
    ) -> None:
        if seq_emb.dim() != 3 or seq_emb.shape[-1] != self.cfg.item_dim:
            raise ValueError(f"seq_emb must be (B, L, {self.cfg.item_dim}), got {tuple(seq_emb.shape)}")
        b, length = seq_emb.shape[:2]
        for name, t in (("seq_action", seq_action), ("seq_gap", seq_gap)):
            if tuple(t.shape) != (b, length):
                raise ValueError(f"{name} must be (B, L)=({b}, {length}), got {tuple(t.shape)}")
        if tuple(seq_len.shape) != (b,):
            raise ValueError(f"seq_len must be (B,)=({b},), got {tuple(seq_len.shape)}")
        if length and (int(seq_action.min()) < 0 or int(seq_action.max()) >= NUM_ACTIONS):
            raise ValueError(f"seq_action ids must lie in [0, {NUM_ACTIONS})")
        if length and (int(seq_gap.min()) < 0 or int(seq_gap.max()) >= NUM_GAP_BUCKETS):
            raise ValueError(f"seq_gap ids must lie in [0, {NUM_GAP_BUCKETS})")
        if b and (int(seq_len.min()) < 0 or int(seq_len.max()) > min(length, self.cfg.max_seq_len)):
            raise ValueError(
                f"seq_len must lie in [0, min(L={length}, max_seq_len="
                f"{self.cfg.max_seq_len})], got max {int(seq_len.max())}"
            )
        if user_globals is not None and (
            user_globals.dim() != 3 or user_globals.shape[0] != b or user_globals.shape[2] != self.cfg.d_model
        ):
            raise ValueError(f"user_globals must be (B={b}, m_u, {self.cfg.d_model}), got {tuple(user_globals.shape)}")

    def embed_sequence(
        self, seq_emb: torch.Tensor, seq_action: torch.Tensor, seq_gap: torch.Tensor, seq_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded events (B, L) -> merged tokens (B, M, D) and their validity (B, M).

        M = max(ceil(L / K), num_recent); groups are aligned at the most recent event.
        """
        b, length, _ = seq_emb.shape
        k = self.cfg.merge_k
        idx = torch.arange(length, device=seq_emb.device)
        valid = idx[None] >= (length - seq_len)[:, None]  # (B, L)
        rev = (length - 1 - idx).clamp(max=self.cfg.max_seq_len - 1)  # 0 = most recent
        feats = torch.cat([seq_emb, self.action_emb(seq_action), self.gap_emb(seq_gap)], -1)
        x = self.event_proj(feats) + self.pos_emb(rev)  # (B, L, D)
        # where() rather than a product: padding rows may hold anything, even NaN.
        x = torch.where(valid[..., None], x, 0.0)
        m = max(-(-length // k), self.cfg.num_recent)
        pad = m * k - length
        x = F.pad(x, (0, 0, pad, 0))
        valid = F.pad(valid, (pad, 0), value=False)
        groups_valid = valid.view(b, m, k)
        merged = self._maybe_checkpoint(self.merge, x.view(b, m, k, -1), groups_valid)  # (B, M, D)
        return merged, groups_valid.any(-1)

    def _globals(self, user_globals: torch.Tensor | None, batch: int) -> torch.Tensor:
        cls = self.cls.expand(batch, -1, -1)  # (B, n_cls, D)
        return cls if user_globals is None else torch.cat([cls, user_globals], 1)

    # ---- attention stack ----------------------------------------------------------------
    def _maybe_checkpoint(self, fn: Callable[..., Any], *args: torch.Tensor) -> Any:
        if self.cfg.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _run_stack(
        self, glob: torch.Tensor, seq: torch.Tensor, seq_valid: torch.Tensor, cand: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor], torch.Tensor]:
        """Full hybrid stack over [globals ++ cand? ++ seq]; returns query outputs, K/V, validity."""
        b, g, _ = glob.shape
        c = 0 if cand is None else cand.shape[1]
        m, dev = seq.shape[1], seq.device
        x = torch.cat([glob] + ([cand] if cand is not None else []) + [seq], 1)  # (B, G+C+M, D)
        kind = torch.tensor([USER] * g + [CAND] * c + [SEQ] * m, device=dev)
        pos = torch.cat([torch.full((g + c,), -1, device=dev), torch.arange(m, device=dev)])
        valid = torch.cat([torch.ones(b, g + c, dtype=torch.bool, device=dev), seq_valid], 1)
        q_index = torch.cat(
            [torch.arange(g + c, device=dev), torch.arange(g + c + m - self.cfg.num_recent, g + c + m, device=dev)]
        )
        kvs, key_valid = [], []
        for block in self.blocks:
            x, k, v = self._maybe_checkpoint(block, x, q_index, hybrid_mask(kind, pos, valid, q_index))
            kvs.append((k, v))
            key_valid.append(valid)
            # After layer 1 the token set is the query set (self-causal layers over m + k).
            kind, pos, valid = kind[q_index], pos[q_index], valid[:, q_index]
            q_index = torch.arange(q_index.shape[0], device=dev)
        return x, kvs, key_valid, valid

    # ---- public API ---------------------------------------------------------------------
    def encode_user(
        self,
        seq_emb: torch.Tensor,
        seq_action: torch.Tensor,
        seq_gap: torch.Tensor,
        seq_len: torch.Tensor,
        user_globals: torch.Tensor | None = None,
    ) -> LongerUserState:
        """All candidate-independent work: per-layer user-side K/V and outputs (the KV cache).

        seq_emb (B, L, E) embedded items, seq_action/seq_gap (B, L) ids, seq_len (B,),
        user_globals (B, m_u, D) user-side global tokens (user id, crosses) or None.
        """
        self._check_inputs(seq_emb, seq_action, seq_gap, seq_len, user_globals)
        seq, seq_valid = self.embed_sequence(seq_emb, seq_action, seq_gap, seq_len)
        glob = self._globals(user_globals, seq.shape[0])
        out, kvs, key_valid, token_valid = self._run_stack(glob, seq, seq_valid)
        return LongerUserState(kvs, key_valid, self.out_norm(out), token_valid, glob.shape[1])

    def score(self, state: LongerUserState, cand_tokens: torch.Tensor) -> torch.Tensor:
        """Candidate outputs (B, N, D): each candidate attends to the cache and to itself."""
        if (
            cand_tokens.dim() != 3
            or cand_tokens.shape[0] != state.batch_size
            or cand_tokens.shape[2] != self.cfg.d_model
        ):
            raise ValueError(
                f"cand_tokens must be (B={state.batch_size}, N, {self.cfg.d_model}), got {tuple(cand_tokens.shape)}"
            )
        if len(state.kv) != len(self.blocks):
            raise ValueError(f"state has {len(state.kv)} layers, encoder has {len(self.blocks)}")
        c = cand_tokens
        for block, (k, v), valid in zip(self.blocks, state.kv, state.key_valid):
            c = self._maybe_checkpoint(block.forward_cached, c, k, v, valid)
        return self.out_norm(c)

    def forward(
        self,
        seq_emb: torch.Tensor,
        seq_action: torch.Tensor,
        seq_gap: torch.Tensor,
        seq_len: torch.Tensor,
        cand_tokens: torch.Tensor,
        user_globals: torch.Tensor | None = None,
        return_user_tokens: bool = False,
        return_summary: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reference without cache: the complete stack runs once per candidate, that candidate
        being the only candidate token. Returns (B, N, D) candidate outputs, and with
        ``return_user_tokens`` also each run's user-side outputs (B, N, G + k, D), or with
        ``return_summary`` each run's ``summarize``-d user tokens (B, N, G + 1, D).
        """
        self._check_inputs(seq_emb, seq_action, seq_gap, seq_len, user_globals)
        if (
            cand_tokens.dim() != 3
            or cand_tokens.shape[0] != seq_emb.shape[0]
            or cand_tokens.shape[2] != self.cfg.d_model
        ):
            raise ValueError(
                f"cand_tokens must be (B={seq_emb.shape[0]}, N, {self.cfg.d_model}), got {tuple(cand_tokens.shape)}"
            )
        b, n, d = cand_tokens.shape
        seq, seq_valid = self.embed_sequence(seq_emb, seq_action, seq_gap, seq_len)
        glob = self._globals(user_globals, b)
        # One row per (group, candidate): the stack runs as if that candidate were alone.
        glob, seq, seq_valid = (t.repeat_interleave(n, 0) for t in (glob, seq, seq_valid))
        out, _, _, valid = self._run_stack(glob, seq, seq_valid, cand_tokens.reshape(b * n, 1, d))
        out = self.out_norm(out)  # (B*N, G+1+k, D)
        g = glob.shape[1]
        cand_out = out[:, g].view(b, n, d)
        if not (return_user_tokens or return_summary):
            return cand_out
        user = torch.cat([out[:, :g], out[:, g + 1 :]], 1)  # the candidate's own column dropped
        if return_summary:
            user_valid = torch.cat([valid[:, :g], valid[:, g + 1 :]], 1)
            return cand_out, summarize(user, user_valid, g).view(b, n, g + 1, d)
        return cand_out, user.view(b, n, -1, d)


def flops(cfg: LongerConfig, seq_len: int, num_candidates: int, num_user_globals: int = 0) -> dict[str, float]:
    """Matmul FLOPs (2mnk) per group: user side once, per candidate, cached total and full total.

    ``full`` is the no-cache reference (sequence features shared, attention stack per candidate).
    """
    d, k, f = cfg.d_model, cfg.merge_k, cfg.ffn_mult
    m = max(-(-seq_len // k), cfg.num_recent)
    g, r = cfg.num_cls + num_user_globals, cfg.num_recent
    embed = 2 * seq_len * (cfg.item_dim + cfg.action_dim + cfg.gap_dim) * d + 2 * m * k * d * d
    if cfg.merge_mode == "inner_transformer":
        embed += m * k * (8 * d * d + 4 * k * d + 4 * f * d * d)

    def block(nq: int, nk: int) -> float:  # q/out proj + k/v proj + scores/AV + FFN
        return 4 * nq * d * d + 4 * nk * d * d + 4 * nq * nk * d + 4 * nq * f * d * d

    user = block(g + r, g + m) + cfg.num_self_layers * block(g + r, g + r)
    proj = 8 * d * d + 4 * f * d * d  # q, k, v, out projections + FFN of one candidate token
    per_cand = (proj + 4 * (g + m + 1) * d) + cfg.num_self_layers * (proj + 4 * (g + r + 1) * d)
    full_per_cand = block(g + 1 + r, g + 1 + m) + cfg.num_self_layers * block(g + 1 + r, g + 1 + r)
    return {
        "embed": float(embed),
        "user": float(embed + user),
        "per_candidate": float(per_cand),
        "cached_total": float(embed + user + num_candidates * per_cand),
        "full_total": float(embed + num_candidates * full_per_cand),
    }
