"""Data benchmark at a tiny N: the record's keys, and a comparison that can fail."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from components import lake
from pipelines.bench import main as bench_main
from pipelines.bench_data import compare_lakes


def test_bench_data_tiny_run_writes_the_record(ray_session, tmp_path):
    out = tmp_path / "data.json"
    workdir = tmp_path / "work"
    rc = bench_main(["data", "--events", "3000", "--buckets", "3", "--json", str(out), "--workdir", str(workdir)])
    assert rc == 0
    record = json.loads(out.read_text())
    for key in ("events", "ray_s", "single_s", "ratio_ray_over_single", "events_per_s", "peak_rss_mb"):
        assert key in record
    assert record["events"] == 3000 and record["identical"] is True and record["differences"] == []
    assert record["ray_s"] > 0 and record["single_s"] > 0 and record["peak_rss_mb"] > 0
    assert record["ratio_ray_over_single"] == pytest.approx(record["ray_s"] / record["single_s"], rel=0.05)

    # The comparison really compares: one flipped label is reported.
    ref_samples = lake.table_uri(str(workdir / "lake_ref"), "samples")
    table = lake.read_table(ref_samples).sort_by("group_id")
    labels = table["label_like"].combine_chunks()
    flipped = pc.subtract(pa.scalar(1, pa.int8()), labels.values.slice(0, 1))
    values = pa.concat_arrays([flipped, labels.values.slice(1)])
    table = table.set_column(
        table.column_names.index("label_like"), "label_like", pa.ListArray.from_arrays(labels.offsets, values)
    )
    lake.write_table(ref_samples, table, partition_by=["split", "bucket"])
    assert compare_lakes(str(workdir / "lake"), str(workdir / "lake_ref")) == ["samples.label_like differs"]
    assert np.isfinite(record["events_per_s"])
