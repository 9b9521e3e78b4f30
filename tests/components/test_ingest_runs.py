"""The ingest-run contract: three commits with one run id; readers pin a matching triple."""

from __future__ import annotations

import pyarrow as pa
import pytest

from components.ingest_runs import RUN_ID_KEY, new_run_id, pin_ingest, write_ingest_tables
from components.lake import LakeError, commit_metadata, events_table, items_table, table_uri, users_table, write_table


def tiny_tables(first_user: int = 1) -> dict[str, pa.Table]:
    users = [first_user, first_user + 1]
    return {
        "items": items_table([10, 11], [0, 0], [0, 0], [[], []]),
        "users": users_table(users),
        "events": events_table(users, [10, 11], [1_600_000_000, 1_600_000_100], [1.0, 2.0], 2),
    }


def test_one_run_id_in_all_three_commits_and_the_triple_is_pinned(tmp_path):
    root = str(tmp_path)
    commits = write_ingest_tables(root, tiny_tables(), "run-a", items_metadata={"genres": "A|B"})
    assert [c.name for c in commits] == ["items", "users", "events"] and {c.version for c in commits} == {0}
    assert [commit_metadata(table_uri(root, c.name))[RUN_ID_KEY] for c in commits] == ["run-a"] * 3
    assert commit_metadata(table_uri(root, "items"))["genres"] == "A|B"
    write_ingest_tables(root, tiny_tables(first_user=5), "run-b")
    snapshot = pin_ingest(root)
    assert snapshot.run_id == "run-b"
    versions = {"items_version": "1", "users_version": "1", "events_version": "1"}
    assert snapshot.metadata() == {RUN_ID_KEY: "run-b", **versions}
    assert snapshot.users.read()["user_id"].to_pylist() == [5, 6]
    write_table(table_uri(root, "users"), users_table([9]), custom_metadata={RUN_ID_KEY: "run-c"})
    assert snapshot.users.read()["user_id"].to_pylist() == [5, 6]  # pinned: a later commit is not read


def test_a_triple_from_two_runs_is_refused_naming_the_tables(tmp_path):
    root = str(tmp_path)
    write_ingest_tables(root, tiny_tables(), new_run_id())
    write_table(table_uri(root, "items"), tiny_tables()["items"], custom_metadata={RUN_ID_KEY: "killed-run"})
    with pytest.raises(LakeError, match=r"incomplete.*items v1 from run killed-run.*Re-run ingest"):
        pin_ingest(root)


def test_missing_tables_and_tables_without_run_id_are_clear_errors(tmp_path):
    root = str(tmp_path)
    with pytest.raises(LakeError, match="no Delta table at .*events.*ingest"):
        pin_ingest(root)
    for name, table in tiny_tables().items():  # written by an older ingest: no run id
        write_table(table_uri(root, name), table)
    with pytest.raises(LakeError, match=f"events table .* records no {RUN_ID_KEY}.*re-run ingest"):
        pin_ingest(root)
