"""The serving bench: ``python -m pipelines.bench serving [--quick] --json PATH [--config demo]``.

Every policy replays the SAME seeded schedules (components/load_schedule.py) against the
real service (serving/app.py on Ray Serve, one app at a time), open loop (pipelines/loadtest.py).

1. In process, no Serve: the latency predictor's fit and its error on held-out batches
   (``predictor_mape``), the compute of a cache hit over a miss at the median
   (``cache_hit_p50_ratio``), and the policies in simulated time on the fitted costs.
2. Stock ``@serve.batch`` (FIFO, no rejection) over a grid of max_batch_size x
   batch_wait_timeout_s. Capacity: the most requests/s any cell serves at a mild overload
   (``probe_capacity``); loads below are multiples of it. The tuned stock baseline is the cell
   with the best goodput at 1.2x capacity.
3. At 1.2x capacity: ``goodput_ratio_vs_stock`` = goodput of the SLO scheduler (cache on,
   affinity routing) / goodput of the tuned stock batcher. Full run: every baseline of
   SERVING.md (EDF without rejection, reject-on-arrival) crossed with cache on/off and routing
   random/affinity, and a sweep of 0.2x-1.5x, with ``--seeds`` seeds.
4. At 0.8x capacity: ``attainment_tight`` of the SLO scheduler.
5. ``serve_overhead_p50_ms``: Serve end to end at a light load minus the same requests scored
   in process; ``serve_floor_p50_ms``/``_p99_ms``: the same schedule against Serve's floor
   (serving/floor.py: the same proxy, route and body, constant scores, nothing behind the
   ranker), and ``serve_overhead_over_floor_p50_ms`` = our overhead minus that floor;
   ``serve_forwarding_hop_p50_ms``: in the same light run every second request goes without the
   routing header and is forwarded replica to replica, so this is the hop that the header saves
   (end to end minus compute, p50, forwarded half minus routed half);
   ``generator_lag_p99_ms``: the worst lag p99 of the generator over all runs (a
   run above 2 ms is marked invalid in ``runs``).
6. W8A16: bundle bytes and in-process p50/p99 latency, quantised vs float, and the test-split
   AUC change for each variant whose checkpoint is given (``--w8a16-checkpoints``; default the
   bundle's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from components.config_loader import load_config
from components.latency_model import LatencyModel
from components.load_schedule import make_schedule
from components.slo_scheduler import SloScheduler
from components.slo_simulation import Arrival, simulate, summarize
from pipelines.cli import configure_logging
from pipelines.config import PipelineConfig
from pipelines.loadtest import users_and_items

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Plan:
    duration_s: float
    seeds: int
    stock_grid: tuple[tuple[int, float], ...]
    loads: tuple[float, ...]  # multiples of the stock capacity
    policies: tuple[str, ...]  # names of POLICIES
    w8a16_batches: int


QUICK = Plan(12.0, 1, ((4, 0.002), (16, 0.01)), (0.2, 0.8, 1.2), ("stock", "slo", "edf"), 20)
FULL = Plan(
    30.0,
    3,
    ((1, 0.0), (4, 0.002), (8, 0.005), (16, 0.01), (32, 0.02)),
    (0.2, 0.5, 0.8, 1.0, 1.2, 1.5),
    ("stock", "slo", "edf", "reject_on_arrival", "slo_nocache", "slo_random", "stock_nocache"),
    60,
)

LIGHT_REQUESTS = 100  # requests of the light runs (our overhead, and Serve's floor)

# Two ranker replicas, so that affinity vs random routing (and the cache behind it) differ.
BENCH_DEFAULTS = ["--serve.num_replicas=2"]

# A capacity probe kept up if its last answer came this soon after the schedule's end.
DRAIN_LIMIT_S = 0.5

# name -> serve.* overrides (on top of the preset); "stock" gets the best grid cell.
POLICIES = {
    "stock": ["--serve.batching=stock"],
    "stock_nocache": ["--serve.batching=stock", "--serve.cache=false"],
    "slo": ["--serve.scheduler.policy=slo"],
    "slo_nocache": ["--serve.scheduler.policy=slo", "--serve.cache=false"],
    "slo_random": ["--serve.scheduler.policy=slo", "--serve.routing=random"],
    "edf": ["--serve.scheduler.policy=edf"],
    "reject_on_arrival": ["--serve.scheduler.policy=reject_on_arrival"],
}


# ---------------------------------------------------------------- in process
def in_process(config: PipelineConfig, plan: Plan) -> tuple[dict, object]:
    """Predictor fit and held-out error, cache hit/miss compute, simulated policies."""
    import torch

    from components.lake import lake_root
    from pipelines.serve import served_bundle
    from serving.ranker_core import RankerCore
    from serving.sequence_store import SequenceStore

    torch.set_num_threads(config.serve.torch_threads)
    bundle = served_bundle(config)
    store = SequenceStore.load(lake_root(config.lake.root), config.lake.storage_options)
    core = RankerCore(bundle, store, config.serve)
    fit = core.profile(rng_seed=0)
    # Held-out: a second sweep, scored by the model fitted on the first.
    held = RankerCore(bundle, store, config.serve)
    held.profile(rng_seed=1)
    shapes, times = held.profile_samples
    held_out = core.latency.evaluate(shapes, times)

    # Cache: the same request scored as a miss, then as a hit (request times an hour apart, so
    # every miss is one). The headline uses the load schedule's own requests (Zipf users, Pareto
    # candidate counts: the traffic the bench serves); 100 candidates for the 40 longest
    # histories is kept as a fixed point across runs.
    def hit_and_miss(requests: list[tuple[int, list[int]]], first_ts: int) -> tuple[list[float], list[float]]:
        miss, hit = [], []
        for i, (user, cands) in enumerate(requests):
            for bucket in (miss, hit):
                started = time.perf_counter()
                core.score_now(int(user), cands, first_ts + 3600 * i)
                bucket.append((time.perf_counter() - started) * 1000.0)
        return miss, hit

    rng = np.random.default_rng(0)
    lengths = np.diff(store.offsets)
    items = bundle.items["item_id"].to_numpy()
    longest = store.user_ids[np.argsort(lengths)[-40:]]  # long histories: what the cache is for
    fixed_miss, fixed_hit = hit_and_miss(
        [(int(u), rng.choice(items, size=min(100, items.size), replace=False).tolist()) for u in longest],
        first_ts=2_000_000_000,
    )
    users, item_ids = [int(u) for u in store.user_ids], items.tolist()
    schedule = make_schedule(dataclasses.replace(config.loadtest, rate_per_s=10.0, duration_s=12.0), users, item_ids)
    miss, hit = hit_and_miss([(r.user_id, list(r.candidates)) for r in schedule[:120]], first_ts=2_100_000_000)
    out = {
        "predictor_fit": fit.as_dict(),
        "predictor_held_out": held_out.as_dict(),
        "predictor_mape": held_out.mape,
        "predictor_coef": [float(c) for c in core.latency.coef],
        "cache_miss_p50_ms": float(np.median(miss)),
        "cache_hit_p50_ms": float(np.median(hit)),
        "cache_hit_p50_ratio": float(np.median(hit) / np.median(miss)),
        "cache_requests": len(miss),
        "cache_candidates_p50": float(np.median([len(r.candidates) for r in schedule[:120]])),
        "cache_miss_p50_ms_100c": float(np.median(fixed_miss)),
        "cache_hit_p50_ms_100c": float(np.median(fixed_hit)),
        "cache_hit_p50_ratio_100c": float(np.median(fixed_hit) / np.median(fixed_miss)),
        "user_state_bytes_mean": int(core.cache.stats.bytes / max(core.cache.stats.entries, 1)),
    }
    return out, core


def simulated(core, config: PipelineConfig, capacity: float, plan: Plan) -> dict:
    """The scheduler policies in simulated time, costs from the fitted model (x lognormal noise)."""
    users, items = users_and_items(config)
    lengths = dict(zip(core.store.user_ids.tolist(), np.diff(core.store.offsets).tolist()))
    out = {}
    for load in plan.loads:
        cfg = dataclasses.replace(config.loadtest, rate_per_s=load * capacity, duration_s=60.0, seed=0)
        schedule = make_schedule(cfg, users, items)
        arrivals = [
            Arrival(
                r.at_ms,
                r.request_id,
                r.user_id,
                len(r.candidates),
                min(lengths.get(r.user_id, 0), core.featurizer.max_seq_len),
                r.slo_class,
                config.serve.slo_classes[r.slo_class],
            )
            for r in schedule
        ]
        row = {}
        for policy in ("fifo", "edf", "reject_on_arrival", "slo"):
            truth, noise = LatencyModel(core.latency.coef), np.random.default_rng(0)  # same draws per policy

            def true_ms(shape, truth=truth, noise=noise) -> float:
                return truth.predict_ms(shape) * float(noise.lognormal(0.0, 0.15))

            scheduler_config = dataclasses.replace(config.serve.scheduler, policy=policy)
            scheduler = SloScheduler(scheduler_config, LatencyModel(core.latency.coef))
            row[policy] = summarize(simulate(arrivals, scheduler, true_ms), cfg.duration_s * 1000.0)
        out[f"{load:g}x"] = row
    return out


# ---------------------------------------------------------------- over Serve
class Service:
    """Deploys one policy at a time on the running Ray and fires schedules at it."""

    def __init__(self, preset: str, base: list[str]) -> None:
        self.preset, self.base = preset, base
        self.config: PipelineConfig | None = None
        self.url = ""

    def deploy(self, overrides: list[str]) -> PipelineConfig:
        from ray import serve

        from pipelines.serve import start

        if self.config is not None:
            serve.delete("ultrarank")
        self.config = load_config(PipelineConfig, self.preset, [*self.base, *overrides])
        self.url = start(self.config)
        self._wait_ready()
        return self.config

    def deploy_floor(self) -> None:
        """Replace the service with Serve's floor (serving/floor.py) on the same proxy, route
        and ingress admission; ``fire`` then measures Serve's own cost."""
        from ray import serve

        from serving.floor import floor_application

        cfg = self.config.serve
        serve.delete("ultrarank")
        serve.run(floor_application(cfg.ranker_max_ongoing_requests), name="ultrarank", route_prefix=cfg.route_prefix)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the service did not become ready in 120 s")
            time.sleep(0.5)

    def fire(self, rate: float, seed: int, duration_s: float, unrouted_every: int = 0) -> tuple[dict, list[dict]]:
        from pipelines.load_generator import fire_apart
        from pipelines.loadtest import summarize_run

        cfg = dataclasses.replace(self.config.loadtest, rate_per_s=rate, duration_s=duration_s, seed=seed)
        users, items = users_and_items(self.config)
        schedule = make_schedule(cfg, users, items)
        deadlines = dict(self.config.serve.slo_classes)
        records, core = fire_apart(self.url, schedule, deadlines, pin=cfg.pin_generator, unrouted_every=unrouted_every)
        run = summarize_run(records, duration_s)
        run["generator_core"] = core
        run.update(backlog(records, duration_s))
        return run, records


def backlog(records: list[dict], duration_s: float) -> dict:
    """How far the service fell behind a run, from the generator's own clock (times from the
    run's start, so the generator process's start-up is not in them). ``drain_s``: from the end
    of the schedule to the last answer; ``served_per_wall_s``: served requests over the time
    until the last one was answered (capacity, under saturation)."""
    answered = [r["scheduled_ms"] + r["latency_ms"] for r in records if r["status"] != 0]
    last_ms = max(answered, default=0.0)
    served = sum(r["status"] == 200 for r in records)
    return {
        "drain_s": max(last_ms / 1000.0 - duration_s, 0.0),
        "served_per_wall_s": served / max(last_ms / 1000.0, duration_s, 1e-3),
    }


def probe_capacity(svc: Service, guess: float, duration_s: float, probes: int = 4) -> dict:
    """Requests/s the deployed service sustains. Fire at 1.25x the estimate: if it kept up (the
    last answer came within ``DRAIN_LIMIT_S`` of the schedule's end), that rate is the new
    estimate; once it falls behind, what it served per second of wall time at that mild overload
    is the capacity (a heavy overload would understate it: on 2 cores the proxy's work on the
    excess competes with the replicas). Counting served requests against the offered rate
    instead mistakes a Poisson schedule's short count for falling behind.

    The drain bound is a fixed time, not a share of the probe: a share made the quick plan's
    6 s probes "fall behind" on one slow answer where the full plan's 15 s probes "kept up", so
    the two plans' "1x" differed by 3x. A service that keeps up drains in about one answer's
    latency; one that falls behind by a tenth drains a tenth of the probe."""
    estimate, steps = guess, []
    for _ in range(probes):
        rate = 1.25 * estimate
        run, _ = svc.fire(rate, seed=100 + len(steps), duration_s=duration_s)
        served, drain = run["served_per_wall_s"], run["drain_s"]
        steps.append({"offered_per_s": rate, "served_per_s": served, "drain_s": drain})
        if drain <= DRAIN_LIMIT_S:
            estimate = rate
            continue
        settled = abs(served - estimate) <= 0.1 * estimate
        estimate = served
        if settled:
            break
    return {"capacity_per_s": estimate, "probes": steps}


def serve_runs(preset: str, base: list[str], plan: Plan, in_proc: dict) -> dict:
    svc = Service(preset, base)
    out: dict = {"stock_grid": {}, "runs": {}}

    # 1) stock grid. Capacity: the most any cell serves per second at a mild overload. Tuned
    #    stock: the cell with the best goodput at 1.2x that capacity (where the headline is read;
    #    the highest-throughput cell batches too long for the tight class).
    def stock_args(size: int, wait: float) -> list[str]:
        return [
            *POLICIES["stock"],
            f"--serve.stock_max_batch_size={size}",
            f"--serve.stock_batch_wait_timeout_s={wait}",
        ]

    guess = 0.5 * 1000.0 / max(in_proc["cache_miss_p50_ms"], 1.0)  # Serve's own work about halves it
    for size, wait in plan.stock_grid:
        svc.deploy(stock_args(size, wait))
        cell = probe_capacity(svc, guess, plan.duration_s / 2)
        out["stock_grid"][f"{size}/{wait:g}"] = cell
        logger.info("stock max_batch_size=%d wait=%gs: capacity %.1f req/s", size, wait, cell["capacity_per_s"])
        guess = cell["capacity_per_s"]
    capacity = max(cell["capacity_per_s"] for cell in out["stock_grid"].values())
    best = None
    for size, wait in plan.stock_grid:
        svc.deploy(stock_args(size, wait))
        run, _ = svc.fire(1.2 * capacity, seed=99, duration_s=plan.duration_s / 2)
        cell = out["stock_grid"][f"{size}/{wait:g}"]
        cell["goodput_at_1.2x_per_s"] = run["goodput_per_s"]
        logger.info("stock max_batch_size=%d wait=%gs: goodput %.2f/s at 1.2x", size, wait, run["goodput_per_s"])
        if best is None or run["goodput_per_s"] > best[2]:
            best = (size, wait, run["goodput_per_s"])
    size, wait, _ = best
    out["stock_best"] = {"max_batch_size": size, "batch_wait_timeout_s": wait, "capacity_per_s": capacity}
    stock_sizes = stock_args(size, wait)[1:]
    outcomes: dict[tuple[str, str, int], dict[str, dict]] = {}  # (policy, load, seed) -> request id -> record
    # 2) every policy on the same schedules at every load.
    for policy in plan.policies:
        overrides = POLICIES[policy] + (stock_sizes if policy.startswith("stock") else [])
        svc.deploy(overrides)
        for load in plan.loads:
            for seed in range(plan.seeds):
                run, records = svc.fire(load * capacity, seed=seed, duration_s=plan.duration_s)
                out["runs"].setdefault(policy, {}).setdefault(f"{load:g}x", []).append(run)
                if policy in ("slo", "edf"):
                    outcomes[policy, f"{load:g}x", seed] = {r["request_id"]: r for r in records}
                logger.info(
                    "%s at %.1fx (%.1f req/s) seed %d: goodput %.2f/s attainment %.3f lag p99 %.2f ms",
                    policy,
                    load,
                    load * capacity,
                    seed,
                    run["goodput_per_s"],
                    run["attainment"],
                    run["lag_p99_ms"],
                )
    out["rejections_checked"] = check_rejections(outcomes)
    # 3) Serve's overhead: a light load through Serve vs the same requests in process; then
    #    the same schedule against Serve's floor (the HTTP path with constant scores behind it).
    svc.deploy(POLICIES["slo"])
    # At least LIGHT_REQUESTS requests each, so that a p99 means something.
    light_rate = max(capacity * 0.1, 1.0)
    light_s = max(plan.duration_s / 2, LIGHT_REQUESTS / light_rate)
    # Every second request goes without the routing header: the replica Serve's proxy picks then
    # forwards it to its user's replica, the hop the header saves, measured in the same run.
    light, records = svc.fire(light_rate, seed=7, duration_s=light_s, unrouted_every=2)
    served = [r for r in records if r["status"] == 200 and r["routed"]]
    forwarded = [r for r in records if r["status"] == 200 and not r["routed"]]

    def outside_model(rs: list[dict]) -> float:  # per request: end to end minus in-replica compute
        return float(np.median([r["latency_ms"] - r["compute_ms"] for r in rs])) if rs else float("nan")

    out["light"] = {
        "e2e_p50_ms": float(np.median([r["latency_ms"] for r in served])),
        "compute_p50_ms": float(np.median([r["compute_ms"] for r in served])),
        "rate_per_s": light_rate,
        "valid": light["valid"],
        "requests": len(served),
        # The forwarded half: one more actor hop (replica -> replica), the rest the same.
        "forwarded_requests": len(forwarded),
        "outside_model_p50_ms": outside_model(served),
        "forwarded_outside_model_p50_ms": outside_model(forwarded),
    }
    svc.deploy_floor()
    floor, records = svc.fire(light_rate, seed=7, duration_s=light_s)
    served = [r["latency_ms"] for r in records if r["status"] == 200]
    out["floor"] = {
        "e2e_p50_ms": float(np.median(served)) if served else float("nan"),
        "e2e_p99_ms": float(np.percentile(served, 99)) if served else float("nan"),
        "served": len(served),
        "offered": len(records),
        "lag_p99_ms": floor["lag_p99_ms"],
        "valid": floor["valid"],
    }
    logger.info("Serve's floor at %.1f req/s: p50 %.2f ms", light_rate, out["floor"]["e2e_p50_ms"])
    from ray import serve

    serve.delete("ultrarank")
    out["capacity_per_s"] = capacity
    return out


def check_rejections(outcomes: dict[tuple[str, str, int], dict[str, dict]]) -> dict:
    """Per load: how many requests ``slo`` rejected, and how many of those same requests (same
    schedule, same seed) ``edf``, which rejects nothing, served within their deadline. The second
    count is the scheduler's waste: requests it turned away that would have made it."""
    checked: dict[str, dict] = {}
    for (policy, load, seed), slo in sorted(outcomes.items()):
        edf = outcomes.get(("edf", load, seed))
        if policy != "slo" or edf is None:
            continue
        rejected = [k for k, r in slo.items() if r["status"] in (429, 503) and k in edf]
        cell = checked.setdefault(load, {"rejected": 0, "edf_served_in_time": 0})
        cell["rejected"] += len(rejected)
        cell["edf_served_in_time"] += sum(bool(edf[k]["good"]) for k in rejected)
    return checked


def _mean(runs: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in runs]))


def headline(result: dict) -> dict:
    """The issue's keys, from the runs."""
    runs = result["serve"]["runs"]
    slo, stock = runs["slo"], runs["stock"]
    tight = [r["by_class"].get("tight", {}).get("attainment", 0.0) for r in slo["0.8x"]]
    lags = [r["lag_p99_ms"] for per_load in runs.values() for rs in per_load.values() for r in rs]
    light = result["serve"]["light"]
    overhead = light["e2e_p50_ms"] - light["compute_p50_ms"]
    floor = result["serve"].get("floor", {})  # absent from runs kept from before the floor (--reuse-serve)
    wrong = result["serve"].get("rejections_checked", {}).get("0.2x", {})
    return {
        "goodput_ratio_vs_stock": _mean(slo["1.2x"], "goodput_per_s")
        / max(_mean(stock["1.2x"], "goodput_per_s"), 1e-9),
        "attainment_tight": float(np.mean(tight)),
        "cache_hit_p50_ratio": result["in_process"]["cache_hit_p50_ratio"],
        "predictor_mape": result["in_process"]["predictor_mape"],
        # Serve end to end minus the in-process work of the same requests (compute + queue in process).
        "serve_overhead_p50_ms": overhead,
        # Serve's own floor on the same path and schedule, and what our service adds above it.
        "serve_floor_p50_ms": floor.get("e2e_p50_ms", float("nan")),
        "serve_floor_p99_ms": floor.get("e2e_p99_ms", float("nan")),
        "serve_overhead_over_floor_p50_ms": overhead - floor.get("e2e_p50_ms", float("nan")),
        # What a request without the routing header pays for its forwarding hop (p50 of end to end
        # minus compute, forwarded half minus routed half of the same light run).
        "serve_forwarding_hop_p50_ms": light.get("forwarded_outside_model_p50_ms", float("nan"))
        - light.get("outside_model_p50_ms", float("nan")),
        # Of slo's rejections at 0.2x, the share that edf served in time on the same schedule.
        "slo_wrong_rejection_share_0.2x": wrong.get("edf_served_in_time", 0) / wrong["rejected"]
        if wrong.get("rejected")
        else float("nan"),
        "generator_lag_p99_ms": float(max(lags)),
        "invalid_runs": sum(not r["valid"] for per_load in runs.values() for rs in per_load.values() for r in rs),
    }


def plot(result: dict, out_dir: Path, stem: str) -> list[str]:
    """``<stem>_goodput.png`` (goodput vs load, every policy) and ``<stem>_attainment.png``
    (overall and tight-class attainment vs load); means over seeds, the bars their range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, capacity = result["serve"]["runs"], result["serve"]["capacity_per_s"]
    panels = {
        f"{stem}_goodput.png": [("goodput (good responses / s)", lambda r: r["goodput_per_s"])],
        f"{stem}_attainment.png": [
            ("SLO attainment, all classes", lambda r: r["attainment"]),
            ("SLO attainment, tight class", lambda r: r["by_class"].get("tight", {}).get("attainment", np.nan)),
        ],
    }
    written = []
    for name, metrics in panels.items():
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.4), squeeze=False)
        for ax, (label, value) in zip(axes[0], metrics):
            for policy, per_load in runs.items():
                loads = sorted(per_load, key=lambda x: float(x.rstrip("x")))
                xs = [float(x.rstrip("x")) for x in loads]
                values = [[value(r) for r in per_load[x]] for x in loads]
                means = [float(np.mean(v)) for v in values]
                low = [m - min(v) for m, v in zip(means, values)]
                high = [max(v) - m for m, v in zip(means, values)]
                ax.errorbar(xs, means, yerr=[low, high], marker="o", ms=3, capsize=2, label=policy)
            ax.set_xlabel(f"offered load (x stock capacity {capacity:.0f} req/s)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


# ---------------------------------------------------------------- W8A16
def w8a16(config: PipelineConfig, checkpoints: list[str], batches: int) -> dict:
    """Bytes, in-process latency and test AUC of W8A16 vs float for each checkpoint."""
    import pyarrow as pa
    import torch

    from components.bundle import load_bundle
    from components.collate import CollateConfig, collate_groups
    from components.metrics import MetricsAccumulator
    from components.training_data import pin_training_data
    from models.task import logits_of
    from pipelines.export import run_export

    out = {}
    for checkpoint in checkpoints:
        with tempfile.TemporaryDirectory() as tmp:
            export = dataclasses.replace(config.export, checkpoint=checkpoint, w8a16=True, output=f"{tmp}/bundle")
            cfg = dataclasses.replace(config, export=export)
            bundle_dir, manifest = run_export(cfg)
            row: dict = {
                "float_bytes": manifest.files["weights.safetensors"]["bytes"],
                "w8a16_bytes": manifest.files["weights_w8a16.safetensors"]["bytes"],
            }
            data = pin_training_data(
                manifest.lake["root"], config.lake.storage_options, manifest.lake["samples_version"]
            )
            rows = data.load_groups("test", manifest.max_seq_len).take_all()
            table = pa.Table.from_pylist(rows)
            for name, quantized in (("float", False), ("w8a16", True)):
                model = load_bundle(bundle_dir, w8a16=quantized).model
                acc, times = MetricsAccumulator(), []
                with torch.inference_mode():
                    for start in range(0, table.num_rows, 32):
                        part = table.slice(start, 32)
                        batch = collate_groups(part, CollateConfig(max_seq_len=manifest.max_seq_len))
                        t0 = time.perf_counter()
                        logits = logits_of(model(batch))
                        if start // 32 < batches:
                            times.append((time.perf_counter() - t0) * 1000.0)
                        acc.update(logits, batch.labels, batch.cand_mask, part.column("user_id").to_numpy())
                metrics = acc.compute()
                row[f"{name}_like_auc"] = metrics["like_auc"]
                row[f"{name}_p50_ms"] = float(np.percentile(times, 50))
                row[f"{name}_p99_ms"] = float(np.percentile(times, 99))
            row["like_auc_change"] = row["w8a16_like_auc"] - row["float_like_auc"]
            out[manifest.variant] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench serving", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="stock, slo, edf at 0.2x, 0.8x, 1.2x; 1 seed (<= 10 min)")
    parser.add_argument("--json", required=True)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--seeds", type=int, default=0, help="override the plan's seeds")
    parser.add_argument("--w8a16-checkpoints", default="", help="comma-separated checkpoints (default: the bundle's)")
    parser.add_argument(
        "--reuse-serve",
        action="store_true",
        help="keep the Serve runs already in --json (the hour-long part) and redo the rest",
    )
    args, overrides = parser.parse_known_args(argv)
    overrides = [*BENCH_DEFAULTS, *overrides]  # the caller's overrides win
    configure_logging()
    plan = QUICK if args.quick else FULL
    if args.seeds:
        plan = dataclasses.replace(plan, seeds=args.seeds)
    config = load_config(PipelineConfig, args.config, overrides)
    started = time.perf_counter()
    path = Path(args.json)
    result: dict = {"quick": args.quick, "plan": dataclasses.asdict(plan), "config": args.config}
    if args.reuse_serve:
        try:
            previous = json.loads(path.read_text())
            result.update({key: previous[key] for key in ("quick", "plan", "config", "serve")})
        except (OSError, ValueError, KeyError) as exc:
            print(f"--reuse-serve: no Serve runs to reuse in {path} ({exc!r})")
            return 2
        plan = Plan(**{k: tuple(map(tuple, v)) if k == "stock_grid" else v for k, v in result["plan"].items()})
        logger.info("reusing the Serve runs of %s (%s)", path, ", ".join(result["serve"]["runs"]))
    proc, core = in_process(config, plan)
    result["in_process"] = proc
    if not args.reuse_serve:
        from pipelines.ray_runtime import ray_runtime

        with ray_runtime(config.ray):
            result["serve"] = serve_runs(args.config, overrides, plan, proc)
    path.parent.mkdir(parents=True, exist_ok=True)
    save = lambda: path.write_text(json.dumps(result, indent=2, sort_keys=True, default=float) + "\n")
    save()  # the Serve runs are the expensive part: kept even if what follows fails
    result["simulated"] = simulated(core, config, result["serve"]["capacity_per_s"], plan)
    checkpoints = [c for c in args.w8a16_checkpoints.split(",") if c]
    if not checkpoints:
        from pipelines.serve import served_bundle

        checkpoints = [served_bundle(config).manifest.checkpoint["path"]]
    result["w8a16"] = w8a16(config, checkpoints, plan.w8a16_batches)
    result.update(headline(result))
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["plots"] = plot(result, path.parent, path.stem)
    save()
    keys = ("goodput_ratio_vs_stock", "attainment_tight", "cache_hit_p50_ratio", "predictor_mape")
    shown = (*keys, "serve_overhead_p50_ms", "serve_floor_p50_ms", "serve_overhead_over_floor_p50_ms")
    shown = (*shown, "serve_forwarding_hop_p50_ms")
    print(json.dumps({k: result[k] for k in (*shown, "generator_lag_p99_ms")}, indent=2))
    return 0
