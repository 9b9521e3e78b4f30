"""RankMixer (arXiv 2507.15551): semantic tokenizer, token-mixing blocks, ReLU Sparse-MoE.

Block (post-LN, MODELS.md §2):

    S  = LN(TokenMix(X) + X)        # H = T heads: parameter-free cross-token exchange
    X' = LN(PFFN(S) + S)            # per-token FFN, weights NOT shared across tokens

Sparse-MoE variant: each token position owns E GELU experts gated by ``ReLU(h(s))``.
Two routers (DTSI): the training router is dense and drives the experts during training;
the inference router is sparse (an L1 penalty whose coefficient adapts towards a target
activation ratio) and is the only one used in eval, which is what gets validated and
served. [ours] The inference router is trained to reproduce the block's training OUTPUT
with its own gates (normalised squared error of the two expert sums, plus a term that
revives dead ReLU gates), with everything but that router detached, its input included.
Matching gate values alone, on an undetached input, let the served output differ from
the trained one by 42-88% per token and the distillation term shape the representation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import (
    ALL_TOKENS,
    AuxLosses,
    BackboneOutput,
    ExpertBank,
    ExpertDispatch,
    PerTokenFFN,
    PerTokenLinear,
    broadcast_rows,
    select_tokens,
    token_mix,
)

logger = logging.getLogger(__name__)

Side = Literal["user", "group"]


# ---------------------------------------------------------------- tokenizer
@dataclass(frozen=True)
class FeatureGroup:
    """A semantic group of features that becomes ``num_tokens`` tokens (one MLP, its output split).

    ``side="user"`` when every input is known from the user/request alone (computed once
    per group of candidates); ``"group"`` when any input depends on the candidate.
    """

    name: str
    in_dim: int
    side: Side = "group"
    num_tokens: int = 1


@dataclass(frozen=True)
class TokenizerConfig:
    """Feature groups (one token each) and the token width D."""

    groups: tuple[FeatureGroup, ...]
    dim: int
    hidden: int = 0  # hidden width of every group MLP; 0 -> dim
    use_global_token: bool = False  # TokenMixer-Large: MLP_g(concat(all groups)) as an extra token

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"TokenizerConfig: group names must be non-empty and unique, got {names}")
        for g in self.groups:
            if g.in_dim <= 0 or g.num_tokens <= 0 or "." in g.name or g.side not in ("user", "group"):
                raise ValueError(
                    f"TokenizerConfig: bad feature group {g} (in_dim > 0, num_tokens > 0, no '.', side user/group)"
                )

    @property
    def global_side(self) -> Side:
        """The global token reads every group, so it is USER only if every group is."""
        return "user" if all(g.side == "user" for g in self.groups) else "group"

    def side_groups(self, side: Side) -> tuple[FeatureGroup, ...]:
        return tuple(g for g in self.groups if g.side == side)

    def num_tokens(self, side: Literal["all", "user", "group"] = "all") -> int:
        if side == "all":
            return sum(g.num_tokens for g in self.groups) + int(self.use_global_token)
        has_global = self.use_global_token and self.global_side == side
        return sum(g.num_tokens for g in self.side_groups(side)) + int(has_global)


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class SemanticTokenizer(nn.Module):
    """Feature groups -> ``num_tokens`` tokens of width D each (one MLP per group whose output
    is split into its tokens), plus an optional global token.

    Token order: user-side group tokens, then group-side ones (the global token leads
    its side). ``forward(features, side)`` computes one side only, so UG-Sep can run the
    user side once per group (B rows) and the group side per candidate (B*N rows).
    """

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden or cfg.dim
        self.group_mlps = nn.ModuleDict(
            {g.name: _mlp(g.in_dim, hidden * g.num_tokens, cfg.dim * g.num_tokens) for g in cfg.groups}
        )
        total_in = sum(g.in_dim for g in cfg.groups)
        self.global_mlp = _mlp(total_in, hidden, cfg.dim) if cfg.use_global_token else None

    def _feature(self, features: Mapping[str, Tensor], group: FeatureGroup) -> Tensor:
        if group.name not in features:
            raise KeyError(f"SemanticTokenizer: missing features for group {group.name!r}; got {sorted(features)}")
        value = features[group.name]
        if value.shape[-1] != group.in_dim:
            raise ValueError(
                f"SemanticTokenizer: group {group.name!r} expects last dim {group.in_dim}, "
                f"got shape {tuple(value.shape)}"
            )
        return value

    def _global_token(self, features: Mapping[str, Tensor], lead: torch.Size) -> Tensor:
        parts = []
        for group in self.cfg.groups:  # user-side inputs broadcast over the candidate dims
            value = self._feature(features, group)
            value = value.reshape(*value.shape[:-1], *([1] * (len(lead) - value.dim() + 1)), value.shape[-1])
            parts.append(value.expand(*lead, group.in_dim))
        return self.global_mlp(torch.cat(parts, dim=-1))  # (..., D)

    def _side_tokens(self, features: Mapping[str, Tensor], side: Side) -> Tensor:
        groups = self.cfg.side_groups(side)
        # (..., k, D) per group: the group MLP's output split into its k tokens
        tokens = [self.group_mlps[g.name](self._feature(features, g)).unflatten(-1, (-1, self.cfg.dim)) for g in groups]
        if self.global_mlp is not None and self.cfg.global_side == side:
            lead = tokens[0].shape[:-2] if tokens else self._feature(features, self.cfg.groups[0]).shape[:-1]
            tokens.insert(0, self._global_token(features, lead).unsqueeze(-2))
        if not tokens:
            raise ValueError(f"SemanticTokenizer: no {side}-side feature groups configured")
        return torch.cat(tokens, dim=-2)  # (..., T_side, D)

    def forward(self, features: Mapping[str, Tensor], side: Literal["all", "user", "group"] = "all") -> Tensor:
        """``features[name]``: (..., in_dim). Returns (..., T_side, D).

        For ``side="all"`` user features may have fewer leading dims (e.g. (B, F) beside
        group features (B, N, F)); their tokens are computed once and broadcast.
        """
        if side != "all":
            return self._side_tokens(features, side)
        if not self.cfg.side_groups("group"):
            return self._side_tokens(features, "user")
        group = self._side_tokens(features, "group")
        if self.cfg.num_tokens("user") == 0:
            return group
        user = self._side_tokens(features, "user")
        user = user.reshape(*user.shape[:-2], *([1] * (group.dim() - user.dim())), *user.shape[-2:])
        return torch.cat([user.expand(*group.shape[:-2], *user.shape[-2:]), group], dim=-2)


# ---------------------------------------------------------------- backbone
@dataclass(frozen=True)
class ReLUMoEConfig:
    """RankMixer Sparse-MoE of the PFFN; ``num_experts=0`` keeps the dense PFFN."""

    num_experts: int = 0
    expert_expansion: float = 2.0  # hidden width of every expert, as a multiple of D
    target_active_ratio: float = 0.5  # wanted fraction of inference gates > 0
    l1_coef_init: float = 0.01
    l1_coef_rate: float = 0.1  # log-space step of the adaptive L1 coefficient per training step
    distill_weight: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass(frozen=True)
class RankMixerConfig:
    """Backbone shape (paper sizes: 100M = D768/T16/L2, 1B = D1536/T32/L2)."""

    num_tokens: int = 16
    dim: int = 768
    num_layers: int = 2
    expansion: float = 2.0  # PFFN hidden = expansion * D (k ~ 2 gives the paper's FLOPs)
    moe: ReLUMoEConfig = field(default_factory=ReLUMoEConfig)

    def __post_init__(self) -> None:
        if min(self.num_tokens, self.dim, self.num_layers) <= 0:
            raise ValueError(f"RankMixerConfig: num_tokens, dim, num_layers must be positive: {self}")
        if self.dim % self.num_tokens:
            raise ValueError(
                f"RankMixerConfig: TokenMix uses H = T heads, so num_tokens={self.num_tokens} "
                f"must divide dim={self.dim}"
            )
        if not 0.0 < self.moe.target_active_ratio <= 1.0:
            raise ValueError(
                f"RankMixerConfig: moe.target_active_ratio must be in (0, 1], got {self.moe.target_active_ratio}"
            )


class ReLUPerTokenMoE(nn.Module):
    """E GELU experts per token position with ReLU gates; dense-train / sparse-infer routers."""

    def __init__(self, num_tokens: int, dim: int, cfg: ReLUMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, self.hidden = cfg.num_experts, max(1, round(cfg.expert_expansion * dim))
        self.router_train = PerTokenLinear(num_tokens, dim, e)
        self.router_infer = PerTokenLinear(num_tokens, dim, e)
        bound_in, bound_out = dim**-0.5, self.hidden**-0.5
        self.w_in = ExpertBank(num_tokens, e, dim, self.hidden, lambda w: w.uniform_(-bound_in, bound_in))
        self.b_in = nn.Parameter(torch.zeros(num_tokens, e, self.hidden))
        self.w_out = ExpertBank(num_tokens, e, self.hidden, dim, lambda w: w.uniform_(-bound_out, bound_out))
        self.b_out = nn.Parameter(torch.zeros(num_tokens, e, dim))
        # Adaptive L1 coefficient: training state, saved with the weights, not a parameter.
        self.register_buffer("l1_coef", torch.tensor(float(cfg.l1_coef_init)))

    def expert_hidden(self, x: Tensor, tokens: slice = ALL_TOKENS) -> Tensor:
        """Every expert's hidden activation ``GELU(x W_in + b_in)``: (..., T', d) -> (..., T', E, h)."""
        return F.gelu(self.w_in.all_experts(x, tokens) + select_tokens(self.b_in, tokens))

    def combine_dense(self, hidden: Tensor, gates: Tensor, tokens: slice = ALL_TOKENS, detach: bool = False) -> Tensor:
        """``sum_e gates[..., t, e] * (hidden[..., t, e] W_out + b_out)``; ``detach`` freezes W_out, b_out."""
        w_out, b_out = select_tokens(self.w_out.weight, tokens), select_tokens(self.b_out, tokens)
        if detach:
            w_out, b_out = w_out.detach(), b_out.detach()
        # Folding the gate in before the second matmul makes it one contraction over (e, h).
        out = torch.einsum("...teh,tehd->...td", gates.unsqueeze(-1) * hidden, w_out)
        return out + torch.einsum("...te,ted->...td", gates, b_out)

    def experts_dense(self, x: Tensor, gates: Tensor, tokens: slice = ALL_TOKENS) -> Tensor:
        """``sum_e gates[..., t, e] * expert_{t,e}(x[..., t])`` computing every expert."""
        return self.combine_dense(self.expert_hidden(x, tokens), gates, tokens)

    def experts_sparse(self, x: Tensor, gates: Tensor, tokens: slice = ALL_TOKENS) -> Tensor:
        """Same sum, computing only experts whose gate is > 0 (grouped bmm over active pairs)."""
        lead, (t, d), e = x.shape[:-2], x.shape[-2:], self.cfg.num_experts
        flat_gates = gates.reshape(-1, t * e)  # (M, T'*E), column = token * E + expert
        row, col = flat_gates.nonzero(as_tuple=True)
        plan = ExpertDispatch.build(col, row * t + col // e, t * e)
        buf = plan.permute(x.reshape(-1, d))  # (G, C, d)
        b_in, b_out = select_tokens(self.b_in, tokens).flatten(0, 1), select_tokens(self.b_out, tokens).flatten(0, 1)
        h = F.gelu(self.w_in.grouped_mm(buf, plan.counts, tokens, bias=b_in))  # (G, C, h)
        out = self.w_out.grouped_mm(h, plan.counts, tokens, bias=b_out)  # (G, C, d)
        return plan.combine(out, flat_gates[row, col], x.numel() // d).view(*lead, t, d)

    def forward(self, x: Tensor, tokens: slice = ALL_TOKENS, aux: AuxLosses | None = None) -> Tensor:
        """Eval: the inference router, sparse experts. Train: the training router, dense experts,
        plus the inference router's losses in ``aux`` (``inference_router_losses``)."""
        if not self.training:
            return self.experts_sparse(x, F.relu(self.router_infer(x, tokens)), tokens)
        aux = AuxLosses() if aux is None else aux
        train_gates = F.relu(self.router_train(x, tokens))  # (..., T', E)
        hidden = self.expert_hidden(x, tokens)  # (..., T', E, h)
        out = self.combine_dense(hidden, train_gates, tokens)
        self.inference_router_losses(x, hidden, train_gates, out, tokens, aux)
        return out

    def inference_router_losses(
        self, x: Tensor, hidden: Tensor, train_gates: Tensor, out: Tensor, tokens: slice, aux: AuxLosses
    ) -> None:
        """Train the inference router to serve what training computes, sparsely (DTSI, [ours]).

        Everything but ``router_infer`` is detached, its input included: these losses must
        shape the router, never the experts or the representation it reads.
        - ``moe_distill``: normalised squared error between the inference-gated expert sum
          (what eval computes) and the training output, plus a revival term pulling a dead
          inference gate (ReLU input <= 0) towards the training gate where that one is open;
          a dead ReLU gets no gradient from the output term, and dead gates are how the
          served output drifted from the trained one.
        - ``moe_l1``: the L1 sparsity pull, its coefficient steered towards
          ``target_active_ratio`` (updated by training steps only, not by no-grad forwards).
        """
        logits = self.router_infer(x.detach(), tokens)  # (..., T', E)
        infer_gates = F.relu(logits)
        served = self.combine_dense(hidden.detach(), infer_gates, tokens, detach=True)
        target, target_gates = out.detach(), train_gates.detach()
        mismatch = (served - target).square().mean() / target.square().mean().clamp_min(1e-12)
        dead = (logits <= 0) & (target_gates > 0)
        revival = ((logits - target_gates).square() * dead).mean()
        aux.add("moe_distill", self.cfg.distill_weight * (mismatch + revival))
        aux.add("moe_l1", self.l1_coef.clone() * infer_gates.mean())  # clone: updated in place below
        active = (infer_gates > 0).float().mean()
        aux.metrics["moe_active_ratio"] = float(active)
        aux.metrics["moe_served_rel_err"] = float(mismatch.detach().sqrt())
        if torch.is_grad_enabled():
            with torch.no_grad():  # steer the L1 strength towards the target activation ratio
                step = self.cfg.l1_coef_rate * (active - self.cfg.target_active_ratio) / self.cfg.target_active_ratio
                self.l1_coef.mul_(torch.exp(step)).clamp_(1e-6, 1e3)


class RankMixerBlock(nn.Module):
    """``S = LN(TokenMix(X) + X); X' = LN(PFFN(S) + S)`` as ``finish(content(x), x)``.

    ``content`` is the parameter-free cross-token half; ``finish`` is token-local, which is
    what UG-Sep separates (``user_content``/``group_content``, models/ugsep.py).
    """

    def __init__(self, cfg: RankMixerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mix_norm = nn.LayerNorm(cfg.dim)
        self.ffn_norm = nn.LayerNorm(cfg.dim)
        if cfg.moe.enabled:
            self.ffn: nn.Module = ReLUPerTokenMoE(cfg.num_tokens, cfg.dim, cfg.moe)
        else:
            self.ffn = PerTokenFFN(cfg.num_tokens, cfg.dim, max(1, round(cfg.expansion * cfg.dim)))

    def content(self, x: Tensor, aux: AuxLosses) -> Tensor:
        """TokenMix(X): (..., T, D) -> (..., T, D)."""
        return token_mix(x, self.cfg.num_tokens)

    def finish(self, content: Tensor, x: Tensor, aux: AuxLosses, tokens: slice = ALL_TOKENS) -> Tensor:
        """``S = LN(content + X); X' = LN(PFFN(S) + S)`` at the positions ``tokens`` that ``x`` holds."""
        s = self.mix_norm(content + x)
        return self.ffn_norm(self.ffn(s, tokens, aux) + s)

    def forward(self, x: Tensor, aux: AuxLosses) -> Tensor:
        return self.finish(self.content(x, aux), x, aux)

    # ---- UG-Sep: mixing is a copy, so the user side caches nothing beyond its tokens
    def user_content(self, x_user: Tensor, aux: AuxLosses) -> tuple[Tensor, None]:
        """Content at the T_u user positions with every group token zero: (B, T_u, D) -> (B, T_u, D)."""
        num_user = x_user.shape[-2]
        padded = F.pad(x_user, (0, 0, 0, self.cfg.num_tokens - num_user))  # (B, T, D), group tokens zero
        return token_mix(padded, self.cfg.num_tokens)[..., :num_user, :], None

    def group_content(self, x_user: Tensor, cache: None, x_group: Tensor, aux: AuxLosses) -> Tensor:
        """Full content (B, N, T, D) from user tokens (B, T_u, D) and group tokens (B, N, T_g, D)."""
        user = broadcast_rows(x_user, x_group).expand(*x_group.shape[:-2], *x_user.shape[-2:])
        return token_mix(torch.cat([user, x_group], -2), self.cfg.num_tokens)


class RankMixer(nn.Module):
    """Stack of RankMixer blocks: (..., T, D) tokens -> ``BackboneOutput`` (mean-pooled)."""

    def __init__(self, cfg: RankMixerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(RankMixerBlock(cfg) for _ in range(cfg.num_layers))
        # The backbone interface UG-Sep wraps (TokenMixerLarge has real ones): RankMixer's
        # blocks end in LayerNorm, with no inter-layer residual and no shallow heads.
        self.final_norm = nn.Identity()
        self.residual_layers: tuple[int, ...] = ()

    def shallow_head(self, layer: int) -> nn.Module | None:
        return None

    def forward(self, x: Tensor) -> BackboneOutput:
        if x.shape[-2:] != (self.cfg.num_tokens, self.cfg.dim):
            raise ValueError(
                f"RankMixer expects tokens (..., {self.cfg.num_tokens}, {self.cfg.dim}), got {tuple(x.shape)}"
            )
        aux = AuxLosses()
        for block in self.blocks:
            x = block(x, aux)
        return BackboneOutput(tokens=x, pooled=x.mean(-2), aux=aux)


def pffn_flops_per_token(cfg: RankMixerConfig) -> int:
    """Forward matmul FLOPs of one token's PFFN (for MoE: the dense-training cost, both routers)."""
    if cfg.moe.enabled:
        hidden = max(1, round(cfg.moe.expert_expansion * cfg.dim)) * cfg.moe.num_experts
        router = 2 * 2 * cfg.dim * cfg.moe.num_experts
    else:
        hidden, router = max(1, round(cfg.expansion * cfg.dim)), 0
    return 4 * cfg.dim * hidden + router


def rankmixer_flops_per_sample(cfg: RankMixerConfig) -> int:
    """Forward matmul FLOPs per sample: ~4kLTD^2 for the dense model."""
    return cfg.num_layers * cfg.num_tokens * pffn_flops_per_token(cfg)
