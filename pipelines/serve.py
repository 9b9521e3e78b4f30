"""Serve the ranking service over HTTP until interrupted.

    python -m pipelines.serve --config PRESET [--serve.bundle=PATH] [--serve.num_replicas=2 ...]
    serve run serving.app:build config=PRESET [bundle=PATH] [serve.num_replicas=2 ...]

Deploys serving/app.py (ranker replicas answering HTTP, routed by user; metrics) on the
configured Ray (embedded by default) with the bundle of the run the config names (python -m pipelines.export), prints
the endpoints and a curl example with a real user and items of the bundle, and serves until
Ctrl-C, then shuts Serve down (in-flight requests drain first). Exit 0 on a clean stop,
1 when the bundle or lake is missing or bad, 2 on a config error.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time

from components import lake, object_store
from components.bundle import Bundle, BundleError, load_bundle
from components.config_loader import ConfigError
from pipelines.cli import pipeline_main
from pipelines.config import PipelineConfig
from pipelines.export import bundle_path
from pipelines.ray_runtime import ray_runtime
from serving import proxy_limits
from serving.api import routing_header

logger = logging.getLogger(__name__)


def bundle_of(config: PipelineConfig) -> str:
    """The served bundle's location: ``serve.bundle``, else export's; a folder made absolute, a URI kept."""
    return object_store.absolute(config.serve.bundle or bundle_path(config))


def served_bundle(config: PipelineConfig, *, w8a16: bool = False) -> Bundle:
    """The bundle ``serve`` would deploy, loaded as a replica loads it (a URI through the cache)."""
    options, cache_dir = config.lake.storage_options, config.serve.bundle_cache
    return load_bundle(bundle_of(config), w8a16=w8a16, storage_options=options, cache_dir=cache_dir)


def example_request(config: PipelineConfig) -> dict:
    """A request for a user with a history and five known items (for the printed curl line)."""
    from serving.sequence_store import SequenceStore

    bundle = served_bundle(config)
    store = SequenceStore.load(lake.lake_root(config.lake.root), config.lake.storage_options)
    lengths = store.offsets[1:] - store.offsets[:-1]
    user = int(store.user_ids[int(lengths.argmax())]) if store.user_ids.size else 0
    items = bundle.items["item_id"].to_pylist()[:5]
    return {"user_id": user, "candidates": items, "slo_class": "normal"}


def start(config: PipelineConfig, *, blocking: bool = False) -> str:
    """Deploy the application on the running Ray; returns the base URL."""
    from ray import serve

    from serving.app import application

    cfg = config.serve
    if not proxy_limits.installed():
        logger.warning(
            "Serve's HTTP proxy buffers whole request bodies: set %s=%s (and %s) in the cluster's "
            "environment to bound them (serving/proxy_limits.py)",
            proxy_limits.CALLBACK_ENV,
            proxy_limits.CALLBACK,
            proxy_limits.CEILING_ENV,
        )
    elif cfg.max_body_bytes > proxy_limits.ceiling():
        raise ConfigError(
            f"serve.max_body_bytes={cfg.max_body_bytes} exceeds the proxy's body ceiling "
            f"{proxy_limits.CEILING_ENV}={proxy_limits.ceiling()}; raise the latter before Ray starts"
        )
    bundle_dir = bundle_of(config)
    # Fail here, with the bundle's own error, not in a replica ("auto" needs only the fp32 weights).
    served_bundle(config, w8a16=cfg.w8a16 is True)
    serve.start(
        proxy_location=cfg.proxy_location,
        http_options={"host": cfg.host, "port": cfg.port},
        logging_config={"enable_access_log": cfg.access_log},
    )
    app = application(cfg, bundle_dir, lake.lake_root(config.lake.root), config.lake.storage_options)
    serve.run(app, name="ultrarank", route_prefix=cfg.route_prefix, blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def _main(config: PipelineConfig, args: argparse.Namespace) -> int:
    from ray import serve

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # kept across ray.init (ray_runtime)
    with ray_runtime(config.ray):
        started = time.perf_counter()
        url = start(config)
        example = example_request(config)
        print(f"serving {bundle_of(config)} at {url} (ready in {time.perf_counter() - started:.1f} s)")
        route = f"-H '{routing_header()}: {example['user_id']}'"  # the proxy routes by user on it
        print(f"  curl -s {url}/rank -H 'content-type: application/json' {route} -d '{json.dumps(example)}'")
        print(f"  curl -s {url}/readyz   |  {url}/metrics   |  {url}/docs")
        print("Ctrl-C stops it.", flush=True)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    return pipeline_main(
        "pipelines.serve",
        __doc__.splitlines()[0],
        argv,
        _main,
        default_preset="demo",
        failures=(lake.LakeError, BundleError),
    )


if __name__ == "__main__":
    raise SystemExit(main())
