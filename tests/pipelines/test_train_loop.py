"""Pieces of the training loop: activation checkpointing is exact, bf16 autocast trains."""

from __future__ import annotations

import torch

from components.checkpoint import latest_checkpoint, read_meta
from models.ranker import Ranker
from models.task import RankingTask
from pipelines.train import main
from pipelines.train_loop import apply_activation_checkpointing
from tests.models import ranker_factories as rf
from tests.small_runs import train_args


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
