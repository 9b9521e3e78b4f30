"""Rare ids share one learned row (models/id_rows.py), in the TorchRec ranker and the baselines alike."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from models.id_rows import OOV_ROW, IdRows, model_id_rows, rare_id_rows, share_rare_ids
from models.task import RankingTask
from models.variants import ModelConfig, build_model
from tests.models.ranker_factories import NUM_ITEMS, NUM_USERS, random_groups, tiny_ranker_config


def test_rare_id_rows_by_hand():
    counts = np.array([0, 0, 7, 4, 5, 0, 1])  # pad, OOV, then items 2..6
    np.testing.assert_array_equal(rare_id_rows(counts, 5), [0, 1, 2, 1, 4, 1, 1])
    np.testing.assert_array_equal(rare_id_rows(counts, 1), [0, 1, 2, 3, 4, 1, 6])  # only never-seen ids
    np.testing.assert_array_equal(rare_id_rows(counts, 0), np.arange(7))  # sharing off
    with pytest.raises(ValueError, match="min_count must be >= 0"):
        rare_id_rows(counts, -1)


def test_assign_rejects_maps_that_move_padding_or_leave_the_table():
    rows = IdRows(5, "item")
    with pytest.raises(ValueError, match=r"must be \(5,\)"):
        rows.assign(np.arange(4))
    with pytest.raises(ValueError, match="padding to 0 and OOV to 1"):
        rows.assign(np.array([1, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"lie in \[0, 5\)"):
        rows.assign(np.array([0, 1, 2, 3, 9]))
    with pytest.raises(ValueError, match="kind must be one of"):
        IdRows(5, "tag")


def _model(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(variant=variant, ranker=tiny_ranker_config("tml_longer")))


@pytest.mark.parametrize("variant", ["full", "dlrm_mlp", "din"])
def test_rare_candidates_and_users_read_the_shared_row(variant: str) -> None:
    model = _model(variant).eval()
    item_counts = np.zeros(NUM_ITEMS, np.int64)
    item_counts[2::2] = 10  # even items common, odd items rare
    user_counts = np.full(NUM_USERS, 10, np.int64)
    user_counts[7] = 0
    shared = share_rare_ids(model, {"item": rare_id_rows(item_counts, 5), "user": rare_id_rows(user_counts, 5)})
    assert shared == {"item": (NUM_ITEMS - 2) // 2, "user": 1}
    assert set(model_id_rows(model)) == {"item", "user"}
    batch = random_groups(0, batch=4)
    batch.cand_mask[:, :2] = True
    batch.cand_item[:, 0], batch.cand_item[:, 1] = 3, 2  # a rare and a common candidate in every group
    batch.user_id[0] = 7  # a rare user
    with torch.no_grad():
        base = RankingTask(model).evaluate(batch)[0]
        as_oov = replace(batch, cand_item=batch.cand_item.clone(), user_id=batch.user_id.clone())
        as_oov.cand_item[:, 0] = OOV_ROW  # the rare item as the OOV id: the same row, the same score
        as_oov.user_id[0] = OOV_ROW
        torch.testing.assert_close(RankingTask(model).evaluate(as_oov)[0], base, rtol=0, atol=0)
        other = replace(batch, cand_item=batch.cand_item.clone())
        other.cand_item[:, 1] = OOV_ROW  # a common item has a row of its own
        assert not torch.allclose(RankingTask(model).evaluate(other)[0][:, 1], base[:, 1])


def test_the_shared_row_learns_and_rare_rows_stay_untouched() -> None:
    model = _model("full").train()
    share_rare_ids(model, {"item": rare_id_rows(np.zeros(NUM_ITEMS, np.int64), 5)})  # every item rare
    loss, _ = RankingTask(model)(random_groups(1, batch=4))
    loss.backward()
    table = dict(model.named_parameters())["sparse_arch.embedding_collection.embeddings.t_item.weight"]
    touched = torch.nonzero(table.grad.abs().sum(-1)).flatten()
    assert set(touched.tolist()) <= {0, OOV_ROW} and OOV_ROW in touched.tolist()


def test_the_map_travels_in_the_state_dict() -> None:
    trained = _model("dlrm_mlp")
    share_rare_ids(trained, {"item": rare_id_rows(np.arange(NUM_ITEMS) % 3, 2)})
    fresh = _model("dlrm_mlp")
    assert not np.array_equal(model_id_rows(fresh)["item"], model_id_rows(trained)["item"])
    fresh.load_state_dict(trained.state_dict())
    np.testing.assert_array_equal(model_id_rows(fresh)["item"], model_id_rows(trained)["item"])
