"""Ingest stage: raw events -> Delta tables ``events``, ``items``, ``users`` (docs/DATA.md).

    python -m pipelines.ingest --config demo [--section.key=value ...]

Sources (``ingest.source``): ``movielens`` (a GroupLens folder, downloaded when absent),
``events`` (a CSV/Parquet log with a declared column mapping, optional items/users
files), ``synthetic`` (the seeded latent-interest generator).

Guarantees
- Validate first, write last: every input is read, coerced and row-checked before the
  first table is touched. Bad files (missing, empty, a missing or mistyped column) and a
  rejected-row fraction above ``ingest.max_reject_frac`` fail the run with a one-line
  error and a non-zero exit; no table changes.
- Idempotent: each table is rewritten with ``mode="overwrite"`` as ONE new Delta version;
  rows are sorted, so re-running on the same input writes the same content again.
  A crash mid-write leaves that table at its previous version (Delta commits are atomic).
- One run = one consistent set of tables: the three commits (items, users, events) record
  one ingest run id (components/ingest_runs.py). A crash between them leaves the latest
  versions from two runs; every reader (``ingest_runs.pin_ingest``) refuses such a lake
  with "re-run ingest" instead of mixing two runs' vocabularies, and re-running repairs it.
- Ray is not needed (the tables fit the driver); Delta writes go through components/lake.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.ingest_runs import TableCommit, new_run_id, write_ingest_tables
from components.ingest_sources import (
    ITEM_ATTR_COLUMNS,
    SourceData,
    read_events_source,
    read_movielens,
    read_synthetic,
    resolve_movielens_dir,
)
from components.lake import LakeError, events_table, items_table, users_table
from components.ts_units import TsRange, near_epoch_message
from components.validation import IngestError, ValidationReport, check_reject_threshold, validate_events
from pipelines.cli import pipeline_main
from pipelines.config import PipelineConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    """What one ingest run committed: its run id (in all three commits), the commits, the row report."""

    run_id: str
    commits: tuple[TableCommit, ...]
    report: ValidationReport


def load_source(cfg: PipelineConfig) -> SourceData:
    """Read the configured source (no validation of rows yet)."""
    ingest = cfg.ingest
    if ingest.source == "movielens":
        folder = resolve_movielens_dir(ingest.movielens_dir, ingest.download_if_missing, ingest.download_dir)
        return read_movielens(folder, cfg.features.tags_per_item, ingest.max_tag_vocab)
    if ingest.source == "events":
        return read_events_source(ingest.events)
    return read_synthetic(ingest.synthetic)


def _complete_items(attrs: pa.Table, event_items: np.ndarray) -> pa.Table:
    """Items table covering the attribute rows AND every item seen in events (defaults: no
    title, no genre, year 0, no tags), so every event item gets a vocabulary index."""
    known = attrs["item_id"].to_numpy()
    extra = np.setdiff1d(np.unique(event_items), known)
    if len(extra):
        logger.info("%d event items have no attributes; adding them with defaults", len(extra))
    empty_tags = pa.ListArray.from_arrays(np.zeros(len(extra) + 1, np.int32), pa.array([], pa.int32()))
    tags = pa.concat_arrays([attrs["tag_ids"].combine_chunks().cast(pa.list_(pa.int32())), empty_tags])
    titles = pa.concat_arrays([attrs["title"].combine_chunks().cast(pa.string()), pa.nulls(len(extra), pa.string())])
    return items_table(
        np.concatenate([known, extra]),
        np.concatenate([attrs["genre_mask"].to_numpy(), np.zeros(len(extra), np.int32)]),
        np.concatenate([attrs["year"].to_numpy(), np.zeros(len(extra), np.int16)]),
        tags,
        titles,
    )


def build_tables(cfg: PipelineConfig, source: SourceData) -> tuple[dict[str, pa.Table], ValidationReport]:
    """Validate the source's events and build the three lake tables in memory."""
    ingest = cfg.ingest
    near_epoch = near_epoch_message(pc.drop_null(source.events["ts"]).to_numpy(), source.ts_unit)
    if near_epoch:
        raise IngestError(f"{source.name}: {near_epoch}; nothing was written")
    clean, report = validate_events(
        source.events,
        ingest.value_min,
        ingest.value_max,
        max_samples=ingest.reject_samples,
        ts_range=TsRange.from_config(ingest.min_ts_s, ingest.max_ts_ahead_s),
        declared_ts_unit=source.ts_unit,
    )
    logger.info("%s: %s", source.name, report.summary())
    check_reject_threshold(report, ingest.max_reject_frac, source.name)
    if clean.num_rows == 0:
        raise IngestError(f"{source.name}: no valid events; nothing was written")
    user_id = clean["user_id"].to_numpy()
    item_id = clean["item_id"].to_numpy()
    events = events_table(
        user_id,
        item_id,
        clean["ts"].to_numpy(),
        pc.cast(clean["value"], pa.float32()).to_numpy(),
        cfg.lake.buckets_for(clean.num_rows),
    )
    extra_users = source.user_ids if source.user_ids is not None else np.zeros(0, np.int64)
    tables = {
        "items": _complete_items(source.items.select(list(ITEM_ATTR_COLUMNS)), item_id),
        "users": users_table(np.concatenate([user_id, extra_users])),
        "events": events,
    }
    return tables, report


def run_ingest(cfg: PipelineConfig) -> IngestResult:
    """Read, validate, build and write; raises IngestError/ConfigError/LakeError on failure."""
    source = load_source(cfg)
    tables, report = build_tables(cfg, source)
    run_id = new_run_id()
    commits = write_ingest_tables(cfg.lake.root, tables, run_id, cfg.lake.storage_options, source.metadata)
    return IngestResult(run_id=run_id, commits=commits, report=report)


def _main(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    result = run_ingest(cfg)
    print(f"{'table':<8} {'version':>7} {'rows':>10}")
    for commit in result.commits:
        print(f"{commit.name:<8} {commit.version:>7} {commit.rows:>10}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints ``table version rows`` per table. 0 ok, 1 bad data, 2 bad config."""
    return pipeline_main(
        "pipelines.ingest",
        "Raw events -> Delta tables events, items, users.",
        argv,
        _main,
        failures=(IngestError, LakeError),
    )


if __name__ == "__main__":
    raise SystemExit(main())
