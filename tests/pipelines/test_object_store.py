"""``lake.storage_options`` reach every stage: the main job on a real S3-compatible server, with
the lake, the training checkpoints (``train.storage_path``) and the serving bundle
(``export.output``) all in one bucket and nothing written to local disk.

moto's S3 server runs in a child process on 127.0.0.1 at a port chosen by the OS, and its
endpoint exists ONLY in ``lake.storage_options``: neither this process nor the Ray workers
carry any AWS setting. A stage (driver, Ray task, Ray Data UDF, Ray Train worker) that drops
the options falls back to AWS' public endpoint without credentials and fails, and so does the test.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from components import lake
from tests.small_runs import TINY_MODEL

BUCKET = "lake-bucket"
ROOT = f"s3://{BUCKET}/lake"
CHECKPOINTS = f"s3://{BUCKET}/checkpoints"
BUNDLE = f"s3://{BUCKET}/bundles/full"
# Every variable that could point deltalake (object_store) at an endpoint or give it credentials.
AWS_ENV = re.compile(r"^AWS_(?!CA_BUNDLE$)")
# The server prints its port and serves until it is terminated. A child process, not a thread:
# deltalake's file-system handler holds the GIL while it waits for a response, so an
# in-process server thread could never answer it.
SERVER = """
import threading
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
threading.Event().wait()
"""


@pytest.fixture(scope="module")
def s3_options() -> Iterator[dict[str, str]]:
    """deltalake storage options of a fresh moto S3 server holding one empty bucket."""

    env = {k: v for k, v in os.environ.items() if not AWS_ENV.match(k)}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        port = server.stdout.readline().strip()
        assert port.isdigit(), "moto's S3 server did not start (its stderr is above)"
        endpoint = f"http://127.0.0.1:{port}"
        options = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
            "AWS_S3_ALLOW_UNSAFE_RENAME": "true",  # one writer at a time here; no lock service
        }
        _client(options).create_bucket(Bucket=BUCKET)
        yield options
    finally:
        server.terminate()  # the server keeps nothing worth a clean shutdown
        server.wait(timeout=10)
        server.stdout.close()


def _client(options: dict[str, str]):
    """boto3 on the server, to look at the bucket from outside the code under test."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=options["AWS_ENDPOINT_URL"],
        aws_access_key_id=options["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=options["AWS_SECRET_ACCESS_KEY"],
        region_name=options["AWS_REGION"],
    )


def _keys(options: dict[str, str], prefix: str) -> list[str]:
    """Every object key under ``prefix`` in the bucket (relative to it)."""
    pages = _client(options).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"][len(prefix) :] for page in pages for item in page.get("Contents", []))


def _aws_env_of_this_process() -> list[str]:
    return sorted(k for k in os.environ if AWS_ENV.match(k))


def _table_version_without_options(uri: str) -> str:
    """What a stage that drops the options gets: the error's type, or the version it found."""
    try:
        return f"version {lake.table_version(uri)}"
    except lake.LakeError:
        return "LakeError"


@dataclass(frozen=True)
class StoreRun:
    """The main job run once with lake, checkpoints and bundle on the server."""

    code: int
    out: str
    err: str
    overrides: list[str]  # the lake's settings (store options included)
    cwd_after: list[str]  # what the job left in the folder it ran in
    reports: str  # run.reports_dir: each run's manifest and summaries, local by design
    rerun_code: int  # the same command again: every stage reused from the store
    rerun_err: str


@pytest.fixture(scope="module")
def store_run(ray_session, s3_options, tmp_path_factory) -> StoreRun:
    from pipelines.run import main

    overrides = [
        f"--lake.root={ROOT}",
        "--lake.num_buckets=2",
        "--ingest.source=synthetic",
        "--ingest.synthetic.num_events=400",
        "--ingest.synthetic.num_users=20",
        "--ingest.synthetic.num_items=60",
        "--ingest.synthetic.max_history=200",
        "--features.max_seq_len=20",
        "--ray.enable_progress_bars=false",
        *(f'--lake.storage_options.{key}="{value}"' for key, value in s3_options.items()),
    ]
    # Train (in-process: the loop uploads its checkpoints itself), evaluate (Ray Data actors
    # download the checkpoint) and export (uploads the bundle) all go to the store. Ray Train's
    # own upload (real workers) is test_ray_train_workers_report_checkpoints_to_the_store.
    training = [
        *TINY_MODEL,
        "--train.num_workers=0",
        "--train.max_steps=2",
        "--train.batch_size=2",
        "--train.max_seq_len=16",
        f"--train.storage_path={CHECKPOINTS}",
        f"--export.output={BUNDLE}",
    ]
    cwd = tmp_path_factory.mktemp("store-run-cwd")  # a stage that wrote locally would show here
    reports = str(tmp_path_factory.mktemp("store-run-reports"))
    argv = ["--config", "demo", *overrides, *training, f"--run.reports_dir={reports}", "--stages=export"]
    outputs = [(io.StringIO(), io.StringIO()) for _ in range(2)]
    with pytest.MonkeyPatch.context() as patch:
        for key in _aws_env_of_this_process():
            patch.delenv(key)
        patch.chdir(cwd)
        codes = []
        for out, err in outputs:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                codes.append(main(argv))
    (out, err), (_, rerun_err) = outputs
    return StoreRun(
        codes[0],
        out.getvalue(),
        err.getvalue(),
        overrides,
        sorted(os.listdir(cwd)),
        reports,
        codes[1],
        rerun_err.getvalue(),
    )


def test_storage_options_reach_every_stage(ray_session, s3_options, store_run):
    from components.config_loader import load_config
    from components.floors import floor_metrics
    from pipelines.bench_data import compare_lakes
    from pipelines.config import PipelineConfig
    from pipelines.features_reference import run_reference

    assert ray_session.get(ray_session.remote(_aws_env_of_this_process).remote()) == [], (
        "Ray workers must not carry AWS settings"
    )
    assert store_run.code == 0, store_run.err[-3000:]
    # ingest wrote, features read and wrote, load_groups resolved a group, the report read all five.
    assert re.search(r"^events +0 +400$", store_run.out, re.M)
    assert re.search(r"^samples +0 +[1-9]\d*$", store_run.out, re.M)
    assert "one sample group:" in store_run.out
    assert "full on test (" in store_run.out
    assert store_run.cwd_after == []  # nothing local: no lake, checkpoints, bundle or metrics folder

    samples_uri = lake.table_uri(ROOT, "samples")
    assert lake.commit_metadata(samples_uri, storage_options=s3_options)["max_seq_len"] == "20"
    # The files the Ray job's workers wrote to the store hold exactly what the oracle computes.
    run_reference(load_config(PipelineConfig, "demo", store_run.overrides), f"s3://{BUCKET}/reference")
    assert compare_lakes(ROOT, f"s3://{BUCKET}/reference", s3_options) == []
    # The floors read samples, events and items of the store through the options as well.
    floors = floor_metrics(ROOT, "test", s3_options)
    assert floors["item_mean_rating"]["num_candidates"] == floors["user_mean"]["num_candidates"] > 0
    # The premise: without the options the lake cannot be reached, from the driver or a worker.
    assert _table_version_without_options(samples_uri) == "LakeError"
    without_options = ray_session.remote(_table_version_without_options)
    assert ray_session.get(without_options.remote(samples_uri)) == "LakeError"


def test_a_second_run_reuses_every_stage_by_reading_the_store(store_run):
    from pipelines.run import STAGES
    from pipelines.run_manifest import earlier_runs

    assert (store_run.code, store_run.rerun_code) == (0, 0), store_run.rerun_err[-3000:]
    first, second = sorted(earlier_runs(store_run.reports), key=lambda m: m.started)
    assert {name: record.status for name, record in second.stages.items()} == dict.fromkeys(STAGES[:5], "reused")
    assert second.stages["export"].outputs["bundle"] == BUNDLE
    assert {record.from_run for record in second.stages.values()} == {first.run_id}


def test_checkpoints_and_metrics_are_objects_in_the_bucket(s3_options, store_run):
    from components.checkpoint import META_FILE, latest_checkpoint

    assert store_run.code == 0, store_run.err[-3000:]
    keys = _keys(s3_options, "checkpoints/full/")
    assert {f"checkpoint_000000002/{name}" for name in (META_FILE, ".metadata", "__0_0.distcp")} <= set(keys)
    assert "metrics_test.json" in keys  # evaluate wrote it beside the run
    assert not any(".partial" in key or key.endswith(".tmp") for key in keys)
    assert f"checkpoint: {CHECKPOINTS}/full/checkpoint_000000002" in store_run.out
    path, meta = latest_checkpoint(f"{CHECKPOINTS}/full", s3_options)
    assert (path, meta.step) == (f"{CHECKPOINTS}/full/checkpoint_000000002", 2)
    # A copy without its meta.json (an upload cut short before the last file) is no checkpoint.
    s3 = _client(s3_options)
    for key in keys:
        if key.startswith("checkpoint_000000002/") and not key.endswith(META_FILE):
            source = {"Bucket": BUCKET, "Key": f"checkpoints/full/{key}"}
            s3.copy_object(Bucket=BUCKET, Key=f"checkpoints/cut/{key}", CopySource=source)
    assert latest_checkpoint(f"{CHECKPOINTS}/cut", s3_options) is None


def test_bundle_on_the_store_loads_through_a_local_cache(s3_options, store_run, tmp_path):
    import json

    from components.bundle import MANIFEST, load_bundle

    assert store_run.code == 0, store_run.err[-3000:]
    manifest = json.loads(_client(s3_options).get_object(Bucket=BUCKET, Key=f"bundles/full/{MANIFEST}")["Body"].read())
    assert _keys(s3_options, "bundles/full/") == sorted([MANIFEST, *manifest["files"]])
    assert f"serving bundle {BUNDLE} (model_version {manifest['model_version']})" in store_run.out
    assert manifest["checkpoint"]["path"] == f"{CHECKPOINTS}/full/checkpoint_000000002"

    cache = tmp_path / "cache"
    loaded = load_bundle(BUNDLE, storage_options=s3_options, cache_dir=str(cache))
    assert loaded.model_version == manifest["model_version"] and loaded.path == BUNDLE
    copy = cache / manifest["model_version"]
    assert sorted(os.listdir(cache)) == [manifest["model_version"]]  # no temporary folder left
    assert sorted(os.listdir(copy)) == sorted([MANIFEST, *manifest["files"]])
    # A damaged cached file is noticed (sha256) and fetched again, not served.
    (copy / "items.parquet").write_bytes(b"not parquet")
    again = load_bundle(BUNDLE, storage_options=s3_options, cache_dir=str(cache))
    assert again.items.num_rows == loaded.items.num_rows
    assert again.model_version == manifest["model_version"]


def test_a_damaged_bundle_on_the_store_is_refused_and_not_cached(s3_options, store_run, tmp_path):
    from components.bundle import MANIFEST, BundleError, load_bundle

    assert store_run.code == 0, store_run.err[-3000:]
    s3, damaged = _client(s3_options), "bundles/damaged/"
    for key in _keys(s3_options, "bundles/full/"):
        s3.copy_object(Bucket=BUCKET, Key=damaged + key, CopySource={"Bucket": BUCKET, "Key": f"bundles/full/{key}"})
    s3.put_object(Bucket=BUCKET, Key=damaged + "users.parquet", Body=b"truncated")
    cache = tmp_path / "cache"
    with pytest.raises(BundleError, match=r"bundle file s3://lake-bucket/bundles/damaged/users\.parquet has 9 bytes"):
        load_bundle(f"s3://{BUCKET}/{damaged}", storage_options=s3_options, cache_dir=str(cache))
    assert os.listdir(cache) == []  # nothing half-checked left behind
    s3.delete_object(Bucket=BUCKET, Key=damaged + MANIFEST)
    with pytest.raises(BundleError, match=f"has no {MANIFEST}"):
        load_bundle(f"s3://{BUCKET}/{damaged}", storage_options=s3_options, cache_dir=str(cache))


def test_ray_train_workers_report_checkpoints_to_the_store(s3_options, store_run, tmp_path, monkeypatch):
    """The real TorchTrainer path: the worker reports a local checkpoint and Ray uploads it
    through the pyarrow filesystem built from the options (RunConfig storage_filesystem); the
    worker's own environment holds no endpoint or keys."""
    from components.checkpoint import read_meta
    from components.config_loader import load_config
    from pipelines.config import PipelineConfig
    from pipelines.train import run_train

    assert store_run.code == 0, store_run.err[-3000:]
    monkeypatch.chdir(tmp_path)
    training = ["--train.num_workers=1", "--train.max_steps=2", "--train.batch_size=2", "--train.max_seq_len=16"]
    quick = ["--train.shuffle=local", "--train.valid_every_epoch=false", "--model.variant=tokenmixer_large"]
    storage = [f"--train.storage_path={CHECKPOINTS}", "--train.run_name=workers"]
    summary = run_train(
        load_config(PipelineConfig, "demo", [*store_run.overrides, *TINY_MODEL, *training, *quick, *storage])
    )
    assert summary.checkpoint == f"{CHECKPOINTS}/workers/checkpoint_000000002"
    assert (read_meta(summary.checkpoint, s3_options).step, summary.steps) == (2, 2)
    assert {"meta.json", ".metadata", "__0_0.distcp"} <= set(
        _keys(s3_options, "checkpoints/workers/checkpoint_000000002/")
    )
    assert list(tmp_path.iterdir()) == []


def test_store_mistakes_are_named_and_leave_nothing_behind(s3_options, store_run, capsys, tmp_path, monkeypatch):
    from pipelines import evaluate, export, train

    assert store_run.code == 0, store_run.err[-3000:]
    monkeypatch.chdir(tmp_path)
    training = ["--train.max_steps=1", "--train.num_workers=0", "--train.max_seq_len=16"]
    args = ["--config", "demo", *store_run.overrides, *TINY_MODEL, *training]

    def fails(main, *extra: str) -> tuple[int, str]:
        code = main([*args, *extra])
        return code, capsys.readouterr().err

    # A bucket that does not exist: refused before any work, naming it.
    code, err = fails(train.main, "--train.storage_path=s3://no-such-bucket/checkpoints")
    assert code == 2 and "bucket 'no-such-bucket' of s3://no-such-bucket/checkpoints does not exist" in err
    code, err = fails(export.main, f"--train.storage_path={CHECKPOINTS}", "--export.output=s3://no-such-bucket/b")
    assert code == 2 and "bucket 'no-such-bucket' of s3://no-such-bucket/b does not exist" in err
    # No checkpoint under the URI, and a bundle over something that is not one.
    code, err = fails(evaluate.main, f"--train.storage_path=s3://{BUCKET}/empty")
    assert code == 1 and f"no checkpoint under s3://{BUCKET}/empty/full" in err
    before = _keys(s3_options, "lake/")
    code, err = fails(export.main, f"--train.storage_path={CHECKPOINTS}", f"--export.output={ROOT}")
    assert code == 1 and f"{ROOT} holds ['events', 'items', 'samples', 'sequences', 'users']" in err
    assert _keys(s3_options, "lake/") == before
    # Options that contradict themselves (a key without its secret).
    keyless = [a for a in args if "AWS_SECRET_ACCESS_KEY" not in a]
    code = train.main([*keyless, f"--train.storage_path={CHECKPOINTS}"])
    assert code == 2 and "gives AWS_ACCESS_KEY_ID without AWS_SECRET_ACCESS_KEY" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_ranker_replica_loads_the_bundle_uri_and_the_lake_with_the_options(s3_options, store_run, tmp_path):
    """What Serve starts (serving/ranker.py), built directly: its only store settings are the
    options it is given, as for a replica on a node without AWS settings."""
    from components.config_loader import load_config, to_dict
    from pipelines.config import PipelineConfig
    from pipelines.serve import bundle_of
    from serving.app import resolve
    from serving.config import ServeConfig
    from serving.ranker import RankerReplica

    assert store_run.code == 0, store_run.err[-3000:]
    assert bundle_of(load_config(PipelineConfig, "demo", [f"--serve.bundle={BUNDLE}"])) == BUNDLE
    store = {f"lake.storage_options.{key}": f'"{value}"' for key, value in s3_options.items()}
    _, bundle, root, options = resolve({"config": "demo", "lake.root": ROOT, "export.output": BUNDLE, **store})
    assert (bundle, root, options) == (BUNDLE, ROOT, s3_options)  # a URI is never made a local path
    serve = ServeConfig(bundle_cache=str(tmp_path / "cache"))
    replica = RankerReplica(bundle, root, options, to_dict(serve))
    manifest_version = replica.core.bundle.manifest.model_version
    assert os.listdir(tmp_path / "cache") == [manifest_version]
    assert replica.core.bundle.path == BUNDLE
