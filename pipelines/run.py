"""The main job: raw logs to a served, load-tested model and a report, on one Ray instance.

    python -m pipelines.run --config demo [--from STAGE | --only STAGE] [--stages LAST]
                            [--keep-serving] [--section.key=value ...]

Stages, in order: ingest -> features -> train -> evaluate -> export -> serve -> loadtest ->
report. Each run gets ``run.reports_dir/<run id>/`` with ``manifest.json`` (every stage's
inputs, outputs and time; pipelines/run_manifest.py), the stages' JSON, the load test's files
and ``report.md`` with its plots (pipelines/report.py).

Reuse: a stage whose inputs are unchanged since an earlier run (its config sections, the
Delta versions, checkpoint or bundle it reads; the source files for ingest) and whose outputs
are still there is not run again; its outputs are taken from that run. serve, loadtest and
report always run: they measure and describe the model now.

``--from STAGE`` runs STAGE and everything after it again (earlier stages are reused where
they can be); ``--only STAGE`` runs just STAGE on the outputs of earlier runs (an error names
a missing one); ``--stages LAST`` stops after LAST. ``--keep-serving`` leaves the service up
after the report until Ctrl-C or SIGTERM (``--only serve`` implies it); otherwise Serve and
Ray are shut down before the command returns. Exit 0 done, 1 a stage failed (the manifest
says which), 2 a config or usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from components import lake, lake_stats, object_store
from components.bundle import MANIFEST as BUNDLE_MANIFEST
from components.bundle import BundleError, parse_manifest
from components.checkpoint import CheckpointError, CheckpointMeta, latest_checkpoint, read_meta, run_dir, write_text
from components.collate import CollateConfig, collate_groups
from components.config_loader import ConfigError, to_dict
from components.validation import IngestError
from pipelines import run_manifest
from pipelines.cli import pipeline_main
from pipelines.config import START_DIR, PipelineConfig
from pipelines.evaluate import EvaluateError
from pipelines.features import FeaturesError
from pipelines.loadtest import LoadTestError
from pipelines.ray_runtime import ray_runtime
from pipelines.run_manifest import RunManifest, StageRecord
from pipelines.train import TrainError

logger = logging.getLogger(__name__)

TABLES = ("events", "items", "users", "sequences", "samples")
STAGES = ("ingest", "features", "train", "evaluate", "export", "serve", "loadtest", "report")
# Stages that measure or describe the model now: they run whenever they are in range.
LIVE = ("serve", "loadtest", "report")
NEEDS_RAY = ("features", "train", "evaluate", "serve", "loadtest")
FAILURES = (
    IngestError,
    lake.LakeError,
    FeaturesError,
    TrainError,
    CheckpointError,
    EvaluateError,
    BundleError,
    LoadTestError,
)


class RunError(RuntimeError):
    """A stage cannot run: an input it needs is neither reusable nor produced by this run."""


# ---------------------------------------------------------------------------------------------
# What runs
# ---------------------------------------------------------------------------------------------
def plan(last: str = STAGES[-1], start: str | None = None, only: str | None = None) -> dict[str, str]:
    """Each stage's mode: ``run`` (always), ``reuse_or_run``, ``reuse`` (reuse or fail) or ``skip``."""
    if only is not None:
        at = STAGES.index(only)
        return {s: "reuse" if i < at else "run" if i == at else "skip" for i, s in enumerate(STAGES)}
    first, end = STAGES.index(start) if start else 0, STAGES.index(last)
    if first > end:
        raise ConfigError(f"--from {start} comes after --stages {last}")
    modes = {}
    for i, s in enumerate(STAGES):
        if i > end:
            modes[s] = "skip"
        elif i < first:
            modes[s] = "reuse_or_run"
        else:
            modes[s] = "run" if start or s in LIVE else "reuse_or_run"
    return modes


# ---------------------------------------------------------------------------------------------
# Inputs of each stage (their hash is the stage's key) and whether recorded outputs still exist
# ---------------------------------------------------------------------------------------------
def source_fingerprint(config: PipelineConfig) -> dict[str, Any]:
    """What identifies ingest's source data: sizes and times of its local files."""
    cfg = config.ingest
    if cfg.source == "synthetic":
        return {"synthetic": dataclasses.asdict(cfg.synthetic)}
    if cfg.source == "movielens":
        paths = [cfg.movielens_dir]
    else:
        paths = [p for p in (cfg.events.path, cfg.events.items_path, cfg.events.users_path) if p]
    return {path: _file_facts(path) for path in paths}


def _file_facts(path: str) -> Any:
    """(name, bytes, mtime) of a local file or of every file in a folder; the path itself for a
    URI (an object rewritten in place under the same name is not noticed: use --from ingest)."""
    if "://" in path:
        return path
    root = Path(path).expanduser()
    if not root.exists():
        return "missing"
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return [
        (str(p.relative_to(root)) if root.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files
    ]


def stage_inputs(name: str, config: PipelineConfig, manifest: RunManifest) -> dict[str, Any]:
    """Everything stage ``name``'s outputs depend on (upstream stages by their output ids)."""
    lake_section = {k: v for k, v in to_dict(config.lake).items() if k != "storage_options"}  # no secrets
    up = manifest.outputs
    if name == "ingest":
        return {"lake": lake_section, "ingest": to_dict(config.ingest), "source": source_fingerprint(config)}
    if name == "features":
        return {"lake": lake_section, "features": to_dict(config.features), "ingest": up("ingest").get("versions")}
    if name == "train":
        return {"model": to_dict(config.model), "train": to_dict(config.train), "data": up("features").get("versions")}
    if name in ("evaluate", "export"):
        section = to_dict(config.eval) if name == "evaluate" else to_dict(config.export)
        checkpoint = up("train").get("checkpoint")
        # The path alone is not the checkpoint: a retrained run of the same name and best step
        # writes the same path with other weights, and its evaluation must not be reused.
        identity = checkpoint_identity(checkpoint, config.lake.storage_options)
        return {name: section, "checkpoint": checkpoint, "checkpoint_meta": identity}
    if name == "serve":
        return {"serve": to_dict(config.serve), "model_version": up("export").get("model_version")}
    if name == "loadtest":
        run = {k: v for k, v in to_dict(config.run).items() if k.startswith("loadtest")}
        return {"loadtest": to_dict(config.loadtest), "run": run, "serve": stage_inputs("serve", config, manifest)}
    return {}


def checkpoint_identity(path: str | None, options: Mapping[str, str]) -> str | None:
    """A digest of checkpoint ``path``'s meta.json (its step, settings and valid metrics): it
    changes whenever another training run wrote that path; None when there is no readable one."""
    if not path:
        return None
    try:
        return run_manifest.stage_key(dataclasses.asdict(read_meta(path, options)))
    except (OSError, CheckpointError):
        return None


def bundle_version(location: str, options: Mapping[str, str]) -> str | None:
    """The ``model_version`` of the bundle at ``location`` (a folder or URI); None when absent."""
    text = object_store.read_text(object_store.join(location, BUNDLE_MANIFEST), options)
    return None if text is None else parse_manifest(text, location).model_version


def still_there(name: str, config: PipelineConfig) -> Callable[[Mapping[str, Any]], bool]:
    """A check that recorded outputs of stage ``name`` still exist unchanged."""
    root, options = lake.lake_root(config.lake.root), config.lake.storage_options

    def tables_at(versions: Mapping[str, int]) -> bool:
        return all(lake.table_version(lake.table_uri(root, t), options) == v for t, v in versions.items())

    def files(*paths: str) -> bool:
        return all(p and Path(p).is_file() for p in paths)

    def check(out: Mapping[str, Any]) -> bool:
        try:
            if name in ("ingest", "features"):
                return tables_at(out["versions"])
            if name == "train":
                read_meta(out["checkpoint"], options)
                return files(out["summary"])
            if name == "evaluate":
                return files(out["metrics"], out["floors"])
            if name == "export":
                return bundle_version(out["bundle"], options) == out["model_version"] and files(out["summary"])
            if name == "loadtest":
                return files(out["summary"])
            return name == "serve"
        except (KeyError, OSError, lake.LakeError, CheckpointError, BundleError):
            return False

    return check


# Train settings a continued run may change: more epochs or steps extend it.
EXTENDING = ("max_epochs", "patience", "max_steps", "resume")


def unfinished_run_of(meta: CheckpointMeta, config: PipelineConfig, samples_version: int) -> str:
    """Why checkpoint ``meta`` is not part of a run of ``config`` on ``samples_version``, or ""."""
    if meta.samples_version != samples_version:
        return f"trained on samples version {meta.samples_version}, not {samples_version}"
    ours = json.loads(json.dumps(to_dict(config.train)))
    changed = sorted(k for k, v in ours.items() if k not in EXTENDING and meta.train.get(k) != v)
    if changed:
        return "trained with other train settings (" + ", ".join(changed) + ")"
    # The checkpoint's model has the lake's vocabulary sizes filled in; the config's are unset.
    model = json.loads(json.dumps(to_dict(config.model)))
    changed = [key for key, (a, b) in _leaves(model, meta.model) if a != b and not key.endswith("_vocab")]
    if changed:
        return "a model with other settings (" + ", ".join(changed[:5]) + ")"
    return ""


def _leaves(a: Any, b: Any, prefix: str = "") -> list[tuple[str, tuple[Any, Any]]]:
    """(dotted key, (a's value, b's value)) for every leaf of two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [leaf for k in keys for leaf in _leaves(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [(prefix.rstrip("."), (a, b))]


# ---------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------
class Pipeline:
    """One run: the config, its manifest and folder, and what is up (Ray, the service)."""

    def __init__(self, config: PipelineConfig, preset: str, argv: list[str], keep_serving: bool) -> None:
        self.config = config
        self.reports_dir = os.path.join(START_DIR, os.path.expanduser(config.run.reports_dir))
        run_id = run_manifest.new_run_id()
        self.folder = run_manifest.run_dir(self.reports_dir, run_id)
        self.manifest = RunManifest(run_id=run_id, preset=preset, argv=argv, config=to_dict(config))
        self.keep_serving = keep_serving
        self.stack = contextlib.ExitStack()
        self.ray_up = False
        self.url = ""
        self.printed: list[str] = []

    # ---- resources ---------------------------------------------------------------------------
    def ensure_ray(self) -> None:
        if not self.ray_up:
            self.stack.enter_context(ray_runtime(self.config.ray))
            self.ray_up = True

    def serving_config(self) -> PipelineConfig:
        """The config with ``serve.bundle`` set to this run's bundle."""
        bundle = self.manifest.outputs("export").get("bundle", "")
        return dataclasses.replace(self.config, serve=dataclasses.replace(self.config.serve, bundle=bundle))

    def ensure_serving(self) -> dict[str, Any]:
        """Deploy the app on the bundle of this run; the serve stage's outputs."""
        from pipelines.serve import start

        self.ensure_ray()
        config = self.serving_config()
        started = time.perf_counter()
        self.url = start(config)
        self.stack.callback(self.stop_serving)
        cfg = config.serve
        return {
            "url": self.url,
            "ready_s": round(time.perf_counter() - started, 2),
            "bundle": cfg.bundle,
            "model_version": self.manifest.outputs("export").get("model_version", ""),
            "num_replicas": cfg.num_replicas,
            "routing": cfg.routing,
            "batching": cfg.batching,
            "policy": cfg.scheduler.policy,
            "cache": cfg.cache,
            "w8a16": cfg.w8a16,
            "slo_classes": dict(cfg.slo_classes),
        }

    def stop_serving(self) -> None:
        from ray import serve

        if self.url:
            serve.shutdown()  # in-flight requests drain first
            self.url = ""
            logger.info("Serve shut down")

    # ---- stages ------------------------------------------------------------------------------
    def ingest(self) -> dict[str, Any]:
        from pipelines.ingest import run_ingest

        result = run_ingest(self.config)
        return {
            "versions": {c.name: c.version for c in result.commits},
            "rows": {c.name: c.rows for c in result.commits},
            "ingest_run_id": result.run_id,
            "source": self.config.ingest.source,
            "lake": lake.lake_root(self.config.lake.root),
        }

    def features(self) -> dict[str, Any]:
        from components.sequence_join import load_groups
        from pipelines.features import run_features

        summary = run_features(self.config)
        root, options = lake.lake_root(self.config.lake.root), self.config.lake.storage_options
        written = table_report(root, options, ("sequences", "samples"))
        versions, rows = {t: v for t, v, _ in written}, {t: n for t, _, n in written}
        sample = load_groups(root, "train", self.config.features.max_seq_len, storage_options=options)
        self.printed.append(
            "one sample group:\n"
            + describe_group(sample.take_batch(1, batch_format="pyarrow"), self.config.features.max_seq_len)
        )
        return {"versions": versions, "rows": rows, "summary": summary}

    def train(self) -> dict[str, Any]:
        from pipelines.train import run_train

        summary = run_train(self.train_config())
        path = self.write_json("train.json", dataclasses.asdict(summary))
        self.printed.append(summary.report())
        return {
            "checkpoint": summary.checkpoint,
            "run_dir": summary.run_dir,
            "run_name": summary.run_name,
            "steps": summary.steps,
            "wandb": summary.wandb,
            "summary": path,
        }

    def train_config(self) -> PipelineConfig:
        """The config to train with. ``train.resume=auto`` continues the run folder's latest
        checkpoint (a run this command started before and did not finish); one trained with
        other settings or data is left alone and a fresh run (a timestamped name) starts."""
        config, t = self.config, self.config.train
        if t.resume != "auto":
            return config
        latest = latest_checkpoint(run_dir(t.storage_path, config.run_name), config.lake.storage_options)
        if latest is None:
            return config
        samples_version = self.manifest.outputs("features")["versions"]["samples"]
        why = unfinished_run_of(latest[1], config, samples_version)
        if not why:
            return config
        logger.info("checkpoint %s was %s: training a fresh run beside it", latest[0], why)
        return dataclasses.replace(config, train=dataclasses.replace(t, resume="never"))

    def evaluate(self) -> dict[str, Any]:
        from components.floors import floor_metrics
        from pipelines.evaluate import run_evaluate

        checkpoint = self.manifest.outputs("train")["checkpoint"]
        config = self.config
        report, written = run_evaluate(
            dataclasses.replace(config, eval=dataclasses.replace(config.eval, checkpoint=checkpoint))
        )
        split = report.split
        metrics = self.write_json(f"metrics_{split}.json", dataclasses.asdict(report) | {"written_to": written})
        floors = floor_metrics(lake.lake_root(config.lake.root), split, config.lake.storage_options)
        floors_path = self.write_json(f"floors_{split}.json", floors)
        m = report.metrics
        self.printed.append(
            f"{report.variant} on {split} ({report.num_groups} groups): "
            + ", ".join(f"{k} {m[k]:.4f}" for k in ("like_auc", "like_uauc", "engage_auc", "like_auc_engaged"))
            + f"\n  metrics: {written}"
        )
        return {"metrics": metrics, "floors": floors_path, "split": split, "wandb": report.wandb, "written_to": written}

    def export(self) -> dict[str, Any]:
        from pipelines.export import run_export

        checkpoint = self.manifest.outputs("train")["checkpoint"]
        config = self.config
        bundle_dir, manifest = run_export(
            dataclasses.replace(config, export=dataclasses.replace(config.export, checkpoint=checkpoint))
        )
        path = self.write_json("bundle.json", dataclasses.asdict(manifest))
        self.printed.append(f"serving bundle {bundle_dir} (model_version {manifest.model_version})")
        return {"bundle": bundle_dir, "model_version": manifest.model_version, "summary": path}

    def serve(self) -> dict[str, Any]:
        return self.ensure_serving()

    def loadtest(self) -> dict[str, Any]:
        from pipelines.loadtest import run_loadtest

        if not self.url:  # --from loadtest / a loadtest that could not be reused
            self.manifest.record(self.timed("serve", self.ensure_serving))
        cfg = self.config.run
        config = self.serving_config()
        config = dataclasses.replace(
            config, loadtest=dataclasses.replace(config.loadtest, duration_s=cfg.loadtest_duration_s)
        )
        out = self.folder / "loadtest"
        summary = run_loadtest(config, self.url, out, list(cfg.loadtest_rates))
        valid = all(r["valid"] for r in summary["runs"].values())
        return {"summary": str(out / "summary.json"), "rates": list(cfg.loadtest_rates), "valid": valid}

    def report(self) -> dict[str, Any]:
        from pipelines.report import write_report

        return {"report": str(write_report(self.manifest, self.folder))}

    # ---- bookkeeping ---------------------------------------------------------------------------
    def write_json(self, name: str, data: Any) -> str:
        path = str(self.folder / name)
        write_text(path, json.dumps(data, indent=1, sort_keys=True, default=float))
        return path

    def timed(self, name: str, body: Callable[[], dict[str, Any]]) -> StageRecord:
        inputs = stage_inputs(name, self.config, self.manifest)
        record = StageRecord(name, "ran", run_manifest.stage_key(inputs), inputs)
        started = time.perf_counter()
        try:
            record.outputs = body()
        except BaseException as exc:
            record.status, record.error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            record.seconds = round(time.perf_counter() - started, 2)
            if record.status == "failed":
                self.manifest.record(record)
        return record


def describe_group(row: pa.Table, max_seq_len: int) -> str:
    """A short human-readable view of one resolved group row and its collated tensors."""
    rec = row.to_pylist()[0]
    batch = collate_groups(row, CollateConfig(max_seq_len=max_seq_len))
    seq = rec["seq_item_idx"]
    lines = [
        f"group {rec['group_id']} user {rec['user_id']} split {rec['split']} request_ts {rec['request_ts']}",
        f"  sequence: {len(seq)} events before the request (seq_end={rec['seq_end']}); "
        f"last 5 items {seq[-5:]}, actions {rec['seq_action'][-5:]}",
        f"  candidates ({len(rec['cand_item_idx'])}): {rec['cand_item_idx'][:8]} ...",
        f"  engage labels: {rec['label_engage'][:8]} ...   like labels: {rec['label_like'][:8]} ...",
        f"  tensors: seq_item {tuple(batch.seq_item.shape)}, cand_item {tuple(batch.cand_item.shape)}, "
        f"labels {tuple(batch.labels.shape)}",
    ]
    return "\n".join(lines)


def table_report(
    root: str, storage_options: Mapping[str, str] | None = None, names: tuple[str, ...] = TABLES
) -> list[tuple[str, int | None, int]]:
    """(name, Delta version, rows) of each table in ``names`` (rows 0 where it does not exist)."""
    out = []
    for name in names:
        uri = lake.table_uri(root, name)
        version = lake.table_version(uri, storage_options)
        rows = lake_stats.row_count(uri, version, storage_options) if version is not None else 0
        out.append((name, version, rows))
    return out


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def run(config: PipelineConfig, args: argparse.Namespace, argv: list[str]) -> int:
    """Run the planned stages; returns the process exit code (see module docstring)."""
    modes = plan(args.stages, args.start, args.only)
    keep_serving = args.keep_serving or args.only == "serve"
    if keep_serving and modes["export"] == "skip":
        raise ConfigError(f"--keep-serving needs a bundle: --stages {args.stages} stops before export")
    pipeline = Pipeline(config, args.config, argv, keep_serving)
    manifest, folder = pipeline.manifest, pipeline.folder
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    try:
        with pipeline.stack:
            for name in STAGES:
                _run_stage(pipeline, name, modes[name])
            manifest.status, manifest.finished = "succeeded", time.time()
            manifest.save(folder)
            _print_summary(pipeline, time.perf_counter() - started)
            if keep_serving:
                _serve_until_stopped(pipeline)
    except KeyboardInterrupt:
        if manifest.status == "succeeded":  # Ctrl-C or SIGTERM while --keep-serving: a clean stop
            print("stopped serving", flush=True)
            return 0
        _failed(pipeline, "interrupted")
        print(f"run: interrupted; manifest {folder / run_manifest.MANIFEST}", flush=True)
        return 130
    except BaseException as exc:
        _failed(pipeline, f"{type(exc).__name__}: {exc}")
        logger.error("run %s failed; what each stage did is in %s", manifest.run_id, folder / run_manifest.MANIFEST)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _run_stage(pipeline: Pipeline, name: str, mode: str) -> None:
    manifest, config = pipeline.manifest, pipeline.config
    if mode == "skip":
        return
    position = f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}"
    if mode in ("reuse_or_run", "reuse") and name != "report":
        inputs = stage_inputs(name, config, manifest)
        key = run_manifest.stage_key(inputs)
        found = run_manifest.find_reusable(
            pipeline.reports_dir, name, key, still_there(name, config), exclude=manifest.run_id
        )
        if found is not None:
            from_run, earlier = found
            manifest.record(StageRecord(name, "reused", key, inputs, earlier.outputs, 0.0, from_run))
            manifest.save(pipeline.folder)
            logger.info("%s: reused from run %s (inputs unchanged)", position, from_run)
            return
        if name == "serve":
            return  # deployed by loadtest if that has to run
        if mode == "reuse":
            raise RunError(
                f"--only needs the outputs of {name} for these inputs and no run under "
                f"{pipeline.reports_dir} has them; run the stages before it first (or use --from {name})"
            )
        logger.info("%s: no earlier run with these inputs, running it", position)
    logger.info("%s: running", position)
    if name in NEEDS_RAY:
        pipeline.ensure_ray()
    record = pipeline.timed(name, getattr(pipeline, name))
    manifest.record(record)
    manifest.save(pipeline.folder)
    logger.info("%s: done in %.1f s", position, record.seconds)
    if name == "loadtest" and not pipeline.keep_serving:
        pipeline.stop_serving()


def _print_summary(pipeline: Pipeline, seconds: float) -> None:
    manifest, config = pipeline.manifest, pipeline.config
    root, options = lake.lake_root(config.lake.root), config.lake.storage_options
    if "ingest" in manifest.stages:
        print(f"\n{'table':<10} {'version':>7} {'rows':>10}")
        for name, version, rows in table_report(root, options):
            print(f"{name:<10} {'-' if version is None else version:>7} {rows:>10}")
    summary = manifest.outputs("features").get("summary")
    if summary:
        splits = {s: summary.get(f"groups_{s}", 0) for s in ("train", "valid", "test")}
        print(f"\ngroups by split: {splits}")
    for text in pipeline.printed:
        print("\n" + text)
    print(f"\nrun {manifest.run_id} ({config.run.reports_dir}):")
    for name, record in manifest.stages.items():
        detail = f"reused from {record.from_run}" if record.status == "reused" else f"{record.seconds:.1f} s"
        print(f"  {name:<9} {record.status:<7} {detail}")
    report = manifest.outputs("report").get("report")
    if report:
        print(f"\nreport: {report}")
    elif manifest.outputs("export"):
        print(f"\n  serve it: python -m pipelines.serve --config {manifest.preset}")
    print(f"done in {seconds:.1f} s; lake at {root}", flush=True)


def _serve_until_stopped(pipeline: Pipeline) -> None:
    from pipelines.serve import example_request

    if not pipeline.url:
        pipeline.manifest.record(pipeline.timed("serve", pipeline.ensure_serving))
        pipeline.manifest.save(pipeline.folder)
    bundle = pipeline.manifest.outputs("export")["bundle"]
    example = example_request(pipeline.serving_config())
    print(f"\nserving {bundle} at {pipeline.url}")
    print(f"  curl -s {pipeline.url}/rank -H 'content-type: application/json' -d '{json.dumps(example)}'")
    print("Ctrl-C (or SIGTERM) stops it.", flush=True)
    threading.Event().wait()  # until KeyboardInterrupt (SIGINT, or SIGTERM via _interrupt)


def _failed(pipeline: Pipeline, error: str) -> None:
    manifest = pipeline.manifest
    manifest.status, manifest.finished = "failed", time.time()
    manifest.error = error
    with contextlib.suppress(OSError):
        manifest.save(pipeline.folder)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the run like Ctrl-C: Serve and Ray shut down cleanly


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", choices=STAGES, default=STAGES[-1], metavar="LAST", help="stop after this stage")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--from", dest="start", choices=STAGES, metavar="STAGE", help="run this stage and all after it again"
    )
    group.add_argument("--only", choices=STAGES, metavar="STAGE", help="run just this stage on earlier runs' outputs")
    parser.add_argument(
        "--keep-serving", action="store_true", help="keep the service up after the report (Ctrl-C stops)"
    )


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    return pipeline_main(
        "pipelines.run",
        __doc__.splitlines()[0],
        argv,
        lambda config, args: run(config, args, argv),
        default_preset="demo",
        failures=(*FAILURES, RunError),
        add_arguments=_add_arguments,
    )


if __name__ == "__main__":
    raise SystemExit(main())
