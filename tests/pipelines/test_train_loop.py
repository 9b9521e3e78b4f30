"""Pieces of the training loop: activation checkpointing is exact, bf16 autocast trains."""

from __future__ import annotations

import pytest
import torch

from components.checkpoint import latest_checkpoint, read_meta
from models.ranker import Ranker
from models.task import RankingTask
from pipelines.train import main, run_train
from pipelines.train_loop import apply_activation_checkpointing
from tests.models import ranker_factories as rf
from tests.small_runs import config_of, train_args


def test_activation_checkpointing_changes_neither_loss_gradients_nor_state_keys():
    torch.set_num_threads(1)
    for variant in ("ugsep_msn_lmn", "tml_longer"):
        torch.manual_seed(0)
        plain = RankingTask(Ranker(rf.VARIANTS[variant]))
        torch.manual_seed(0)
        wrapped = RankingTask(Ranker(rf.VARIANTS[variant]))
        assert apply_activation_checkpointing(wrapped.model) >= 4  # backbone blocks + LONGER blocks
        batch = rf.random_groups(seed=1, batch=4, cands=5, seq=20)
        torch.manual_seed(5)
        loss_a, _ = plain(batch)
        loss_a.backward()
        torch.manual_seed(5)
        loss_b, _ = wrapped(batch)
        loss_b.backward()
        assert loss_a.item() == loss_b.item()
        assert plain.state_dict().keys() == wrapped.state_dict().keys()
        grads = {k.replace("_checkpoint_wrapped_module.", ""): p.grad for k, p in wrapped.named_parameters()}
        for name, p in plain.named_parameters():
            if p.grad is not None:
                assert torch.equal(p.grad, grads[name]), name


def test_bf16_with_activation_checkpointing_trains_and_checkpoints(small_lake, tmp_path):
    args = train_args(
        small_lake,
        str(tmp_path),
        "--train.run_name=bf16",
        "--train.bf16=true",
        "--train.activation_checkpointing=true",
        "--train.max_steps=3",
        "--train.valid_every_epoch=false",
    )
    assert main(args) == 0
    meta = read_meta(latest_checkpoint(f"{tmp_path}/bf16")[0])
    assert meta.step == 3 and meta.train["bf16"] and torch.isfinite(torch.tensor(meta.metrics["train/loss"]))


def test_linear_schedule_lowers_the_dense_rate_every_step_to_lr_over_total(small_lake, tmp_path):
    """``train.lr_schedule=linear`` over a 4-step run: the dense AdamW rate of each step, as the
    run's history logs it, is lr x (1, 3/4, 1/2, 1/4); ``constant`` keeps lr throughout."""
    rates = {}
    for schedule in ("linear", "constant"):
        args = train_args(
            small_lake,
            str(tmp_path),
            f"--train.run_name={schedule}",
            f"--train.lr_schedule={schedule}",
            "--train.lr=0.002",
            "--train.max_steps=4",
            "--train.log_every_steps=1",
            "--train.valid_every_epoch=false",
        )
        summary = run_train(config_of(args))
        rates[schedule] = [h["lr"] for h in summary.history if "lr" in h]
    assert rates["linear"] == pytest.approx([0.002, 0.0015, 0.001, 0.0005])
    assert rates["constant"] == pytest.approx([0.002] * 4)


def test_epoch_metrics_log_as_short_lines_per_split_with_counts_as_integers():
    from pipelines.train_loop import _metric_lines

    metrics = {"train/loss": 1.5, "valid/like_auc": 0.48125, "valid/num_groups": 38.0}
    metrics |= {f"valid/metric_{i}": 0.5 for i in range(12)}
    metrics |= {"best/epoch": 2.0, "best/valid_like_auc": 0.5}
    lines = _metric_lines(metrics, width=140)
    assert lines[0] == "best: epoch=2, valid_like_auc=0.5000"
    lines = lines[1:]
    assert lines[0] == "train: loss=1.5000"
    assert all(line.startswith("valid: ") and len(line) <= 140 for line in lines[1:]) and len(lines) > 2
    joined = " ".join(lines[1:])
    assert "like_auc=0.4813" in joined and "num_groups=38," in joined + "," and joined.count("metric_") == 12
