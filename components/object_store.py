"""Object storage for checkpoints and bundles: ``lake.storage_options`` -> a pyarrow filesystem.

The lake reaches its store through deltalake, which takes ``lake.storage_options`` (object_store
keys: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, ``AWS_ALLOW_HTTP``, ...).
Checkpoints (Ray Train, torch.distributed.checkpoint) and serving bundles go through
``pyarrow.fs`` instead, so this module translates the SAME options into a pyarrow filesystem:
one store, one set of settings, and nothing read from the environment of the process, since
Ray workers and Serve replicas carry no AWS settings of their own (the options travel to
them explicitly and every one builds its filesystem here).

    s3:// (s3a://)   pyarrow.fs.S3FileSystem: endpoint, http/https, keys, session token, region
    gs:// (gcs://)   pyarrow.fs.GcsFileSystem: base URL, anonymous; credentials from the node's
                     Application Default Credentials (pyarrow takes no service-account file)
    other schemes    pyarrow.fs.FileSystem.from_uri (its own defaults; the options do not apply)
    a local path     pyarrow.fs.LocalFileSystem, the path made absolute (``file://`` accepted)

A folder is published to a store file by file with the named ``last`` files at the end (a
checkpoint's ``meta.json``, a bundle's ``bundle.json``), so a reader that goes by those never
sees half of one. Store failures become :class:`ObjectStoreError` naming the location, the
endpoint and what is wrong (bucket absent, store unreachable, options that contradict).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pyarrow.fs as pafs

from components.config_loader import ConfigError

# Where object-store bundles are copied to be loaded (serve.bundle_cache); here, not beside the
# bundle code, so that a config naming it (serving/config.py) imports no torch.
DEFAULT_CACHE_DIR = "~/.cache/ultrarank/bundles"

logger = logging.getLogger(__name__)

S3_SCHEMES = ("s3", "s3a")
GCS_SCHEMES = ("gs", "gcs")
TRUE_VALUES = ("true", "1", "yes", "on")

# object_store's aliases (lower case, "aws_"/"google_" prefix dropped) -> pyarrow's argument.
S3_KEYS = {
    "access_key_id": "access_key",
    "secret_access_key": "secret_key",
    "session_token": "session_token",
    "token": "session_token",
    "region": "region",
    "default_region": "region",
    "endpoint_url": "endpoint",
    "endpoint": "endpoint",
    "allow_http": "allow_http",
    "virtual_hosted_style_request": "virtual_hosted",
    "skip_signature": "anonymous",
}
# GCS keys deltalake reads that pyarrow's GCS client cannot take (it uses the node's ADC).
GCS_CREDENTIAL_KEYS = ("service_account", "service_account_path", "service_account_key", "application_credentials")


class ObjectStoreError(ConfigError):
    """An object-store location cannot be used as configured (contradicting options, bucket
    absent, store unreachable); the message names the location, the endpoint and the cause."""


def is_remote(location: str) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``, ...); False for a local path or ``file://``."""
    return "://" in location and not location.startswith("file://")


def absolute(location: str) -> str:
    """A local path made absolute (Ray workers and Serve replicas run elsewhere); a URI unchanged."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def _scheme(location: str) -> str:
    return location.split("://", 1)[0].lower()


def _normalised(options: Mapping[str, str] | None, prefix: str) -> dict[str, str]:
    """Option keys as object_store matches them: case-insensitive, the provider prefix optional."""
    out = {}
    for key, value in (options or {}).items():
        name = key.lower()
        out[name[len(prefix) :] if name.startswith(prefix) else name] = str(value)
    return out


def _is_true(value: str | None) -> bool:
    return str(value or "").strip().lower() in TRUE_VALUES


def _split_endpoint(endpoint: str) -> tuple[str | None, str]:
    """``http://host:port`` -> ("http", "host:port"); a bare ``host:port`` has no scheme."""
    if "://" in endpoint:
        scheme, rest = endpoint.split("://", 1)
        return scheme.lower(), rest.rstrip("/")
    return None, endpoint.rstrip("/")


def s3_arguments(storage_options: Mapping[str, str] | None) -> dict[str, Any]:
    """``pyarrow.fs.S3FileSystem`` keyword arguments for deltalake-style ``storage_options``.

    Keys pyarrow has no use for (``AWS_S3_ALLOW_UNSAFE_RENAME``, locking, ...) are ignored.
    ObjectStoreError when the options contradict themselves, as deltalake would refuse them too.
    """
    given = {S3_KEYS[k]: v for k, v in _normalised(storage_options, "aws_").items() if k in S3_KEYS}
    if ("access_key" in given) != ("secret_key" in given):
        have, lack = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")[:: 1 if "access_key" in given else -1]
        raise ObjectStoreError(f"lake.storage_options gives {have} without {lack}; give both or neither")
    args: dict[str, Any] = {}
    for name in ("access_key", "secret_key", "session_token", "region"):
        if given.get(name):
            args[name] = given[name]
    if _is_true(given.get("anonymous")):
        args["anonymous"] = True
    if _is_true(given.get("virtual_hosted")):
        args["force_virtual_addressing"] = True
    allow_http = _is_true(given.get("allow_http"))
    if given.get("endpoint"):
        scheme, host = _split_endpoint(given["endpoint"])
        if scheme == "http" and not allow_http:
            raise ObjectStoreError(
                f"lake.storage_options AWS_ENDPOINT_URL {given['endpoint']} is http:// but AWS_ALLOW_HTTP "
                "is not true (deltalake refuses it as well); set AWS_ALLOW_HTTP=true or use https"
            )
        args["endpoint_override"] = host
        args["scheme"] = scheme or ("http" if allow_http else "https")
    elif allow_http:
        args["scheme"] = "http"
    return args


def gcs_arguments(storage_options: Mapping[str, str] | None) -> dict[str, Any]:
    """``pyarrow.fs.GcsFileSystem`` keyword arguments for deltalake-style ``storage_options``.

    pyarrow's GCS client resolves credentials itself (Application Default Credentials:
    ``GOOGLE_APPLICATION_CREDENTIALS`` or the node's service account); a service-account key
    given only in the options reaches the lake, not checkpoints or bundles, hence the warning.
    """
    given = _normalised(storage_options, "google_")
    args: dict[str, Any] = {}
    if given.get("base_url"):
        scheme, host = _split_endpoint(given["base_url"])
        args["endpoint_override"] = host
        args["scheme"] = scheme or "https"
    if _is_true(given.get("skip_signature")):
        args["anonymous"] = True
    ignored = sorted(k for k in GCS_CREDENTIAL_KEYS if k in given)
    if ignored:
        logger.warning(
            "lake.storage_options %s: pyarrow's GCS client (checkpoints, bundles) cannot take them and uses "
            "the node's Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS) instead",
            ", ".join(f"GOOGLE_{k.upper()}" for k in ignored),
        )
    return args


def filesystem(location: str, storage_options: Mapping[str, str] | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a local path or an object-store URI.

    ``storage_options`` are ``lake.storage_options``: the endpoint and credentials of the store.
    """
    if not is_remote(location):
        local = location[len("file://") :] if location.startswith("file://") else location
        return pafs.LocalFileSystem(), absolute(local)
    scheme, inner = _scheme(location), location.split("://", 1)[1].strip("/")
    if not inner:
        raise ObjectStoreError(f"{location} names no bucket; e.g. {scheme}://bucket/folder")
    if scheme in S3_SCHEMES:
        return pafs.S3FileSystem(**s3_arguments(storage_options)), inner
    if scheme in GCS_SCHEMES:
        return pafs.GcsFileSystem(**gcs_arguments(storage_options)), inner
    try:
        return pafs.FileSystem.from_uri(location)  # its own defaults: lake.storage_options do not apply
    except (ValueError, OSError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) for a scheme it lacks
        raise ObjectStoreError(
            f"{location}: checkpoints and bundles go to s3:// or gs:// (or what pyarrow reads by URI): "
            f"{_first_line(exc)}"
        ) from exc


def ray_storage(location: str, storage_options: Mapping[str, str] | None) -> tuple[str, pafs.FileSystem | None]:
    """(``storage_path``, ``storage_filesystem``) of Ray Train's ``RunConfig`` for ``location``.

    With a custom filesystem Ray wants the path without its scheme (``s3://b/p`` -> ``b/p``);
    a local folder goes as an absolute path with Ray's own local filesystem.
    """
    if not is_remote(location):
        return absolute(location), None
    fs, inner = filesystem(location, storage_options)
    return inner, fs


def join(location: str, *names: str) -> str:
    """``location/name/...`` for a local path or a URI (no ``os.path`` on URIs)."""
    return "/".join([location.rstrip("/"), *names])


def describe(location: str, storage_options: Mapping[str, str] | None) -> str:
    """Where requests for ``location`` go and with what credentials (never the secrets)."""
    if _scheme(location) in S3_SCHEMES:
        args = s3_arguments(storage_options)
        endpoint = f"{args['scheme']}://{args['endpoint_override']}" if "endpoint_override" in args else "AWS S3"
        creds = "keys from lake.storage_options" if "access_key" in args else "no keys in lake.storage_options"
        return f"endpoint {endpoint}, {creds}"
    return f"{_scheme(location)} store, options {sorted(storage_options or {})}"


def check_bucket(location: str, storage_options: Mapping[str, str] | None) -> None:
    """ObjectStoreError unless ``location``'s bucket exists and answers (no-op when local)."""
    if not is_remote(location):
        return
    fs, inner = filesystem(location, storage_options)
    bucket = inner.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket).type
    except OSError as exc:
        raise ObjectStoreError(
            f"cannot reach {location} ({describe(location, storage_options)}): {_first_line(exc)}"
        ) from exc
    if found == pafs.FileType.NotFound:
        raise ObjectStoreError(
            f"bucket {bucket!r} of {location} does not exist ({describe(location, storage_options)}); "
            "create it, or fix the URI or lake.storage_options"
        )


@contextmanager
def explained(location: str, storage_options: Mapping[str, str] | None) -> Iterator[None]:
    """Turn a store's OSError inside the block into an ObjectStoreError saying why (local errors pass)."""
    try:
        yield
    except ObjectStoreError:
        raise
    except OSError as exc:
        if not is_remote(location):
            raise
        check_bucket(location, storage_options)  # the likelier causes, named precisely
        raise ObjectStoreError(f"{location} ({describe(location, storage_options)}): {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def upload_order(names: Sequence[str], last: Sequence[str]) -> list[str]:
    """``names`` sorted, except that those in ``last`` come at the end, in ``last``'s order."""
    return sorted(n for n in names if n not in last) + [n for n in last if n in names]


def upload_folder(
    local_dir: str, location: str, storage_options: Mapping[str, str] | None, last: Sequence[str] = ()
) -> None:
    """Copy the files of ``local_dir`` (flat or nested) to ``location``, the ``last`` names at
    the end and in that order: readers that need those files never see a partial folder."""
    fs, base = filesystem(location, storage_options)
    names = [
        os.path.relpath(os.path.join(folder, name), local_dir)
        for folder, _, files in os.walk(local_dir)
        for name in files
    ]
    with explained(location, storage_options):
        for name in upload_order(names, last):
            pafs.copy_files(
                os.path.join(local_dir, name),
                f"{base}/{name}",
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=fs,
            )


def download_files(
    location: str, names: Sequence[str], local_dir: str, storage_options: Mapping[str, str] | None
) -> None:
    """Copy the named files of the folder at ``location`` into ``local_dir``."""
    fs, base = filesystem(location, storage_options)
    local = pafs.LocalFileSystem()
    with explained(location, storage_options):
        for name in names:
            target = os.path.join(local_dir, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            pafs.copy_files(f"{base}/{name}", target, source_filesystem=fs, destination_filesystem=local)


def download_folder(location: str, local_dir: str, storage_options: Mapping[str, str] | None) -> None:
    """Copy everything under ``location`` into ``local_dir``."""
    fs, base = filesystem(location, storage_options)
    with explained(location, storage_options):
        pafs.copy_files(base, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def read_text(location: str, storage_options: Mapping[str, str] | None) -> str | None:
    """The text of the file at ``location``; None when there is none."""
    fs, path = filesystem(location, storage_options)
    with explained(location, storage_options):
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()
