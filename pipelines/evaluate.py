"""Evaluate a training checkpoint on a split: batch inference with Ray Data, metrics.json, W&B.

    python -m pipelines.evaluate --config PRESET [--eval.checkpoint=PATH] [--eval.split=test]

The split's groups (at the samples version the checkpoint was trained on) are scored by an
actor pool (``map_batches``); each actor loads the checkpoint once, unsharded, through
``torch.distributed.checkpoint`` (no pickle), and scores groups in eval mode — the model as
served. The driver computes per task AUC, UAUC and logloss plus ``like_auc_engaged``
(components/metrics.py) and writes ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from components import lake
from components.checkpoint import (
    CheckpointError,
    find_checkpoint,
    load_model,
    write_text,
)
from components.collate import CollateConfig, collate_groups
from components.metrics import MetricsAccumulator
from components.tracking import Tracker
from components.training_data import pin_training_data, warm_items
from models.batch import GroupBatch
from pipelines.cli import pipeline_main
from pipelines.config import PipelineConfig
from pipelines.ray_runtime import ray_runtime

logger = logging.getLogger(__name__)


class EvaluateError(RuntimeError):
    """Evaluation could not run (nothing to evaluate, an empty split)."""


@dataclass(frozen=True)
class EvalReport:
    """The content of ``metrics.json``."""

    checkpoint: str
    variant: str
    split: str
    step: int
    samples_version: int
    max_seq_len: int
    num_groups: int
    metrics: dict[str, float]
    eval_s: float
    wandb: str = ""


class GroupScorer:
    """Ray Data actor: loads the checkpoint once, then scores batches of resolved groups.

    Output: one row per real candidate (user, logits and labels of both tasks), so the
    driver's metrics see every candidate exactly once whatever the batching.
    """

    def __init__(
        self,
        checkpoint: str,
        max_seq_len: int,
        threads: int = 1,
        storage_options: dict[str, str] | None = None,
        warm_items: np.ndarray | None = None,
    ) -> None:
        import torch

        torch.set_num_threads(threads)
        self.model, _ = load_model(checkpoint, storage_options=storage_options)
        self.collate = CollateConfig(max_seq_len=max_seq_len)
        self.warm_items = warm_items  # (item_vocab,) bool: item has train-period events

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        import torch

        batch = collate_groups(table, self.collate)
        with torch.no_grad():
            out = self.model(batch)
        logits = getattr(out, "logits", out)
        # UAUC groups by the raw user id: vocabulary index 1 lumps every unknown user together.
        return score_rows(batch, logits, table.column("user_id").to_numpy(), self.warm_items)


def score_rows(
    batch: GroupBatch, logits, user_ids: np.ndarray, warm_items: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Flat per-candidate columns of a scored batch (real slots only); ``warm`` (int8) when
    ``warm_items`` (bool by item_idx) says which items are warm."""
    mask = batch.cand_mask.numpy()
    user = np.broadcast_to(np.asarray(user_ids)[:, None], mask.shape)[mask]
    logit = logits.detach().float().numpy()[mask]  # (M, tasks)
    label = batch.labels.numpy()[mask]
    out = {"user_id": user.astype(np.int64)}
    if warm_items is not None:
        out["warm"] = warm_items[batch.cand_item.numpy()[mask]].astype(np.int8)
    for i, task in enumerate(GroupBatch.TASKS):
        out[f"logit_{task}"] = logit[:, i].astype(np.float32)
        out[f"label_{task}"] = label[:, i].astype(np.float32)
    return out


def metrics_of(rows: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-candidate columns -> metrics (components/metrics.py)."""
    acc = MetricsAccumulator()
    m = len(rows["user_id"])
    logits = np.stack([rows[f"logit_{t}"] for t in GroupBatch.TASKS], -1).reshape(m, 1, -1)
    labels = np.stack([rows[f"label_{t}"] for t in GroupBatch.TASKS], -1).reshape(m, 1, -1)
    warm = rows["warm"].reshape(m, 1).astype(bool) if "warm" in rows else None
    acc.update(logits, labels, np.ones((m, 1), bool), rows["user_id"], warm)
    return acc.compute()


def _scored(
    groups: Any, cfg: Any, path: str, max_seq_len: int, options: Mapping[str, str], warm_items: np.ndarray | None
) -> Any:
    """The scorer actor pool over ``groups`` (a Ray Dataset of group rows)."""
    return groups.map_batches(
        GroupScorer,
        # The actors carry no store settings of their own: the options travel with them.
        fn_constructor_kwargs={
            "checkpoint": path,
            "max_seq_len": max_seq_len,
            "storage_options": dict(options),
            "warm_items": warm_items,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        concurrency=cfg.num_actors,
        num_cpus=1,
        # Ray Data restarts pool actors by default, but its actors' constructor arguments sit in
        # the object store, where a restart cannot be relied on (ray-project/ray#53727; Ray logs
        # an error line per actor saying so): a lost scorer fails the stage, which a re-run
        # redoes from the checkpoint. (Through ray_remote_args_fn: max_restarts as a keyword is
        # deprecated in this Ray; the function's args are applied last, at each actor's creation.)
        ray_remote_args_fn=lambda: {"max_restarts": 0, "max_task_retries": 0},
    )


def run_evaluate(config: PipelineConfig) -> tuple[EvalReport, str]:
    """Score ``eval.split`` with the checkpoint; (report, metrics.json path). Ray must be up."""
    started = time.perf_counter()
    cfg = config.eval
    options = config.lake.storage_options
    path, meta = find_checkpoint(cfg.checkpoint, config.train.storage_path, config.run_name, options)
    if os.path.abspath(meta.lake_root) != lake.lake_root(config.lake.root) and "://" not in meta.lake_root:
        logger.warning("checkpoint was trained on lake %s; evaluating on %s", meta.lake_root, config.lake.root)
    data = pin_training_data(config.lake.root, options, meta.samples_version)
    if data.split_rows.get(cfg.split, 0) == 0:
        raise EvaluateError(f"split {cfg.split!r} of samples version {data.samples_version} has no groups")
    max_seq_len = int(meta.train.get("max_seq_len") or data.max_seq_len)
    warm = warm_items(data)
    logger.info(
        "evaluating %s (%s, step %d) on %s: %d groups",
        path,
        meta.variant,
        meta.step,
        cfg.split,
        data.split_rows[cfg.split],
    )
    with warnings.catch_warnings():  # the deprecation below names Ray 2.64, which has the named parameter
        warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
        scored = _scored(data.load_groups(cfg.split, max_seq_len), cfg, path, max_seq_len, options, warm)
    parts = list(scored.iter_batches(batch_format="numpy", batch_size=None))
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    if not rows:
        raise EvaluateError(f"split {cfg.split!r} produced no scored candidates")
    metrics = metrics_of(rows)
    output = cfg.output or f"{path.rstrip('/').rsplit('/', 1)[0]}/metrics_{cfg.split}.json"
    tracker = Tracker.start(
        f"{meta.variant}-eval-{cfg.split}",
        {"checkpoint": path, "split": cfg.split, "model": meta.model, "step": meta.step},
        config.wandb_dir,
        job_type="evaluate",
    )
    tracker.log({f"{cfg.split}/{k}": v for k, v in metrics.items()})
    tracker.summary({f"{cfg.split}/{k}": v for k, v in metrics.items()} | {"checkpoint": path})
    report = EvalReport(
        checkpoint=path,
        variant=meta.variant,
        split=cfg.split,
        step=meta.step,
        samples_version=data.samples_version,
        max_seq_len=max_seq_len,
        num_groups=data.split_rows[cfg.split],
        metrics=metrics,
        eval_s=round(time.perf_counter() - started, 2),
        wandb=tracker.path,
    )
    tracker.finish()
    write_text(output, json.dumps(asdict(report), indent=1, sort_keys=True), options)
    return report, output


def _main(config: PipelineConfig, args: argparse.Namespace) -> int:
    with ray_runtime(config.ray):
        report, output = run_evaluate(config)
    m = report.metrics
    print(f"{report.variant} step {report.step} on {report.split} ({report.num_groups} groups):")
    for task in GroupBatch.TASKS:
        print(
            f"  {task:<7} AUC {m[f'{task}_auc']:.4f}  UAUC {m[f'{task}_uauc']:.4f}  logloss {m[f'{task}_logloss']:.4f}"
        )
    print(f"  like AUC among engaged: {m['like_auc_engaged']:.4f}")
    print(f"metrics: {output}" + (f"\nW&B run: {report.wandb}" if report.wandb else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return pipeline_main(
        "pipelines.evaluate",
        __doc__.splitlines()[0],
        argv,
        _main,
        default_preset="demo",
        failures=(lake.LakeError, CheckpointError, EvaluateError),
    )


if __name__ == "__main__":
    raise SystemExit(main())
