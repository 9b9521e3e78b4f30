"""Single-process reference of the features stage (polars): the oracle for pipelines/features.py.

It reads the whole events table at once and builds the same ``sequences`` and ``samples``
tables with independent code (polars window expressions instead of NumPy run arithmetic,
a full sort instead of the distributed order statistics, joins instead of array lookups).
Only the pieces that must be bit-identical come from components/groups.py: the group id,
the cut-off rank definition, the popularity edges and the seeded negative sampler.

``python -m pipelines.features_reference --config demo --out-root lake_ref``
"""

from __future__ import annotations

import argparse
import json
import logging
import uuid

import numpy as np
import polars as pl
import pyarrow as pa

from components import groups, lake
from components.ingest_runs import pin_ingest
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

logger = logging.getLogger(__name__)


def reference_cutoffs(ts: np.ndarray, cfg: FeaturesConfig) -> groups.TimeCutoffs:
    """Exact cut-offs by a full partial sort of every event time."""
    ranks = groups.cutoff_ranks(ts.size, cfg.valid_frac, cfg.test_frac)
    wanted = sorted({r for r in ranks if r < ts.size})
    picked = np.partition(ts, wanted) if wanted else ts
    return groups.cutoffs_from_values(ts.size, ranks, {r: int(picked[r]) for r in wanted})


def split_expr(ts: pl.Expr, cutoffs: groups.TimeCutoffs) -> pl.Expr:
    """ "train" / "valid" / "test" of a time column against the cut-offs."""
    return (
        pl.when(ts < cutoffs.valid_start_ts)
        .then(pl.lit("train"))
        .when(ts < cutoffs.test_start_ts)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("test"))
    )


def ordered_events(
    events: pl.DataFrame, items: pl.DataFrame, cfg: FeaturesConfig, cutoffs: groups.TimeCutoffs
) -> pl.DataFrame:
    """Events with item_idx/action, sorted, annotated with position, group and seq_end.

    A "session" here also ends where the event's own split changes, so no group's positives
    cross a time cut-off.
    """
    gap = pl.col("ts") - pl.col("ts").shift(1)
    new_user = (pl.col("user_id") != pl.col("user_id").shift(1)).fill_null(True)
    new_split = (pl.col("event_split") != pl.col("event_split").shift(1)).fill_null(True)
    return (
        events.join(items.select("item_id", "item_idx"), on="item_id", how="left", maintain_order="left")
        .with_columns(pl.col("item_idx").fill_null(OOV).cast(pl.Int32), event_split=split_expr(pl.col("ts"), cutoffs))
        .sort(["user_id", "ts", "item_id", "value"])
        .with_columns(
            pos=pl.int_range(pl.len()).over("user_id"),
            session=(new_user | (gap > cfg.session_gap_s).fill_null(True) | new_split).cum_sum(),
            action=pl.col("value").map_batches(lambda v: pl.Series(action_bucket(v.to_numpy())), return_dtype=pl.Int8),
        )
        .with_columns(
            chunk=((pl.int_range(pl.len()).over("session") % cfg.max_positives_per_group) == 0).cum_sum(),
            seq_end=pl.col("pos").min().over(["user_id", "ts"]),
        )
    )


def popularity_snapshots(ev: pl.DataFrame, num_idx: int, cfg: FeaturesConfig) -> groups.PopularitySnapshots:
    """Item counts before each popularity edge; the edges from the histogram of ALL event times."""
    ts = ev["ts"].to_numpy()
    ts_min = int(ts.min())
    shift = groups.histogram_shift(ts_min, int(ts.max()))
    edges = groups.popularity_edges(*groups.ts_histogram(ts, ts_min, shift), ts_min, shift, cfg.popularity_snapshots)
    interval = np.maximum(np.searchsorted(edges, ts, side="right") - 1, 0)
    counts = ev.select("item_idx").with_columns(interval=pl.Series(interval)).group_by("interval", "item_idx").len()
    return groups.snapshot_counts(
        counts["interval"].to_numpy(),
        counts["item_idx"].to_numpy(),
        counts["len"].to_numpy(),
        edges,
        num_idx,
        cfg.popularity_window,
    )


def item_features(items: pl.DataFrame, tags_per_item: int) -> pl.DataFrame:
    """item_idx -> genre_mask, year, exactly ``tags_per_item`` tags (truncated / 0-padded).

    Pad (0) and OOV (1) rows are added with all-zero features.
    """
    zeros = pl.lit(pl.Series([[0] * tags_per_item], dtype=pl.List(pl.Int32)))
    pad_and_oov = pl.DataFrame(
        {"item_idx": [0, OOV], "genre_mask": [0, 0], "year": [0, 0], "tag_ids": [[], []]},
        schema={"item_idx": pl.Int32, "genre_mask": pl.Int32, "year": pl.Int16, "tag_ids": pl.List(pl.Int32)},
    )
    items = pl.concat([pad_and_oov, items.select(pad_and_oov.columns).cast(pad_and_oov.schema)])
    return items.select(
        "item_idx",
        pl.col("genre_mask").fill_null(0).cast(pl.Int32),
        pl.col("year").fill_null(0).cast(pl.Int16),
        tags=pl.concat_list(pl.col("tag_ids").fill_null([]).cast(pl.List(pl.Int32)), zeros).list.head(tags_per_item),
    )


def reference_groups(ev: pl.DataFrame, popularity: groups.PopularitySnapshots, cfg: FeaturesConfig) -> pl.DataFrame:
    """One row per kept group with its candidate list and labels (before side features)."""
    g = (
        ev.group_by("chunk", maintain_order=True)
        .agg(
            pl.col("user_id").first(),
            pl.col("bucket").first(),
            request_ts=pl.col("ts").first(),
            first_pos=pl.col("pos").first(),
            seq_end=pl.col("seq_end").first(),
            pos_items=pl.col("item_idx"),
            pos_values=pl.col("value"),
        )
        .filter(pl.col("seq_end") >= cfg.min_seq_len)
    )
    n_pos = g["pos_items"].list.len().to_numpy().astype(np.int64)
    gid = groups.group_ids(g["user_id"].to_numpy(), g["first_pos"].to_numpy())
    pos_offsets = np.concatenate([[0], np.cumsum(n_pos)])
    flat_pos = g["pos_items"].explode().to_numpy()
    negatives = groups.sample_negatives_asof(
        gid,
        cfg.candidates_per_group - n_pos,
        pos_offsets,
        flat_pos,
        g["request_ts"].to_numpy(),
        popularity,
        cfg.negatives_seed,
    )
    found = negatives != 0
    neg_lists = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(found.sum(axis=1))]), pa.int32()),
        pa.array(negatives[found], pa.int32()),
    )
    return g.with_columns(
        group_id=pl.Series(gid),
        neg_items=pl.Series(neg_lists),
    ).with_columns(
        cand_item_idx=pl.concat_list("pos_items", "neg_items"),
        label_engage=pl.concat_list(
            pl.col("pos_items").list.eval(pl.element() * 0 + 1), pl.col("neg_items").list.eval(pl.element() * 0)
        ).cast(pl.List(pl.Int8)),
        label_like=pl.concat_list(
            pl.col("pos_values").list.eval(pl.element().cast(pl.Float64) >= cfg.like_threshold),
            pl.col("neg_items").list.eval(pl.element() * 0 != 0),
        ).cast(pl.List(pl.Int8)),
    )


def with_side_features(g: pl.DataFrame, feats: pl.DataFrame, cutoffs: groups.TimeCutoffs) -> pl.DataFrame:
    """Join item side features per candidate (explode, join, re-aggregate) and assign splits."""
    cands = (
        g.select("group_id", "cand_item_idx")
        .with_row_index("row")
        .explode("cand_item_idx")
        .with_columns(slot=pl.int_range(pl.len()).over("row"))
        .join(feats, left_on="cand_item_idx", right_on="item_idx", how="left", maintain_order="left")
        .sort(["row", "slot"])
        .group_by("row", maintain_order=True)
        .agg(cand_genre_mask=pl.col("genre_mask"), cand_year=pl.col("year"), cand_tags=pl.col("tags").explode())
    )
    return (
        g.with_row_index("row")
        .join(cands, on="row", how="left", maintain_order="left")
        .with_columns(split=split_expr(pl.col("request_ts"), cutoffs))
    )


def reference_tables(
    events: pa.Table, items: pa.Table, users: pa.Table, cfg: FeaturesConfig
) -> tuple[pa.Table, pa.Table]:
    """(sequences, samples) in the contract's schemas, rows in no particular order."""
    if events.num_rows == 0:
        raise lake.LakeError("events table has no rows; nothing to build features from")
    items_df = pl.from_arrow(items)
    cutoffs = reference_cutoffs(events["ts"].to_numpy(), cfg)
    ev = ordered_events(pl.from_arrow(events), items_df, cfg, cutoffs)
    popularity = popularity_snapshots(ev, int(items_df["item_idx"].max() or OOV) + 1, cfg)
    sequences = ev.group_by("user_id", maintain_order=True).agg(
        pl.col("bucket").first(), pl.col("item_idx"), pl.col("action"), pl.col("ts")
    )
    g = with_side_features(reference_groups(ev, popularity, cfg), item_features(items_df, cfg.tags_per_item), cutoffs)
    samples = g.join(
        pl.from_arrow(users).select("user_id", "user_idx"), on="user_id", how="left", maintain_order="left"
    ).with_columns(pl.col("user_idx").fill_null(OOV))
    return (
        sequences.select(SEQUENCES_SCHEMA.names).to_arrow().cast(SEQUENCES_SCHEMA),
        samples.select(SAMPLES_SCHEMA.names).to_arrow().cast(SAMPLES_SCHEMA),
    )


def run_reference(config: PipelineConfig, out_root: str | None = None) -> dict:
    """Read the lake at ``config.lake.root``, write sequences/samples under ``out_root`` (default: same lake).

    Both lakes are reached with ``lake.storage_options``.
    """
    cfg, options = config.features, config.lake.storage_options
    root = lake_root(config.lake.root)
    out = lake_root(out_root) if out_root else root
    inputs = pin_ingest(root, options)  # one ingest run's triple, as the Ray job reads it
    events_rows = inputs.events.read(["user_id", "item_id", "ts", "value", "bucket"])
    users = inputs.users.read(["user_id", "user_idx"])
    sequences, samples = reference_tables(events_rows, inputs.items.read(), users, cfg)
    job_id = f"reference-{uuid.uuid4().hex}"
    cutoffs = reference_cutoffs(events_rows["ts"].to_numpy(), cfg)
    metadata = run_metadata(
        job_id,
        inputs.metadata(),
        cfg.max_seq_len,
        cfg.candidates_per_group,
        (cutoffs.valid_start_ts, cutoffs.test_start_ts),
    )
    for name, rows, partition_by in (
        ("sequences", sequences, SEQUENCES_PARTITION),
        ("samples", samples, SAMPLES_PARTITION),
    ):
        lake.write_table(
            lake.table_uri(out, name),
            rows,
            partition_by=partition_by,
            storage_options=options,
            custom_metadata=metadata,
        )
    return {"events": events_rows.num_rows, "users": sequences.num_rows, "groups": samples.num_rows}


def main(argv: list[str] | None = None) -> int:
    def body(config: PipelineConfig, args: argparse.Namespace) -> int:
        print(json.dumps(run_reference(config, args.out_root)))
        return 0

    def out_root(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--out-root", default=None, help="lake root to write sequences/samples to (default: lake.root)"
        )

    return pipeline_main(
        "pipelines.features_reference",
        __doc__.splitlines()[0],
        argv,
        body,
        failures=(lake.LakeError,),
        add_arguments=out_root,
    )


if __name__ == "__main__":
    raise SystemExit(main())
