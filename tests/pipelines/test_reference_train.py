"""pipelines.reference_train: the single-process yardstick trains, scores and reports best-valid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from components import lake
from components.training_data import pin_training_data
from pipelines.reference_train import ReferenceSpec, id_counts, load_split, main, warmup_schedule
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


def test_id_counts_are_the_events_before_the_valid_cutoff(small_lake):
    """Item and user counts (warm items, rare ids) against the raw events, counted here by hand."""
    data = pin_training_data(small_lake)
    counts = id_counts(data, load_split(data, "valid", 8))
    assert data.valid_start_ts is not None  # the features run recorded its cut-off
    events = lake.read_table(lake.table_uri(small_lake, "events")).to_pylist()
    items = {r["item_id"]: r["item_idx"] for r in lake.read_table(lake.table_uri(small_lake, "items")).to_pylist()}
    users = {r["user_id"]: r["user_idx"] for r in lake.read_table(lake.table_uri(small_lake, "users")).to_pylist()}
    want_items = np.zeros(data.vocabulary.item_vocab, np.int64)
    want_users = np.zeros(data.vocabulary.user_vocab, np.int64)
    for event in events:
        if event["ts"] < data.valid_start_ts:
            want_items[items.get(event["item_id"], 1)] += 1
            want_users[users[event["user_id"]]] += 1
    np.testing.assert_array_equal(counts["item"], want_items)
    np.testing.assert_array_equal(counts["user"], want_users)
    assert 0 < (counts["item"] > 0).sum() < counts["item"].size - 2  # some items are cold


def test_bad_settings_exit_2(small_lake, capsys):
    assert main(["--config", "demo", *lake_args(small_lake), "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().out
    assert main(["--config", "demo", *lake_args(small_lake), "--warmup-steps", "-1"]) == 2
    assert "--warmup-steps must be >= 0" in capsys.readouterr().out


def test_warmup_raises_the_rate_linearly_to_lr():
    """The schedule the loop builds: lr x min(1, (step + 1) / warmup) after each step."""
    spec = ReferenceSpec(warmup_steps=4, lr=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=spec.lr)
    schedule = warmup_schedule(optimizer, spec.warmup_steps)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
