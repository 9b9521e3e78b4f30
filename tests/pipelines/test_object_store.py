"""``lake.storage_options`` reach every stage: the main job on a real S3-compatible server.

moto's S3 server runs in a child process on 127.0.0.1 at a port chosen by the OS, and its
endpoint exists ONLY in ``lake.storage_options``: neither this process nor the Ray workers
carry any AWS setting. A stage (driver, Ray task or Ray Data UDF) that drops the options
falls back to AWS' public endpoint without credentials and fails, and so does the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from components import lake
from tests.small_runs import TINY_MODEL

BUCKET = "lake-bucket"
ROOT = f"s3://{BUCKET}/lake"
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
    import boto3

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
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=options["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=options["AWS_SECRET_ACCESS_KEY"],
            region_name=options["AWS_REGION"],
        )
        s3.create_bucket(Bucket=BUCKET)
        yield options
    finally:
        server.terminate()  # the server keeps nothing worth a clean shutdown
        server.wait(timeout=10)
        server.stdout.close()


def _aws_env_of_this_process() -> list[str]:
    return sorted(k for k in os.environ if AWS_ENV.match(k))


def _table_version_without_options(uri: str) -> str:
    """What a stage that drops the options gets: the error's type, or the version it found."""
    try:
        return f"version {lake.table_version(uri)}"
    except lake.LakeError:
        return "LakeError"


def test_storage_options_reach_every_stage(ray_session, s3_options, tmp_path, monkeypatch, capsys):
    from components.config_loader import load_config
    from components.floors import floor_metrics
    from pipelines.bench_data import compare_lakes
    from pipelines.config import PipelineConfig
    from pipelines.features_reference import run_reference
    from pipelines.run import main

    for key in _aws_env_of_this_process():
        monkeypatch.delenv(key)
    aws_env_of_workers = ray_session.remote(_aws_env_of_this_process)
    assert ray_session.get(aws_env_of_workers.remote()) == [], "Ray workers must not carry AWS settings"
    monkeypatch.chdir(tmp_path)  # a stage that wrote a local "lake" folder instead would show here

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
    # Train, evaluate and export read the store's groups and vocabularies too (checkpoints and
    # the serving bundle stay on local disk: Ray Train's storage is not given the lake's options,
    # and a bundle is a local folder that replicas load).
    checkpoints = tmp_path.parent / f"{tmp_path.name}-checkpoints"
    training = [
        *TINY_MODEL,
        "--train.num_workers=0",
        "--train.max_steps=2",
        "--train.batch_size=2",
        "--train.max_seq_len=16",
        f"--train.storage_path={checkpoints}",
        f"--export.output={checkpoints / 'bundle'}",
    ]
    code = main(["--config", "demo", *overrides, *training])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    # ingest wrote, features read and wrote, load_groups resolved a group, the report read all five.
    assert re.search(r"^events +0 +400$", captured.out, re.M)
    assert re.search(r"^samples +0 +[1-9]\d*$", captured.out, re.M)
    assert "one sample group:" in captured.out
    assert "full on test (" in captured.out and (checkpoints / "full" / "metrics_test.json").is_file()
    assert (checkpoints / "bundle" / "bundle.json").is_file()  # items/users read from the store
    assert list(tmp_path.iterdir()) == []

    samples_uri = lake.table_uri(ROOT, "samples")
    assert lake.commit_metadata(samples_uri, storage_options=s3_options)["max_seq_len"] == "20"
    # The files the Ray job's workers wrote to the store hold exactly what the oracle computes.
    run_reference(load_config(PipelineConfig, "demo", overrides), f"s3://{BUCKET}/reference")
    assert compare_lakes(ROOT, f"s3://{BUCKET}/reference", s3_options) == []
    # The floors read samples, events and items of the store through the options as well.
    floors = floor_metrics(ROOT, "test", s3_options)
    assert floors["item_mean_rating"]["num_candidates"] == floors["user_mean"]["num_candidates"] > 0
    # The premise: without the options the lake cannot be reached, from the driver or a worker.
    assert _table_version_without_options(samples_uri) == "LakeError"
    without_options = ray_session.remote(_table_version_without_options)
    assert ray_session.get(without_options.remote(samples_uri)) == "LakeError"
