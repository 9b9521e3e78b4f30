"""One initialisation policy for every embedding table (MODELS.md: an [ours] decision).

Every entry of every table is drawn from N(0, 1): the TorchRec tables of ``SparseArch``
(items, users, tags), LONGER's position/action/gap tables, the ranker's year table, the
baselines' tables and the PKM value tables. An embedding is an input feature, and unit
variance per coordinate is what ``nn.Linear``'s fan-in init expects of its inputs (as of
standardised dense features), whatever the vocabulary size or width, so every variant's
first layers see their embeddings on equal terms. Rows at a ``padding_idx`` are zero.

Why one policy: defaults differ by module. TorchRec draws U(+-1/sqrt(vocab)) (std 0.002 at
100k items) while ``nn.Embedding`` draws N(0, 1): LONGER's position, action and gap
tables then drowned the item signal and LONGER sat at chance for hundreds of steps where
pooling, reading item embeddings alone, learnt at once (tests/models/test_learning.py).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

EMBEDDING_STD = 1.0


def embedding_std(dim: int) -> float:
    """Standard deviation of every embedding entry (unit variance per coordinate, any ``dim``)."""
    return EMBEDDING_STD


@torch.no_grad()
def init_embedding_(weight: Tensor, padding_idx: int | None = None) -> Tensor:
    """Initialise a (rows, dim) table in place by the policy; returns it."""
    weight.normal_(0.0, embedding_std(weight.shape[-1]))
    if padding_idx is not None:
        weight[padding_idx].zero_()
    return weight


def embedding(num_embeddings: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """``nn.Embedding`` initialised by the policy."""
    table = nn.Embedding(num_embeddings, dim, padding_idx=padding_idx)
    init_embedding_(table.weight, padding_idx)
    return table


def torchrec_init_fn(dim: int) -> functools.partial:
    """The policy as a TorchRec ``EmbeddingConfig.init_fn`` (picklable; applied per shard when sharded)."""
    return functools.partial(nn.init.normal_, mean=0.0, std=embedding_std(dim))
