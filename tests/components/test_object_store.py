"""lake.storage_options -> pyarrow filesystems: the translation of deltalake's keys, literal
expected arguments for hand-made option sets, and the errors that name what is wrong.

The round trips through a real S3 server are in tests/pipelines/test_object_store.py.
"""

from __future__ import annotations

import os
import pickle
import socket

import pyarrow.fs as pafs
import pytest

from components import object_store
from components.object_store import ObjectStoreError

# What tests/pipelines/test_object_store.py gives deltalake for moto's server.
MOTO = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "AWS_ACCESS_KEY_ID": "test-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret",
    "AWS_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
    "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
}


def test_deltalake_s3_options_become_s3filesystem_arguments():
    assert object_store.s3_arguments(MOTO) == {
        "endpoint_override": "127.0.0.1:9000",
        "scheme": "http",
        "access_key": "test-key",
        "secret_key": "test-secret",
        "region": "us-east-1",
    }


def test_object_store_aliases_and_lower_case_keys_are_understood():
    options = {
        "aws_endpoint": "https://minio.example:443/",
        "access_key_id": "k",
        "aws_secret_access_key": "s",
        "AWS_SESSION_TOKEN": "t",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "true",
    }
    assert object_store.s3_arguments(options) == {
        "endpoint_override": "minio.example:443",
        "scheme": "https",
        "access_key": "k",
        "secret_key": "s",
        "session_token": "t",
        "region": "eu-west-1",
        "force_virtual_addressing": True,
    }


def test_an_endpoint_without_scheme_takes_http_from_allow_http():
    assert object_store.s3_arguments({"AWS_ENDPOINT_URL": "127.0.0.1:9000", "AWS_ALLOW_HTTP": "TRUE"}) == {
        "endpoint_override": "127.0.0.1:9000",
        "scheme": "http",
    }
    assert object_store.s3_arguments({"AWS_ENDPOINT_URL": "s3.local"})["scheme"] == "https"


def test_no_options_mean_pyarrow_defaults_and_unrelated_keys_are_ignored():
    assert object_store.s3_arguments(None) == {}
    assert object_store.s3_arguments({"AWS_S3_LOCKING_PROVIDER": "dynamodb", "timeout": "30s"}) == {}
    assert object_store.s3_arguments({"AWS_SKIP_SIGNATURE": "true"}) == {"anonymous": True}


def test_contradicting_options_are_refused_naming_the_keys():
    with pytest.raises(ObjectStoreError, match="AWS_ACCESS_KEY_ID without AWS_SECRET_ACCESS_KEY"):
        object_store.s3_arguments({"AWS_ACCESS_KEY_ID": "k"})
    with pytest.raises(ObjectStoreError, match="AWS_SECRET_ACCESS_KEY without AWS_ACCESS_KEY_ID"):
        object_store.s3_arguments({"AWS_SECRET_ACCESS_KEY": "s"})
    with pytest.raises(ObjectStoreError, match="http:// but AWS_ALLOW_HTTP is not true"):
        object_store.s3_arguments({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"})


def test_s3_uri_gives_an_s3filesystem_with_the_options_and_the_path_without_scheme():
    fs, path = object_store.filesystem("s3://bucket/checkpoints/run/", MOTO)
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/checkpoints/run"
    assert fs.region == "us-east-1"
    # The options survive pickling: Ray ships this filesystem to its workers, whose own
    # environment holds no endpoint or keys.
    assert pickle.loads(pickle.dumps(fs)) == fs
    literal = {"access_key": "test-key", "secret_key": "test-secret", "region": "us-east-1"}
    assert fs == pafs.S3FileSystem(endpoint_override="127.0.0.1:9000", scheme="http", **literal)
    assert fs != pafs.S3FileSystem(endpoint_override="127.0.0.1:9000", scheme="https", **literal)
    assert object_store.filesystem("s3a://bucket/x", MOTO)[1] == "bucket/x"


def test_gcs_options_that_pyarrow_can_take_reach_gcsfilesystem(caplog):
    options = {"GOOGLE_BASE_URL": "http://127.0.0.1:4443", "google_skip_signature": "true"}
    assert object_store.gcs_arguments(options) == {
        "endpoint_override": "127.0.0.1:4443",
        "scheme": "http",
        "anonymous": True,
    }
    fs, path = object_store.filesystem("gs://bucket/bundles/full", options)
    assert isinstance(fs, pafs.GcsFileSystem) and path == "bucket/bundles/full"
    # A service-account key in the options cannot reach pyarrow's GCS client: said, not hidden.
    assert object_store.gcs_arguments({"GOOGLE_SERVICE_ACCOUNT_KEY": "{...}"}) == {}
    assert "GOOGLE_SERVICE_ACCOUNT_KEY" in caplog.text and "Application Default Credentials" in caplog.text


def test_local_paths_and_file_uris_are_absolute_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = object_store.filesystem("checkpoints")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "checkpoints")
    assert object_store.filesystem(f"file://{tmp_path}/x", MOTO)[1] == f"{tmp_path}/x"
    assert object_store.absolute("bundles/full") == str(tmp_path / "bundles" / "full")
    assert object_store.absolute("s3://bucket/bundles/full") == "s3://bucket/bundles/full"  # never abspath'ed
    assert object_store.absolute("~/x") == os.path.expanduser("~/x")
    assert [object_store.is_remote(p) for p in ("s3://b/x", "gs://b/x", "file:///x", "/x", "x")] == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert object_store.join("s3://b/run/", "checkpoint_1") == "s3://b/run/checkpoint_1"


def test_ray_storage_is_a_stripped_path_and_a_filesystem_for_a_store_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert object_store.ray_storage("checkpoints", MOTO) == (str(tmp_path / "checkpoints"), None)
    path, fs = object_store.ray_storage("s3://bucket/checkpoints", MOTO)
    assert path == "bucket/checkpoints" and isinstance(fs, pafs.S3FileSystem)


def test_a_uri_without_bucket_or_of_an_unknown_scheme_is_refused():
    with pytest.raises(ObjectStoreError, match="names no bucket"):
        object_store.filesystem("s3:///", MOTO)
    with pytest.raises(ObjectStoreError, match=r"^nosuch://bucket/x: checkpoints and bundles go to s3:// or gs://"):
        object_store.filesystem("nosuch://bucket/x", MOTO)


def test_upload_order_puts_the_named_files_last_in_their_order():
    names = ["meta.json", "__0_0.distcp", ".metadata", "a/b.bin", "__1_0.distcp"]
    assert object_store.upload_order(names, last=(".metadata", "meta.json", "absent.json")) == [
        "__0_0.distcp",
        "__1_0.distcp",
        "a/b.bin",
        ".metadata",
        "meta.json",
    ]


def test_an_unreachable_endpoint_is_named_with_the_location():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {**MOTO, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with pytest.raises(ObjectStoreError, match=rf"cannot reach s3://bucket/ckpt \(endpoint http://127.0.0.1:{port}, "):
        object_store.check_bucket("s3://bucket/ckpt", options)
    object_store.check_bucket("relative/folder", options)  # local: nothing to check
