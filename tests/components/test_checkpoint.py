"""Checkpoint records: meta.json round trip, completeness checks, the vetted DCP index, diffs."""

from __future__ import annotations

import json
import math
import pickle

import pytest

from components.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    best_checkpoint,
    check_compatible,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
    write_meta,
)

MODEL = {"variant": "full", "ranker": {"dim": 64, "sparse": {"item_vocab": 100, "user_vocab": 10}}}


def _meta(step: int = 3, **changes) -> CheckpointMeta:
    fields = dict(
        variant="full",
        model=MODEL,
        lake_root="/lake",
        samples_version=2,
        sequences_version=2,
        step=step,
        epoch=0,
        step_in_epoch=step,
        steps_per_epoch=10,
        total_steps=30,
        world_size=2,
    )
    return CheckpointMeta(**{**fields, **changes})


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _checkpoint(path, meta: CheckpointMeta, index: object | None = None) -> str:
    """A folder shaped like a checkpoint whose DCP index is ``index`` (pickled as DCP does)."""
    from torch.distributed.checkpoint.metadata import Metadata

    path.mkdir(parents=True)
    write_meta(str(path), meta)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(Metadata(state_dict_metadata={}, storage_data={}) if index is None else index, f)
    return str(path)


def test_meta_round_trips_and_is_written_atomically(tmp_path):
    path = _checkpoint(tmp_path / "c", _meta())
    assert read_meta(path) == _meta()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".metadata", "meta.json"]


def test_an_index_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    path = _checkpoint(tmp_path / "c", _meta(), index={"x": _Evil()})
    with pytest.raises(CheckpointError, match="builtins.print is not part of a checkpoint index"):
        read_meta(path)
    assert "pwned" not in capsys.readouterr().out


def test_bad_records_name_the_file_and_the_problem(tmp_path):
    path = tmp_path / "c"
    _checkpoint(path, _meta())
    (path / "meta.json").write_text('{"format": 1, "variant": "full"')
    with pytest.raises(CheckpointError, match="meta.json is not valid JSON"):
        read_meta(str(path))
    (path / "meta.json").write_text(json.dumps({"format": 1, "variant": "full"}))
    with pytest.raises(CheckpointError, match=r"lacks field\(s\) \['epoch'"):
        read_meta(str(path))
    (path / "meta.json").write_text(json.dumps({**json.loads(_meta().to_json()), "format": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        read_meta(str(path))
    (path / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="has no .metadata"):
        read_meta(str(path))


def test_latest_is_the_highest_complete_step(tmp_path):
    for step in (2, 10, 4):
        _checkpoint(tmp_path / f"checkpoint_{step:09d}", _meta(step))
    broken = tmp_path / "checkpoint_000000099"
    broken.mkdir()  # a save that died before its files
    (tmp_path / "not_a_checkpoint").mkdir()
    assert [m.step for _, m in list_checkpoints(str(tmp_path))] == [2, 4, 10]
    assert latest_checkpoint(str(tmp_path))[1].step == 10
    assert latest_checkpoint(str(tmp_path / "absent")) is None


def test_compatibility_names_every_differing_key():
    meta = _meta()
    check_compatible("ck", meta, MODEL)
    with pytest.raises(CheckpointError, match="holds variant 'full', asked for 'longer'"):
        check_compatible("ck", meta, {**MODEL, "variant": "longer"})
    other = {"variant": "full", "ranker": {"dim": 32, "sparse": {"item_vocab": 101, "user_vocab": 10}}}
    with pytest.raises(CheckpointError) as info:
        check_compatible("ck", meta, other)
    assert "model.ranker.dim: checkpoint 64 vs asked 32" in str(info.value)
    assert "model.ranker.sparse.item_vocab: checkpoint 100 vs asked 101" in str(info.value)


def test_best_is_the_highest_valid_like_auc_and_the_earliest_of_equals(tmp_path):
    aucs = {2: 0.61, 4: 0.70, 6: math.nan, 8: 0.70, 10: 0.65}  # step 6: a mid-epoch save, not validated
    for step, auc in aucs.items():
        metrics = {} if math.isnan(auc) else {"valid/like_auc": auc}
        _checkpoint(tmp_path / f"checkpoint_{step:09d}", _meta(step, metrics=metrics))
    path, meta = best_checkpoint(str(tmp_path))
    assert meta.step == 4 and path.endswith("checkpoint_000000004")
    assert find_checkpoint("", str(tmp_path.parent), tmp_path.name)[1].step == 4  # eval/export's default
    # Nothing validated: the latest.
    unvalidated = tmp_path / "unvalidated"
    for step in (3, 5):
        _checkpoint(unvalidated / f"checkpoint_{step:09d}", _meta(step, metrics={}))
    assert best_checkpoint(str(unvalidated))[1].step == 5
    assert best_checkpoint(str(tmp_path / "absent")) is None
