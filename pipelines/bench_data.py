"""Data benchmark: the Ray features job against its single-process reference, same input.

``python -m pipelines.bench data --events 5000000 --json bench/data.json``

Generates N synthetic events (``components.synthetic``: power-law history lengths up to
12,000 events, sessions, Zipf items), writes the events/items/users Delta tables, then times
1. the single-process reference (pipelines/features_reference.py, polars), before Ray starts,
2. Ray startup (reported separately, excluded from ``ray_s``): ``ray.init`` plus starting one
   worker process per logical CPU with the job's modules imported (``ray_worker_warmup_s``),
3. the Ray Data job (pipelines/features.py): ``ray_s`` is its first run on the warm workers;
   ``--rerun`` adds ``ray_rerun_s``, a second run (steady state of a long-lived cluster),
and checks that both produced identical ``sequences`` and ``samples`` tables (rows sorted by
user_id / group_id, every column compared). Exit status 1 when they differ.

Peak RSS is sampled every 50 ms with psutil over the driver's whole process tree: with an
embedded Ray that is the driver plus raylet, GCS and every Ray worker. RSS counts shared
object-store pages once per process that maps them, so it over-estimates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import psutil

from components import lake
from components.ingest_runs import new_run_id, write_ingest_tables
from components.lake import LakeConfig
from components.synthetic import SyntheticConfig
from pipelines.cli import configure_logging
from pipelines.config import FeaturesConfig, PipelineConfig, RayConfig

logger = logging.getLogger(__name__)


def synthetic_lake(root: str, num_events: int, num_buckets: int = 8, seed: int = 0, max_history: int = 12_000) -> None:
    """Write events/items/users Delta tables (docs/DATA.md) from ``components.synthetic``.

    About 200 events per user on average (power law); the heaviest user has ``max_history``
    events (capped at a quarter of ``num_events`` so tiny runs still have many users).
    """
    from components.synthetic import MIN_HISTORY, build_world, generate_events, generate_items

    max_history = max(1, min(max_history, num_events // 4))
    num_users = max(1, min(num_events // 200, (num_events - max_history) // MIN_HISTORY + 1))
    num_users = max(num_users, -(-num_events // max_history))  # enough users to hold N events
    cfg = SyntheticConfig(
        seed=seed,
        num_events=num_events,
        num_users=num_users,
        max_history=max_history,
        num_items=int(np.clip(num_events // 20, 32, 20_000)),
    )
    world = build_world(cfg)
    events = generate_events(cfg, world)
    table = lake.events_table(
        events["user_id"].to_numpy(),
        events["item_id"].to_numpy(),
        events["ts"].to_numpy(),
        events["value"].to_numpy(),
        num_buckets,
    )
    tables = {"items": generate_items(cfg, world), "users": lake.users_table(world.user_ids), "events": table}
    write_ingest_tables(root, tables, new_run_id())  # one ingest run, as pipelines/ingest writes it


def compare_lakes(root_a: str, root_b: str, storage_options: Mapping[str, str] | None = None) -> list[str]:
    """Differences between the sequences/samples tables of two lakes (empty when identical)."""
    problems = []
    for name, key in (("sequences", "user_id"), ("samples", "group_id")):
        a = lake.read_table(lake.table_uri(root_a, name), storage_options=storage_options).sort_by(key)
        b = lake.read_table(lake.table_uri(root_b, name), storage_options=storage_options).sort_by(key)
        if sorted(a.column_names) != sorted(b.column_names):
            problems.append(f"{name}: columns {a.column_names} != {b.column_names}")
            continue
        b = b.select(a.column_names)
        if a.num_rows != b.num_rows:
            problems.append(f"{name}: {a.num_rows} rows != {b.num_rows} rows")
            continue
        problems += [f"{name}.{c} differs" for c in a.column_names if not a[c].equals(b[c])]
    return problems


class PeakRss:
    """Samples the summed RSS of this process and all its descendants in a background thread."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s, self.peak_mb = interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current_mb() -> float:
        root = psutil.Process(os.getpid())
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # a worker exited between listing and reading
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.current_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())


def _import_job_modules() -> int:
    # pyarrow imports pandas lazily, on a worker's first Arrow -> NumPy conversion (~1 s here):
    # a module import of the job like the others, so it belongs to the warm-up, not the job.
    import pandas  # noqa: F401

    import pipelines.features  # noqa: F401  (pyarrow, polars, deltalake in the worker)

    return os.getpid()


def warm_workers(num_cpus: int) -> int:
    """Start one worker process per logical CPU and import the job's modules in each.

    A fresh embedded Ray has no worker processes; the first tasks pay for process start and
    imports (seconds on 2 busy cores). That is Ray startup, reported apart from the job.
    """
    import ray

    task = ray.remote(num_cpus=1)(_import_job_modules)
    return len(set(ray.get([task.remote() for _ in range(num_cpus)])))


class PhaseClock:
    """Raw ``time.perf_counter()`` readings [start, end] of named phases.

    The record keeps them (``clock_s``) beside the rounded durations and ratios, so a reader
    (and tests/pipelines/test_bench_data.py) can recompute every number from the clock.
    """

    def __init__(self) -> None:
        self.stamps: dict[str, list[float]] = {}

    def start(self, name: str) -> None:
        self.stamps[name] = [time.perf_counter()]

    def stop(self, name: str) -> None:
        self.stamps[name].append(time.perf_counter())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def seconds(self, *names: str) -> float:
        """Summed duration of the named phases."""
        return sum(self.stamps[n][1] - self.stamps[n][0] for n in names)


def run_bench(num_events: int, workdir: str, num_buckets: int, num_cpus: int, seed: int, rerun: bool = False) -> dict:
    """Generate, run reference then Ray job, compare; return the result record."""
    from pipelines.features import run_features
    from pipelines.features_reference import run_reference
    from pipelines.ray_runtime import ray_runtime

    root, ref_root = f"{workdir}/lake", f"{workdir}/lake_ref"
    num_buckets = LakeConfig(num_buckets=num_buckets).buckets_for(num_events)  # 0 = auto, as ingest does
    clock = PhaseClock()
    with clock.phase("generate"):
        synthetic_lake(root, num_events, num_buckets, seed)
    config = PipelineConfig(
        ray=RayConfig(num_cpus=num_cpus, enable_progress_bars=False),
        lake=LakeConfig(root=root, num_buckets=num_buckets),
        features=FeaturesConfig(),
    )
    with PeakRss() as single_rss, clock.phase("reference"):  # before Ray starts: the reference process alone
        reference = run_reference(config, ref_root)
    clock.start("ray_init")
    with ray_runtime(config.ray):
        clock.stop("ray_init")
        with clock.phase("worker_warmup"):
            warm_workers(num_cpus)
        idle_mb = PeakRss.current_mb()
        with PeakRss() as ray_rss, clock.phase("ray_job"):
            summary = run_features(config)
        if rerun:  # steady state: same workers, every module and code path already warm
            with clock.phase("ray_rerun"):
                run_features(config)
    memory = {"peak_rss_mb": ray_rss.peak_mb, "ray_idle_rss_mb": idle_mb, "single_peak_rss_mb": single_rss.peak_mb}
    return bench_record(clock, reference, summary, memory, num_buckets, num_cpus, compare_lakes(root, ref_root))


def bench_record(
    clock: PhaseClock,
    reference: dict,
    summary: dict,
    memory_mb: dict[str, float],
    num_buckets: int,
    num_cpus: int,
    differences: list[str],
) -> dict:
    """The JSON record: durations and ratios (rounded) from ``clock``, and its raw readings."""
    single_s, ray_s = clock.seconds("reference"), clock.seconds("ray_job")
    return {
        "events": reference["events"],
        "ray_s": round(ray_s, 3),
        "single_s": round(single_s, 3),
        "ratio_ray_over_single": round(ray_s / single_s, 3),
        "events_per_s": round(reference["events"] / ray_s),
        # The same ratio charged with Ray's start-up: worker processes + imports, then also ray.init.
        "ratio_incl_worker_warmup": round(clock.seconds("worker_warmup", "ray_job") / single_s, 3),
        "ratio_incl_ray_start": round(clock.seconds("ray_init", "worker_warmup", "ray_job") / single_s, 3),
        **{key: round(mb, 1) for key, mb in memory_mb.items()},
        "peak_rss_scope": "driver + all Ray processes (psutil RSS over the process tree)",
        "ray_startup_s": round(clock.seconds("ray_init"), 3),
        "ray_worker_warmup_s": round(clock.seconds("worker_warmup"), 3),
        "generate_s": round(clock.seconds("generate"), 3),
        "users": reference["users"],
        "groups": reference["groups"],
        "buckets": num_buckets,
        "ray_num_cpus": num_cpus,
        "physical_cores": psutil.cpu_count(logical=False),
        "ray_phases_s": {k: v for k, v in summary.items() if k.endswith("_s")},
        **({"ray_rerun_s": round(clock.seconds("ray_rerun"), 3)} if "ray_rerun" in clock.stamps else {}),
        "clock_s": clock.stamps,  # raw perf_counter [start, end] of every phase, for re-computation
        "identical": not differences,
        "differences": differences,
    }


def exit_code(exc: SystemExit) -> int:
    """The process exit status a SystemExit stands for (None: 0; a message: 1, as Python does)."""
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def main(argv: list[str] | None = None) -> int:
    """``bench data`` CLI: 0 identical outputs, 1 the Ray job and the reference differ, 2 bad arguments."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="number of synthetic events")
    parser.add_argument("--json", required=True, help="where to write the result record")
    parser.add_argument(
        "--buckets",
        type=int,
        default=0,
        help="user buckets (the memory knob); 0 = auto, as ingest: ~1M events per bucket, >= 8",
    )
    parser.add_argument("--num-cpus", type=int, default=RayConfig().num_cpus, help="Ray logical CPUs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rerun", action="store_true", help="also time a second Ray run (steady state)")
    parser.add_argument("--workdir", default=None, help="keep the lakes here (default: a temp dir, removed)")
    try:  # argparse exits on bad arguments and --help: main(argv) -> int returns that code instead
        args = parser.parse_args(argv)
        if args.events < 1 or args.num_cpus < 1:
            parser.error(f"--events and --num-cpus must be >= 1, got {args.events} and {args.num_cpus}")
    except SystemExit as exc:
        return exit_code(exc)
    configure_logging()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    try:
        result = run_bench(args.events, os.path.abspath(workdir), args.buckets, args.num_cpus, args.seed, args.rerun)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    if result["differences"]:
        logger.error("Ray job and reference differ: %s", result["differences"])
        return 1
    return 0
