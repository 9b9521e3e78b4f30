"""Data benchmark at a tiny N: the record's keys, and a comparison that can fail."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from components import lake
from pipelines.bench import main as bench_main
from pipelines.bench_data import compare_lakes


def flip_first_like_label(samples: pa.Table) -> pa.Table:
    """``samples`` with the first candidate's like label flipped (a planted difference)."""
    labels = samples["label_like"].combine_chunks()
    flipped = pc.subtract(pa.scalar(1, pa.int8()), labels.values.slice(0, 1))
    column = pa.ListArray.from_arrays(labels.offsets, pa.concat_arrays([flipped, labels.values.slice(1)]))
    return samples.set_column(samples.column_names.index("label_like"), "label_like", column)


def check_ratios_against_the_clock(record: dict, wall_s: float) -> None:
    """Every reported ratio recomputed from the raw clock readings (``clock_s``), not from the
    rounded durations it was computed from; the phases are ordered and fit in the wall time."""
    clock = record["clock_s"]
    phases = ["reference", "ray_init", "worker_warmup", "ray_job"]
    stamps = [t for name in phases for t in clock[name]]
    assert stamps == sorted(stamps), clock  # one after the other, none overlapping
    took = {name: clock[name][1] - clock[name][0] for name in phases}
    assert all(seconds > 0 for seconds in took.values()) and sum(took.values()) < wall_s
    ratio = lambda names: sum(took[n] for n in names) / took["reference"]
    assert record["ratio_ray_over_single"] == pytest.approx(ratio(["ray_job"]), abs=1e-3)
    assert record["ratio_incl_worker_warmup"] == pytest.approx(ratio(["worker_warmup", "ray_job"]), abs=1e-3)
    assert record["ratio_incl_ray_start"] == pytest.approx(ratio(["ray_init", "worker_warmup", "ray_job"]), abs=1e-3)
    assert record["events_per_s"] == pytest.approx(record["events"] / took["ray_job"], abs=1)


def test_bench_data_tiny_run_writes_the_record(ray_session, tmp_path):
    out = tmp_path / "data.json"
    workdir = tmp_path / "work"
    args = ["data", "--events", "3000", "--buckets", "3", "--json", str(out)]
    started = time.perf_counter()
    rc = bench_main([*args, "--workdir", str(workdir)])
    wall_s = time.perf_counter() - started
    assert rc == 0
    record = json.loads(out.read_text())
    for key in ("events", "ray_s", "single_s", "ratio_ray_over_single", "events_per_s", "peak_rss_mb"):
        assert key in record
    assert record["events"] == 3000 and record["identical"] is True and record["differences"] == []
    assert record["ray_s"] > 0 and record["single_s"] > 0 and record["peak_rss_mb"] > 0
    check_ratios_against_the_clock(record, wall_s)

    # The comparison really compares: one flipped label is reported.
    ref_samples = lake.table_uri(str(workdir / "lake_ref"), "samples")
    table = flip_first_like_label(lake.read_table(ref_samples).sort_by("group_id"))
    lake.write_table(ref_samples, table, partition_by=["split", "bucket"])
    assert compare_lakes(str(workdir / "lake"), str(workdir / "lake_ref")) == ["samples.label_like differs"]
    assert np.isfinite(record["events_per_s"])


def test_bench_data_exit_codes_are_returned(tmp_path, capsys):
    """main(argv) -> int returns its exit code (argparse's included) instead of raising SystemExit."""
    out = str(tmp_path / "x.json")
    assert bench_main(["data", "--events", "0", "--json", out]) == 2
    assert bench_main(["data", "--num-cpus", "0", "--json", out]) == 2
    assert bench_main(["data", "--events", "10"]) == 2  # --json is required
    assert bench_main(["data", "--bogus", "--json", out]) == 2
    assert bench_main(["models", "--quick"]) == 2
    assert bench_main(["data", "--help"]) == 0
    capsys.readouterr()


def test_bench_data_exits_1_when_the_ray_job_and_the_reference_differ(ray_session, tmp_path, monkeypatch):
    """A bug planted in the reference (one label flipped) is reported and fails the command."""
    import pipelines.features_reference as reference

    real = reference.reference_tables

    def one_label_flipped(*args, **kwargs):
        sequences, samples = real(*args, **kwargs)
        return sequences, flip_first_like_label(samples)

    monkeypatch.setattr(reference, "reference_tables", one_label_flipped)
    out = tmp_path / "data.json"
    assert bench_main(["data", "--events", "1500", "--buckets", "2", "--json", str(out)]) == 1
    record = json.loads(out.read_text())
    assert record["identical"] is False and record["differences"] == ["samples.label_like differs"]
