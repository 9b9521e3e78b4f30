"""The ranking application: ranker replicas that answer HTTP themselves, and a metrics hub.

    python -m pipelines.serve --config demo          # on an embedded Ray
    serve run serving.app:build config=demo          # the same application under the Serve CLI

The routes are in serving/ingress.py, the replica's model and scheduling loop in
serving/ranker.py; this module binds the deployments (Serve's proxy -> ranker replicas, routed
by user; metrics hub) and reads a preset for ``build``.
"""

from __future__ import annotations

import os

from ray import serve

from components import object_store
from components.bundle import default_bundle_dir
from components.config_loader import ConfigError, from_dict, merge, parse_overrides, read_preset, to_dict
from components.lake import LakeConfig, lake_root
from models.variants import ModelConfig
from serving.config import ServeConfig
from serving.ingress import RankingService
from serving.metrics import MetricsHub
from serving.ranker import DRAIN_CHECK_S, ranker_options


def application(config: ServeConfig, bundle: str, lake_root: str, storage_options: dict[str, str]):
    """The bound application (ranker replicas as the ingress, metrics hub)."""
    hub = serve.deployment(
        name="Metrics",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=64,
        max_queued_requests=256,
        graceful_shutdown_wait_loop_s=DRAIN_CHECK_S,
        logging_config={"enable_access_log": config.access_log},
    )(MetricsHub)
    metrics = hub.bind()
    ranker = serve.deployment(**ranker_options(config))(RankingService)
    return ranker.bind(bundle, lake_root, storage_options, to_dict(config), metrics, api_key_of(config))


def api_key_of(config: ServeConfig) -> str:
    """The key /rank requires, read by the deploying process from the variable the config names.

    It reaches the ranker replicas as an init argument (Serve keeps those in its controller):
    use a key meant for this service only."""
    if not config.api_key_env:
        return ""
    key = os.environ.get(config.api_key_env, "")
    if not key:
        raise ConfigError(f"serve.api_key_env names {config.api_key_env!r}, which is not set or empty")
    return key


def resolve(args: dict[str, str]) -> tuple[ServeConfig, str, str, dict[str, str]]:
    """``build``'s arguments -> (serve config, bundle folder or URI, lake root, storage options).

    Reads the preset's ``serve`` and ``lake`` sections (overrides as ``serve.num_replicas=2``);
    the bundle is ``bundle=``, else ``serve.bundle``, else the one ``export`` writes for the
    preset's run (``export.output`` or ``bundles/<train.run_name or model.variant>``). Only the
    sections serving reads are validated here: ``python -m pipelines.serve`` checks the whole
    preset and the bundle before deploying."""
    args = dict(args)
    preset, bundle = args.pop("config", "demo"), args.pop("bundle", "")
    data = merge(read_preset(preset), parse_overrides([f"--{key}={value}" for key, value in args.items()]))
    config = from_dict(ServeConfig, data.get("serve"), "serve")
    lake_config = from_dict(LakeConfig, data.get("lake"), "lake")
    if not bundle:
        train, model = data.get("train") or {}, data.get("model") or {}
        run_name = train.get("run_name") or model.get("variant") or ModelConfig().variant
        bundle = config.bundle or default_bundle_dir((data.get("export") or {}).get("output", ""), run_name)
    return config, object_store.absolute(bundle), lake_root(lake_config.root), lake_config.storage_options


def build(args: dict[str, str]):
    """``serve run serving.app:build [config=PRESET] [bundle=PATH] [section.key=value ...]``
    (see :func:`resolve`)."""
    return application(*resolve(args))
