"""SparseArch: the ranker's embedding tables as one TorchRec ``EmbeddingCollection``.

Defined unsharded here; sharding (DMP + planner) is applied from outside by the training
stage, which is why the tables live in a TorchRec module type rather than nn.Embedding.
Table names are ``t_*`` because a name equal to an nn.ModuleDict attribute (``items``)
crashes TorchRec (STACK.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from models.embedding_init import torchrec_init_fn
from models.id_rows import IdRows

# Feature name -> table name. The item table is shared by the sequence and the candidates.
FEATURE_TABLES = {
    "seq_item": "t_item",
    "cand_item": "t_item",
    "user": "t_user",
    "cand_tag": "t_tag",
}


@dataclass(frozen=True)
class SparseConfig:
    """Vocabulary sizes include the padding (0) and out-of-vocabulary (1) rows."""

    item_vocab: int = 10_000
    user_vocab: int = 1_000
    tag_vocab: int = 2_000
    embedding_dim: int = 64


class SparseArch(nn.Module):
    """Id tensors of any shape -> embeddings with a trailing ``embedding_dim`` axis."""

    def __init__(self, config: SparseConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        sizes = {"t_item": config.item_vocab, "t_user": config.user_vocab, "t_tag": config.tag_vocab}
        tables = []
        for table, rows in sizes.items():
            features = [f for f, t in FEATURE_TABLES.items() if t == table]
            tables.append(
                EmbeddingConfig(
                    name=table,
                    embedding_dim=config.embedding_dim,
                    num_embeddings=rows,
                    feature_names=features,
                    init_fn=torchrec_init_fn(config.embedding_dim),
                )
            )
        self.embedding_collection = EmbeddingCollection(tables=tables, device=torch.device(device or "cpu"))
        # Rare ids read the shared OOV row (models/id_rows.py); identity until training sets it.
        self.item_rows, self.user_rows = IdRows(config.item_vocab, "item"), IdRows(config.user_vocab, "user")

    def _rows(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """The table rows of a feature's ids (tags have no rare-id map: every tag keeps its row)."""
        rows = {"t_item": self.item_rows, "t_user": self.user_rows}.get(FEATURE_TABLES[feature])
        return ids if rows is None else rows(ids)

    def forward(self, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"seq_item": (B, L), "user": (B,), ...}`` -> same keys, shapes + (embedding_dim,).

        Every id must lie in its table's range; the padding row 0 is a real (trainable)
        row, and callers mask padded positions themselves. Item and user ids are vocabulary
        indices: rare ones read the shared OOV row here (``item_rows``, ``user_rows``).
        """
        unknown = sorted(set(ids) - set(FEATURE_TABLES))
        if unknown:
            raise KeyError(f"unknown sparse feature(s) {unknown}; known: {sorted(FEATURE_TABLES)}")
        batch = next(iter(ids.values())).shape[0]
        # EmbeddingCollection wants every feature: absent ones get empty rows.
        # One jagged row per group holds all of that group's ids of a feature.
        keys = list(FEATURE_TABLES)
        per_row = [
            self._rows(k, ids[k]).reshape(batch, -1) if k in ids else torch.empty(batch, 0, dtype=torch.long)
            for k in keys
        ]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.cat([p.reshape(-1) for p in per_row]),
            lengths=torch.cat([torch.full((batch,), p.shape[1], dtype=torch.long) for p in per_row]),
        )
        out = self.embedding_collection(kjt)
        dim = self.config.embedding_dim
        return {k: out[k].values().view(*ids[k].shape, dim) for k in ids}
