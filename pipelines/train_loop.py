"""The per-worker training loop that Ray Train runs (``TorchTrainer(train_loop_per_worker=...)``).

Every rank: build the model, shard it (components/distributed_model.py), restore the latest
checkpoint if there is one, then for each epoch iterate its shard of the train split as
``GroupBatch``\\ es (``iter_torch_batches`` + ``GroupCollateFn``, a seeded local shuffle)
taking exactly ``steps_per_epoch`` steps — equal on every rank, or TorchRec's collectives
hang. Checkpoints (every epoch and every ``checkpoint_every_steps``) are DCP saves of every
rank's shards, reported to Ray Train, which merges them into one folder in storage.

Determinism: the RNG is re-seeded from (seed, step, rank) before every step and the shuffle
from (seed, epoch, rank), so a run resumed at step k draws what the uninterrupted run drew
at step k; with ``train.deterministic`` the data order is preserved too and the final
weights match the uninterrupted run's.
"""

from __future__ import annotations

import logging
import math
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from components import object_store
from components.checkpoint import (
    BEST_METRIC,
    DCP_METADATA,
    META_FILE,
    CheckpointMeta,
    load_tensors,
    read_meta,
    run_dir,
    write_meta,
)
from components.collate import CollateConfig, GroupCollateFn
from components.distributed_model import DistributedRanker, ShardingSpec
from components.host_memory import retain_freed_memory
from components.lr_schedule import lr_factor
from components.tracking import Tracker
from models.capability import probe
from pipelines.cli import configure_logging

logger = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the message names the step and the batch."""


@dataclass(frozen=True)
class LoopSpec:
    """Everything a worker needs, resolved by the driver (pipelines/train.py); picklable."""

    model: dict[str, Any]  # ModelConfig as a dict, vocabulary sizes resolved
    train: Any  # pipelines.config.TrainConfig
    lake_root: str
    samples_version: int
    sequences_version: int
    steps_per_epoch: int
    total_steps: int
    valid_batches: int  # per rank; 0 = no validation
    max_seq_len: int
    run_name: str
    storage: str  # absolute folder or URI; the run lives in storage/run_name
    wandb_dir: str
    resume_path: str = ""  # explicit checkpoint to start from when Ray holds none
    # lake.storage_options: endpoint and credentials of an object-store ``storage`` or
    # ``resume_path`` (workers carry no store settings of their own). Never logged.
    storage_options: dict[str, str] = field(default_factory=dict, repr=False)
    extra_config: dict[str, Any] = field(default_factory=dict)  # logged to W&B beside the spec
    # (item_vocab,) bool, True for items with train-period events: valid metrics are also given
    # for warm and cold candidates apart (components/metrics.py). None: the lake has no cut-off.
    warm_items: np.ndarray | None = field(default=None, repr=False)
    # {"item": (item_vocab,), "user": (user_vocab,)} vocabulary index -> embedding row: rare ids
    # share the OOV row (models/id_rows.py). None: every id its own row (no cut-off recorded).
    id_rows: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def sharding(self) -> ShardingSpec:
        t = self.train
        return ShardingSpec(
            t.sharding_types, t.sparse_optimizer, t.sparse_lr, t.memory_lr, t.lr, t.weight_decay, t.fused_optimizer
        )

    def meta(self, progress: Progress, world_size: int, metrics: dict[str, float]) -> CheckpointMeta:
        return CheckpointMeta(
            variant=self.model["variant"],
            model=self.model,
            lake_root=self.lake_root,
            samples_version=self.samples_version,
            sequences_version=self.sequences_version,
            step=progress.step,
            epoch=progress.epoch,
            step_in_epoch=progress.step_in_epoch,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            world_size=world_size,
            train=asdict(self.train),
            metrics=metrics,
        )


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken in the whole run
    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # batches of ``epoch`` already consumed
    # Early stopping's state (checkpointed in the meta's metrics, so a resumed run keeps it).
    best_auc: float = -math.inf  # best valid like AUC so far
    best_epoch: int = -1  # the epoch that reached it (-1: none validated yet)

    def patience_spent(self, patience: int) -> bool:
        """True once ``patience`` finished epochs have passed without a better valid like AUC."""
        return patience > 0 and self.best_epoch >= 0 and (self.epoch - 1) - self.best_epoch >= patience

    def record(self, epoch: int, metrics: dict[str, float]) -> dict[str, float]:
        """Note ``epoch``'s valid like AUC; the ``best/`` entries a checkpoint's meta keeps."""
        auc = metrics.get(BEST_KEY, math.nan)
        if math.isfinite(auc) and auc > self.best_auc:
            self.best_auc, self.best_epoch = auc, epoch
        return {BEST_AUC: self.best_auc, BEST_EPOCH: float(self.best_epoch)}


# ---------------------------------------------------------------------------------------------
# Process group and model
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group() -> bool:
    """A gloo group of one when Ray Train started none (``num_workers=0`` runs in-process);
    returns True when this call created it (and must destroy it)."""
    if dist.is_initialized():
        return False
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return True


def build_distributed(spec: LoopSpec, device: torch.device) -> DistributedRanker:
    from components.config_loader import from_dict
    from models.id_rows import share_rare_ids
    from models.task import RankingTask
    from models.variants import ModelConfig, build_model

    torch.manual_seed(spec.train.seed)  # identical dense init on every rank (DDP also broadcasts)
    model = build_model(from_dict(ModelConfig, spec.model, "model"))
    if spec.id_rows is not None:
        share_rare_ids(model, spec.id_rows)  # before sharding: the map is a (replicated) buffer
    if spec.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if spec.train.compile:
        from models.compiled import compile_dense_blocks

        logger.info("train.compile: compiled %s (the first steps compile them)", compile_dense_blocks(model))
    return DistributedRanker.build(RankingTask(model), spec.sharding, device)


def apply_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute the backbone's and LONGER's blocks in the backward instead of keeping their
    activations; returns how many blocks were wrapped. State-dict keys are unchanged (the
    wrapper strips its prefix), so checkpoints load with or without it."""
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply,
    )

    names = CHECKPOINTED_BLOCKS
    wrapped = sum(type(m).__name__ in names for m in model.modules())
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: type(m).__name__ in names)
    return wrapped


# Blocks whose activations are recomputed under ``train.activation_checkpointing``. UG-Sep's
# split calls (user_content/group_content) bypass the wrapper's forward and are not recomputed.
CHECKPOINTED_BLOCKS = frozenset({"TokenMixerLargeBlock", "RankMixerBlock", "LongerBlock"})


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def restore(dr: DistributedRanker, spec: LoopSpec) -> Progress:
    """Load Ray's latest checkpoint (a restart after a failure, or an auto-resumed run), else
    ``spec.resume_path``, else start at step 0."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            return _load(dr, path)
    if spec.resume_path:
        return _load(dr, spec.resume_path, spec.storage_options)
    return Progress()


def _load(dr: DistributedRanker, path: str, storage_options: dict[str, str] | None = None) -> Progress:
    meta = read_meta(path, storage_options)
    state = dr.state_dict()
    load_tensors(path, state, distributed=True, storage_options=storage_options)
    dr.load_state_dict(state)
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, meta.step, meta.epoch, meta.step_in_epoch)
    best_auc = meta.metrics.get(BEST_AUC, -math.inf)
    return Progress(meta.step, meta.epoch, meta.step_in_epoch, best_auc, int(meta.metrics.get(BEST_EPOCH, -1)))


def save_checkpoint(
    dr: DistributedRanker, spec: LoopSpec, progress: Progress, metrics: dict[str, float], rank: int, world: int
) -> None:
    """Every rank saves its shards into a local folder; Ray Train merges them in storage."""
    import ray.train
    import torch.distributed.checkpoint as dcp

    name = f"checkpoint_{progress.step:09d}"
    with tempfile.TemporaryDirectory(prefix="ultrarank-ckpt-") as directory:
        dcp.save(dr.state_dict(), checkpoint_id=directory)
        if rank == 0:
            write_meta(directory, spec.meta(progress, world, metrics))
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        if spec.train.num_workers == 0:
            # In-process mode reports without uploading: persist it ourselves, where Ray would.
            checkpoint = persist(directory, f"{run_dir(spec.storage, spec.run_name)}/{name}", spec.storage_options)
        report = {**metrics, "step": progress.step, "epoch": progress.epoch}
        if spec.valid_batches:
            # Ray keeps the best checkpoints by this score (and always the latest, for resuming):
            # a mid-epoch save, which validated nothing, ranks below every validated one.
            report[BEST_KEY] = metrics.get(BEST_KEY, -math.inf)
        ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=name)


def persist(directory: str, target: str, storage_options: dict[str, str] | None = None):
    """Copy a local checkpoint folder to ``target`` (folder or URI); the copy's Checkpoint.

    A local copy is staged and moved into place at once. An object store has no folder move:
    the tensor files go first, ``.metadata`` and ``meta.json`` last, and a reader counts a
    checkpoint only once those are there (components/checkpoint.py ``read_meta``)."""
    import pyarrow.fs as pafs
    import ray.train

    fs, path = object_store.filesystem(target, storage_options)
    if object_store.is_remote(target):
        object_store.upload_folder(directory, target, storage_options, last=(DCP_METADATA, META_FILE))
    else:
        staging = f"{path}.partial"
        fs.create_dir(staging, recursive=True)
        pafs.copy_files(directory, staging, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        fs.move(staging, path)
    return ray.train.Checkpoint(path=path, filesystem=fs)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def _autocast(spec: LoopSpec, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.train.bf16)


def train_step(dr: DistributedRanker, batch, spec: LoopSpec, device: torch.device, step: int) -> dict[str, float]:
    """One synchronous step after ``step`` steps: forward, backward (fused sparse update inside),
    dense AdamW at ``train.lr`` times the schedule's factor for this step."""
    rate = spec.train.lr * lr_factor(spec.train.lr_schedule, step, spec.total_steps)
    for group in dr.dense_optimizer.param_groups:
        group["lr"] = rate
    with _autocast(spec, device):
        loss, logs = dr.module(batch)
    dr.zero_grad()
    loss.backward()
    if spec.train.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(dr.dense_parameters(), spec.train.grad_clip_norm)
    dr.step()
    return {**logs, "lr": rate}


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average of every rank's values (one all-reduce); a NaN anywhere stays NaN everywhere,
    so every rank sees a non-finite loss at the same step and stops together."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def validate(dr: DistributedRanker, spec: LoopSpec, device: torch.device) -> dict[str, float]:
    """AUC/UAUC/logloss of the valid split as served (eval mode), computed on rank 0 from every
    rank's scores (gathered: AUC does not decompose over shards)."""
    import ray.train

    from components.metrics import MetricsAccumulator

    shard = ray.train.get_dataset_shard("valid")
    collate = GroupCollateFn(CollateConfig(max_seq_len=spec.max_seq_len))
    acc = MetricsAccumulator()
    task = dr.task
    for i, batch in enumerate(shard.iter_torch_batches(batch_size=spec.train.batch_size, collate_fn=collate)):
        if i >= spec.valid_batches:
            continue  # equal batch counts on every rank: the collectives of a forward must pair up
        with _autocast(spec, device):
            logits, _ = task.evaluate(batch)
        warm = None if spec.warm_items is None else torch.from_numpy(spec.warm_items[batch.cand_item.numpy()])
        acc.update(logits.float(), batch.labels, batch.cand_mask, batch.user_id, warm)
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, acc.state())
    if dist.get_rank() != 0:
        return {}
    return {f"valid/{k}": v for k, v in MetricsAccumulator.from_states(states).compute().items()}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
class _Meter:
    """Throughput between log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.groups, self.candidates = time.perf_counter(), 0, 0

    def add(self, batch) -> None:
        self.groups += batch.batch_size
        self.candidates += int(batch.cand_mask.sum())

    def rates(self, world: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"groups_per_s": self.groups * world / elapsed, "candidates_per_s": self.candidates * world / elapsed}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry point; returns (rank 0) the run's summary as ``Result.return_value``."""
    import ray.train

    spec: LoopSpec = config["spec"]
    configure_logging()  # the driver's rules: FBGEMM's argument dumps never print
    if spec.train.retain_freed_memory:
        retain_freed_memory()
    own_group = ensure_process_group()
    try:
        return _run(spec, ray.train.get_context())
    finally:
        if own_group:
            dist.destroy_process_group()


def _run(spec: LoopSpec, ctx) -> dict[str, Any]:
    import ray.train

    rank, world = dist.get_rank(), dist.get_world_size()
    t = spec.train
    device = torch.device("cuda", ray.train.torch.get_device().index or 0) if t.use_gpu else torch.device("cpu")
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if t.bf16 and rank == 0 and not probe().fast_16bit_gemm(device.type, torch.bfloat16):
        logger.warning(
            "train.bf16 on a device without native bf16 (%s): autocast is emulated, slower than fp32",
            probe().describe(),
        )
    dr = build_distributed(spec, device)
    progress = restore(dr, spec)
    restored_at = progress.step
    tracker = Tracker.start(
        spec.run_name, {**spec.extra_config, "model": spec.model, "train": asdict(t)}, spec.wandb_dir, active=rank == 0
    )
    shard = ray.train.get_dataset_shard("train")
    collate = GroupCollateFn(CollateConfig(max_seq_len=spec.max_seq_len))
    meter, best, last_metrics = _Meter(), {}, {}
    run_meter, warmup_steps = _Meter(), progress.step + 2  # whole-run throughput, first steps excluded
    run_rates: dict[str, float] = {}
    # The curves of the run's report (rank 0's copy is returned): every logged step's losses
    # (means over ranks) and every epoch's validation metrics.
    history: list[dict[str, float]] = []
    buffer = t.shuffle_buffer if t.shuffle != "none" else 0
    started = time.perf_counter()
    stopped_early = progress.patience_spent(t.patience)  # a resumed run that had already stopped
    try:
        while progress.step < spec.total_steps and not stopped_early:
            batches = shard.iter_torch_batches(
                batch_size=t.batch_size,
                collate_fn=collate,
                drop_last=True,
                local_shuffle_buffer_size=buffer or None,
                local_shuffle_seed=(t.seed * 1_000_003 + progress.epoch * 101 + rank) if buffer else None,
            )
            seen = 0
            for i, batch in enumerate(batches):
                seen = i + 1
                # Skip what a resumed run already consumed; never break out early: a streaming
                # split is consumed to the end of the epoch on every rank.
                if i < progress.step_in_epoch or i >= spec.steps_per_epoch or progress.step >= spec.total_steps:
                    continue
                torch.manual_seed(t.seed * 1_000_003 + progress.step * 1009 + rank)
                logs = mean_over_ranks(train_step(dr, batch, spec, device, progress.step))
                progress.step, progress.step_in_epoch = progress.step + 1, progress.step_in_epoch + 1
                meter.add(batch)
                if progress.step == warmup_steps:
                    run_meter.reset()
                elif progress.step > warmup_steps:
                    run_meter.add(batch)
                    run_rates = run_meter.rates(world)  # at the step: no validation or saving inside
                if not math.isfinite(logs["loss"]):
                    raise NonFiniteLoss(
                        f"loss is {logs['loss']} at step {progress.step} (epoch {progress.epoch}, batch {i}); "
                        f"first groups' user_idx {batch.user_id[:4].tolist()}; the last good checkpoint is kept"
                    )
                if t.log_every_steps and progress.step % t.log_every_steps == 0:
                    _log_progress(spec, progress, logs, meter, world, tracker, rank)
                    history.append({"step": progress.step, "epoch": progress.epoch, **logs})
                    meter.reset()
                last_metrics = {f"train/{k}": v for k, v in logs.items()}
                end_of_epoch = progress.step_in_epoch >= spec.steps_per_epoch
                last_step = end_of_epoch or progress.step >= spec.total_steps  # saved below, with validation
                if t.checkpoint_every_steps and progress.step % t.checkpoint_every_steps == 0 and not last_step:
                    save_checkpoint(dr, spec, progress, last_metrics, rank, world)
            epoch_done = progress.step_in_epoch >= spec.steps_per_epoch
            if not epoch_done and progress.step < spec.total_steps:
                raise RuntimeError(
                    f"rank {rank} got {seen} batches in epoch {progress.epoch}, expected {spec.steps_per_epoch} "
                    "(the train split changed under the run, or Ray's split was unequal)"
                )
            if epoch_done or progress.step >= spec.total_steps:
                epoch = progress.epoch
                if epoch_done:  # a max_steps stop mid-epoch resumes inside the epoch
                    progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
                metrics = dict(last_metrics)
                if spec.valid_batches:
                    metrics |= validate(dr, spec, device)
                    best = _better(best, metrics)
                    metrics |= progress.record(epoch, metrics)
                    # Every rank validated the same groups (metrics are reduced): they agree.
                    stopped_early = epoch_done and progress.patience_spent(t.patience)
                if rank == 0:  # short lines: all the metrics in one line ran to ~600 characters
                    for line in _metric_lines(metrics):
                        logger.info("epoch %d done at step %d, %s", epoch, progress.step, line)
                    if stopped_early and progress.step < spec.total_steps:
                        logger.info(
                            "early stop after epoch %d: valid like AUC %.4f at epoch %d, no better in %d epoch(s) "
                            "(train.patience=%d)",
                            epoch,
                            progress.best_auc,
                            progress.best_epoch,
                            epoch - progress.best_epoch,
                            t.patience,
                        )
                tracker.log({**metrics, "epoch": epoch}, step=progress.step)
                history.append({"step": progress.step, "epoch": epoch, **metrics})
                save_checkpoint(dr, spec, progress, metrics, rank, world)
    except NonFiniteLoss as exc:
        tracker.summary({"error": str(exc)})
        tracker.finish()
        return {"error": str(exc), "step": progress.step} if rank == 0 else {}
    summary = {
        "step": progress.step,
        "epochs": progress.epoch,
        "restored_at_step": restored_at,
        "train_s": time.perf_counter() - started,
        "best_valid": best,
        "best_epoch": progress.best_epoch,
        "stopped_early": stopped_early and progress.step < spec.total_steps,
        "last": last_metrics,
        "wandb": tracker.path,
        "history": history,
        **{f"run_{k}": v for k, v in run_rates.items()},
        "sparse_state_bytes": _sum_over_ranks(dr.sparse_state_bytes()),
    }
    tracker.summary({"best_valid": best, "steps": progress.step})
    tracker.finish()
    return summary if rank == 0 else {}


def _sum_over_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


BEST_KEY = BEST_METRIC  # what best-valid means: early stopping, Ray's retention, checkpoint choice
BEST_AUC, BEST_EPOCH = "best/valid_like_auc", "best/epoch"  # kept in every validated checkpoint's meta


def _better(best: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
    """The valid metrics of the best epoch so far (by like AUC)."""
    if BEST_KEY not in metrics or not np.isfinite(metrics[BEST_KEY]):
        return best
    if not best or metrics[BEST_KEY] > best.get(BEST_KEY, -1.0):
        return {k: v for k, v in metrics.items() if k.startswith("valid/")}
    return best


def _metric_lines(metrics: dict[str, float], width: int = 140) -> list[str]:
    """ "split: k=v, ..." per split ("train/loss" -> train), counts as integers, lines of at most
    ~``width`` characters (a console line stays readable beside its timestamp and worker name)."""
    lines = []
    for split in sorted({k.partition("/")[0] for k in metrics}):
        items = [
            f"{name}={int(v)}" if name.startswith("num_") or name == "epoch" else f"{name}={v:.4f}"
            for key, v in sorted(metrics.items())
            if (name := key.partition("/")[2] or key) and key.partition("/")[0] == split
        ]
        line = f"{split}:"
        for item in items:
            if len(line) + len(item) + 2 > width and line != f"{split}:":
                lines.append(line.rstrip(","))
                line = f"{split}:"
            line += f" {item},"
        lines.append(line.rstrip(","))
    return lines


def _log_progress(spec, progress, logs, meter, world, tracker, rank) -> None:
    rates = meter.rates(world)
    if rank == 0:
        losses = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if k.startswith("bce_") or k == "loss")
        logger.info(
            "epoch %d step %d/%d %s | %.1f groups/s %.0f candidates/s",
            progress.epoch,
            progress.step,
            spec.total_steps,
            losses,
            rates["groups_per_s"],
            rates["candidates_per_s"],
        )
    tracker.log(
        {**{f"train/{k}": v for k, v in logs.items()}, **{f"train/{k}": v for k, v in rates.items()}},
        step=progress.step,
    )
