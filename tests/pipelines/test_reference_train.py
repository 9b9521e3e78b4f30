"""pipelines.reference_train: the single-process yardstick trains, scores and reports best-valid."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc

from components import lake
from components.training_data import pin_training_data
from pipelines.reference_train import load_split, main, warm_mask
from tests.small_runs import TINY_MODEL, lake_args


def test_reference_loop_trains_and_reports_the_best_valid_epoch(small_lake, tmp_path, capsys):
    out = tmp_path / "ref.json"
    args = ["--config", "demo", *lake_args(small_lake), *TINY_MODEL, "--model.variant=dlrm_mlp"]
    args += ["--train.max_seq_len=16", "--epochs", "2", "--batch-size", "16", "--threads", "1", "--json", str(out)]
    assert main(args) == 0
    record = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "best epoch" in printed and str(out) in printed
    assert [e["epoch"] for e in record["epochs"]] == [0, 1]
    best = max(record["epochs"], key=lambda e: e["valid"]["like_auc"])
    assert record["best_epoch"] == best["epoch"] and record["test"] == best["test"]
    # Training moved the model: the loss fell, and the test split is scored whole, warm and cold apart.
    assert record["epochs"][1]["train_loss"] < record["epochs"][0]["train_loss"]
    test = record["test"]
    assert test["num_candidates_warm"] + test["num_candidates_cold"] == test["num_candidates"]
    assert np.isfinite(test["like_auc"]) and "like_auc_warm" in test


def test_warm_items_are_the_items_seen_before_the_valid_cutoff(small_lake):
    data = pin_training_data(small_lake)
    warm = warm_mask(data, load_split(data, "valid", 8))
    assert data.valid_start_ts is not None  # the features run recorded its cut-off
    events = lake.read_table(lake.table_uri(small_lake, "events"))
    items = lake.read_table(lake.table_uri(small_lake, "items"))
    seen = events.filter(pc.less(events["ts"], data.valid_start_ts))["item_id"]
    expected = items.filter(pc.is_in(items["item_id"], seen))["item_idx"].to_numpy()
    np.testing.assert_array_equal(np.flatnonzero(warm), np.sort(expected))


def test_bad_settings_exit_2(small_lake, capsys):
    assert main(["--config", "demo", *lake_args(small_lake), "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().out
