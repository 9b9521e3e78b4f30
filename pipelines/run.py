"""The main job: every pipeline stage that exists, in order, on one Ray instance.

    python -m pipelines.run --config demo [--section.key=value ...]

Today: ingest -> features -> train -> evaluate -> export (the serving bundle), then a report
of each Delta table's version and row count, one resolved sample group, the training summary,
the test metrics and how to serve the bundle. ``--stages`` runs a prefix of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Mapping

import pyarrow as pa

from components import lake, lake_stats
from components.bundle import BundleError
from components.checkpoint import CheckpointError
from components.collate import CollateConfig, collate_groups
from components.validation import IngestError
from pipelines.cli import pipeline_main
from pipelines.config import PipelineConfig
from pipelines.evaluate import EvaluateError, run_evaluate
from pipelines.export import run_export
from pipelines.features import FeaturesError, run_features
from pipelines.ingest import run_ingest
from pipelines.ray_runtime import ray_runtime
from pipelines.train import TrainError, run_train

logger = logging.getLogger(__name__)

TABLES = ("events", "items", "users", "sequences", "samples")
STAGES = ("ingest", "features", "train", "evaluate", "export")


def describe_group(row: pa.Table, max_seq_len: int) -> str:
    """A short human-readable view of one resolved group row and its collated tensors."""
    rec = row.to_pylist()[0]
    batch = collate_groups(row, CollateConfig(max_seq_len=max_seq_len))
    seq = rec["seq_item_idx"]
    lines = [
        f"group {rec['group_id']} user {rec['user_id']} split {rec['split']} request_ts {rec['request_ts']}",
        f"  sequence: {len(seq)} events before the request (seq_end={rec['seq_end']}); "
        f"last 5 items {seq[-5:]}, actions {rec['seq_action'][-5:]}",
        f"  candidates ({len(rec['cand_item_idx'])}): {rec['cand_item_idx'][:8]} ...",
        f"  engage labels: {rec['label_engage'][:8]} ...   like labels: {rec['label_like'][:8]} ...",
        f"  tensors: seq_item {tuple(batch.seq_item.shape)}, cand_item {tuple(batch.cand_item.shape)}, "
        f"labels {tuple(batch.labels.shape)}",
    ]
    return "\n".join(lines)


def table_report(root: str, storage_options: Mapping[str, str] | None = None) -> list[tuple[str, int | None, int]]:
    """(name, Delta version, rows) for every lake table that exists."""
    out = []
    for name in TABLES:
        uri = lake.table_uri(root, name)
        version = lake.table_version(uri, storage_options)
        rows = lake_stats.row_count(uri, version, storage_options) if version is not None else 0
        out.append((name, version, rows))
    return out


def run(config: PipelineConfig, last_stage: str = STAGES[-1], preset: str = "demo") -> int:
    """Run the stages up to ``last_stage``; returns the process exit code."""
    started = time.perf_counter()
    stages = STAGES[: STAGES.index(last_stage) + 1]
    result = run_ingest(config)
    logger.info("ingest done: %s", ", ".join(f"{c.name} v{c.version} ({c.rows} rows)" for c in result.commits))
    root, options = lake.lake_root(config.lake.root), config.lake.storage_options
    trained, evaluated = None, None
    with ray_runtime(config.ray):
        summary = run_features(config) if "features" in stages else None
        if summary is not None:
            logger.info("features done: %s", summary)
            from components.sequence_join import load_groups

            train = load_groups(root, "train", config.features.max_seq_len, storage_options=options)
            sample = train.take_batch(1, batch_format="pyarrow")
        if "train" in stages:
            trained = run_train(config)
        if "evaluate" in stages:
            checkpoint = trained.checkpoint if trained is not None else config.eval.checkpoint
            evaluated, metrics_path = run_evaluate(
                dataclasses.replace(config, eval=dataclasses.replace(config.eval, checkpoint=checkpoint))
            )
    exported = None
    if "export" in stages:
        checkpoint = trained.checkpoint if trained is not None else config.export.checkpoint
        exported = run_export(
            dataclasses.replace(config, export=dataclasses.replace(config.export, checkpoint=checkpoint))
        )
    print(f"\n{'table':<10} {'version':>7} {'rows':>10}")
    for name, version, rows in table_report(root, options):
        print(f"{name:<10} {'-' if version is None else version:>7} {rows:>10}")
    if summary is not None:
        splits = {s: summary.get(f"groups_{s}", 0) for s in ("train", "valid", "test")}
        print(f"\ngroups by split: {splits}")
        print("\none sample group:\n" + describe_group(sample, config.features.max_seq_len))
    if trained is not None:
        print("\n" + trained.report())
    if evaluated is not None:
        m = evaluated.metrics
        print(
            f"\n{evaluated.variant} on {evaluated.split} ({evaluated.num_groups} groups): "
            + ", ".join(f"{k} {m[k]:.4f}" for k in ("like_auc", "like_uauc", "engage_auc", "like_auc_engaged"))
            + f"\n  metrics: {metrics_path}"
        )
    if exported is not None:
        bundle_dir, manifest = exported
        print(f"\nserving bundle {bundle_dir} (model_version {manifest.model_version})")
        print(f"  serve it: python -m pipelines.serve --config {preset}")
    print(f"\ndone in {time.perf_counter() - started:.1f} s; lake at {root}")
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", choices=STAGES[1:], default=STAGES[-1], help="run the stages up to this one")


def main(argv: list[str] | None = None) -> int:
    return pipeline_main(
        "pipelines.run",
        __doc__.splitlines()[0],
        argv,
        lambda config, args: run(config, args.stages, args.config),
        default_preset="demo",
        failures=(IngestError, lake.LakeError, FeaturesError, TrainError, CheckpointError, EvaluateError, BundleError),
        add_arguments=_add_arguments,
    )


if __name__ == "__main__":
    raise SystemExit(main())
