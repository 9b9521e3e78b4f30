"""SparseArch: TorchRec EmbeddingCollection lookups equal plain row gathers, shapes kept."""

from __future__ import annotations

import pytest
import torch

from models.sparse import SparseArch, SparseConfig


def test_lookup_equals_table_rows_for_any_shape():
    torch.manual_seed(0)
    arch = SparseArch(SparseConfig(item_vocab=50, user_vocab=9, tag_vocab=7, embedding_dim=8))
    ids = {
        "seq_item": torch.randint(0, 50, (3, 5)),
        "cand_item": torch.randint(0, 50, (3, 4)),
        "user": torch.randint(0, 9, (3,)),
        "cand_tag": torch.randint(0, 7, (3, 4, 2)),
    }
    out = arch(ids)
    tables = arch.embedding_collection.embeddings
    assert out["cand_tag"].shape == (3, 4, 2, 8)
    assert torch.equal(out["seq_item"], tables["t_item"].weight[ids["seq_item"]])
    assert torch.equal(out["cand_item"], tables["t_item"].weight[ids["cand_item"]])
    assert torch.equal(out["user"], tables["t_user"].weight[ids["user"]])


def test_item_table_is_shared_and_trainable():
    arch = SparseArch(SparseConfig(item_vocab=20, embedding_dim=4))
    out = arch({"seq_item": torch.tensor([[3, 4]]), "cand_item": torch.tensor([[3]])})
    (out["seq_item"].sum() + out["cand_item"].sum()).backward()
    grad = arch.embedding_collection.embeddings["t_item"].weight.grad
    assert grad[3].abs().sum() > 0 and grad[5].abs().sum() == 0


def test_unknown_feature_named():
    arch = SparseArch(SparseConfig(embedding_dim=4))
    with pytest.raises(KeyError, match="bogus"):
        arch({"bogus": torch.zeros(2, dtype=torch.long)})
