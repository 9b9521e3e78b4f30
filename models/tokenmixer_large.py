"""TokenMixer-Large backbone (arXiv 2602.06563).

Block = Mix -> per-token SwiGLU -> Revert -> per-token SwiGLU, with the second residual
aligned to the ORIGINAL token (MODELS.md §3):

    post-norm:  Hn = Norm(pSwiGLU_mix(Hm) + Hm)      X' = Norm(pSwiGLU_rev(Xr) + X)
    pre-norm:   Hn = Hm + pSwiGLU_mix(Norm(Hm))      X' = X + pSwiGLU_rev(Norm(Xr))
    where Hm = Mix(X) (H mixed tokens of width T*D/H) and Xr = Revert(Hn).

Extras from the paper: a global token (built by ``SemanticTokenizer``), small
down-projection init, inter-layer residuals every r blocks (never after the last),
auxiliary logits from shallow layers, and the Sparse-Pertoken MoE: every token position
owns E SwiGLU experts + one always-on shared expert, softmax top-k routing per token,
routed sum scaled by alpha = E/k. The MoE runs REAL sparse dispatch (permute ->
one grouped bmm over (token, expert) groups -> combine); ``forward_dense_reference``
computes every expert and is the correctness oracle only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import (
    ALL_TOKENS,
    AuxLosses,
    BackboneOutput,
    ExpertDispatch,
    PerTokenLinear,
    PerTokenSwiGLU,
    RMSNorm,
    select_tokens,
    swiglu,
    token_mix,
    token_revert,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparseMoEConfig:
    """Sparse-Pertoken MoE of the per-token SwiGLUs; ``num_experts=0`` keeps them dense."""

    num_experts: int = 0
    top_k: int = 2
    # Hidden width of every expert (and of the shared expert) as a multiple of the token width.
    expert_expansion: float = 1.0
    load_balance_weight: float = 0.01

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @property
    def alpha(self) -> float:
        """Routed-sum scale E/k: top-k softmax weights sum to ~k/E, so the sum keeps unit scale."""
        return self.num_experts / self.top_k


@dataclass(frozen=True)
class TokenMixerLargeConfig:
    """Backbone shape: T tokens of width D (the global token counts as one), L blocks, H heads."""

    num_tokens: int = 16
    dim: int = 512
    num_layers: int = 4
    heads: int | None = None  # None -> H = T (mixed tokens have the token width)
    expansion: float = 4.0  # dense SwiGLU hidden = expansion * width
    norm: Literal["pre", "post"] = "pre"
    residual_every: int = 2  # inter-layer residual every r blocks; 0 disables
    down_init_std: float = 0.01
    aux_layers: tuple[int, ...] = ()  # blocks whose output feeds an auxiliary logit head
    num_tasks: int = 2
    moe: SparseMoEConfig = field(default_factory=SparseMoEConfig)

    def __post_init__(self) -> None:
        if min(self.num_tokens, self.dim, self.num_layers, self.num_mix_heads) <= 0:
            raise ValueError(f"TokenMixerLargeConfig: num_tokens, dim, num_layers, heads must be positive: {self}")
        if self.dim % self.num_mix_heads:
            raise ValueError(f"TokenMixerLargeConfig: heads={self.num_mix_heads} must divide dim={self.dim}")
        if self.residual_every < 0:
            raise ValueError(f"TokenMixerLargeConfig: residual_every must be >= 0, got {self.residual_every}")
        bad = [i for i in self.aux_layers if not 0 <= i < self.num_layers - 1]
        if bad:
            raise ValueError(
                f"TokenMixerLargeConfig: aux_layers {bad} must be shallow blocks in [0, {self.num_layers - 2}]"
            )
        moe = self.moe
        if moe.enabled and not 0 < moe.top_k <= moe.num_experts:
            raise ValueError(
                f"TokenMixerLargeConfig: moe.top_k={moe.top_k} must be in [1, num_experts={moe.num_experts}]"
            )

    @property
    def num_mix_heads(self) -> int:
        return self.num_tokens if self.heads is None else self.heads

    @property
    def mix_width(self) -> int:
        """Width of a mixed token: T*D/H."""
        return self.num_tokens * self.dim // self.num_mix_heads

    @property
    def residual_layers(self) -> tuple[int, ...]:
        """Blocks after which the inter-layer residual is added: every r-th, never the last."""
        r = self.residual_every
        if r == 0:
            return ()
        return tuple(i for i in range(self.num_layers - 1) if (i + 1) % r == 0)


def _hidden(expansion: float, width: int) -> int:
    return max(1, round(expansion * width))


def ffn_flops(cfg: TokenMixerLargeConfig, positions: int, width: int) -> int:
    """Forward matmul FLOPs (2mnk) of one per-token SwiGLU layer over ``positions`` tokens."""
    swiglu = lambda hidden: 6 * width * hidden  # gate+up (2*d*2h) + down (2*h*d)
    if not cfg.moe.enabled:
        return positions * swiglu(_hidden(cfg.expansion, width))
    expert = swiglu(_hidden(cfg.moe.expert_expansion, width))
    router = 2 * width * cfg.moe.num_experts
    return positions * (router + (1 + cfg.moe.top_k) * expert)


def flops_per_sample(cfg: TokenMixerLargeConfig) -> int:
    """Forward matmul FLOPs of the backbone for one sample (active experts only for MoE)."""
    per_block = ffn_flops(cfg, cfg.num_mix_heads, cfg.mix_width) + ffn_flops(cfg, cfg.num_tokens, cfg.dim)
    heads = len(cfg.aux_layers) * 2 * cfg.dim * cfg.num_tasks
    return cfg.num_layers * per_block + heads


class SparsePerTokenMoE(nn.Module):
    """E SwiGLU experts per token position + one shared expert, softmax top-k routing."""

    quantizable_params = ("gate_up", "down")  # (T, E, d_in, d_out) expert weights, for W8A16

    def __init__(self, num_tokens: int, dim: int, cfg: SparseMoEConfig, down_init_std: float | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden = hidden = _hidden(cfg.expert_expansion, dim)
        e = cfg.num_experts
        self.router = PerTokenLinear(num_tokens, dim, e, bias=False)
        self.shared = PerTokenSwiGLU(num_tokens, dim, hidden, down_init_std)
        # (T, E, d, 2h) and (T, E, h, d): flattening (T, E) gives the per-group weights.
        self.gate_up = nn.Parameter(torch.empty(num_tokens, e, dim, 2 * hidden).uniform_(-(dim**-0.5), dim**-0.5))
        down_std = hidden**-0.5 if down_init_std is None else down_init_std
        self.down = nn.Parameter(torch.empty(num_tokens, e, hidden, dim).normal_(0.0, down_std))

    def _route(self, x: Tensor, tokens: slice, aux: AuxLosses) -> tuple[Tensor, Tensor]:
        """Top-k expert ids (..., T', k) and their weights alpha * softmax prob."""
        probs = torch.softmax(self.router(x, tokens).float(), dim=-1)  # (..., T', E)
        top_p, top_i = probs.topk(self.cfg.top_k, dim=-1)  # (..., T', k)
        if self.training and self.cfg.load_balance_weight > 0:
            e = self.cfg.num_experts
            rows_p = probs.reshape(-1, *probs.shape[-2:])  # (M, T', E)
            share = F.one_hot(top_i, e).reshape(rows_p.shape[0], -1, self.cfg.top_k, e).sum(2)
            frac = share.float().mean(0) / self.cfg.top_k  # (T', E) routed fraction
            balance = e * (frac * rows_p.mean(0)).sum(-1).mean()
            aux.add("load_balance", self.cfg.load_balance_weight * balance)
        return top_i, (self.cfg.alpha * top_p).to(x.dtype)

    def forward(self, x: Tensor, tokens: slice = ALL_TOKENS, aux: AuxLosses | None = None) -> Tensor:
        """Sparse dispatch: only the k chosen experts of each (row, token) are computed."""
        aux = AuxLosses() if aux is None else aux
        top_i, top_w = self._route(x, tokens, aux)
        lead, (t, d), k, e = x.shape[:-2], x.shape[-2:], self.cfg.top_k, self.cfg.num_experts
        rows = x.reshape(-1, d)  # (M*T', d), row = m*T' + t
        pos = torch.arange(t, device=x.device).view(1, t, 1)
        groups = (pos * e + top_i.reshape(-1, t, k)).flatten()  # group = (token, expert)
        src = (torch.arange(rows.shape[0], device=x.device).view(-1, t, 1)).expand(-1, t, k).flatten()
        plan = ExpertDispatch.build(groups, src, t * e)
        buf = plan.permute(rows)  # (G, C, d)
        act = swiglu(torch.bmm(buf, select_tokens(self.gate_up, tokens).reshape(t * e, d, -1)), self.hidden)
        out = torch.bmm(act, select_tokens(self.down, tokens).reshape(t * e, self.hidden, d))  # (G, C, d)
        picked = plan.gather(out).view(*lead, t, k, d)  # caller order: (row, token, slot)
        routed = (picked * top_w.unsqueeze(-1)).sum(-2)  # (..., T', d)
        return self.shared(x, tokens) + routed

    def forward_dense_reference(self, x: Tensor, tokens: slice = ALL_TOKENS) -> Tensor:
        """Every expert on every token, weighted by the same top-k gates (oracle for tests)."""
        top_i, top_w = self._route(x, tokens, AuxLosses())
        weights = torch.zeros(*top_i.shape[:-1], self.cfg.num_experts, dtype=x.dtype, device=x.device)
        weights.scatter_(-1, top_i, top_w)  # (..., T', E), zero off the top-k
        gate, up = torch.einsum("...td,tedh->...teh", x, select_tokens(self.gate_up, tokens)).split(self.hidden, -1)
        expert_out = torch.einsum("...teh,tehd->...ted", F.silu(gate) * up, select_tokens(self.down, tokens))
        return self.shared(x, tokens) + (weights.unsqueeze(-1) * expert_out).sum(-2)


def _make_ffn(cfg: TokenMixerLargeConfig, positions: int, width: int) -> nn.Module:
    if cfg.moe.enabled:
        return SparsePerTokenMoE(positions, width, cfg.moe, cfg.down_init_std)
    return PerTokenSwiGLU(positions, width, _hidden(cfg.expansion, width), cfg.down_init_std)


class TokenMixerLargeBlock(nn.Module):
    """One Mix -> pSwiGLU -> Revert -> pSwiGLU block; split in two steps for UG-Sep."""

    def __init__(self, cfg: TokenMixerLargeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mix_ffn = _make_ffn(cfg, cfg.num_mix_heads, cfg.mix_width)
        self.rev_ffn = _make_ffn(cfg, cfg.num_tokens, cfg.dim)
        self.mix_norm = RMSNorm(cfg.mix_width)
        self.rev_norm = RMSNorm(cfg.dim)

    def _ffn(self, ffn: nn.Module, x: Tensor, tokens: slice, aux: AuxLosses) -> Tensor:
        if isinstance(ffn, SparsePerTokenMoE):
            return ffn(x, tokens, aux)
        return ffn(x, tokens)

    def mix_step(self, x: Tensor, aux: AuxLosses) -> Tensor:
        """(..., T, D) -> Xr = Revert(Hn), (..., T, D): every output token sees every input token."""
        heads = self.cfg.num_mix_heads
        hm = token_mix(x, heads)  # (..., H, T*D/H)
        if self.cfg.norm == "pre":
            hn = hm + self._ffn(self.mix_ffn, self.mix_norm(hm), ALL_TOKENS, aux)
        else:
            hn = self.mix_norm(self._ffn(self.mix_ffn, hm, ALL_TOKENS, aux) + hm)
        return token_revert(hn, heads, self.cfg.num_tokens)  # (..., T, D)

    def revert_step(self, xr: Tensor, x: Tensor, aux: AuxLosses, tokens: slice = ALL_TOKENS) -> Tensor:
        """Token-local second half; ``tokens`` selects which positions ``xr``/``x`` hold."""
        if self.cfg.norm == "pre":
            return x + self._ffn(self.rev_ffn, self.rev_norm(xr), tokens, aux)
        return self.rev_norm(self._ffn(self.rev_ffn, xr, tokens, aux) + x)

    def forward(self, x: Tensor, aux: AuxLosses) -> Tensor:
        return self.revert_step(self.mix_step(x, aux), x, aux)


class TokenMixerLarge(nn.Module):
    """Stack of TokenMixer-Large blocks: (..., T, D) tokens -> ``BackboneOutput``."""

    def __init__(self, cfg: TokenMixerLargeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(TokenMixerLargeBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.dim) if cfg.norm == "pre" else nn.Identity()
        self.aux_heads = nn.ModuleDict({str(i): nn.Linear(cfg.dim, cfg.num_tasks) for i in cfg.aux_layers})

    def forward(self, x: Tensor) -> BackboneOutput:
        cfg = self.cfg
        if x.shape[-2:] != (cfg.num_tokens, cfg.dim):
            raise ValueError(f"TokenMixerLarge expects tokens (..., {cfg.num_tokens}, {cfg.dim}), got {tuple(x.shape)}")
        aux, shallow = AuxLosses(), []
        skip = x
        for i, block in enumerate(self.blocks):
            x = block(x, aux)
            if i in cfg.residual_layers:
                x = skip = x + skip
            if str(i) in self.aux_heads:
                shallow.append(self.aux_heads[str(i)](x.mean(-2)))
        x = self.final_norm(x)
        return BackboneOutput(tokens=x, pooled=x.mean(-2), shallow_logits=tuple(shallow), aux=aux)
