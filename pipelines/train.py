"""Train a ranker variant on the lake's group batches with Ray Train.

    python -m pipelines.train --config PRESET [--model.variant=full] [--train.num_workers=2] ...

A ``TorchTrainer`` of ``train.num_workers`` workers (gloo on CPU, nccl with
``train.use_gpu``) runs pipelines/train_loop.py: TorchRec-sharded tables with fused
row-wise Adagrad and DDP dense parameters with AdamW, one synchronous step per batch of
``train.batch_size`` groups per worker. The driver pins the data (components/training_data.py),
resolves vocabulary sizes and the resume point, and prints a summary at the end: best
valid metrics, the checkpoint path and the W&B run.

Checkpoints go to ``train.storage_path/run_name``: a folder, or an object-store URI reached with
``lake.storage_options`` (Ray Train gets the pyarrow filesystem built from them; its workers
carry no store settings of their own).

Resume (``train.resume``): ``auto`` continues the run ``storage_path/run_name`` from its
latest checkpoint (also what Ray Train does after a worker failure, up to
``train.max_failures`` times); ``never`` starts a fresh run (a new, timestamped run name if
the old one has checkpoints); a path starts from that checkpoint. A checkpoint of another
variant or other vocabulary sizes is refused with the file and the difference named.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from components import lake, object_store
from components.checkpoint import (
    BEST_METRIC,
    CheckpointError,
    CheckpointMeta,
    best_checkpoint,
    check_compatible,
    latest_checkpoint,
    read_meta,
    run_dir,
)
from components.config_loader import to_dict
from components.training_data import TrainingData, pin_training_data, rare_id_maps, resolved_model, train_counts
from models.id_rows import OOV_ROW, num_shared
from models.variants import ModelConfig
from pipelines.cli import pipeline_main
from pipelines.config import PipelineConfig, TrainConfig
from pipelines.ray_runtime import ray_runtime
from pipelines.train_loop import LoopSpec, train_loop_per_worker

logger = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """The run failed (non-finite loss, data too small for one step, workers failing)."""


@dataclass(frozen=True)
class TrainSummary:
    """What ``run_train`` returns and prints."""

    run_name: str
    run_dir: str
    checkpoint: str  # the best-valid checkpoint (the latest when nothing was validated)
    steps: int
    epochs: int
    train_s: float
    best_valid: dict[str, float]
    wandb: str
    resumed_from: str
    samples_version: int
    sparse_state_bytes: int
    restored_at_step: int  # the step the final worker group started from (> 0 after a restart)
    candidates_per_s: float  # all workers, after the first two steps (validation and checkpoints included)
    last: dict[str, float] = field(default_factory=dict)
    best_epoch: int = -1  # the epoch of ``checkpoint`` (-1: none validated)
    stopped_early: bool = False  # train.patience ended the run before train.max_epochs
    last_checkpoint: str = ""  # where a resumed run continues (the run's latest checkpoint)
    # Logged steps' losses and each epoch's valid metrics, in step order (pipelines/train_loop.py).
    history: list[dict[str, float]] = field(default_factory=list)

    def report(self) -> str:
        lines = [
            f"run {self.run_name}: {self.steps} steps, {self.epochs} epochs in {self.train_s:.1f} s"
            + (f" (resumed from {self.resumed_from})" if self.resumed_from else ""),
            f"  checkpoint: {self.checkpoint}"
            + (f" (best valid like AUC, epoch {self.best_epoch})" if self.best_epoch >= 0 else "")
            + (", early stop (train.patience)" if self.stopped_early else ""),
            f"  W&B run:    {self.wandb or '(tracking off: WANDB_MODE=disabled)'}",
        ]
        shown = {k[len("valid/") :]: v for k, v in self.best_valid.items() if not k.startswith("valid/num_")}
        whole = {k: v for k, v in shown.items() if not k.endswith(("_warm", "_cold"))}
        if whole:
            lines.append("  best valid: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(whole.items())))
        parts = {
            k: shown[k] for k in ("like_auc_warm", "like_auc_cold", "engage_auc_warm", "engage_auc_cold") if k in shown
        }
        if parts:  # the rest of the warm/cold metrics are in the history and W&B
            lines.append("  best valid, warm and cold items: " + ", ".join(f"{k}={v:.4f}" for k, v in parts.items()))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Resolving the run
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePlan:
    run_name: str
    resume_path: str  # explicit checkpoint to load when Ray has none for the run ("" = none)
    meta: CheckpointMeta | None  # the checkpoint a resumed run continues from


def plan_resume(
    t: TrainConfig, storage: str, base_name: str, model: dict[str, Any], storage_options: dict[str, str] | None = None
) -> ResumePlan:
    """Which run folder, and from which checkpoint (see module docstring)."""
    latest = latest_checkpoint(run_dir(storage, base_name), storage_options)
    fresh_name = f"{base_name}-{time.strftime('%Y%m%d-%H%M%S')}" if latest else base_name
    if t.resume == "never":
        return ResumePlan(fresh_name, "", None)
    if t.resume == "auto":
        if latest is None:
            return ResumePlan(base_name, "", None)
        path, meta = latest
        check_compatible(path, meta, model)
        # Ray Train restores a run's latest checkpoint itself; naming it also covers the
        # in-process mode (num_workers=0), which does not.
        return ResumePlan(base_name, path, meta)
    meta = read_meta(t.resume, storage_options)
    check_compatible(t.resume, meta, model)
    return ResumePlan(fresh_name, t.resume, meta)


def steps_per_epoch(rows: int, world: int, batch_size: int) -> int:
    """Full batches each rank gets: Ray's equal split gives every rank ``rows // world`` rows."""
    return (rows // world) // batch_size


def build_spec(
    config: PipelineConfig, data: TrainingData, model: ModelConfig, plan: ResumePlan, storage: str
) -> LoopSpec:
    t = config.train
    world = t.world_size
    per_epoch = steps_per_epoch(data.split_rows["train"], world, t.batch_size)
    if per_epoch < 1:
        raise TrainError(
            f"the train split has {data.split_rows['train']} groups: fewer than one batch of "
            f"train.batch_size={t.batch_size} per worker ({world} workers); lower train.batch_size"
        )
    total = per_epoch * t.max_epochs if not t.max_steps else min(t.max_steps, per_epoch * t.max_epochs)
    valid_rows = data.split_rows["valid"] // world
    valid_batches = math.ceil(valid_rows / t.batch_size) if t.valid_every_epoch and valid_rows else 0
    counts = train_counts(data)
    id_rows = None
    if counts is not None:
        f = config.features
        id_rows = rare_id_maps(counts, f.min_item_count, f.min_user_count)
        shared = {kind: num_shared(rows) for kind, rows in id_rows.items()}
        logger.info(
            "rare ids share the OOV row: %d of %d items (features.min_item_count=%d), %d of %d users "
            "(features.min_user_count=%d)",
            shared["item"],
            id_rows["item"].size - (OOV_ROW + 1),
            f.min_item_count,
            shared["user"],
            id_rows["user"].size - (OOV_ROW + 1),
            f.min_user_count,
        )
    return LoopSpec(
        model=to_dict(model),
        train=t,
        lake_root=data.lake_root,
        samples_version=data.samples_version,
        sequences_version=data.sequences_version,
        steps_per_epoch=per_epoch,
        total_steps=total,
        valid_batches=valid_batches,
        max_seq_len=t.max_seq_len or data.max_seq_len,
        run_name=plan.run_name,
        storage=storage,
        wandb_dir=config.wandb_dir,
        resume_path=plan.resume_path,
        storage_options=dict(config.lake.storage_options),
        extra_config={"samples_version": data.samples_version, "lake_root": data.lake_root},
        warm_items=counts["item"] > 0 if valid_batches and counts is not None else None,
        id_rows=id_rows,
    )


def make_trainer(config: PipelineConfig, spec: LoopSpec, data: TrainingData, storage: str):
    """The ``TorchTrainer`` (datasets split equally across workers, seeded, pinned)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = config.train
    # An object store goes to Ray as a pyarrow filesystem built from lake.storage_options and the
    # path without its scheme: Ray's own from_uri would read the (absent) AWS env of each node.
    storage_path, storage_filesystem = object_store.ray_storage(storage, spec.storage_options)
    train = data.load_groups("train", spec.max_seq_len)
    if t.shuffle == "global":
        train = train.random_shuffle(seed=t.seed)
    datasets = {"train": train}
    if spec.valid_batches:
        datasets["valid"] = data.load_groups("valid", spec.max_seq_len)
    # Ordered execution makes the split (and so each rank's batches) repeatable.
    options = ExecutionOptions(preserve_order=t.deterministic)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu),
        run_config=RunConfig(
            name=spec.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=t.max_failures),
            # Ray keeps the best validated checkpoints (and always the latest, to resume from).
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.num_checkpoints_to_keep,
                checkpoint_score_attribute=BEST_METRIC if spec.valid_batches else None,
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=list(datasets), execution_options=options),
    )


def run_train(config: PipelineConfig) -> TrainSummary:
    """Train ``config.model`` on the lake (Ray must be up); raises TrainError/CheckpointError/LakeError."""
    from ray.train import TrainingFailedError

    t = config.train
    storage, options = object_store.absolute(t.storage_path), config.lake.storage_options
    object_store.check_bucket(storage, options)  # before any work: the first save would fail
    base_name = config.run_name
    probe = pin_training_data(config.lake.root, options)
    plan = plan_resume(t, storage, base_name, to_dict(resolved_model(config.model, probe)), options)
    data = probe
    if plan.meta is not None and plan.meta.samples_version != probe.samples_version:
        # A resumed run keeps the data it started on, whatever features wrote since.
        data = pin_training_data(config.lake.root, config.lake.storage_options, plan.meta.samples_version)
        logger.info("resuming on samples version %d (latest is %d)", data.samples_version, probe.samples_version)
    spec = build_spec(config, data, resolved_model(config.model, data), plan, storage)
    logger.info(
        "training %s: %d workers x %d groups/step, %d steps/epoch, %d steps, L=%d, run %s/%s",
        config.model.variant,
        t.world_size,
        t.batch_size,
        spec.steps_per_epoch,
        spec.total_steps,
        spec.max_seq_len,
        storage,
        spec.run_name,
    )
    try:
        result = make_trainer(config, spec, data, storage).fit()
    except TrainingFailedError as exc:
        raise TrainError(f"training failed: {_root_cause(exc)}") from exc
    out = result.return_value or {}
    if "error" in out:
        raise TrainError(out["error"])
    where = run_dir(storage, spec.run_name)
    # Ray's path is inside its filesystem (no scheme for a store): name it as the config does.
    saved = result.checkpoint
    last = object_store.join(where, saved.path.rstrip("/").rsplit("/", 1)[-1]) if saved is not None else ""
    best = best_checkpoint(where, options)
    return TrainSummary(
        run_name=spec.run_name,
        run_dir=where,
        checkpoint=best[0] if best is not None else last,
        last_checkpoint=last,
        best_epoch=int(out.get("best_epoch", -1)),
        stopped_early=bool(out.get("stopped_early", False)),
        steps=int(out.get("step", 0)),
        epochs=int(out.get("epochs", 0)),
        train_s=float(out.get("train_s", 0.0)),
        best_valid=dict(out.get("best_valid", {})),
        wandb=str(out.get("wandb", "")),
        resumed_from=plan.resume_path or ("" if plan.meta is None else f"step {plan.meta.step}"),
        samples_version=data.samples_version,
        sparse_state_bytes=int(out.get("sparse_state_bytes", 0)),
        restored_at_step=int(out.get("restored_at_step", 0)),
        candidates_per_s=float(out.get("run_candidates_per_s", 0.0)),
        last=dict(out.get("last", {})),
        history=list(out.get("history", [])),
    )


def _root_cause(exc: BaseException) -> str:
    """The innermost error's message (Ray wraps worker errors in several layers)."""
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return text[-1] if text else type(seen).__name__


def _main(config: PipelineConfig, args: argparse.Namespace) -> int:
    with ray_runtime(config.ray):
        summary = run_train(config)
    print(summary.report())
    if args.json:
        print(json.dumps(dataclasses.asdict(summary)))
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="also print the summary as one JSON line")


def main(argv: list[str] | None = None) -> int:
    return pipeline_main(
        "pipelines.train",
        __doc__.splitlines()[0],
        argv,
        _main,
        default_preset="demo",
        failures=(lake.LakeError, CheckpointError, TrainError),
        add_arguments=_add_arguments,
    )


if __name__ == "__main__":
    raise SystemExit(main())
