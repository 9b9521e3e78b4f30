"""pipelines.train on a real small lake: Ray Train (in-process and 2 real workers), TorchRec DMP,
DCP checkpoints, exact resume, a killed worker, and the errors a user can run into."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from components.checkpoint import (
    CheckpointError,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    read_meta,
)
from components.training_data import pin_training_data
from pipelines.train import main, run_train, steps_per_epoch
from tests.small_runs import config_of, train_args


def _steps(root: str, world: int = 1, batch: int = 8) -> int:
    return steps_per_epoch(pin_training_data(root).split_rows["train"], world, batch)


def _weights(path: str) -> dict[str, torch.Tensor]:
    model, _ = load_model(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_epoch_in_process_leaves_a_complete_checkpoint(small_lake, trained, capsys):
    storage, path = trained
    meta = read_meta(path)
    assert meta.step == _steps(small_lake) > 2
    assert (meta.epoch, meta.step_in_epoch) == (1, 0)
    assert meta.variant == "tokenmixer_large" and meta.samples_version == pin_training_data(small_lake).samples_version
    vocab = pin_training_data(small_lake).vocabulary
    assert meta.sparse_sizes["item_vocab"] == vocab.item_vocab and meta.sparse_sizes["user_vocab"] == vocab.user_vocab
    assert {"valid/like_auc", "valid/engage_uauc", "train/loss"} <= set(meta.metrics)
    assert 0.0 <= meta.metrics["valid/like_auc"] <= 1.0
    # Tensors only (DCP) beside the JSON record: nothing to unpickle.
    files = sorted(os.listdir(path))
    assert files == [".metadata", "__0_0.distcp", "meta.json"]


def test_deterministic_resume_ends_at_the_uninterrupted_weights(small_lake, tmp_path):
    storage = str(tmp_path)
    # 32 groups a step: a few dozen steps in all, each checkpointed, not a hundred. A constant rate:
    # the interrupted part runs to a smaller max_steps, and a linear schedule spans max_steps.
    common = [
        "--train.lr_schedule=constant",
        "--train.deterministic=true",
        "--train.checkpoint_every_steps=2",
        "--train.max_epochs=2",
        "--train.batch_size=32",
    ]
    per_epoch = _steps(small_lake, batch=32)
    total = per_epoch + 3  # into the second epoch: resume crosses an epoch boundary
    assert main(train_args(small_lake, storage, *common, "--train.run_name=whole", f"--train.max_steps={total}")) == 0
    stop = per_epoch - 1  # stop inside the first epoch
    part = train_args(small_lake, storage, *common, "--train.run_name=parts")
    assert main([*part, f"--train.max_steps={stop}"]) == 0
    assert read_meta(latest_checkpoint(f"{storage}/parts")[0]).step_in_epoch == stop
    summary = run_train(config_of([*part, f"--train.max_steps={total}"]))  # resume=auto
    assert summary.resumed_from and summary.steps == total
    whole, parts = _weights(latest_checkpoint(f"{storage}/whole")[0]), _weights(summary.last_checkpoint)
    assert whole.keys() == parts.keys()
    worst = max((whole[k].float() - parts[k].float()).abs().max().item() for k in whole)
    assert worst <= 1e-5, worst
    # A second auto run of a finished run trains nothing and keeps the step count.
    again = run_train(config_of([*part, f"--train.max_steps={total}"]))
    assert again.steps == total


def test_patience_ends_a_run_that_stops_improving_and_its_best_checkpoint_is_the_one_used(small_lake, tmp_path):
    """Updates too small to move an fp32 weight (every rate 1e-30) make epoch 1's valid like AUC
    equal epoch 0's, which is not better: ``train.patience=1`` ends the run after epoch 1 of 3,
    and the summary, evaluation and export (find_checkpoint) name epoch 0's checkpoint."""
    storage = str(tmp_path)
    flat = ["--train.lr=1e-30", "--train.sparse_lr=1e-30", "--train.memory_lr=1e-30"]
    epochs = ["--train.max_epochs=3", "--train.patience=1", "--train.batch_size=32"]
    args = train_args(small_lake, storage, "--train.run_name=flat", *epochs, *flat)
    summary = run_train(config_of(args))
    per_epoch = _steps(small_lake, batch=32)
    assert (summary.stopped_early, summary.steps, summary.epochs, summary.best_epoch) == (True, 2 * per_epoch, 2, 0)
    best, last = read_meta(summary.checkpoint), read_meta(summary.last_checkpoint)
    assert (best.step, last.step) == (per_epoch, 2 * per_epoch)
    assert best.metrics["valid/like_auc"] == last.metrics["valid/like_auc"] == last.metrics["best/valid_like_auc"]
    assert find_checkpoint("", storage, "flat")[0] == summary.checkpoint
    assert "(best valid like AUC, epoch 0), early stop (train.patience)" in summary.report()
    # Run again (resume=auto): its patience is spent, so it trains nothing more.
    again = run_train(config_of(args))
    assert (again.steps, again.stopped_early, again.checkpoint) == (summary.steps, True, summary.checkpoint)


def test_resume_from_a_checkpoint_of_another_variant_is_refused(small_lake, trained, tmp_path, capsys):
    _, path = trained
    args = train_args(small_lake, str(tmp_path), f"--train.resume={path}", "--model.variant=rankmixer")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert path in err and "'tokenmixer_large'" in err and "'rankmixer'" in err


def test_resume_with_other_vocabulary_sizes_names_the_setting(small_lake, trained, tmp_path, capsys):
    _, path = trained
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["model"]["ranker"]["sparse"]["item_vocab"] += 7
    (copy / "meta.json").write_text(json.dumps(meta))
    assert main(train_args(small_lake, str(tmp_path / "s"), f"--train.resume={copy}")) == 1
    err = capsys.readouterr().err
    assert str(copy) in err and "model.ranker.sparse.item_vocab" in err


def test_missing_incomplete_and_truncated_checkpoints_are_named(small_lake, trained, tmp_path, capsys):
    _, path = trained
    missing = tmp_path / "nope"
    assert main(train_args(small_lake, str(tmp_path / "s"), f"--train.resume={missing}")) == 1
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err
    incomplete = tmp_path / "incomplete"
    shutil.copytree(path, incomplete)
    (incomplete / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=f"{incomplete} has no meta.json"):
        read_meta(str(incomplete))
    truncated = tmp_path / "truncated"
    shutil.copytree(path, truncated)
    shard = truncated / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=f"checkpoint {truncated}: __0_0.distcp is truncated"):
        load_model(str(truncated))
    # An incomplete save is not a checkpoint: auto-resume skips it for the last complete one.
    run = tmp_path / "run"
    shutil.copytree(path, run / "checkpoint_000000001")
    shutil.copytree(incomplete, run / "checkpoint_000000999")
    assert [Path(p).name for p, _ in list_checkpoints(str(run))] == ["checkpoint_000000001"]


def test_non_finite_loss_stops_with_step_and_batch_keeping_the_last_checkpoint(small_lake, tmp_path, capsys):
    storage = str(tmp_path)
    args = train_args(small_lake, storage, "--train.run_name=nan", "--train.checkpoint_every_steps=1")
    assert main([*args, "--train.lr=1e30", "--train.sparse_lr=1e30"]) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step" in err.lower() and "batch" in err
    kept = latest_checkpoint(f"{storage}/nan")
    assert kept is not None and all(
        torch.isfinite(v).all() for v in _weights(kept[0]).values() if v.is_floating_point()
    )


def test_resume_keeps_the_samples_version_it_started_on(small_lake, tmp_path):
    from pipelines.features import run_features

    args = train_args(small_lake, str(tmp_path), "--train.run_name=pinned", "--train.max_epochs=2")
    first = run_train(config_of([*args, "--train.max_steps=2"]))
    run_features(config_of(args))  # the lake moves on: a new samples version
    assert pin_training_data(small_lake).samples_version == first.samples_version + 1
    second = run_train(config_of([*args, "--train.max_steps=4"]))
    assert second.samples_version == first.samples_version and second.steps == 4


def test_two_real_workers_survive_a_killed_worker(small_lake, tmp_path):
    """A real 2-worker TorchTrainer with TorchRec DMP (gloo): one worker is killed by PID after
    the first checkpoint; Ray restarts the group from it and the run ends at the full step count."""
    storage = str(tmp_path)
    per_epoch = _steps(small_lake, world=2, batch=8)
    total = per_epoch + per_epoch // 2  # across an epoch boundary
    args = train_args(
        small_lake,
        storage,
        "--train.run_name=killed",
        "--train.num_workers=2",
        "--train.max_epochs=2",
        f"--train.max_steps={total}",
        f"--train.checkpoint_every_steps={per_epoch // 4}",
        "--train.max_failures=1",
        "--train.valid_every_epoch=false",
    )
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(summary=run_train(config_of(args))), daemon=True)
    thread.start()
    deadline, victim = time.monotonic() + 900, None
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        # Kill only once Ray's controller has registered a checkpoint (it records it in this
        # snapshot; a checkpoint merely uploaded is not what a restart resumes from).
        snapshot = Path(storage) / "killed" / "checkpoint_manager_snapshot.json"
        if snapshot.exists() and "checkpoint_0" in snapshot.read_text():
            workers = [
                p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
            ]
            victim = workers[-1] if workers else None
        time.sleep(0.05)
    assert victim is not None, "no checkpoint or no train worker to kill"
    victim.kill()
    thread.join(timeout=900)
    summary = box["summary"]
    assert summary.steps == total and summary.epochs == 1
    assert summary.restored_at_step >= per_epoch // 4  # the new worker group restarted from a checkpoint
    assert read_meta(summary.checkpoint).world_size == 2
