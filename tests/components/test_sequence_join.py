"""Loader-side sequence resolution: slices, truncation, errors, and the per-bucket Ray loader."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components import lake
from components.sequence_join import SequenceJoinError, load_groups, resolve_sequences


def _sequences(histories: dict[int, list[int]]) -> pa.Table:
    users = sorted(histories)
    return pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "item_idx": pa.array([histories[u] for u in users], pa.list_(pa.int32())),
            "action": pa.array([[h % 11 + 1 for h in histories[u]] for u in users], pa.list_(pa.int8())),
            "ts": pa.array([[1000 + 10 * i for i in range(len(histories[u]))] for u in users], pa.list_(pa.int64())),
        }
    )


def _samples(users: list[int], seq_end: list[int]) -> pa.Table:
    return pa.table(
        {
            "group_id": pa.array(range(len(users)), pa.int64()),
            "user_id": pa.array(users, pa.int64()),
            "seq_end": pa.array(seq_end, pa.int32()),
        }
    )


def test_slices_truncate_to_the_most_recent_events():
    seqs = _sequences({7: [2, 3, 4, 5, 6], 9: [10, 11]})
    out = resolve_sequences(_samples([9, 7, 7, 7], [2, 0, 3, 5]), seqs, max_seq_len=2)
    assert out["seq_item_idx"].to_pylist() == [[10, 11], [], [3, 4], [5, 6]]
    assert out["seq_ts"].to_pylist() == [[1000, 1010], [], [1010, 1020], [1030, 1040]]
    assert out["seq_action"].type == pa.list_(pa.int8())
    assert out.column_names[:3] == ["group_id", "user_id", "seq_end"]


def test_ultra_long_history():
    history = list(range(2, 12_002))
    out = resolve_sequences(_samples([1], [11_500]), _sequences({1: history}), max_seq_len=10_000)
    assert out["seq_item_idx"].to_pylist()[0] == history[1_500:11_500]


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=6), max_len=st.integers(1, 12), data=st.data())
def test_matches_python_slicing_on_chunked_input(lengths, max_len, data):
    histories = {u * 3 + 1: list(range(100 * u, 100 * u + n)) for u, n in enumerate(lengths)}
    users = data.draw(st.lists(st.sampled_from(sorted(histories)), min_size=0, max_size=10))
    ends = [data.draw(st.integers(0, len(histories[u]))) for u in users]
    seqs = _sequences(histories)
    chunked = pa.concat_tables([seqs.slice(0, 1), seqs.slice(1)])  # chunked + sliced lists
    out = resolve_sequences(_samples(users, ends), chunked, max_len)
    expected = [histories[u][max(0, e - max_len) : e] for u, e in zip(users, ends)]
    assert out["seq_item_idx"].to_pylist() == expected


def test_errors_name_the_problem():
    seqs = _sequences({7: [2, 3]})
    with pytest.raises(SequenceJoinError, match="user_id 8"):
        resolve_sequences(_samples([8], [1]), seqs, 5)
    with pytest.raises(SequenceJoinError, match="seq_end 3 of user_id 7"):
        resolve_sequences(_samples([7], [3]), seqs, 5)
    with pytest.raises(SequenceJoinError, match="seq_end"):
        resolve_sequences(_samples([7], [1]).drop_columns(["seq_end"]), seqs, 5)
    with pytest.raises(ValueError, match="max_seq_len"):
        resolve_sequences(_samples([7], [1]), seqs, 0)


def _shifted_items(sequences: pa.Table, shift: int) -> pa.Table:
    """Same users and lengths, different item_idx: what another features run could have written."""
    col = sequences["item_idx"].combine_chunks()
    moved = pa.ListArray.from_arrays(col.offsets, pa.compute.add(col.values, shift))
    return sequences.set_column(sequences.schema.get_field_index("item_idx"), "item_idx", moved)


def test_load_groups_resolves_every_bucket(ray_session, tmp_path):
    from components.collate import collate_groups
    from components.lake import LakeConfig
    from pipelines.bench_data import synthetic_lake
    from pipelines.config import FeaturesConfig, PipelineConfig
    from pipelines.features import run_features

    root = str(tmp_path / "lake")
    synthetic_lake(root, num_events=2000, num_buckets=3, seed=2, max_history=300)
    run_features(
        PipelineConfig(
            lake=LakeConfig(root=root, num_buckets=3),
            features=FeaturesConfig(candidates_per_group=8, max_positives_per_group=4, max_seq_len=5),
        )
    )
    blocks = ray_session.get(load_groups(root, "train", max_seq_len=6, rows_per_block=50).to_arrow_refs())
    got = pa.concat_tables(blocks).sort_by("group_id")
    samples = lake.read_table(lake.table_uri(root, "samples"), filters=pa.compute.field("split") == "train")
    sequences = lake.read_table(lake.table_uri(root, "sequences"))
    expected = resolve_sequences(samples, sequences, 6).sort_by("group_id")
    assert got.select(expected.column_names).equals(expected)
    assert max(len(s) for s in got["seq_item_idx"].to_pylist()) == 6  # explicit argument wins
    batch = collate_groups(got.slice(0, 16))
    assert tuple(batch.seq_item.shape) == (16, 6) and tuple(batch.cand_item.shape) == (16, 8)
    # Default: the max_seq_len the features run recorded in the samples commit (5).
    default = pa.concat_tables(ray_session.get(load_groups(root, "valid").to_arrow_refs()))
    assert max(len(s) for s in default["seq_item_idx"].to_pylist()) == 5
    with pytest.raises(ValueError, match="split"):
        load_groups(root, "training", 6)


def test_load_groups_pairs_samples_with_the_sequences_of_the_same_run(ray_session, tmp_path):
    from components.lake import LakeConfig
    from pipelines.bench_data import synthetic_lake
    from pipelines.config import FeaturesConfig, PipelineConfig
    from pipelines.features import run_features

    root = str(tmp_path / "lake")
    synthetic_lake(root, num_events=1500, num_buckets=2, seed=3, max_history=200)
    run_features(
        PipelineConfig(
            lake=LakeConfig(root=root, num_buckets=2),
            features=FeaturesConfig(candidates_per_group=4, max_positives_per_group=4, max_seq_len=8),
        )
    )  # run A
    seq_uri, samples_uri = lake.table_uri(root, "sequences"), lake.table_uri(root, "samples")
    sequences_a = lake.read_table(seq_uri)
    expected = resolve_sequences(
        lake.read_table(samples_uri, filters=pa.compute.field("split") == "train"), sequences_a, 8
    ).sort_by("group_id")
    # Run B commits its sequences after run A's samples, then dies before its samples commit.
    lake.write_table(
        seq_uri,
        _shifted_items(sequences_a, 1000),
        partition_by=lake.SEQUENCES_PARTITION,
        custom_metadata={"job_id": "run-b"},
    )
    got = pa.concat_tables(ray_session.get(load_groups(root, "train").to_arrow_refs())).sort_by("group_id")
    assert got.select(expected.column_names).equals(expected)  # run A's sequences
    # A samples version whose run has no sequences version: a clear error naming both tables.
    samples_a = lake.read_table(samples_uri)
    lake.write_table(samples_uri, samples_a, partition_by=["split", "bucket"], custom_metadata={"job_id": "run-c"})
    with pytest.raises(lake.LakeError, match=r"samples table .*run-c.* sequences table"):
        load_groups(root, "train")
    lake.write_table(samples_uri, samples_a, partition_by=["split", "bucket"])  # no job id at all
    with pytest.raises(lake.LakeError, match=r"samples table .*no job_id.*sequences table"):
        load_groups(root, "train")
