"""pipelines.reference_train: the single-process yardstick trains, scores and reports best-valid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from components import lake
from components.training_data import pin_training_data
from pipelines.reference_train import (
    ReferenceSpec,
    RowwiseAdagrad,
    id_counts,
    load_split,
    main,
    table_parameters,
    warmup_schedule,
)
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


def test_linear_schedule_times_warmup_as_the_trainer_decays():
    """``--lr-schedule linear`` over 4 steps with a 2-step warmup: lr x min(1, (s+1)/2) x (1 - s/4)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=0.1)
    schedule = warmup_schedule(optimizer, 2, "linear", 4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.05, 0.075, 0.05, 0.025])
    with pytest.raises(ValueError, match="--lr-schedule must be one of"):
        ReferenceSpec(lr_schedule="cosine")


def test_rowwise_adagrad_is_fbgemms_fused_kernel():
    """The loop's ``--table-optimizer rowwise_adagrad`` against FBGEMM's own CPU kernel, the one the
    real path's sharded tables run: same rows after three steps of lookups with repeated ids."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    torch.manual_seed(0)
    rows, dim, lr = 12, 4, 0.05
    fused = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr,
        pooling_mode=PoolingMode.SUM,
    )
    start = torch.randn(rows, dim)
    fused.split_embedding_weights()[0].copy_(start)
    table = torch.nn.Parameter(start.clone())
    ours = RowwiseAdagrad([table], lr)
    for step in range(3):
        indices = torch.tensor([1, 3, 3, 5, 1, 7 + step])  # row 3 twice in a bag, row 1 in two bags
        offsets = torch.tensor([0, 3, 6])
        target = torch.randn(2, dim)
        (fused(indices, offsets) * target).sum().backward()  # the fused kernel updates in backward
        ours.zero_grad()
        (torch.nn.functional.embedding_bag(indices, table, offsets[:-1], mode="sum") * target).sum().backward()
        ours.step()
    torch.testing.assert_close(table.detach(), fused.split_embedding_weights()[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(table.detach(), start)  # it moved, and untouched rows did not
    torch.testing.assert_close(table.detach()[[0, 2, 4, 6, 10, 11]], start[[0, 2, 4, 6, 10, 11]])


def test_table_parameters_are_the_torchrec_tables():
    """What the loop hands to row-wise Adagrad is what the real path shards: the sequence tables
    (item, user, tag) and the MSN/LMN value tables, each once; nothing dense."""
    from components.distributed_model import torchrec_tables
    from tests.models.ranker_factories import make_ranker

    model = make_ranker("ugsep_msn_lmn")
    sequence, memory = table_parameters(model)
    tables = {name: module for _, name, module in torchrec_tables(model)}
    want_memory = [p for m in (model.msn.memory, model.lmn.memory) for p in m.value_tables().parameters()]
    assert {id(p) for p in memory} == {id(p) for p in want_memory} and len(memory) == 2
    assert {id(p) for p in sequence} == {id(p) for p in model.sparse_arch.parameters()}
    assert len(sequence) + len(memory) == len(tables)  # one parameter per TorchRec table
