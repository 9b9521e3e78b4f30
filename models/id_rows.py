"""Vocabulary index -> embedding row: rare ids share one learned row (MODELS.md "Rare ids").

A production ranker never gives an id it has (almost) never trained on a row of its own: such
a row keeps its random init and scores noise. Ids with fewer than ``features.min_item_count``
(``min_user_count``) train-period events are mapped to the out-of-vocabulary row ``OOV_ROW``
instead, which the rare ids of training teach what "an item we know little about" is worth;
the candidate's side features (genres, year, tags) still tell such items apart.

The map is a buffer of the model, so the checkpoint, the bundle and every replica carry it and
evaluation and serving cannot disagree: an ``IdRows`` sits in front of each id table (TorchRec
``SparseArch`` and the baselines' ``nn.Embedding`` alike), and batches keep their vocabulary
indices (warm/cold metrics and item features read those). Until :func:`share_rare_ids` is
called the map is the identity.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

PAD_ROW = 0
OOV_ROW = 1
KINDS = ("item", "user")


class IdRows(nn.Module):
    """(vocab,) int64 buffer ``rows``: ids of any shape -> the embedding rows they read."""

    def __init__(self, vocab: int, kind: str) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"IdRows kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.register_buffer("rows", torch.arange(vocab, dtype=torch.long))

    def forward(self, ids: Tensor) -> Tensor:
        return self.rows[ids]

    @torch.no_grad()
    def assign(self, rows: np.ndarray | Tensor) -> None:
        """Set the map (e.g. from :func:`rare_id_rows`); it must keep padding and OOV in place."""
        rows = torch.tensor(np.asarray(rows), dtype=torch.long)  # a copy: the caller's array may be read-only
        if tuple(rows.shape) != tuple(self.rows.shape):
            raise ValueError(f"{self.kind} rows must be {tuple(self.rows.shape)}, got {tuple(rows.shape)}")
        if rows.numel() > OOV_ROW and (int(rows[PAD_ROW]) != PAD_ROW or int(rows[OOV_ROW]) != OOV_ROW):
            raise ValueError(f"{self.kind} rows must map padding to {PAD_ROW} and OOV to {OOV_ROW}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= rows.numel()):
            raise ValueError(f"{self.kind} rows must lie in [0, {rows.numel()})")
        self.rows.copy_(rows.to(self.rows.device))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, vocab={self.rows.numel()}"


def rare_id_rows(train_counts: np.ndarray, min_count: int) -> np.ndarray:
    """(vocab,) int64: each index itself when it has ``>= min_count`` train-period events, else
    ``OOV_ROW`` (padding stays ``PAD_ROW``). 1 shares only ids never seen in training; 0 shares
    none (the identity: every id keeps its own row, trained or not)."""
    if min_count < 0:
        raise ValueError(f"min_count must be >= 0, got {min_count}")
    counts = np.asarray(train_counts)
    rows = np.where(counts >= min_count, np.arange(counts.size), OOV_ROW).astype(np.int64)
    rows[: OOV_ROW + 1] = np.arange(min(rows.size, OOV_ROW + 1))  # padding and OOV keep their rows
    return rows


def num_shared(rows: np.ndarray) -> int:
    """Ids a map sends to the shared OOV row (padding and OOV themselves not counted)."""
    return int((np.asarray(rows)[OOV_ROW + 1 :] == OOV_ROW).sum())


def id_rows_modules(model: nn.Module) -> dict[str, list[IdRows]]:
    """Every ``IdRows`` of ``model`` by kind."""
    out: dict[str, list[IdRows]] = {kind: [] for kind in KINDS}
    for module in model.modules():
        if isinstance(module, IdRows):
            out[module.kind].append(module)
    return out


def share_rare_ids(model: nn.Module, rows: dict[str, np.ndarray]) -> dict[str, int]:
    """Give every ``IdRows`` of ``model`` its kind's map; returns the shared (rare) ids per kind."""
    modules = id_rows_modules(model)
    unknown = sorted(set(rows) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown id kind(s) {unknown}; known: {list(KINDS)}")
    for kind, table in rows.items():
        for module in modules[kind]:
            module.assign(table)
    return {kind: num_shared(table) for kind, table in rows.items()}


def model_id_rows(model: nn.Module) -> dict[str, np.ndarray]:
    """The map of each kind the model holds (all modules of a kind agree; checked)."""
    out = {}
    for kind, modules in id_rows_modules(model).items():
        if not modules:
            continue
        first = modules[0].rows.detach().cpu()
        if any(not torch.equal(m.rows.detach().cpu(), first) for m in modules[1:]):
            raise ValueError(f"the model's {kind} id maps disagree")
        out[kind] = first.numpy().copy()
    return out
