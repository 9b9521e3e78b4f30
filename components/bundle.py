"""Serving bundles: one folder that a ranker replica needs and nothing else.

``pipelines/export.py`` writes it from a training checkpoint; ``serving/`` loads it. Layout::

    bundle.json                 BundleManifest: format, model_version, variant, model config,
                                serving features, lake versions it was trained on, checkpoint,
                                and the sha256 and size of every other file
    weights.safetensors         consolidated fp32 state dict of the trained model (no pickle)
    weights_w8a16.safetensors   optional: the W8A16 model's state dict (int8 weights + scales)
    items.parquet               item_id -> item_idx, embedding_row, genre_mask, year, tag_ids
                                (the vocabulary and the candidate features, at the items
                                version trained on; ``embedding_row`` is the table row the id
                                reads: the shared OOV row for rare ids, models/id_rows.py)
    users.parquet               user_id -> user_idx, embedding_row

``model_version`` is a content hash (sha256 over the manifest's files and the model config),
so two exports of the same checkpoint have the same version and any change gets a new one:
the user-side cache keys on it. Loading checks every piece (format, files present, sizes and
hashes, vocabulary sizes against the model's tables, every weight's name and shape, the
vocabularies' embedding rows against the model's rare-id map) and names
what is missing or mismatched. A bundle is written into a temporary sibling folder and moved
into place, so a reader never sees half of one. On an object store (``s3://``, ``gs://``) a
bundle is published file by file with ``bundle.json`` last, and read through a local cache
keyed by ``model_version`` (components/bundle_store.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from components import object_store
from components.json_record import parse_record
from models.id_rows import model_id_rows

# 2: vocabularies carry embedding_row, weights the rare-id map; 3: unit-scaled user dense features;
# 4: the ranker's cross network (cross_net token and logit path); 5: the ranker's dense arch (dense_arch)
BUNDLE_FORMAT = 5
DEFAULT_CACHE_DIR = object_store.DEFAULT_CACHE_DIR  # local copies of object-store bundles (serve.bundle_cache)
MANIFEST = "bundle.json"
WEIGHTS = "weights.safetensors"
WEIGHTS_W8A16 = "weights_w8a16.safetensors"
ITEMS = "items.parquet"
USERS = "users.parquet"
ITEM_COLUMNS = ("item_id", "item_idx", "genre_mask", "year", "tag_ids")
USER_COLUMNS = ("user_id", "user_idx")
ROW_COLUMN = "embedding_row"  # written by write_bundle from the model's rare-id map


def default_bundle_dir(export_output: str, run_name: str) -> str:
    """Where ``export`` writes and ``serve`` reads a run's bundle: ``export.output`` (a folder or
    an object-store URI), else ``bundles/<run name>``; a folder is made absolute, so Serve
    replicas in other folders find it."""
    return object_store.absolute(export_output or os.path.join("bundles", run_name))


class BundleError(ValueError):
    """A bundle is missing a piece, or a piece does not match; the message names it."""


@dataclass(frozen=True)
class BundleManifest:
    """``bundle.json``. ``files`` maps each file name to ``{"sha256": hex, "bytes": n}``."""

    model_version: str
    variant: str
    model: dict[str, Any]  # models.variants.ModelConfig as a dict, vocabulary sizes resolved
    max_seq_len: int  # events of history the model reads per user (the training run's)
    tags_per_item: int  # tags per candidate, as the features stage wrote them
    lake: dict[str, Any]  # root, samples/sequences/items/users versions trained on
    checkpoint: dict[str, Any]  # path and step it was exported from
    files: dict[str, dict[str, Any]]
    w8a16: bool = False
    created_at: str = ""
    format: int = BUNDLE_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


@dataclass
class Bundle:
    """A loaded bundle: the model (eval mode; W8A16 when asked and present) and its vocabularies."""

    path: str  # where it was loaded from: a local folder or an object-store URI
    manifest: BundleManifest
    model: nn.Module
    items: pa.Table
    users: pa.Table
    quantized: bool = False

    @property
    def model_version(self) -> str:
        return self.manifest.model_version + ("-w8a16" if self.quantized else "")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_version(files: dict[str, dict[str, Any]], model: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(model, sort_keys=True).encode())
    for name in sorted(files):
        digest.update(f"{name}:{files[name]['sha256']}".encode())
    return digest.hexdigest()[:16]


def _state_for_safetensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, unshared copies (safetensors refuses tensors that share storage)."""
    return {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}


def write_bundle(
    out_dir: str,
    model: nn.Module,
    *,
    variant: str,
    model_config: dict[str, Any],
    max_seq_len: int,
    tags_per_item: int,
    items: pa.Table,
    users: pa.Table,
    lake: dict[str, Any],
    checkpoint: dict[str, Any],
    w8a16: bool = False,
) -> BundleManifest:
    """Write a bundle folder at ``out_dir`` (replacing one that is there, atomically)."""
    from safetensors.torch import save_file

    missing = [c for c in ITEM_COLUMNS if c not in items.column_names] + [
        c for c in USER_COLUMNS if c not in users.column_names
    ]
    if missing:
        raise BundleError(f"write_bundle: vocabulary tables lack column(s) {missing}")
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tag = {"variant": variant}
        save_file(_state_for_safetensors(model), os.path.join(tmp, WEIGHTS), metadata=tag)
        if w8a16:
            from models.quant import quantize_w8a16

            save_file(_state_for_safetensors(quantize_w8a16(model)), os.path.join(tmp, WEIGHTS_W8A16), metadata=tag)
        rows = model_id_rows(model)
        pq.write_table(
            _with_rows(items.select(list(ITEM_COLUMNS)), "item_idx", rows.get("item")), os.path.join(tmp, ITEMS)
        )
        pq.write_table(
            _with_rows(users.select(list(USER_COLUMNS)), "user_idx", rows.get("user")), os.path.join(tmp, USERS)
        )
        files = {
            name: {"sha256": _sha256(os.path.join(tmp, name)), "bytes": os.path.getsize(os.path.join(tmp, name))}
            for name in sorted(os.listdir(tmp))
        }
        manifest = BundleManifest(
            model_version=_model_version(files, model_config),
            variant=variant,
            model=model_config,
            max_seq_len=max_seq_len,
            tags_per_item=tags_per_item,
            lake=lake,
            checkpoint=checkpoint,
            files=files,
            w8a16=w8a16,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            f.write(manifest.to_json())
        old = None
        if os.path.exists(out_dir):
            if not os.path.exists(os.path.join(out_dir, MANIFEST)):
                raise BundleError(f"{out_dir} exists and is not a bundle (no {MANIFEST}); not replacing it")
            old = f"{tmp}.old"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str) -> BundleManifest:
    """``bundle.json`` of the bundle at ``path``, checked for shape (not the files: see ``check_files``)."""
    where = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise BundleError(f"bundle {path} does not exist (export one with python -m pipelines.export)")
    if not os.path.exists(where):
        raise BundleError(f"bundle {path} has no {MANIFEST}: not a bundle, or an export that did not finish")
    with open(where) as f:
        return parse_manifest(f.read(), where)


def parse_manifest(text: str, where: str) -> BundleManifest:
    """A ``bundle.json``'s text, checked for shape; ``where`` names it in errors."""
    return parse_record(BundleManifest, text, where, BundleError, version=BUNDLE_FORMAT, strict=True)


def check_files(path: str, manifest: BundleManifest) -> None:
    """Every file the manifest lists is there with its size and sha256, and the required ones are listed."""
    required = [WEIGHTS, ITEMS, USERS] + ([WEIGHTS_W8A16] if manifest.w8a16 else [])
    unlisted = [name for name in required if name not in manifest.files]
    if unlisted:
        raise BundleError(f"bundle {path}: {MANIFEST} does not list {unlisted}")
    for name, facts in manifest.files.items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise BundleError(f"bundle {path} is missing {name}")
        size = os.path.getsize(file)
        if size != facts.get("bytes"):
            raise BundleError(f"bundle file {file} has {size} bytes, {MANIFEST} says {facts.get('bytes')} (truncated?)")
        if _sha256(file) != facts.get("sha256"):
            raise BundleError(f"bundle file {file} does not match its sha256 in {MANIFEST} (changed or corrupt)")
    if _model_version(manifest.files, manifest.model) != manifest.model_version:
        raise BundleError(f"bundle {path}: model_version {manifest.model_version} does not match its files and config")


def _load_weights(model: nn.Module, file: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(file)
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{file} is not a readable safetensors file ({exc})") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BundleError(f"{file} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape) or tensor.dtype != want.dtype:
            have, need = f"{tuple(tensor.shape)} {tensor.dtype}", f"{tuple(want.shape)} {want.dtype}"
            raise BundleError(f"{file}: {name} is {have}, the model has {need}")
    model.load_state_dict(state, strict=True)


def _embedding_rows(table: pa.Table, index: str, rows: np.ndarray | None) -> np.ndarray:
    """The row each vocabulary index of ``table`` reads under the map ``rows`` (itself without one)."""
    idx = table[index].to_numpy().astype(np.int64)
    return idx if rows is None else rows[idx]


def _with_rows(table: pa.Table, index: str, rows: np.ndarray | None) -> pa.Table:
    """``table`` with ``embedding_row`` (:func:`_embedding_rows`)."""
    top = int(table[index].to_numpy().max(initial=-1))
    if rows is not None and top >= rows.size:
        raise BundleError(f"write_bundle: {index} {top} is outside the model's {rows.size}-row id map")
    values = _embedding_rows(table, index, rows)
    return table.append_column(ROW_COLUMN, pa.array(values.astype(np.int32), pa.int32()))


def _check_rows(path: str, model: nn.Module, items: pa.Table, users: pa.Table) -> None:
    """The vocabularies' ``embedding_row`` is the model's rare-id map (featurizer and model agree)."""
    rows = model_id_rows(model)
    for table, name, index, kind in ((items, ITEMS, "item_idx", "item"), (users, USERS, "user_idx", "user")):
        if ROW_COLUMN not in table.column_names:
            raise BundleError(f"bundle {path}: {name} has no {ROW_COLUMN} column (re-export the checkpoint)")
        want = _embedding_rows(table, index, rows.get(kind))
        have = table[ROW_COLUMN].to_numpy()
        if not np.array_equal(have, want):
            bad = int(np.flatnonzero(have != want)[0])
            raise BundleError(
                f"bundle {path}: {name} gives {index} {table[index][bad]} embedding row {have[bad]}, the model's "
                f"{kind} map gives {want[bad]} (vocabulary and weights come from different exports)"
            )


def _check_vocabulary(path: str, manifest: BundleManifest, items: pa.Table, users: pa.Table) -> None:
    missing = [c for c in ITEM_COLUMNS if c not in items.column_names] + [
        c for c in USER_COLUMNS if c not in users.column_names
    ]
    if missing:
        raise BundleError(f"bundle {path}: vocabulary files lack column(s) {missing}")
    sparse = manifest.model["ranker"]["sparse"]
    checks = ((items, ITEMS, "item_idx", "item_vocab"), (users, USERS, "user_idx", "user_vocab"))
    for table, name, column, vocab_key in checks:
        rows = int(sparse[vocab_key])
        top = table[column].to_numpy().max(initial=-1)
        if top >= rows:
            raise BundleError(
                f"bundle {path}: {name} has {column} {top}, but the model's {vocab_key} is {rows} rows "
                "(vocabulary and weights come from different runs)"
            )


def load_bundle(
    path: str,
    *,
    w8a16: bool = False,
    storage_options: dict[str, str] | None = None,
    cache_dir: str = DEFAULT_CACHE_DIR,
) -> Bundle:
    """Load and check the bundle at ``path``; ``w8a16`` serves its quantized weights.

    ``path`` may be an object-store URI: the bundle is then copied (once, checked) into
    ``cache_dir/<model_version>`` with ``storage_options`` (``lake.storage_options``) and
    loaded from there."""
    from components.config_loader import from_dict
    from models.variants import ModelConfig, build_model

    if object_store.is_remote(path):
        from components.bundle_store import fetch_bundle  # builds on this module, hence imported here

        local = fetch_bundle(path, storage_options, cache_dir)  # files and hashes checked
        manifest = read_manifest(local)
    else:
        local = path = os.path.abspath(path)
        manifest = read_manifest(local)
        check_files(local, manifest)
    if w8a16 and not manifest.w8a16:
        raise BundleError(f"bundle {path} has no W8A16 weights (export with --export.w8a16=true)")
    items = pq.read_table(os.path.join(local, ITEMS))
    users = pq.read_table(os.path.join(local, USERS))
    _check_vocabulary(path, manifest, items, users)
    try:
        model = build_model(from_dict(ModelConfig, manifest.model, "model"))
    except (ValueError, TypeError) as exc:
        raise BundleError(f"bundle {path}: its model config does not build ({exc})") from exc
    if w8a16:
        from models.quant import quantize_w8a16

        model = quantize_w8a16(model, inplace=True)
        _load_weights(model, os.path.join(local, WEIGHTS_W8A16))
    else:
        _load_weights(model, os.path.join(local, WEIGHTS))
    _check_rows(path, model, items, users)
    return Bundle(path, manifest, model.eval(), items, users, quantized=w8a16)
