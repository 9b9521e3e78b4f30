"""Features stage: Delta ``events`` (+ ``items``, ``users``) -> Delta ``sequences`` and ``samples``.

``python -m pipelines.features --config demo [--features.max_seq_len=...]``

One Ray Data pass over a dataset of bucket ids (docs/DATA.md): each task reads ONE bucket of
events (a partition of the events table), sorts it by (user_id, ts, item_id, value), builds
the users' sequences and groups with vectorised NumPy, writes Parquet files for both output
tables and returns only their file metadata; the driver then makes ONE atomic Delta commit
per table. No shuffle, and a task's memory grows with its bucket, not with the number of
users: ``lake.num_buckets`` (set at ingest) is the memory knob.

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

import numpy as np
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
from components.transforms import OOV, action_bucket
from pipelines.cli import pipeline_main
from pipelines.config import FeaturesConfig, PipelineConfig
from pipelines.features_stats import EventStats, FeaturesError, bucket_filter, check_train_period, global_stats
from pipelines.ray_runtime import ray_runtime

logger = logging.getLogger(__name__)

EVENT_COLUMNS = ["user_id", "item_id", "ts", "value"]


# ---------------------------------------------------------------------------------------------
# Global context shipped to every bucket task
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BucketContext:
    """What every bucket task needs besides its own rows (shipped once through the object store).

    Sized by the item catalogue, never by the number of users: user indices are read per bucket.
    """

    features: FeaturesConfig
    item_ids: np.ndarray  # (V,) int64 raw ids, sorted
    item_idx: np.ndarray  # (V,) int32 vocabulary index of item_ids
    genre_mask: np.ndarray  # (V+2,) int32 by item_idx (0 for pad/OOV)
    year: np.ndarray  # (V+2,) int16 by item_idx
    tags: np.ndarray  # (V+2, tags_per_item) int32 by item_idx, 0-padded
    negative_cdf: np.ndarray  # (V+2,) float64 cumulative popularity^0.75 weights
    cutoffs: groups.TimeCutoffs


# ---------------------------------------------------------------------------------------------
# Per-bucket build (pure: events of one bucket -> sequences rows and sample rows)
# ---------------------------------------------------------------------------------------------
def _run_starts(new_run: np.ndarray) -> np.ndarray:
    """For every position, the index where its run (new_run True at run starts) began."""
    return np.maximum.accumulate(np.where(new_run, np.arange(new_run.size), 0))


def _list_column(values: np.ndarray, offsets: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def _masked_lists(dense: np.ndarray, valid: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """Rows of ``dense`` (G, W) keeping the ``valid`` slots, in order, as a list column."""
    offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))])
    return _list_column(dense[valid], offsets, value_type)


def _sort_events(events: pa.Table, ctx: BucketContext) -> dict[str, np.ndarray]:
    user = events["user_id"].to_numpy()
    item = events["item_id"].to_numpy()
    ts = events["ts"].to_numpy()
    value = events["value"].to_numpy()
    order = np.lexsort((value, item, ts, user))  # deterministic ties: ts, then item_id, then value
    user, item, ts, value = user[order], item[order], ts[order], value[order]
    new_user = np.ones(user.size, dtype=bool)
    new_user[1:] = user[1:] != user[:-1]
    return {
        "user": user,
        "ts": ts,
        "value": value,
        "new_user": new_user,
        "item_idx": lookup(ctx.item_ids, ctx.item_idx, item, OOV),
    }


def build_sequences(ev: dict[str, np.ndarray], bucket: int) -> pa.Table:
    """One row per user: full time-ordered history."""
    starts = np.flatnonzero(ev["new_user"])
    offsets = np.append(starts, ev["user"].size)
    return pa.table(
        [
            pa.array(ev["user"][starts], pa.int64()),
            pa.array(np.full(starts.size, bucket, np.int32)),
            _list_column(ev["item_idx"], offsets, pa.int32()),
            _list_column(action_bucket(ev["value"]), offsets, pa.int8()),
            _list_column(ev["ts"], offsets, pa.int64()),
        ],
        schema=SEQUENCES_SCHEMA,
    )


def _group_bounds(
    ev: dict[str, np.ndarray], cfg: FeaturesConfig, cutoffs: groups.TimeCutoffs
) -> tuple[np.ndarray, ...]:
    """(start, end, seq_end, user_start) of the kept groups: session chunks with enough history.

    A chunk never crosses a split cut-off: otherwise a group requested before valid_start_ts
    (a train group) could carry positives from the valid period as labels.
    """
    ts, new_user = ev["ts"], ev["new_user"]
    n = ts.size
    idx = np.arange(n)
    gap = np.diff(ts, prepend=ts[:1])
    event_split = groups.split_codes(ts, cutoffs)
    new_split = np.diff(event_split, prepend=event_split[:1]) != 0
    new_run = new_user | (gap > cfg.session_gap_s) | new_split
    new_chunk = (idx - _run_starts(new_run)) % cfg.max_positives_per_group == 0
    user_start = _run_starts(new_user)
    same_ts_start = _run_starts(new_user | (gap != 0))
    start = np.flatnonzero(new_chunk)
    end = np.append(start[1:], n) if start.size else start
    seq_end = same_ts_start[start] - user_start[start]  # events strictly before the request
    keep = seq_end >= cfg.min_seq_len
    return start[keep], end[keep], seq_end[keep], user_start[start[keep]]


def build_samples(ev: dict[str, np.ndarray], users: pa.Table, bucket: int, ctx: BucketContext) -> pa.Table:
    """One row per kept group: candidates (positives, then negatives), labels, side features."""
    cfg = ctx.features
    start, end, seq_end, user_start = _group_bounds(ev, cfg, ctx.cutoffs)
    num_groups, width = start.size, cfg.candidates_per_group
    n_pos = end - start
    pos_offsets = np.concatenate([[0], np.cumsum(n_pos)])
    row = np.repeat(np.arange(num_groups), n_pos)
    col = np.arange(row.size) - np.repeat(pos_offsets[:-1], n_pos)
    pos_event = np.repeat(start, n_pos) + col
    user = ev["user"][start]
    gid = groups.group_ids(user, start - user_start)
    negatives = groups.sample_negatives(
        gid, width - n_pos, pos_offsets, ev["item_idx"][pos_event], ctx.negative_cdf, cfg.negatives_seed
    )
    cand = np.zeros((num_groups, width), np.int32)  # (G, C)
    cand[row, col] = ev["item_idx"][pos_event]
    neg_col = n_pos[:, None] + np.arange(negatives.shape[1])[None, :]  # (G, W_neg)
    fits = neg_col < width
    cand[np.nonzero(fits)[0], neg_col[fits]] = negatives[fits]
    engage = np.zeros((num_groups, width), np.int8)
    engage[row, col] = 1
    like = np.zeros((num_groups, width), np.int8)
    like[row, col] = ev["value"][pos_event].astype(np.float64) >= cfg.like_threshold
    valid = cand != 0  # 0 = catalogue ran out
    request_ts = ev["ts"][start]
    split = groups.split_codes(request_ts, ctx.cutoffs)
    tags = ctx.tags[cand].reshape(num_groups, width * cfg.tags_per_item)  # (G, C*T)
    return pa.table(
        [
            pa.array(gid, pa.int64()),
            pa.array(user, pa.int64()),
            pa.array(lookup(users["user_id"].to_numpy(), users["user_idx"].to_numpy(), user, OOV), pa.int32()),
            pa.array(np.full(num_groups, bucket, np.int32)),
            pa.DictionaryArray.from_arrays(pa.array(split, pa.int8()), pa.array(groups.SPLITS)).cast(pa.string()),
            pa.array(request_ts, pa.int64()),
            pa.array(seq_end, pa.int32()),
            _masked_lists(cand, valid, pa.int32()),
            _masked_lists(engage, valid, pa.int8()),
            _masked_lists(like, valid, pa.int8()),
            _masked_lists(ctx.genre_mask[cand], valid, pa.int32()),
            _masked_lists(ctx.year[cand], valid, pa.int16()),
            _masked_lists(tags, np.repeat(valid, cfg.tags_per_item, axis=1), pa.int32()),
        ],
        schema=SAMPLES_SCHEMA,
    )


def build_bucket(events: pa.Table, users: pa.Table, bucket: int, ctx: BucketContext) -> tuple[pa.Table, pa.Table]:
    """Events of one bucket (+ user_id -> user_idx of at least its users) -> (sequences, samples) rows."""
    ev = _sort_events(events, ctx)
    return build_sequences(ev, bucket), build_samples(ev, users.sort_by("user_id"), bucket, ctx)


# ---------------------------------------------------------------------------------------------
# Workers write Parquet (components/lake.py), the driver commits once per table
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BucketJob:
    """What every bucket task of one features run reads, and where and how it writes."""

    ctx: ray.ObjectRef  # BucketContext, put once; nested in a dataclass, Ray ships the ref itself
    events: lake.PinnedTable
    users: lake.PinnedTable
    sequences_uri: str
    samples_uri: str
    storage_options: dict[str, str]  # of the output tables (the lake's, as for the inputs)
    job_id: str


def _write_bucket(sequences: pa.Table, samples: pa.Table, bucket: int, job: BucketJob) -> list[dict]:
    """Write one bucket's rows (one file per table and split); return the files' metadata."""
    name = f"part-{bucket:05d}-{job.job_id}"
    write = lambda table, rows, uri, partition: {
        "table": table,
        **lake_files.write_data_file(rows, uri, partition, name, job.storage_options),
    }
    files = [write("sequences", sequences, job.sequences_uri, {"bucket": str(bucket)})]
    for split in groups.SPLITS:
        part = samples.filter(pc.field("split") == split)
        if part.num_rows:
            files.append(write("samples", part, job.samples_uri, {"split": split, "bucket": str(bucket)}))
    return files


def _process_buckets(batch: dict[str, np.ndarray], job: BucketJob) -> dict[str, list]:
    """Ray Data UDF: build and write every bucket of ``batch``; return the written files."""
    ctx: BucketContext = ray.get(job.ctx)
    rows: list[dict] = []
    for bucket in batch["bucket"].tolist():
        events = job.events.read(EVENT_COLUMNS, bucket_filter(bucket))
        # The users table is not bucketed: stream it through a filter so memory stays per bucket.
        bucket_users = pc.field("user_id").isin(pc.unique(events["user_id"]))
        users = job.users.read(["user_id", "user_idx"], bucket_users)
        sequences, samples = build_bucket(events, users, bucket, ctx)
        rows += _write_bucket(sequences, samples, bucket, job)
    return {key: [r[key] for r in rows] for key in ("table", "path", "size", "partition", "num_rows")}


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
    counts = np.zeros(arrays["genre_mask"].size, np.int64)
    counted_idx = lookup(arrays["item_ids"], arrays["item_idx"], stats.item_ids, OOV)
    np.add.at(counts, counted_idx, stats.item_counts)
    return BucketContext(features=cfg, **arrays, negative_cdf=groups.negative_cdf(counts), cutoffs=stats.cutoffs)


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
        ctx=ctx_ref,
        events=inputs.events,
        users=inputs.users,
        sequences_uri=lake.table_uri(root, "sequences"),
        samples_uri=lake.table_uri(root, "samples"),
        storage_options=dict(options),
        job_id=uuid.uuid4().hex,
    )
    written = (
        ray.data.from_items([{"bucket": b} for b in buckets], override_num_blocks=len(buckets))
        .map_batches(_process_buckets, batch_size=1, batch_format="numpy", fn_kwargs={"job": job}, num_cpus=1)
        .take_all()
    )
    job_s, clock = time.perf_counter() - clock, time.perf_counter()
    check_train_groups(written, cfg, stats)
    metadata = run_metadata(job.job_id, inputs.metadata(), cfg.max_seq_len, cfg.candidates_per_group)
    commit_outputs(job, written, metadata)
    timings_s = {"stats_s": stats_s, "buckets_s": job_s, "commit_s": time.perf_counter() - clock}
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
