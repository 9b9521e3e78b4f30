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

Every block has the two halves UG-Sep separates: ``content`` (Mix -> pSwiGLU -> Revert,
the only place tokens exchange information) and ``finish`` (token-local). For UG-Sep,
``user_content`` runs the user tokens' share of the mix half once per group and
``group_content`` completes it per candidate: the mix FFN's first layer is linear and
bias-free, so its input ``[user slices ; group slices]`` splits into a per-group part and
a per-candidate part, and pre-norm's RMSNorm is a per-row scale assembled from the two
halves' squared norms (``models/layers.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import (
    ALL_TOKENS,
    AuxLosses,
    BackboneOutput,
    ExpertBank,
    ExpertDispatch,
    PerTokenLinear,
    PerTokenSwiGLU,
    RMSNorm,
    broadcast_rows,
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
    # Blocks whose output feeds an auxiliary logit head (shallow-layer BCE, MODELS.md §3);
    # None -> one head at the middle of the stack (block L//2 - 1), none for a single block.
    aux_layers: tuple[int, ...] | None = None
    num_tasks: int = 2
    moe: SparseMoEConfig = field(default_factory=SparseMoEConfig)

    def __post_init__(self) -> None:
        if min(self.num_tokens, self.dim, self.num_layers, self.num_mix_heads) <= 0:
            raise ValueError(f"TokenMixerLargeConfig: num_tokens, dim, num_layers, heads must be positive: {self}")
        if self.dim % self.num_mix_heads:
            raise ValueError(f"TokenMixerLargeConfig: heads={self.num_mix_heads} must divide dim={self.dim}")
        if self.residual_every < 0:
            raise ValueError(f"TokenMixerLargeConfig: residual_every must be >= 0, got {self.residual_every}")
        bad = [i for i in self.shallow_layers if not 0 <= i < self.num_layers - 1]
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
    def shallow_layers(self) -> tuple[int, ...]:
        """Blocks with an auxiliary logit head (``aux_layers`` resolved)."""
        if self.aux_layers is not None:
            return tuple(self.aux_layers)
        return (self.num_layers // 2 - 1,) if self.num_layers >= 2 else ()

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
    heads = len(cfg.shallow_layers) * 2 * cfg.dim * cfg.num_tasks
    return cfg.num_layers * per_block + heads


class MoEPartial(NamedTuple):
    """The user features' share of a Sparse-Pertoken MoE's first layer, once per group (B rows).

    Every expert's share is kept: which k experts a candidate row uses is only known once
    its group half has been routed.
    """

    router: Tensor  # (B, T, E) router logits
    shared: Tensor  # (B, T, 2h) the shared expert's gate/up pre-activation
    experts: Tensor  # (B, T, E, 2h) every expert's gate/up pre-activation


class SparsePerTokenMoE(nn.Module):
    """E SwiGLU experts per token position + one shared expert, softmax top-k routing."""

    # Layers that ``first_partial``/``forward_split`` call on input-feature blocks (``UGSepBackbone.input_splits``).
    split_input_layers = ("router", "shared.gate_up", "gate_up")

    def __init__(self, num_tokens: int, dim: int, cfg: SparseMoEConfig, down_init_std: float | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden = hidden = _hidden(cfg.expert_expansion, dim)
        e = cfg.num_experts
        self.router = PerTokenLinear(num_tokens, dim, e, bias=False)
        self.shared = PerTokenSwiGLU(num_tokens, dim, hidden, down_init_std)
        # (T, E, d, 2h) and (T, E, h, d): flattening (T, E) gives the per-group weights.
        self.gate_up = ExpertBank(num_tokens, e, dim, 2 * hidden, lambda w: w.uniform_(-(dim**-0.5), dim**-0.5))
        down_std = hidden**-0.5 if down_init_std is None else down_init_std
        self.down = ExpertBank(num_tokens, e, hidden, dim, lambda w: w.normal_(0.0, down_std))

    def _route(self, logits: Tensor, aux: AuxLosses) -> tuple[Tensor, Tensor]:
        """Router logits (..., T', E) -> top-k expert ids (..., T', k) and weights alpha * softmax prob."""
        probs = torch.softmax(logits.float(), dim=-1)  # (..., T', E)
        top_p, top_i = probs.topk(self.cfg.top_k, dim=-1)  # (..., T', k)
        if self.training and self.cfg.load_balance_weight > 0:
            e = self.cfg.num_experts
            rows_p = probs.reshape(-1, *probs.shape[-2:])  # (M, T', E)
            share = F.one_hot(top_i, e).reshape(rows_p.shape[0], -1, self.cfg.top_k, e).sum(2)
            frac = share.float().mean(0) / self.cfg.top_k  # (T', E) routed fraction
            balance = e * (frac * rows_p.mean(0)).sum(-1).mean()
            aux.add("load_balance", self.cfg.load_balance_weight * balance)
        return top_i, (self.cfg.alpha * top_p).to(logits.dtype)

    def _dispatch(self, top_i: Tensor) -> ExpertDispatch:
        """The (row, token, slot) assignments of top-k ids (..., T', k), grouped by (token, expert)."""
        t, k, e = top_i.shape[-2], self.cfg.top_k, self.cfg.num_experts
        pos = torch.arange(t, device=top_i.device).view(1, t, 1)
        groups = (pos * e + top_i.reshape(-1, t, k)).flatten()  # group = (token, expert)
        rows = torch.arange(top_i.numel() // (t * k), device=top_i.device).view(-1, 1, 1)
        src = (rows * t + pos).expand(-1, t, k).flatten()  # input row m*T' + t
        return ExpertDispatch.build(groups, src, t * e)

    def _experts_out(self, pre: Tensor, plan: ExpertDispatch, top_w: Tensor, tokens: slice) -> Tensor:
        """Gate/up pre-activations in the group buffer (G, C, 2h) -> weighted routed sum (..., T', d)."""
        out = self.down.grouped_mm(swiglu(pre, self.hidden), plan.counts, tokens)  # (G, C, d)
        picked = plan.gather(out).view(*top_w.shape, out.shape[-1])  # caller order: (row, token, slot, d)
        return (picked * top_w.unsqueeze(-1)).sum(-2)  # (..., T', d)

    def forward(self, x: Tensor, tokens: slice = ALL_TOKENS, aux: AuxLosses | None = None) -> Tensor:
        """Sparse dispatch: only the k chosen experts of each (row, token) are computed."""
        aux = AuxLosses() if aux is None else aux
        top_i, top_w = self._route(self.router(x, tokens), aux)
        plan = self._dispatch(top_i)
        pre = self.gate_up.grouped_mm(plan.permute(x.reshape(-1, x.shape[-1])), plan.counts, tokens)  # (G, C, 2h)
        return self.shared(x, tokens) + self._experts_out(pre, plan, top_w, tokens)

    # ---- split input (UG-Sep): x = [x_user ; x_group] along the features, all T positions
    def first_partial(self, x_user: Tensor) -> MoEPartial:
        """The user features' (..., T, k) share of the router, shared expert and every expert."""
        user_inputs = slice(0, x_user.shape[-1])
        experts = self.gate_up.all_experts(x_user, inputs=user_inputs)  # (..., T, E, 2h)
        return MoEPartial(self.router(x_user, inputs=user_inputs), self.shared.first_partial(x_user), experts)

    def forward_split(
        self, x_group: Tensor | None, partial: MoEPartial, scale: Tensor | None = None, aux: AuxLosses | None = None
    ) -> Tensor:
        """``forward(scale * [x_user ; x_group])`` from ``partial = first_partial(x_user)``.

        Shapes as ``PerTokenSwiGLU.forward_split``: ``partial`` per group (B, T, ...),
        ``x_group`` (B, N, T, d - k) or None for a zero group half, ``scale`` (..., T, 1).
        """
        aux = AuxLosses() if aux is None else aux
        logits = partial.router
        if x_group is not None:
            group_inputs = slice(self.router.in_features - x_group.shape[-1], None)
            logits = self.router(x_group, inputs=group_inputs, per_group=logits)
        top_i, top_w = self._route(logits if scale is None else logits * scale, aux)
        t, k, e = top_i.shape[-2], self.cfg.top_k, self.cfg.num_experts
        plan = self._dispatch(top_i)
        # The user share of assignment (row m, token t, expert e) is partial.experts[m // N, t, e].
        rows = torch.arange(top_i.numel() // (t * k), device=top_i.device).view(-1, 1, 1)  # m = b*N + n
        group_rows = rows // (rows.shape[0] // partial.router.shape[0])  # b
        user_ids = (group_rows * t + torch.arange(t, device=rows.device).view(1, t, 1)) * e + top_i.reshape(-1, t, k)
        user_ids = user_ids.flatten()
        pre = plan.place(partial.experts.reshape(-1, partial.experts.shape[-1]).index_select(0, user_ids))
        if x_group is not None:
            d_group = x_group.shape[-1]
            group_buf = plan.permute(x_group.reshape(-1, d_group))  # (G, C, d - k)
            group_inputs = slice(self.gate_up.in_features - d_group, None)
            pre = pre + self.gate_up.grouped_mm(group_buf, plan.counts, inputs=group_inputs)
        if scale is not None:
            pre = pre * plan.permute(scale.reshape(-1, 1))
        shared = self.shared.forward_split(x_group, partial.shared, scale)
        return shared + self._experts_out(pre, plan, top_w, ALL_TOKENS)

    def forward_dense_reference(self, x: Tensor, tokens: slice = ALL_TOKENS) -> Tensor:
        """Every expert on every token, weighted by the same top-k gates (oracle for tests)."""
        top_i, top_w = self._route(self.router(x, tokens), AuxLosses())
        weights = torch.zeros(*top_i.shape[:-1], self.cfg.num_experts, dtype=x.dtype, device=x.device)
        weights.scatter_(-1, top_i, top_w)  # (..., T', E), zero off the top-k
        gate, up = self.gate_up.all_experts(x, tokens).split(self.hidden, -1)  # (..., T', E, h) each
        down = select_tokens(self.down.weight, tokens)  # (T', E, h, d)
        expert_out = torch.einsum("...teh,tehd->...ted", F.silu(gate) * up, down)
        return self.shared(x, tokens) + (weights.unsqueeze(-1) * expert_out).sum(-2)


def _make_ffn(cfg: TokenMixerLargeConfig, positions: int, width: int) -> nn.Module:
    if cfg.moe.enabled:
        return SparsePerTokenMoE(positions, width, cfg.moe, cfg.down_init_std)
    return PerTokenSwiGLU(positions, width, _hidden(cfg.expansion, width), cfg.down_init_std)


class MixCache(NamedTuple):
    """One block's user-side mixing, reused by every candidate of the group (B rows)."""

    mixed: Tensor  # (B, H, k): the user tokens' slices of every mixed token, k = T_u*D/H
    partial: Tensor | MoEPartial  # the mix FFN's first layer on them (RMSNorm weight folded in)
    sq_norm: Tensor | None  # (B, H, 1) their squared L2 norm: part of pre-norm's RMSNorm scale


class TokenMixerLargeBlock(nn.Module):
    """One Mix -> pSwiGLU -> Revert -> pSwiGLU block: ``finish(content(x), x)``."""

    def __init__(self, cfg: TokenMixerLargeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mix_ffn = _make_ffn(cfg, cfg.num_mix_heads, cfg.mix_width)
        self.rev_ffn = _make_ffn(cfg, cfg.num_tokens, cfg.dim)
        self.mix_norm = RMSNorm(cfg.mix_width)
        self.rev_norm = RMSNorm(cfg.dim)

    def content(self, x: Tensor, aux: AuxLosses) -> Tensor:
        """(..., T, D) -> Xr = Revert(Hn), (..., T, D): every output token sees every input token."""
        heads = self.cfg.num_mix_heads
        hm = token_mix(x, heads)  # (..., H, T*D/H)
        if self.cfg.norm == "pre":
            hn = hm + self.mix_ffn(self.mix_norm(hm), ALL_TOKENS, aux)
        else:
            hn = self.mix_norm(self.mix_ffn(hm, ALL_TOKENS, aux) + hm)
        return token_revert(hn, heads, self.cfg.num_tokens)  # (..., T, D)

    def finish(self, content: Tensor, x: Tensor, aux: AuxLosses, tokens: slice = ALL_TOKENS) -> Tensor:
        """Token-local second half; ``tokens`` selects which positions ``content``/``x`` hold."""
        if self.cfg.norm == "pre":
            return x + self.rev_ffn(self.rev_norm(content), tokens, aux)
        return self.rev_norm(self.rev_ffn(content, tokens, aux) + x)

    def forward(self, x: Tensor, aux: AuxLosses) -> Tensor:
        return self.finish(self.content(x, aux), x, aux)

    # ---- UG-Sep: the mix half with the user tokens' share computed once per group
    def user_content(self, x_user: Tensor, aux: AuxLosses) -> tuple[Tensor, MixCache]:
        """Content at the T_u user positions with every group token zero (the masked mix), at batch B,
        and what ``group_content`` reuses. ``x_user``: (B, T_u, D) -> (B, T_u, D)."""
        heads, width = self.cfg.num_mix_heads, self.cfg.mix_width
        mixed = token_mix(x_user, heads)  # (B, H, k): user columns of every mixed token
        k = mixed.shape[-1]
        if self.cfg.norm == "pre":
            cache = MixCache(
                mixed,
                self.mix_ffn.first_partial(mixed * self.mix_norm.weight[:k]),
                mixed.square().sum(-1, keepdim=True),
            )
            out = self.mix_ffn.forward_split(None, cache.partial, self.mix_norm.inv_rms(cache.sq_norm), aux)
            hn_user = mixed + out[..., :k]  # (B, H, k)
        else:
            cache = MixCache(mixed, self.mix_ffn.first_partial(mixed), None)
            out = self.mix_ffn.forward_split(None, cache.partial, None, aux)  # (B, H, W)
            hn_user = self.mix_norm(out + F.pad(mixed, (0, width - k)))[..., :k]
        # A user position's content holds only user columns, so reverting them alone is exact.
        return token_revert(hn_user, heads, x_user.shape[-2]), cache

    def group_content(self, x_user: Tensor, cache: MixCache, x_group: Tensor, aux: AuxLosses) -> Tensor:
        """Full content at all T positions for every candidate, from the cached user share:
        ``x_group`` (B, N, T_g, D) -> (B, N, T, D). Only the group columns run at B*N in the
        first layer; the down projection and residual run on the whole mixed token."""
        heads, k = self.cfg.num_mix_heads, cache.mixed.shape[-1]
        mixed_group = token_mix(x_group, heads)  # (B, N, H, W - k)
        user = broadcast_rows(cache.mixed, mixed_group).expand(*mixed_group.shape[:-1], k)
        mixed = torch.cat([user, mixed_group], -1)  # (B, N, H, W)
        if self.cfg.norm == "pre":
            sq_norm = broadcast_rows(cache.sq_norm, mixed_group) + mixed_group.square().sum(-1, keepdim=True)
            group_in = mixed_group * self.mix_norm.weight[k:]
            hn = mixed + self.mix_ffn.forward_split(group_in, cache.partial, self.mix_norm.inv_rms(sq_norm), aux)
        else:
            hn = self.mix_norm(self.mix_ffn.forward_split(mixed_group, cache.partial, None, aux) + mixed)
        return token_revert(hn, heads, self.cfg.num_tokens)  # (B, N, T, D)


class TokenMixerLarge(nn.Module):
    """Stack of TokenMixer-Large blocks: (..., T, D) tokens -> ``BackboneOutput``."""

    def __init__(self, cfg: TokenMixerLargeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(TokenMixerLargeBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.dim) if cfg.norm == "pre" else nn.Identity()
        self.aux_heads = nn.ModuleDict({str(i): nn.Linear(cfg.dim, cfg.num_tasks) for i in cfg.shallow_layers})
        self.residual_layers = cfg.residual_layers

    def shallow_head(self, layer: int) -> nn.Module | None:
        """The auxiliary logit head after block ``layer``, if it has one."""
        return self.aux_heads[str(layer)] if str(layer) in self.aux_heads else None

    def forward(self, x: Tensor) -> BackboneOutput:
        cfg = self.cfg
        if x.shape[-2:] != (cfg.num_tokens, cfg.dim):
            raise ValueError(f"TokenMixerLarge expects tokens (..., {cfg.num_tokens}, {cfg.dim}), got {tuple(x.shape)}")
        aux, shallow = AuxLosses(), []
        skip = x
        for i, block in enumerate(self.blocks):
            x = block(x, aux)
            if i in self.residual_layers:
                x = skip = x + skip
            head = self.shallow_head(i)
            if head is not None:
                shallow.append(head(x.mean(-2)))
        x = self.final_norm(x)
        return BackboneOutput(tokens=x, pooled=x.mean(-2), shallow_logits=tuple(shallow), aux=aux)
