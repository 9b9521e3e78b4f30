"""Shared primitives of the token-mixing backbones (RankMixer, TokenMixer-Large, UG-Sep).

- ``token_mix`` / ``token_revert``: the parameter-free head shuffle of RankMixer
  (arXiv 2507.15551) and its exact inverse used by TokenMixer-Large (arXiv 2602.06563).
- Per-token layers: every token position owns its weights, stored as (T, d_in, d_out)
  and applied with ONE ``torch.bmm`` over the token axis, so a layer is a few big GEMMs
  instead of T small ones.
- Grouped expert GEMM: permute (row, token, expert) assignments into a padded
  per-(token, expert) buffer, run one ``bmm`` over all groups, gather back. The experts'
  weights live in an ``ExpertBank`` (T, E, d_in, d_out), so a quantized bank can replace it.
- Split-input first layers (UG-Sep): a per-token FFN whose input is ``[x_user ; x_group]``
  along the features and whose first layer is linear and bias-free computes the user
  half's contribution once per group (``first_partial``) and adds the group half per
  candidate (``forward_split``); RMSNorm's per-row scale factors out of that first layer.
- ``AuxLosses`` / ``BackboneOutput``: what a backbone returns besides its tokens.
- ``masked_mean``: the one masked average of the project.

Every per-token FFN has one forward signature, ``ffn(x, tokens, aux)``: ``tokens`` selects
the positions ``x`` holds, ``aux`` collects auxiliary losses (ignored by dense FFNs).

Activations are batch-major ``(..., T, d)`` at every public API. Internally ``bmm`` runs
on the transposed view ``(T, M, d)``; BLAS takes the strided rows without a copy, and the
result is left token-major in memory, which the next ``bmm`` reads for free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ALL_TOKENS = slice(None)
ALL_INPUTS = slice(None)


def select_tokens(param: Tensor, tokens: slice) -> Tensor:
    """``param[tokens]`` along the token axis, or ``param`` itself for all tokens.

    Returning the parameter itself matters for speed: the backward of a full slice
    allocates a zero tensor of the parameter's size and copies the gradient into it.
    """
    return param if tokens == ALL_TOKENS else param[tokens]


# ---------------------------------------------------------------- token mixing
def token_mix(x: Tensor, heads: int) -> Tensor:
    """Split every token into ``heads`` slices; output token h = slice h of every token.

    ``x``: (..., T, D) -> (..., H, T*D/H). With H = T the shape is kept and the map is
    its own inverse (a transpose of the (T, H) slice grid).
    """
    dim = x.shape[-1]
    if heads <= 0 or dim % heads:
        raise ValueError(f"token_mix: heads={heads} must be positive and divide the token width {dim}")
    sliced = x.unflatten(-1, (heads, dim // heads))  # (..., T, H, D/H)
    return sliced.transpose(-3, -2).flatten(-2)  # (..., H, T*D/H)


def token_revert(x: Tensor, heads: int, num_tokens: int | None = None) -> Tensor:
    """Exact inverse of ``token_mix(., heads)``: (..., H, T*D/H) -> (..., T, D).

    ``num_tokens`` is T (defaults to ``heads``, the RankMixer case H = T). Reverting is
    itself a mix with T heads, which is why mix is an involution when H = T.
    """
    if x.shape[-2] != heads:
        raise ValueError(f"token_revert: expected {heads} mixed tokens on dim -2, got shape {tuple(x.shape)}")
    num_tokens = heads if num_tokens is None else num_tokens
    if x.shape[-1] % num_tokens:
        raise ValueError(f"token_revert: mixed width {x.shape[-1]} is not divisible by num_tokens={num_tokens}")
    return token_mix(x, num_tokens)


# ---------------------------------------------------------------- per-token layers
def per_token_matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None, per_group: Tensor | None = None) -> Tensor:
    """``y[..., t, :] = x[..., t, :] @ weight[t] (+ bias[t])``: one bmm over the token axis.

    ``x``: (..., T, d_in), ``weight``: (T, d_in, d_out), ``bias``: (T, d_out) -> (..., T, d_out).
    ``per_group`` (B, T, d_out) is added to every row of group b, for ``x`` laid out (B, N, ..., T, d_in):
    UG-Sep's cached user share. It is laid out token-major once and the GEMM accumulates into it,
    which is cheaper than a broadcast add on the transposed result.
    """
    num_tokens, d_in, d_out = weight.shape
    if x.shape[-2:] != (num_tokens, d_in):
        raise ValueError(
            f"per-token weight {tuple(weight.shape)} does not fit input {tuple(x.shape)}: "
            f"expected (..., {num_tokens}, {d_in})"
        )
    lead = x.shape[:-2]
    rows = x.reshape(-1, num_tokens, d_in).transpose(0, 1)  # (T, M, d_in), a strided view
    init = None if bias is None else bias.unsqueeze(1)  # (T, 1, d_out)
    if per_group is not None:
        rows_per_group = rows.shape[1] // per_group.shape[0]
        per_row = per_group.transpose(0, 1).repeat_interleave(rows_per_group, dim=1)  # (T, M, d_out), a new tensor
        if init is not None:
            per_row = per_row + init
        # per_row is a fresh (T, M, d_out) tensor: accumulate in place (baddbmm would copy it once more).
        out = per_row.baddbmm_(rows, weight)
        return out.transpose(0, 1).reshape(*lead, num_tokens, d_out)
    out = torch.bmm(rows, weight) if init is None else torch.baddbmm(init, rows, weight)  # (T, M, d_out)
    return out.transpose(0, 1).reshape(*lead, num_tokens, d_out)  # (..., T, d_out)


def _init_per_token(weight: Tensor, fan_in: int, std: float | None) -> None:
    with torch.no_grad():
        if std is None:
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default scale, per token
            weight.uniform_(-bound, bound)
        else:
            weight.normal_(0.0, std)


class PerTokenLinear(nn.Module):
    """A separate ``Linear(d_in, d_out)`` for each of T token positions."""

    def __init__(
        self, num_tokens: int, d_in: int, d_out: int, bias: bool = True, init_std: float | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_tokens, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(num_tokens, d_out)) if bias else None
        _init_per_token(self.weight, d_in, init_std)

    def forward(
        self, x: Tensor, tokens: slice = ALL_TOKENS, inputs: slice = ALL_INPUTS, per_group: Tensor | None = None
    ) -> Tensor:
        """``x``: (..., T', d_in') with T' the positions selected by ``tokens`` and d_in' the
        input features selected by ``inputs``: a partial input gives that part's contribution,
        ``x @ weight[t][inputs]``, which is only well defined for a bias-free layer.
        ``per_group``: see ``per_token_matmul``."""
        weight = select_tokens(self.weight, tokens)
        if inputs != ALL_INPUTS:
            if self.bias is not None:
                raise ValueError("PerTokenLinear: a partial input needs a bias-free layer (the bias is not split)")
            weight = weight[:, inputs]  # (T', d_in', d_out): a row block, bmm reads it without a copy
        bias = None if self.bias is None else select_tokens(self.bias, tokens)
        return per_token_matmul(x, weight, bias, per_group)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


class PerTokenFFN(nn.Module):
    """RankMixer's PFFN: per-token ``W2 GELU(W1 x + b1) + b2`` with hidden width k*D."""

    def __init__(self, num_tokens: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = PerTokenLinear(num_tokens, dim, hidden)
        self.down = PerTokenLinear(num_tokens, hidden, dim)

    def forward(self, x: Tensor, tokens: slice = ALL_TOKENS, aux: AuxLosses | None = None) -> Tensor:
        return self.down(F.gelu(self.up(x, tokens)), tokens)


def _needs_autograd(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def swiglu(gate_up: Tensor, hidden: int) -> Tensor:
    """``Swish(gate) * up`` of a fused (..., 2h) projection.

    Without autograd (serving, benchmarks) it works in place on the matmul output:
    ~3x faster on CPU than allocating two new (..., h) tensors.
    """
    gate, up = gate_up.split(hidden, dim=-1)
    if _needs_autograd(gate_up):
        return F.silu(gate) * up
    return F.silu(gate, inplace=True).mul_(up)


class PerTokenSwiGLU(nn.Module):
    """Per-token ``W_down(Swish(W_gate x) * W_up x)`` (no biases, as in LLaMA-style SwiGLU).

    Gate and up projections are fused into one (T, d, 2h) weight so each call is two
    bmm's. ``down_init_std`` (~0.01) starts the block near identity (TokenMixer-Large).
    """

    # Layers that ``first_partial``/``forward_split`` call on input-feature blocks (``UGSepBackbone.input_splits``).
    split_input_layers = ("gate_up",)

    def __init__(self, num_tokens: int, dim: int, hidden: int, down_init_std: float | None = 0.01) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up = PerTokenLinear(num_tokens, dim, 2 * hidden, bias=False)
        self.down = PerTokenLinear(num_tokens, hidden, dim, bias=False, init_std=down_init_std)

    def forward(self, x: Tensor, tokens: slice = ALL_TOKENS, aux: AuxLosses | None = None) -> Tensor:
        return self.down(swiglu(self.gate_up(x, tokens), self.hidden), tokens)

    # ---- split input (UG-Sep): x = [x_user ; x_group] along the features, all T positions
    def first_partial(self, x_user: Tensor) -> Tensor:
        """The user features' share of the fused gate/up pre-activation: (..., T, k) -> (..., T, 2h)."""
        return self.gate_up(x_user, inputs=slice(0, x_user.shape[-1]))

    def forward_split(
        self, x_group: Tensor | None, partial: Tensor, scale: Tensor | None = None, aux: AuxLosses | None = None
    ) -> Tensor:
        """``forward(scale * [x_user ; x_group])`` from ``partial = first_partial(x_user)``.

        ``partial`` (B, T, 2h) is broadcast over the extra candidate dims of ``x_group``
        (B, N, T, d - k); ``x_group=None`` means a zero group half (the masked user path).
        ``scale`` (..., T, 1) is a per-row factor of the whole input (RMSNorm's 1/rms).
        """
        pre = partial
        if x_group is not None:
            group_inputs = slice(self.gate_up.in_features - x_group.shape[-1], None)
            pre = self.gate_up(x_group, inputs=group_inputs, per_group=partial)
        if scale is not None:
            pre = pre * scale if _needs_autograd(pre) or x_group is None else pre.mul_(scale)
        return self.down(swiglu(pre, self.hidden))


def broadcast_rows(per_group: Tensor, like: Tensor) -> Tensor:
    """(B, *S) per-group values viewed as (B, 1, ..., *S) to broadcast against ``like`` (B, N, ..., *S)."""
    return per_group.reshape(per_group.shape[0], *([1] * (like.dim() - per_group.dim())), *per_group.shape[1:])


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def inv_rms(self, sq_norm: Tensor) -> Tensor:
        """``1 / sqrt(mean(x^2) + eps)`` from a row's squared L2 norm (..., 1): the per-row scale,
        which UG-Sep assembles from the user and group halves' squared norms."""
        return torch.rsqrt(sq_norm / self.weight.shape[0] + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        # One vector_norm pass + one scaling pass: ~2x faster on CPU than F.rms_norm,
        # whose decomposition (pow, sum, mul) walks the tensor four times.
        scaled = x * self.inv_rms(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square())
        return scaled * self.weight if _needs_autograd(scaled) else scaled.mul_(self.weight)


# ---------------------------------------------------------------- grouped expert GEMM
@dataclass(frozen=True)
class ExpertDispatch:
    """Where each (row, group) assignment sits in a padded (G, C, d) group buffer.

    A group is one (token position, expert) pair with its own weights. ``src`` indexes the
    flattened input rows, ``dest`` the flattened (G*C) buffer; both are sorted by group,
    so the permutation is contiguous per group. C = the largest group size, so nothing
    is ever dropped (exact, unlike capacity-factor routing).
    """

    src: Tensor  # (n,) int64 input row of each assignment, in group-sorted order
    dest: Tensor  # (n,) int64 slot in the flattened (G*C) buffer, same order
    order: Tensor  # (n,) int64 sort permutation: sorted assignment i = caller's order[i]
    counts: Tensor  # (G,) int64 assignments per group (the first counts[g] rows of group g are real)
    num_groups: int
    capacity: int

    @staticmethod
    def build(group_ids: Tensor, src_rows: Tensor, num_groups: int) -> ExpertDispatch:
        """``group_ids``/``src_rows``: (n,) group and input row of every assignment."""
        # Order within a group does not matter (rows are independent, results are gathered
        # back by assignment), and the unstable CPU sort is ~100x faster than the stable one.
        sorted_groups, order = torch.sort(group_ids)
        counts = torch.bincount(sorted_groups, minlength=num_groups)
        capacity = int(counts.max()) if sorted_groups.numel() else 0
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(sorted_groups.numel(), device=group_ids.device)
        dest = sorted_groups * capacity + (rank - starts[sorted_groups])
        return ExpertDispatch(src_rows[order], dest, order, counts, num_groups, capacity)

    def permute(self, rows: Tensor) -> Tensor:
        """(R, d) input rows -> (G, C, d) padded group buffer (padding rows are zero)."""
        buf = rows.new_zeros(self.num_groups * self.capacity, rows.shape[-1])
        buf = buf.index_copy(0, self.dest, rows.index_select(0, self.src))
        return buf.view(self.num_groups, self.capacity, rows.shape[-1])  # (G, C, d)

    def place(self, values: Tensor) -> Tensor:
        """(n, f) per-assignment values in the caller's order -> (G, C, f) group buffer (zero padding)."""
        buf = values.new_zeros(self.num_groups * self.capacity, values.shape[-1])
        buf = buf.index_copy(0, self.dest, values.index_select(0, self.order))
        return buf.view(self.num_groups, self.capacity, values.shape[-1])  # (G, C, f)

    def gather(self, out: Tensor) -> Tensor:
        """(G, C, d) group results -> (n, d), one row per assignment in the caller's order."""
        flat = out.reshape(self.num_groups * self.capacity, out.shape[-1])
        dest_in_caller_order = torch.empty_like(self.dest).index_copy_(0, self.order, self.dest)
        return flat.index_select(0, dest_in_caller_order)

    def combine(self, out: Tensor, weights: Tensor, num_rows: int) -> Tensor:
        """(G, C, d) group results -> (R, d): ``sum over assignments of weight * result``.

        ``weights``: (n,) per assignment, in the caller's (unsorted) order. For a variable
        number of assignments per row; with a fixed k per row, ``gather`` + a sum over k
        avoids the serial ``index_add`` and is several times faster on CPU.
        """
        flat = out.reshape(self.num_groups * self.capacity, out.shape[-1])
        picked = flat.index_select(0, self.dest) * weights[self.order].unsqueeze(-1)  # (n, d)
        return picked.new_zeros(num_rows, out.shape[-1]).index_add(0, self.src, picked)


class ExpertBank(nn.Module):
    """E bias-free linear maps per token position, weight (T, E, d_in, d_out): the experts of a
    per-token MoE. Group g = t * E + e of a dispatch (``ExpertDispatch``) uses ``weight[t, e]``.

    ``models.quant_layers.QuantizedExpertBank`` has the same interface with int8 weights.
    """

    def __init__(self, num_tokens: int, num_experts: int, d_in: int, d_out: int, init: Callable[[Tensor], Any]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_tokens, num_experts, d_in, d_out))
        with torch.no_grad():
            init(self.weight)

    @property
    def in_features(self) -> int:
        return self.weight.shape[2]

    def grouped_mm(
        self,
        buf: Tensor,
        counts: Tensor | None = None,
        tokens: slice = ALL_TOKENS,
        inputs: slice = ALL_INPUTS,
        bias: Tensor | None = None,
    ) -> Tensor:
        """Group buffer (G, C, d_in') -> (G, C, d_out), G = T'·E groups of the positions ``tokens``.

        ``inputs`` selects the input features ``buf`` holds (a partial product, as
        ``PerTokenLinear``); ``bias`` (G, d_out) is added to every row; ``counts`` (G,) real rows
        per group, which an implementation may use to skip padding (the float bmm ignores it).
        """
        weight = select_tokens(self.weight, tokens)[:, :, inputs]  # (T', E, d_in', d_out): a view
        weight = weight.reshape(-1, *weight.shape[2:])  # (G, d_in', d_out)
        return torch.bmm(buf, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), buf, weight)

    def all_experts(self, x: Tensor, tokens: slice = ALL_TOKENS, inputs: slice = ALL_INPUTS) -> Tensor:
        """Every expert on every row: (..., T', d_in') -> (..., T', E, d_out)."""
        return torch.einsum("...tk,tekf->...tef", x, select_tokens(self.weight, tokens)[:, :, inputs])


# ---------------------------------------------------------------- backbone outputs
@dataclass
class AuxLosses:
    """Auxiliary training losses of a backbone (already weighted) plus monitoring values.

    The task wrapper adds ``total()`` to its loss; metrics are detached floats.
    """

    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: Tensor) -> None:
        self.losses[name] = self.losses[name] + value if name in self.losses else value

    def merge(self, other: AuxLosses) -> None:
        for name, value in other.losses.items():
            self.add(name, value)
        self.metrics.update(other.metrics)

    def total(self) -> Tensor | float:
        return sum(self.losses.values()) if self.losses else 0.0


@dataclass
class BackboneOutput:
    """What every token-mixing backbone returns.

    ``tokens``: (..., T, D) final tokens; ``pooled``: (..., D) their mean (the input of
    the task towers); ``shallow_logits``: per-task logits (..., n_tasks) from auxiliary
    heads on shallow layers (TokenMixer-Large; the task wrapper adds their BCE).
    """

    tokens: Tensor
    pooled: Tensor
    shallow_logits: tuple[Tensor, ...] = ()
    aux: AuxLosses = field(default_factory=AuxLosses)


# ---------------------------------------------------------------- masking and state helpers
def masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of ``x`` (..., F) over ``dim`` where ``mask`` (x's shape without F) is True; 0 where none is."""
    weight = mask.unsqueeze(-1).to(x.dtype)
    return (x * weight).sum(dim) / weight.sum(dim).clamp_min(1.0)


def map_tensors(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """``fn`` applied to every tensor of a tree of tuples / NamedTuples (None passes through)."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, tuple):
        mapped = [map_tensors(fn, item) for item in tree]
        return type(tree)(*mapped) if hasattr(tree, "_fields") else tuple(mapped)
    if tree is None:
        return None
    raise TypeError(f"map_tensors: unsupported node {type(tree).__name__}")


def cat_trees(trees: list[Any]) -> Any:
    """Trees of the same structure (see ``map_tensors``) -> one tree, each tensor concatenated
    along dim 0 (the batch): states of different groups stacked into one batch."""
    first = trees[0]
    if isinstance(first, Tensor):
        return torch.cat(trees)
    if isinstance(first, tuple):
        parts = [cat_trees(list(items)) for items in zip(*trees, strict=True)]
        return type(first)(*parts) if hasattr(first, "_fields") else tuple(parts)
    if first is None:
        if any(t is not None for t in trees):
            raise ValueError("cat_trees: trees differ (None beside a value)")
        return None
    raise TypeError(f"cat_trees: unsupported node {type(first).__name__}")


def tree_nbytes(tree: Any) -> int:
    """Bytes held by the tensors of a tree (see ``map_tensors``)."""
    sizes: list[int] = []
    map_tensors(lambda t: sizes.append(t.numel() * t.element_size()) or t, tree)
    return sum(sizes)
