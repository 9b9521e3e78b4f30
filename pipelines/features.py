"""Features stage: Delta ``events`` (+ ``items``, ``users``) -> Delta ``sequences`` and ``samples``.

``python -m pipelines.features --config demo [--features.max_seq_len=...]``

One Ray task per bucket (docs/DATA.md): each reads ONE bucket of events (a partition of the
events table), sorts it by (user_id, ts, item_id, value), builds the users' sequences and
groups with whole-column polars/NumPy (pipelines/features_build.py), writes Parquet files for
both output tables and returns only their file metadata; the driver then makes ONE atomic
Delta commit per table. No shuffle, and a task's memory grows with its bucket, not with the
number of users: ``lake.num_buckets`` (set at ingest) is the memory knob.

Plain tasks, not a Ray Data pass: a task's output is a few file records, so Ray Data's
streaming executor had nothing to stream, and its first use in a driver cost ~4 s (a trivial
Ray Data job on freshly warmed workers: 4.2 s, one busy core) on top of a job of seconds.

Global inputs every bucket needs are computed first by small Ray tasks over the ``ts`` and
``item_id`` columns only (pipelines/features_stats.py): the exact time-split cut-offs, then
item popularity over the train period (for negatives).

The inputs are ONE ingest run's items/users/events triple (``ingest_runs.pin_ingest``: a lake
whose latest ingest run is incomplete is refused). Both commits carry ``run_metadata`` (job id,
that triple: ingest run id and table versions, loader settings) in their Delta commit info;
``sequences`` commits first and ``components.sequence_join.load_groups`` pairs the two tables
by job id. Sequences are stored in full: ``max_seq_len`` applies at load time.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray

from components import groups, lake, lake_files
from components.ingest_runs import pin_ingest
from components.item_features import item_arrays, lookup
from components.lake import (
    SAMPLES_PARTITION,
    SAMPLES_SCHEMA,
    SEQUENCES_PARTITION,
    SEQUENCES_SCHEMA,
    lake_root,
    run_metadata,
)
from components.transforms import OOV
from pipelines.cli import pipeline_main
from pipelines.config import FeaturesConfig, PipelineConfig
from pipelines.features_build import BUCKET_PHASES, EVENT_COLUMNS, BucketContext, PhaseTimer, build_bucket
from pipelines.features_stats import EventStats, FeaturesError, bucket_filter, check_train_period, global_stats
from pipelines.ray_runtime import ray_runtime

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Workers write Parquet (components/lake.py), the driver commits once per table
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BucketJob:
    """What every bucket task of one features run reads, and where and how it writes."""

    events: lake.PinnedTable
    users: lake.PinnedTable
    sequences_uri: str
    samples_uri: str
    storage_options: dict[str, str]  # of the output tables (the lake's, as for the inputs)
    job_id: str


@dataclass(frozen=True)
class BucketResult:
    """What one bucket task hands back: its data files' metadata and where its time went."""

    files: list[dict]  # table, path, size, partition, num_rows of every data file written
    phases_s: dict[str, float]  # BUCKET_PHASES


def _split_parts(samples: pa.Table) -> list[tuple[str, pa.Table]]:
    """(split, rows) of each split present, as zero-copy slices of rows grouped by split."""
    parts, at = [], 0
    for split in groups.SPLITS:
        rows = int(pc.sum(pc.equal(samples["split"], split)).as_py() or 0)
        part = samples.slice(at, rows)
        if rows and not pc.all(pc.equal(part["split"], split)).as_py():  # a build broke the grouping
            raise AssertionError(f"samples rows are not grouped by split ({groups.SPLITS}); {split!r} is not one run")
        parts.append((split, part))
        at += rows
    return [(split, part) for split, part in parts if part.num_rows]


def _write_bucket(sequences: pa.Table, samples: pa.Table, bucket: int, job: BucketJob) -> list[dict]:
    """Write one bucket's rows (one file per table and split); return the files' metadata."""
    name = f"part-{bucket:05d}-{job.job_id}"
    write = lambda table, rows, uri, partition: {
        "table": table,
        **lake_files.write_data_file(rows, uri, partition, name, job.storage_options),
    }
    files = [write("sequences", sequences, job.sequences_uri, {"bucket": str(bucket)})]
    for split, part in _split_parts(samples):
        files.append(write("samples", part, job.samples_uri, {"split": split, "bucket": str(bucket)}))
    return files


@ray.remote(num_cpus=1)
def _bucket_task(bucket: int, ctx: BucketContext, job: BucketJob) -> BucketResult:
    """Ray task: read, build and write one bucket (``ctx`` arrives resolved from the object store)."""
    timer = PhaseTimer()
    with timer.phase("read_s"):
        events = job.events.read(EVENT_COLUMNS, bucket_filter(bucket))
        # The users table is not bucketed: stream it through a filter so memory stays per bucket.
        bucket_users = pc.field("user_id").isin(pc.unique(events["user_id"]))
        users = job.users.read(["user_id", "user_idx"], bucket_users)
    sequences, samples = build_bucket(events, users, bucket, ctx, timer)
    with timer.phase("write_s"):
        files = _write_bucket(sequences, samples, bucket, job)
    return BucketResult(files, timer.seconds)


def run_buckets(buckets: list[int], ctx_ref: ray.ObjectRef, job: BucketJob) -> tuple[list[dict], dict[str, float]]:
    """All bucket tasks (as many at once as Ray has CPUs): (written files, summed phase seconds).

    Logs each finished bucket: the job's progress line.
    """
    pending = [_bucket_task.remote(b, ctx_ref, job) for b in buckets]
    written, phases_s = [], dict.fromkeys(BUCKET_PHASES, 0.0)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        result: BucketResult = ray.get(done[0])
        written += result.files
        phases_s = {name: phases_s[name] + result.phases_s[name] for name in BUCKET_PHASES}
        logger.info("features: %d/%d buckets written", len(buckets) - len(pending), len(buckets))
    return sorted(written, key=lambda w: (w["table"], w["path"])), phases_s


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def event_buckets(events: lake.PinnedTable) -> list[int]:
    """Bucket ids present in the events table (from the Delta log, no data read)."""
    if "bucket" not in events.partition_columns():
        raise lake.LakeError(f"events table {events.uri} must be partitioned by 'bucket' (docs/DATA.md)")
    return sorted(int(b) for b in events.partition_values("bucket"))


def build_context(items: pa.Table, cfg: FeaturesConfig, stats: EventStats) -> BucketContext:
    """The shared per-bucket context from the items table (read on the driver) and the stats."""
    arrays = item_arrays(items, cfg.tags_per_item)
    intervals, item_ids, counts = stats.intervals
    popularity = groups.snapshot_counts(
        intervals,
        lookup(arrays["item_ids"], arrays["item_idx"], item_ids, OOV),
        counts,
        stats.edges,
        arrays["genre_mask"].size,
        cfg.popularity_window,
    )
    return BucketContext(features=cfg, **arrays, popularity=popularity, cutoffs=stats.cutoffs)


def commit_outputs(job: BucketJob, written: list[dict], metadata: dict[str, str]) -> None:
    """One commit per output table; sequences first, so a samples commit is only ever made
    after the sequences commit of the same run landed (docs/DATA.md)."""
    for table, uri, schema, partition_by in (
        ("sequences", job.sequences_uri, SEQUENCES_SCHEMA, SEQUENCES_PARTITION),
        ("samples", job.samples_uri, SAMPLES_SCHEMA, SAMPLES_PARTITION),
    ):
        files = [w for w in written if w["table"] == table]
        lake_files.commit_files_overwrite(uri, schema, partition_by, files, metadata, job.storage_options)


def check_train_groups(written: list[dict], cfg: FeaturesConfig, stats: EventStats) -> None:
    """FeaturesError when the run built no train group (called before any commit)."""
    train = sum(int(w["num_rows"]) for w in written if w["table"] == "samples" and '"train"' in w["partition"])
    if train == 0:
        raise FeaturesError(
            f"no train group was built from {stats.num_events} events: every train-period request has fewer "
            f"than features.min_seq_len={cfg.min_seq_len} earlier events of its user (lower it); nothing was committed"
        )


def run_summary(job: BucketJob, stats: EventStats, buckets: int, written: list[dict], timings_s: dict) -> dict:
    """The JSON line the CLI prints: inputs, timings, cut-offs and groups per split."""
    summary = {
        "events": stats.num_events,
        "events_version": job.events.version,
        "job_id": job.job_id,
        "buckets": buckets,
        **{name: round(seconds, 3) for name, seconds in timings_s.items()},
        "valid_start_ts": stats.cutoffs.valid_start_ts,
        "test_start_ts": stats.cutoffs.test_start_ts,
    }
    for split in groups.SPLITS:
        summary[f"groups_{split}"] = sum(
            int(w["num_rows"]) for w in written if w["table"] == "samples" and f'"{split}"' in w["partition"]
        )
    return summary


def run_features(config: PipelineConfig) -> dict:
    """Build and commit ``sequences`` and ``samples`` from the lake's events (Ray must be up).

    Reads ONE ingest run's items/users/events triple, pinned before anything is read
    (components/ingest_runs.py), and records it in both commits.
    """
    cfg, options = config.features, config.lake.storage_options
    root = lake_root(config.lake.root)
    inputs = pin_ingest(root, options)
    buckets = event_buckets(inputs.events)
    clock = time.perf_counter()
    stats = global_stats(inputs.events, buckets, cfg)
    check_train_period(stats)
    ctx_ref = ray.put(build_context(inputs.items.read(), cfg, stats))
    stats_s, clock = time.perf_counter() - clock, time.perf_counter()
    job = BucketJob(
        events=inputs.events,
        users=inputs.users,
        sequences_uri=lake.table_uri(root, "sequences"),
        samples_uri=lake.table_uri(root, "samples"),
        storage_options=dict(options),
        job_id=uuid.uuid4().hex,
    )
    written, phases_s = run_buckets(buckets, ctx_ref, job)
    job_s, clock = time.perf_counter() - clock, time.perf_counter()
    check_train_groups(written, cfg, stats)
    cutoffs = (stats.cutoffs.valid_start_ts, stats.cutoffs.test_start_ts)
    metadata = run_metadata(job.job_id, inputs.metadata(), cfg.max_seq_len, cfg.candidates_per_group, cutoffs)
    commit_outputs(job, written, metadata)
    timings_s = {"stats_s": stats_s, "buckets_s": job_s, **phases_s, "commit_s": time.perf_counter() - clock}
    return run_summary(job, stats, len(buckets), written, timings_s) | {"ingest_run_id": inputs.run_id}


def _main(config: PipelineConfig, args: argparse.Namespace) -> int:
    with ray_runtime(config.ray):
        print(json.dumps(run_features(config)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return pipeline_main(
        "pipelines.features", __doc__.splitlines()[0], argv, _main, failures=(lake.LakeError, FeaturesError)
    )


if __name__ == "__main__":
    raise SystemExit(main())
