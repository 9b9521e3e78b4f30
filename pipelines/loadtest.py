"""Open-loop load test of a running ranking service.

    python -m pipelines.loadtest --config demo --url http://127.0.0.1:8000 --out loadtest/run1 \\
        [--rates 5,10,20] [--schedule FILE] [--loadtest.arrivals=bursty --loadtest.seed=1 ...]

For each offered rate: a seeded schedule (components/load_schedule.py; users and items from
the lake and the bundle) is saved as ``schedule_<rate>.jsonl`` and fired open loop — every
request is sent at its scheduled time whether or not earlier ones were answered — latency is
measured from the scheduled time, and the generator's own lag (actual minus scheduled send)
is recorded: a run whose lag p99 exceeds 2 ms measured the generator, not the service, and
is marked invalid. Writes ``requests_<rate>.jsonl`` (one line per request), ``summary.json``
(per rate: goodput, attainment overall and per SLO class, p50/p95/p99, throughput, cache hit
rate, rejections by reason, lag) and PNG plots (goodput and attainment vs offered load,
latency CDF per class). Exit 0, 1 when the service is unreachable, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from components.load_schedule import make_schedule, read_schedule, write_schedule
from components.slo_simulation import Outcome, summarize
from pipelines.cli import pipeline_main
from pipelines.config import PipelineConfig
from pipelines.load_generator import fire_apart

logger = logging.getLogger(__name__)

LAG_LIMIT_MS = 2.0


class LoadTestError(RuntimeError):
    """The service could not be reached."""


def summarize_run(records: Sequence[dict], duration_s: float) -> dict:
    """Goodput, attainment, latency per class, cache hits, rejections and the generator's lag."""
    outcomes = [
        Outcome(
            r["request_id"],
            r["slo_class"],
            r["status"],
            r.get("reason", ""),
            r["latency_ms"],
            r["good"],
            bool(r.get("degraded")),
        )
        for r in records
    ]
    out = summarize(outcomes, duration_s * 1000.0)
    ok = [r for r in records if r["status"] == 200]
    lags = np.array([r["lag_ms"] for r in records]) if records else np.zeros(1)
    out.update(
        {
            "throughput_per_s": len(ok) / duration_s,
            "cache_hit_rate": float(np.mean([bool(r["cache_hit"]) for r in ok])) if ok else 0.0,
            "errors": sum(r["status"] not in (200, 429, 503) for r in records),
            "lag_p50_ms": float(np.percentile(lags, 50)),
            "lag_p99_ms": float(np.percentile(lags, 99)),
            "lag_max_ms": float(lags.max()),
        }
    )
    out["valid"] = out["lag_p99_ms"] <= LAG_LIMIT_MS
    return out


def plot(summary: dict, records_by_rate: dict[str, list[dict]], out: Path) -> list[str]:
    """goodput_vs_load.png, attainment_vs_load.png, latency_cdf.png (of the highest rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rates = sorted(summary["runs"], key=float)
    offered = [float(r) for r in rates]
    written = []
    for key, label, name in (
        ("goodput_per_s", "goodput (good responses / s)", "goodput_vs_load.png"),
        ("attainment", "SLO attainment (good / offered)", "attainment_vs_load.png"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(offered, [summary["runs"][r][key] for r in rates], marker="o", label="all")
        if key == "attainment":
            classes = sorted({c for r in rates for c in summary["runs"][r]["by_class"]})
            for c in classes:
                ys = [summary["runs"][r]["by_class"].get(c, {}).get("attainment", np.nan) for r in rates]
                ax.plot(offered, ys, marker=".", linestyle="--", label=c)
        ax.set_xlabel("offered load (requests / s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    top = rates[-1]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    served = []
    for c in sorted({r["slo_class"] for r in records_by_rate[top]}):
        lat = np.sort([r["latency_ms"] for r in records_by_rate[top] if r["slo_class"] == c and r["status"] == 200])
        if lat.size:
            ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=c)
            served.append(lat)
    ax.set_xscale("log")
    if served:
        # matplotlib's own log ticks label a narrow range (e.g. 30-45 ms) with overlapping minor
        # labels ("3x10^1 4x10^1"): a few round values, written plainly, instead
        ticks = log_ticks(min(float(lat[0]) for lat in served), max(float(lat[-1]) for lat in served))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"latency ms (served requests, {top} req/s)")
    ax.set_ylabel("CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)
    return [*written, "latency_cdf.png"]


def log_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` tick values for a log axis over [low, high]: geometric steps rounded to two
    significant digits, distinct and ascending (one tick where the range is a point)."""
    low, high = max(low, 1e-3), max(high, low * 1.0001, 1e-3)
    ticks = [float(f"{v:.2g}") for v in np.geomspace(low, high, count)]
    return sorted(set(ticks))


def users_and_items(config: PipelineConfig) -> tuple[list[int], list[int]]:
    """Users of the lake's sequences and items of the served bundle (what the schedule draws from)."""
    from components.lake import lake_root
    from pipelines.serve import served_bundle
    from serving.sequence_store import SequenceStore

    store = SequenceStore.load(lake_root(config.lake.root), config.lake.storage_options)
    items = served_bundle(config).items["item_id"].to_pylist()
    return [int(u) for u in store.user_ids], items


def run_loadtest(config: PipelineConfig, url: str, out: Path, rates: list[float], schedule_path: str = "") -> dict:
    """Fire one schedule per rate at ``url``; write records, summary.json and plots under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    deadlines = dict(config.serve.slo_classes)
    api_key = os.environ.get(config.serve.api_key_env, "") if config.serve.api_key_env else ""
    users, items = ([], []) if schedule_path else users_and_items(config)
    summary: dict = {"url": url, "load": {k: v for k, v in vars(config.loadtest).items()}, "runs": {}}
    records_by_rate = {}
    for rate in rates:
        cfg = replace(config.loadtest, rate_per_s=rate)
        schedule = read_schedule(schedule_path) if schedule_path else make_schedule(cfg, users, items)
        tag = f"{rate:g}"
        write_schedule(out / f"schedule_{tag}.jsonl", schedule)
        started = time.perf_counter()
        records, core = fire_apart(url, schedule, deadlines, api_key, pin=cfg.pin_generator)
        if records and all(r["status"] == 0 for r in records):
            raise LoadTestError(f"no request reached {url}/rank (is the service up? python -m pipelines.serve)")
        with open(out / f"requests_{tag}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        run = summarize_run(records, cfg.duration_s)
        run["wall_s"] = round(time.perf_counter() - started, 2)
        run["generator_core"] = core  # None: the generator shared the cores with the service
        summary["runs"][tag] = run
        records_by_rate[tag] = records
        logger.info(
            "rate %s/s: goodput %.2f/s, attainment %.3f, lag p99 %.2f ms%s",
            tag,
            run["goodput_per_s"],
            run["attainment"],
            run["lag_p99_ms"],
            "" if run["valid"] else " (INVALID: generator lag)",
        )
    summary["plots"] = plot(summary, records_by_rate, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return summary


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="", help="service base URL (default: http://serve.host:serve.port)")
    parser.add_argument("--out", default="loadtest", help="output folder")
    parser.add_argument("--rates", default="", help="offered loads to sweep, req/s (default: loadtest.rate_per_s)")
    parser.add_argument("--schedule", default="", help="replay this schedule JSONL instead of generating one")


def _main(config: PipelineConfig, args: argparse.Namespace) -> int:
    try:
        rates = [float(x) for x in args.rates.split(",") if x] or [config.loadtest.rate_per_s]
    except ValueError:
        print(f"loadtest: --rates must be numbers separated by commas, got {args.rates!r}")
        return 2
    url = (args.url or f"http://{config.serve.host}:{config.serve.port}").rstrip("/")
    summary = run_loadtest(config, url, Path(args.out), rates, args.schedule)
    for rate, run in summary["runs"].items():
        classes = ", ".join(f"{c} {v['attainment']:.3f}" for c, v in run["by_class"].items())
        flag = "" if run["valid"] else "  INVALID (generator lag p99 > 2 ms)"
        print(
            f"{rate:>6} req/s: goodput {run['goodput_per_s']:.2f}/s, attainment {run['attainment']:.3f} "
            f"({classes}), cache hits {run['cache_hit_rate']:.2f}, lag p99 {run['lag_p99_ms']:.2f} ms{flag}"
        )
    print(f"summary: {Path(args.out) / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return pipeline_main(
        "pipelines.loadtest",
        __doc__.splitlines()[0],
        argv,
        _main,
        default_preset="demo",
        failures=(LoadTestError, ValueError),
        add_arguments=_add_arguments,
    )


if __name__ == "__main__":
    raise SystemExit(main())
