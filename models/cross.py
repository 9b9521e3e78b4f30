"""User-side-once first layers and DCNv2's cross network, shared by the baselines and the ranker.

``SplitLinear`` writes ``Linear(concat(user, candidate))`` as ``W_u user + W_c candidate`` so the
user half runs once per group (B rows) and only the candidate half per candidate (B·N rows).
``CrossNetwork`` is DCNv2's cross network (arXiv 2008.13535), ``x_{l+1} = x0 * (W x_l + b) + x_l``,
with its first layer split that way: the baseline DCNv2 uses it whole, and the ranker reads it as
its user x candidate cross token and linear logit path (docs/MODELS.md, "The cross").
"""

from __future__ import annotations

from torch import Tensor, nn


class SplitLinear(nn.Module):
    """``Linear(concat(user, cand))`` computed as ``W_u user + W_c cand``.

    ``user``: (B, Du) runs once per group; ``cand``: (B, N, Dc) once per candidate -> (B, N, out).
    """

    def __init__(self, user_dim: int, cand_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.user = nn.Linear(user_dim, out_dim, bias=bias)
        self.cand = nn.Linear(cand_dim, out_dim, bias=False)

    def forward(self, user: Tensor, cand: Tensor) -> Tensor:
        return self.user(user).unsqueeze(1) + self.cand(cand)  # (B, N, out)


class CrossNetwork(nn.Module):
    """DCNv2 cross layers; layer 0's ``W x0`` splits into user and candidate halves."""

    def __init__(self, user_dim: int, cand_dim: int, num_layers: int, rank: int | None) -> None:
        super().__init__()
        if num_layers < 1 or (rank is not None and rank < 1):
            raise ValueError(
                f"cross network needs num_cross_layers >= 1 and cross_rank >= 1 or None, got {num_layers}, {rank}"
            )
        dim = user_dim + cand_dim
        width, full = (rank or dim), rank is None
        # Full rank: down = W (with bias), up = identity. Low rank: down = Vᵀ, up = U (+ bias).
        self.first_down = SplitLinear(user_dim, cand_dim, width, bias=full)
        self.downs = nn.ModuleList([nn.Linear(dim, width, bias=full) for _ in range(num_layers - 1)])
        self.ups = nn.ModuleList([nn.Identity() if full else nn.Linear(width, dim) for _ in range(num_layers)])

    def forward(self, user: Tensor, cand: Tensor, x0: Tensor) -> Tensor:
        """``user`` (B, Du), ``cand`` (B, N, Dc), ``x0`` = their concat (B, N, D) -> (B, N, D)."""
        x = x0
        for i, up in enumerate(self.ups):
            inner = self.first_down(user, cand) if i == 0 else self.downs[i - 1](x)
            x = x0 * up(inner) + x
        return x
