"""Collator: resolved Arrow rows -> GroupBatch, by hand-checked values and through real Ray Data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from components.collate import CollateConfig, CollateError, GroupCollateFn, collate_groups
from components.transforms import action_bucket


def _rows() -> pa.Table:
    return pa.table(
        {
            "user_idx": pa.array([2, 3], pa.int32()),
            "request_ts": pa.array([1000, 5000], pa.int64()),
            "seq_item_idx": pa.array([[5, 6, 7], [9]], pa.list_(pa.int32())),
            "seq_action": pa.array([[8, 10, 2], [4]], pa.list_(pa.int8())),
            "seq_ts": pa.array([[10, 500, 999], [4000]], pa.list_(pa.int64())),
            "cand_item_idx": pa.array([[11, 12], [13, 14, 15]], pa.list_(pa.int32())),
            "cand_genre_mask": pa.array([[1, 2], [4, 0, 3]], pa.list_(pa.int32())),
            "cand_year": pa.array([[1995, 0], [2001, 2010, 1960]], pa.list_(pa.int16())),
            "cand_tags": pa.array([[2, 0, 3, 4], [5, 0, 0, 0, 6, 7]], pa.list_(pa.int32())),
            "label_engage": pa.array([[1, 0], [1, 1, 0]], pa.list_(pa.int8())),
            "label_like": pa.array([[1, 0], [0, 1, 0]], pa.list_(pa.int8())),
        }
    )


def test_sequences_left_padded_most_recent_last():
    batch = collate_groups(_rows())
    assert batch.seq_item.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert batch.seq_action.tolist() == [[8, 10, 2], [0, 0, 4]]
    assert batch.seq_len.tolist() == [3, 1]
    # By hand, floor(log2(gap + 1)) + 1: gaps 990, 500 and 1 s -> 10, 9, 2; 1000 s -> 10.
    assert batch.seq_gap.tolist() == [[10, 9, 2], [0, 0, 10]]


def test_user_dense_features_by_hand():
    # [log1p(history size) - 5, mean action - 7, (gap bucket of the MOST RECENT event - 16) / 8]
    batch = collate_groups(_rows())
    expected = [[np.log1p(3) - 5, (8 + 10 + 2) / 3 - 7, (2 - 16) / 8], [np.log1p(1) - 5, 4 - 7, (10 - 16) / 8]]
    np.testing.assert_allclose(batch.user_dense.numpy(), expected, rtol=1e-6)
    # Truncation to the last 2 events changes every feature the same way serving would.
    short = collate_groups(_rows(), CollateConfig(max_seq_len=2))
    expected_short = [np.log1p(2) - 5, (10 + 2) / 2 - 7, (2 - 16) / 8]
    np.testing.assert_allclose(short.user_dense[0].numpy(), expected_short, rtol=1e-6)


def test_candidate_side_features_by_hand():
    batch = collate_groups(_rows())
    # Five-year buckets from 1900 (1995 -> 20, 2001 -> 21, 2010 -> 23, 1960 -> 13), 0 = unknown/padding.
    assert batch.cand_year.tolist() == [[20, 0, 0], [21, 23, 13]]
    # Genre bit masks 1, 2 | 4, 0, 3 -> genres {0}, {1} | {2}, {}, {0, 1}.
    genres = [[sorted(np.flatnonzero(g).tolist()) for g in row] for row in batch.cand_genres.numpy()]
    assert genres == [[[0], [1], []], [[2], [], [0, 1]]]


def test_truncation_keeps_most_recent_events():
    batch = collate_groups(_rows(), CollateConfig(max_seq_len=2))
    assert batch.seq_item.tolist() == [[6, 7], [0, 9]]
    assert batch.seq_len.tolist() == [2, 1]


def test_candidates_padded_with_mask_and_labels():
    batch = collate_groups(_rows())
    assert batch.cand_item.tolist() == [[11, 12, 0], [13, 14, 15]]
    assert batch.cand_mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.labels.shape == (2, 3, 2)
    assert batch.labels[..., 0].tolist() == [[1, 0, 0], [1, 1, 0]]
    assert batch.labels[..., 1].tolist() == [[1, 0, 0], [0, 1, 0]]
    assert batch.cand_tags.tolist() == [[[2, 0], [3, 4], [0, 0]], [[5, 0], [0, 0], [6, 7]]]
    assert batch.cand_genres[0, 1].tolist()[:3] == [0.0, 1.0, 0.0]


def test_fixed_padding_and_dtypes():
    batch = collate_groups(_rows(), CollateConfig(pad_seq_to=5))
    assert batch.seq_item.shape == (2, 5)
    assert batch.seq_item[0].tolist() == [0, 0, 5, 6, 7]
    assert batch.seq_item.dtype == torch.int64 and batch.user_dense.dtype == torch.float32
    assert batch.user_dense.shape == (2, 3)


def test_serving_rows_without_labels():
    table = _rows().drop_columns(["label_engage", "label_like"])
    assert collate_groups(table, CollateConfig(with_labels=False)).labels is None


def test_missing_column_is_named():
    with pytest.raises(CollateError, match="cand_year"):
        collate_groups(_rows().drop_columns(["cand_year"]))


def test_mismatched_sequence_lists_rejected():
    table = _rows().set_column(4, "seq_ts", pa.array([[10, 500], [4000]], pa.list_(pa.int64())))
    with pytest.raises(CollateError, match="seq_ts"):
        collate_groups(table)


def test_iter_torch_batches_with_collate_fn(ray_session):
    import ray

    ds = ray.data.from_arrow(_rows())
    batches = list(ds.iter_torch_batches(batch_size=2, collate_fn=GroupCollateFn(), drop_last=True))
    assert len(batches) == 1
    direct = collate_groups(_rows())
    assert torch.equal(batches[0].seq_item, direct.seq_item)
    assert torch.equal(batches[0].labels, direct.labels)


def test_user_dense_features_without_history_by_hand():
    # A user with no events yet: log1p(0) - 5, mean action at its centre (0), pad gap bucket 0 -> -2.
    table = _rows()
    for name in ("seq_item_idx", "seq_action", "seq_ts"):
        column = table.column(name).to_pylist()
        column[1] = []
        table = table.set_column(table.column_names.index(name), name, pa.array(column, table.schema.field(name).type))
    batch = collate_groups(table)
    assert batch.seq_len.tolist() == [3, 0]
    np.testing.assert_allclose(batch.user_dense[1].numpy(), [-5.0, 0.0, -2.0], rtol=1e-6)


def test_first_row_without_candidates_is_fine():
    table = _rows()
    empty = {
        name: [[]] if pa.types.is_list(table.schema.field(name).type) else [table.column(name)[0].as_py()]
        for name in table.column_names
    }
    rows = pa.concat_tables([pa.table(empty, schema=table.schema), table])
    batch = collate_groups(rows)
    assert batch.cand_mask[0].tolist() == [False, False, False]
    assert batch.cand_tags.shape == (3, 3, 2)


def test_action_buckets_by_hand():
    # Half-star ratings map to 1..10; anything else is clipped into 1..11 (NaN: 11, "other").
    values = np.array([0.5, 1.0, 4.5, 5.0, 0.0, 7.0, np.nan, -3.0])
    assert action_bucket(values).tolist() == [1, 2, 9, 10, 1, 11, 11, 1]
