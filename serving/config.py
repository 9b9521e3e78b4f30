"""The ``serve`` config section: what the ranking service runs and how it protects its SLOs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from components.config_loader import ConfigError
from components.object_store import DEFAULT_CACHE_DIR
from components.slo_scheduler import SchedulerConfig


def _default_classes() -> dict[str, float]:
    # SERVING.md's classes; on 2 cores Serve's own p50 overhead is a few ms, so no SLO < 20 ms.
    return {"tight": 50.0, "normal": 150.0, "loose": 500.0}


@dataclass(frozen=True)
class ServeConfig:
    """``python -m pipelines.serve`` and ``serving.app:build``."""

    # The bundle folder or object-store URI (python -m pipelines.export); "" = export.output, i.e.
    # bundles/<run name>. A URI is read with ``lake.storage_options`` and copied once into
    # ``bundle_cache``/<model_version> on each node, then loaded from there.
    bundle: str = ""
    bundle_cache: str = DEFAULT_CACHE_DIR
    # Serve the bundle's W8A16 weights: true, false, or "auto" = the faster of fp32 and W8A16 on
    # this CPU, timed at replica start on the same requests (serving/bundle_choice.py); fp32 when
    # the bundle has no W8A16 weights.
    w8a16: bool | Literal["auto"] = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    # Where Serve runs HTTP proxies: on every node with a replica (Ray's default, what a load
    # balancer in front of the nodes needs), or on the head only (nodes sharing one host and port).
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    route_prefix: str = "/"
    num_replicas: int = 1  # ranker replicas
    replica_cpus: float = 1.0  # Ray CPUs reserved per ranker replica
    torch_threads: int = 1  # intra-op threads of a replica's model
    # Requests: a body above max_body_bytes is refused (413) before it is parsed.
    max_body_bytes: int = 1_000_000
    max_candidates: int = 1000
    slo_classes: dict[str, float] = field(default_factory=_default_classes)  # name -> deadline ms
    default_slo_class: str = "normal"
    # Ray Serve admission, set deliberately: a ranker replica takes more requests than its
    # scheduler queue would hold, so requests wait in the scheduler's slack-ordered queue (not in
    # Serve's FIFO), which answers 429 beyond its bound.
    ranker_max_ongoing_requests: int = 512
    max_queued_requests: int = 1024  # Serve's own queue in front of a replica (-1 unbounded: never)
    # The user-side cache of each replica.
    cache: bool = True
    cache_bytes: int = 256 << 20
    cache_ttl_s: float = 600.0
    # Pre-warm: while a replica is idle it computes the user state of users seen lately (at most
    # prewarm_users, within the cache TTL) for the current time window, and for the next one from
    # prewarm_lead_s before it starts, or after a new sequences version, so a returning user
    # hits. 0 = off. One user at a time: a request arriving meanwhile waits for at most one encode.
    prewarm_users: int = 4096
    prewarm_lead_s: float = 10.0
    # Request time is quantised to this many seconds: a cached user state is exact for every
    # request in the same window (the gap features and the history cut depend on the time).
    request_ts_granularity_s: int = 60
    # Routing: "affinity" = rendezvous hashing on user_id with bounded-load spill-over
    # (serving/router.py); "random" = Ray Serve's default power-of-two-choices.
    routing: Literal["affinity", "random"] = "affinity"
    bounded_load: float = 1.5  # spill over when a replica holds > this x the mean ongoing load (+1)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # "scheduler": the SLO-aware scheduler above (its policy picks slo / edf / reject_on_arrival /
    # fifo); "stock": Ray Serve's own @serve.batch (FIFO, no rejection) at the sizes below, the
    # baseline the serving bench tunes by a grid.
    batching: Literal["scheduler", "stock"] = "scheduler"
    stock_max_batch_size: int = 8
    stock_batch_wait_timeout_s: float = 0.005
    # Serve's per-request access log line (in every replica, and streamed to the driver): off by
    # default, it is a log write per request on the serving path; errors are logged either way.
    access_log: bool = False
    profile_batches: int = 30  # profiling sweep at replica start (fits the latency model)
    sequence_poll_s: float = 30.0  # how often a replica checks for a new ``sequences`` version
    # Optional API key on /rank: the NAME of an environment variable holding it ("" = no auth).
    api_key_env: str = ""

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.torch_threads < 1 or self.replica_cpus <= 0:
            raise ConfigError("serve.num_replicas and serve.torch_threads must be >= 1, serve.replica_cpus > 0")
        if self.max_candidates < 1 or self.max_body_bytes < 1024:
            raise ConfigError(
                f"serve.max_candidates must be >= 1 and serve.max_body_bytes >= 1024, "
                f"got {self.max_candidates}, {self.max_body_bytes}"
            )
        if not self.slo_classes or any(not ms > 0 for ms in self.slo_classes.values()):
            raise ConfigError(f"serve.slo_classes must map names to deadlines > 0 ms, got {self.slo_classes}")
        if self.default_slo_class not in self.slo_classes:
            raise ConfigError(
                f"serve.default_slo_class {self.default_slo_class!r} is not one of {sorted(self.slo_classes)}"
            )
        if self.request_ts_granularity_s < 1 or self.cache_ttl_s <= 0 or self.cache_bytes < 0:
            raise ConfigError("serve.request_ts_granularity_s >= 1, serve.cache_ttl_s > 0, serve.cache_bytes >= 0")
        if self.prewarm_users < 0 or not 0 <= self.prewarm_lead_s < self.request_ts_granularity_s:
            raise ConfigError(
                f"serve.prewarm_users must be >= 0 and 0 <= serve.prewarm_lead_s < serve.request_ts_granularity_s, "
                f"got {self.prewarm_users}, {self.prewarm_lead_s}"
            )
        if self.bounded_load < 1.0:
            raise ConfigError(f"serve.bounded_load must be >= 1, got {self.bounded_load}")
        if self.ranker_max_ongoing_requests < self.scheduler.max_queue:
            raise ConfigError(
                f"serve.ranker_max_ongoing_requests ({self.ranker_max_ongoing_requests}) must be >= "
                f"serve.scheduler.max_queue ({self.scheduler.max_queue}): the scheduler, not Serve, queues requests"
            )
        if self.stock_max_batch_size < 1 or self.stock_batch_wait_timeout_s < 0:
            raise ConfigError("serve.stock_max_batch_size must be >= 1 and serve.stock_batch_wait_timeout_s >= 0")
        if self.batching == "stock" and self.ranker_max_ongoing_requests < self.stock_max_batch_size:
            raise ConfigError(
                f"serve.ranker_max_ongoing_requests ({self.ranker_max_ongoing_requests}) < "
                f"serve.stock_max_batch_size ({self.stock_max_batch_size}): batches would never fill"
            )
        if self.profile_batches < 6:
            raise ConfigError(f"serve.profile_batches must be >= 6 (5 coefficients to fit), got {self.profile_batches}")
