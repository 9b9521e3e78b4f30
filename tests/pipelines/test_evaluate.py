"""pipelines.evaluate: Ray Data actors score a split from a checkpoint; metrics.json and its numbers."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from components import lake
from components.checkpoint import load_model
from components.collate import CollateConfig, collate_groups
from components.metrics import MetricsAccumulator
from components.training_data import pin_training_data
from pipelines.evaluate import main
from tests.small_runs import config_of, train_args

KEYS = {f"{t}_{m}" for t in ("engage", "like") for m in ("auc", "uauc", "logloss")} | {"like_auc_engaged"}


def test_metrics_json_equals_scoring_the_split_directly(small_lake, trained, tmp_path, capsys):
    storage, checkpoint = trained
    out = tmp_path / "m.json"
    args = train_args(
        small_lake, storage, f"--eval.checkpoint={checkpoint}", "--eval.split=test", f"--eval.output={out}"
    )
    args += ["--eval.num_actors=2", "--eval.batch_size=16"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert KEYS <= set(report["metrics"]) and report["split"] == "test" and report["checkpoint"] == checkpoint
    assert "like AUC among engaged" in printed and str(out) in printed
    # The same numbers from one in-process pass over the split (no Ray Data, no batching).
    data = pin_training_data(small_lake, samples_version=report["samples_version"])
    model, meta = load_model(checkpoint)
    rows = data.load_groups("test", report["max_seq_len"]).take_all()
    table = pa.Table.from_pylist(rows)
    batch = collate_groups(table, CollateConfig(max_seq_len=report["max_seq_len"]))
    # Warm: the candidate item has an event before the valid cut-off (read here from the events).
    events = lake.read_table(lake.table_uri(small_lake, "events"))
    items = lake.read_table(lake.table_uri(small_lake, "items"))
    train_ids = events.filter(pc.less(events["ts"], data.valid_start_ts))["item_id"]
    warm_idx = items.filter(pc.is_in(items["item_id"], train_ids))["item_idx"].to_numpy()
    warm = torch.from_numpy(np.isin(batch.cand_item.numpy(), warm_idx))
    acc = MetricsAccumulator()
    users = table.column("user_id").to_numpy()
    acc.update(model(batch).logits.detach(), batch.labels, batch.cand_mask, users, warm)
    expected = acc.compute()
    assert report["num_groups"] == table.num_rows == data.split_rows["test"]
    parts = {f"{k}_{part}" for k in ("like_auc", "like_uauc", "engage_auc") for part in ("warm", "cold")}
    for key in KEYS | parts | {"num_candidates_warm", "num_candidates_cold"}:
        assert report["metrics"][key] == pytest.approx(expected[key], abs=1e-5, nan_ok=True), key
    assert 0 < report["metrics"]["num_candidates_cold"] < report["metrics"]["num_candidates"]
    assert report["metrics"]["num_candidates"] == int(batch.cand_mask.sum())


def test_default_checkpoint_is_the_best_valid_of_the_run_and_metrics_land_beside_it(small_lake, trained):
    storage, checkpoint = trained  # one epoch: its one validated checkpoint is the best
    assert main(train_args(small_lake, storage, "--train.run_name=base", "--eval.split=valid")) == 0
    report = json.loads((pytest.importorskip("pathlib").Path(storage) / "base" / "metrics_valid.json").read_text())
    assert report["checkpoint"] == checkpoint and report["split"] == "valid"
    assert np.isfinite(report["metrics"]["like_auc"])


def test_no_checkpoint_is_a_clear_error(small_lake, tmp_path, capsys):
    assert main(train_args(small_lake, str(tmp_path), "--train.run_name=never_trained")) == 1
    assert "no checkpoint under" in capsys.readouterr().err
    assert config_of(train_args(small_lake, str(tmp_path))).eval.split == "test"
