"""Serving bundles on an object store: publish a local bundle, fetch one into a local cache.

A bundle is always written as a local folder (components/bundle.py ``write_bundle``); for an
``s3://``/``gs://`` location, :func:`bundle_target` hands out a temporary folder and publishes
it when the block succeeds. Publishing removes the old ``bundle.json`` first, uploads the files,
and uploads the new ``bundle.json`` last, so a reader sees no bundle or a whole one (a reader
that raced the upload gets a hash mismatch, never a mixed model).

Readers (export's check, ``pipelines.serve``, every Serve replica) :func:`fetch_bundle`: read
the store's ``bundle.json``, and copy the files it lists into ``cache_dir/<model_version>``
unless a checked copy is there already. ``model_version`` is a content hash, so a cached
folder of that name holds exactly that bundle; it is checked (sizes, sha256) before use and
downloaded again when it fails. Downloads go to a temporary sibling and are renamed into
place, so replicas of one node sharing the cache never see half a copy.

    cache_dir/<model_version>/   bundle.json + the files it lists (as in components/bundle.py)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pyarrow.fs as pafs

from components import object_store
from components.bundle import (
    ITEMS,
    MANIFEST,
    USERS,
    WEIGHTS,
    WEIGHTS_W8A16,
    BundleError,
    BundleManifest,
    check_files,
    parse_manifest,
)

logger = logging.getLogger(__name__)

BUNDLE_FILES = frozenset({MANIFEST, WEIGHTS, WEIGHTS_W8A16, ITEMS, USERS})


@contextmanager
def bundle_target(location: str, storage_options: Mapping[str, str] | None) -> Iterator[str]:
    """The local folder to write the bundle for ``location`` into: ``location`` itself when
    local; else a temporary folder, published to the store when the block ends without error."""
    if not object_store.is_remote(location):
        yield location
        return
    object_store.check_bucket(location, storage_options)  # before the model is even loaded
    with tempfile.TemporaryDirectory(prefix="ultrarank-bundle-") as tmp:
        folder = os.path.join(tmp, "bundle")
        yield folder
        publish_bundle(folder, location, storage_options)


def publish_bundle(local_dir: str, location: str, storage_options: Mapping[str, str] | None) -> None:
    """Upload the bundle folder ``local_dir`` to ``location``, replacing a bundle there;
    ``bundle.json`` goes last. BundleError if ``location`` holds objects that are no bundle's."""
    fs, base = object_store.filesystem(location, storage_options)
    with object_store.explained(location, storage_options):
        selector = pafs.FileSelector(base, allow_not_found=True)
        there = {entry.base_name for entry in fs.get_file_info(selector)}
        if there and MANIFEST not in there and there - BUNDLE_FILES:
            raise BundleError(
                f"{location} holds {sorted(there - BUNDLE_FILES)[:5]} and no {MANIFEST}: not a bundle, not replacing it"
            )
        # Old manifest first: from here on a reader finds no bundle rather than a mix of two.
        stale = (there & BUNDLE_FILES) - set(os.listdir(local_dir))
        for name in sorted(stale | ({MANIFEST} & there)):
            fs.delete_file(f"{base}/{name}")
    object_store.upload_folder(local_dir, location, storage_options, last=(MANIFEST,))
    logger.info("published bundle to %s", location)


def fetch_bundle(location: str, storage_options: Mapping[str, str] | None, cache_dir: str) -> str:
    """A checked local copy of the bundle at URI ``location``: ``cache_dir/<model_version>``."""
    text = object_store.read_text(object_store.join(location, MANIFEST), storage_options)
    if text is None:
        object_store.check_bucket(location, storage_options)
        raise BundleError(f"bundle {location} has no {MANIFEST}: not a bundle, or an export that did not finish")
    manifest = parse_manifest(text, object_store.join(location, MANIFEST))
    cache = os.path.join(object_store.absolute(cache_dir), manifest.model_version)
    if _is_checked_copy(cache, manifest):
        return cache
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{manifest.model_version}.tmp-", dir=os.path.dirname(cache))
    try:
        object_store.download_files(location, sorted(manifest.files), tmp, storage_options)
        try:
            check_files(tmp, manifest)
        except BundleError as exc:  # named by the store's file, not the temporary copy's
            raise BundleError(str(exc).replace(tmp, location.rstrip("/"))) from exc
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            f.write(text)
        _move_into_place(tmp, cache, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("bundle %s (model_version %s) cached at %s", location, manifest.model_version, cache)
    return cache


def _is_checked_copy(cache: str, manifest: BundleManifest) -> bool:
    if not os.path.isfile(os.path.join(cache, MANIFEST)):
        return False
    try:
        check_files(cache, manifest)
    except BundleError as exc:
        logger.warning("cached bundle %s fails its check (%s); downloading it again", cache, exc)
        return False
    return True


def _move_into_place(tmp: str, cache: str, manifest: BundleManifest) -> None:
    """Rename the checked download to ``cache``; a broken copy there is replaced, and a good
    one that another replica put there meanwhile is kept (same model_version, same files)."""
    if os.path.exists(cache) and not _is_checked_copy(cache, manifest):
        shutil.rmtree(cache, ignore_errors=True)
    try:
        os.rename(tmp, cache)
    except OSError:
        if not _is_checked_copy(cache, manifest):
            raise
