"""UG-Sep: User-Group Separation of a token-mixing backbone (arXiv 2602.10455; details ours).

T = T_u user tokens (first) + T_g group tokens. Every layer computes, per position, a
"content" that the token-local second half turns into the next token state:

    TokenMixer-Large: content = Revert(pSwiGLU_mix-half(Mix(X)))   finish = pSwiGLU_rev-half
    RankMixer:        content = TokenMix(X)                        finish = LN(. + X) -> PFFN

Masked mixing: user positions take their content from the mix of the user tokens only
(group tokens zeroed); group positions take the mix of everything. The finish is
token-local and the residual token-aligned, so by induction user tokens are functions
of user inputs only: they are computed once per group (batch B) and reused by all N
candidates (batch B*N). Information Compensation gives the GROUP tokens, through a
gated path, what the mask removed from the user positions (full content - masked
content at user positions); it never writes into user tokens.

Cost per candidate: everything user-only runs once per group. RankMixer's group side
skips the user tokens' whole layer. TokenMixer-Large's mix half feeds every token, but
its first layer is linear: each mixed token is [user slices ; group slices], so the user
slices' share of the gate/up projection (and of the MoE router, every expert and RMSNorm's
squared norm) is computed at batch B (``user_content`` -> ``MixCache``) and only the group
slices' share, the down projection and the group positions' revert half run at B*N
(``group_content``); ``flops_per_candidate`` counts it.

``forward_user`` + ``forward_group`` is the fast path; ``forward`` recomputes the user
tokens for every candidate with an explicit mask and is the reference it must equal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn

from models.layers import (
    ALL_TOKENS,
    AuxLosses,
    BackboneOutput,
    PerTokenLinear,
    cat_trees,
    map_tensors,
    tree_nbytes,
)
from models.rankmixer import RankMixer, RankMixerConfig, pffn_flops_per_token
from models.tokenmixer_large import MixCache, TokenMixerLarge, TokenMixerLargeConfig, ffn_flops

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UGSepConfig:
    """Which backbone to separate and how many of its T tokens (the first ones) are USER tokens."""

    num_user_tokens: int = 8
    use_compensation: bool = True
    backbone: Literal["tokenmixer_large", "rankmixer"] = "tokenmixer_large"
    tokenmixer_large: TokenMixerLargeConfig = field(default_factory=TokenMixerLargeConfig)
    rankmixer: RankMixerConfig = field(default_factory=RankMixerConfig)

    def __post_init__(self) -> None:
        if not 0 < self.num_user_tokens < self.num_tokens:
            raise ValueError(
                f"UGSepConfig: num_user_tokens={self.num_user_tokens} must be in "
                f"[1, {self.num_tokens - 1}] (the backbone has {self.num_tokens} tokens)"
            )

    @property
    def backbone_config(self) -> TokenMixerLargeConfig | RankMixerConfig:
        return self.tokenmixer_large if self.backbone == "tokenmixer_large" else self.rankmixer

    @property
    def num_tokens(self) -> int:
        return self.backbone_config.num_tokens

    @property
    def num_group_tokens(self) -> int:
        return self.num_tokens - self.num_user_tokens

    @property
    def dim(self) -> int:
        return self.backbone_config.dim


@dataclass
class UserTokenStates:
    """Per-layer user-side states the group side needs; computed once per group (B rows)."""

    tokens: tuple[Tensor, ...]  # L+1 x (B, T_u, D): input of every layer, then the last output
    contents: tuple[Tensor, ...]  # L x (B, T_u, D): masked content at user positions
    caches: tuple[MixCache | None, ...]  # L x the user share of each layer's mixing (None: RankMixer)
    output: Tensor  # (B, T_u, D): final user tokens (after the final norm)
    aux: AuxLosses = field(default_factory=AuxLosses)

    def take(self, rows: Tensor) -> UserTokenStates:
        """States of groups ``rows`` (1-D index): gather per-request states from a cache."""
        pick = lambda tree: map_tensors(lambda t: t.index_select(0, rows), tree)
        return replace(
            self,
            tokens=pick(self.tokens),
            contents=pick(self.contents),
            caches=pick(self.caches),
            output=pick(self.output),
            aux=AuxLosses(),
        )

    def nbytes(self) -> int:
        """Bytes held (serving cache budget)."""
        return tree_nbytes((self.tokens, self.contents, self.caches, self.output))

    @staticmethod
    def cat(states: list[UserTokenStates]) -> UserTokenStates:
        """States of several groups stacked in order (serving scores a whole batch at once)."""
        trees = [(s.tokens, s.contents, s.caches, s.output) for s in states]
        tokens, contents, caches, output = cat_trees(trees)
        return UserTokenStates(tokens, contents, caches, output)


def _mix_ffn_flops(tml: TokenMixerLargeConfig, in_features: int) -> int:
    """Forward FLOPs of one mixed position's FFN when only ``in_features`` of its inputs are
    new (the rest come from a cached partial): first layer on those, down projection whole."""
    width, e = tml.mix_width, tml.moe.num_experts
    if not tml.moe.enabled:
        hidden = max(1, round(tml.expansion * width))
        return 2 * in_features * 2 * hidden + 2 * hidden * width
    hidden = max(1, round(tml.moe.expert_expansion * width))
    per_expert = 2 * in_features * 2 * hidden + 2 * hidden * width
    return 2 * in_features * e + (1 + tml.moe.top_k) * per_expert


def flops_per_candidate(cfg: UGSepConfig, num_candidates: int) -> float:
    """Forward matmul FLOPs per candidate with user-side reuse (user path amortised over N)."""
    t_u, t_g, d = cfg.num_user_tokens, cfg.num_group_tokens, cfg.dim
    if cfg.backbone == "tokenmixer_large":
        tml = cfg.tokenmixer_large
        heads, user_width = tml.num_mix_heads, t_u * d // tml.num_mix_heads
        # User side (batch B): the masked mix with the user slices only, plus the user revert half;
        # with an MoE the first layer of every expert runs on the user slices (any may be picked).
        user_mix = _mix_ffn_flops(tml, user_width)
        if tml.moe.enabled:
            hidden = max(1, round(tml.moe.expert_expansion * tml.mix_width))
            user_mix += (tml.moe.num_experts - tml.moe.top_k) * 2 * user_width * 2 * hidden
        user = heads * user_mix + ffn_flops(tml, t_u, d)
        group = heads * _mix_ffn_flops(tml, tml.mix_width - user_width) + ffn_flops(tml, t_g, d)
        shallow = len(tml.shallow_layers) * 2 * d * tml.num_tasks
    else:
        per_token = pffn_flops_per_token(cfg.rankmixer)
        user, group, shallow = t_u * per_token, t_g * per_token, 0
    compensation = (2 * t_g * t_u * d + 2 * 2 * t_g * d * d) if cfg.use_compensation else 0
    layers = cfg.backbone_config.num_layers
    return layers * (group + compensation + user / num_candidates) + shallow


class InformationCompensation(nn.Module):
    """Gated path from the masked-out user-position content into the group tokens.

    ``route`` mixes the T_u masked-out slots into T_g group slots; a per-group-token value
    projection (small init: starts near the plain masked model) is gated elementwise by a
    sigmoid of the group token's own content.
    """

    def __init__(self, num_user: int, num_group: int, dim: int) -> None:
        super().__init__()
        self.route = nn.Parameter(torch.full((num_group, num_user), 1.0 / num_user))
        self.value = PerTokenLinear(num_group, dim, dim, init_std=0.01)
        self.gate = PerTokenLinear(num_group, dim, dim)

    def forward(self, masked_out: Tensor, group_content: Tensor) -> Tensor:
        """``masked_out``: (..., T_u, D), ``group_content``: (..., T_g, D) -> (..., T_g, D)."""
        *lead, num_user, dim = masked_out.shape
        # Route as ONE (T_g, T_u) @ (T_u, M*D) GEMM in token-major layout (an einsum broadcasts the
        # tiny route matrix over M rows: ~5x slower on CPU); the result is what the per-token value
        # projection reads without a copy.
        rows = masked_out.reshape(-1, num_user, dim).transpose(0, 1).reshape(num_user, -1)  # (T_u, M*D)
        routed = (self.route @ rows).view(-1, rows.shape[1] // dim, dim).transpose(0, 1)  # (M, T_g, D) view
        return torch.sigmoid(self.gate(group_content)) * self.value(routed.reshape(*lead, -1, dim))


class UGSepBackbone(nn.Module):
    """A TokenMixer-Large or RankMixer backbone with user/group separation."""

    def __init__(self, cfg: UGSepConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.backbone == "tokenmixer_large":
            self.backbone: TokenMixerLarge | RankMixer = TokenMixerLarge(cfg.tokenmixer_large)
        else:
            self.backbone = RankMixer(cfg.rankmixer)
        t_u, t_g, d = cfg.num_user_tokens, cfg.num_group_tokens, cfg.dim
        layers = len(self.backbone.blocks)
        self.compensation = (
            nn.ModuleList(InformationCompensation(t_u, t_g, d) for _ in range(layers)) if cfg.use_compensation else None
        )
        self.user_tokens, self.group_tokens = slice(0, t_u), slice(t_u, cfg.num_tokens)

    def input_splits(self) -> dict[str, int]:
        """Layers the fast path calls on the two halves of their input ``[user slices ; group slices]``
        (module path -> width k of the user half): the first layer of TokenMixer-Large's mix FFN.
        ``models/quant.py`` stores their int8 weights as those two column blocks."""
        if self.cfg.backbone != "tokenmixer_large":
            return {}
        tml = self.cfg.tokenmixer_large
        k = self.cfg.num_user_tokens * tml.dim // tml.num_mix_heads  # user columns of a mixed token
        return {
            f"backbone.blocks.{i}.mix_ffn.{name}": k
            for i, block in enumerate(self.backbone.blocks)
            for name in block.mix_ffn.split_input_layers
        }

    def _check(self, name: str, x: Tensor, num_tokens: int, ndim: int) -> None:
        if x.dim() != ndim or x.shape[-2:] != (num_tokens, self.cfg.dim):
            raise ValueError(
                f"UGSepBackbone: {name} must have {ndim} dims ending in ({num_tokens}, {self.cfg.dim}), "
                f"got {tuple(x.shape)}"
            )

    # ------------------------------------------------------------ fast path
    def forward_user(self, x_user: Tensor) -> UserTokenStates:
        """User path at batch B: ``x_user`` (B, T_u, D) -> per-layer user states."""
        self._check("x_user", x_user, self.cfg.num_user_tokens, 3)
        aux, tokens, contents, caches = AuxLosses(), [x_user], [], []
        x = skip = x_user
        for i, block in enumerate(self.backbone.blocks):
            content, cache = block.user_content(x, aux)  # (B, T_u, D): the masked mix
            x = block.finish(content, x, aux, self.user_tokens)
            if i in self.backbone.residual_layers:
                x = skip = x + skip
            tokens.append(x)
            contents.append(content)
            caches.append(cache)
        return UserTokenStates(tuple(tokens), tuple(contents), tuple(caches), self.backbone.final_norm(x), aux)

    def forward_group(self, states: UserTokenStates, x_group: Tensor) -> BackboneOutput:
        """Group path at batch B*N: ``x_group`` (B, N, T_g, D) -> tokens (B, N, T, D).

        User states are broadcast to the N candidates, never recomputed.
        """
        self._check("x_group", x_group, self.cfg.num_group_tokens, 4)
        b, n = x_group.shape[:2]
        if states.output.shape[0] != b:
            raise ValueError(f"UGSepBackbone: states hold {states.output.shape[0]} groups, x_group has {b}")
        per_cand = lambda t: t.unsqueeze(1).expand(b, n, *t.shape[1:])  # (B, N, T_u, D) view
        aux, shallow = AuxLosses(), []
        aux.merge(states.aux)
        x = skip = x_group
        for i, block in enumerate(self.backbone.blocks):
            content = block.group_content(states.tokens[i], states.caches[i], x, aux)  # (B, N, T, D)
            group_content = content[..., self.group_tokens, :]
            if self.compensation is not None:
                masked_out = content[..., self.user_tokens, :] - per_cand(states.contents[i])
                group_content = group_content + self.compensation[i](masked_out, group_content)
            x = block.finish(group_content, x, aux, self.group_tokens)
            if i in self.backbone.residual_layers:
                x = skip = x + skip
            head = self.backbone.shallow_head(i)
            if head is not None:
                pooled = (states.tokens[i + 1].sum(-2).unsqueeze(1) + x.sum(-2)) / self.cfg.num_tokens
                shallow.append(head(pooled))
        tokens = torch.cat([per_cand(states.output), self.backbone.final_norm(x)], dim=-2)  # (B, N, T, D)
        return BackboneOutput(tokens=tokens, pooled=tokens.mean(-2), shallow_logits=tuple(shallow), aux=aux)

    # ------------------------------------------------------------ reference path
    def forward(self, x_user: Tensor, x_group: Tensor) -> BackboneOutput:
        """Reference: every candidate recomputes the user tokens with an explicit token mask.

        ``x_user`` (B, T_u, D), ``x_group`` (B, N, T_g, D) -> tokens (B, N, T, D).
        """
        self._check("x_user", x_user, self.cfg.num_user_tokens, 3)
        self._check("x_group", x_group, self.cfg.num_group_tokens, 4)
        b, n = x_group.shape[:2]
        x = torch.cat([x_user.unsqueeze(1).expand(b, n, *x_user.shape[1:]), x_group], dim=-2)
        is_user = torch.arange(self.cfg.num_tokens, device=x.device) < self.cfg.num_user_tokens
        user_only = is_user.to(x.dtype).unsqueeze(-1)  # (T, 1): zeroes the group tokens
        aux, shallow, skip = AuxLosses(), [], x
        for i, block in enumerate(self.backbone.blocks):
            full, masked = block.content(x, aux), block.content(x * user_only, aux)
            content = torch.where(is_user.unsqueeze(-1), masked, full)
            if self.compensation is not None:
                extra = self.compensation[i]((full - masked)[..., self.user_tokens, :], full[..., self.group_tokens, :])
                content = content + torch.cat([torch.zeros_like(masked[..., self.user_tokens, :]), extra], dim=-2)
            x = block.finish(content, x, aux, ALL_TOKENS)
            if i in self.backbone.residual_layers:
                x = skip = x + skip
            head = self.backbone.shallow_head(i)
            if head is not None:
                shallow.append(head(x.mean(-2)))
        x = self.backbone.final_norm(x)
        return BackboneOutput(tokens=x, pooled=x.mean(-2), shallow_logits=tuple(shallow), aux=aux)
