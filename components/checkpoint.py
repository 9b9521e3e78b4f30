"""Training checkpoints: sharded tensors by ``torch.distributed.checkpoint``, facts in ``meta.json``.

A checkpoint is a folder: local, or on an object store (an ``s3://``/``gs://`` URI reached
through ``pyarrow.fs`` with ``lake.storage_options``, components/object_store.py):

    .metadata, __<rank>_0.distcp   torch.distributed.checkpoint files: tensors only
                                   (model, fused sparse optimizer state, AdamW state)
    meta.json                      CheckpointMeta: variant, resolved model config, pinned
                                   samples/sequences versions, step counters, train config

Nothing is ever unpickled: DCP stores tensors, the rest is JSON. A checkpoint is complete
when both ``.metadata`` and ``meta.json`` exist (rank 0 writes ``meta.json`` after the DCP
save returned on every rank). Every error names the file and what does not fit.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from components import object_store
from components.json_record import parse_record

META_FILE = "meta.json"
DCP_METADATA = ".metadata"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model asked for; names the file."""


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything about a checkpoint except its tensors (``meta.json``).

    ``step`` counts optimizer steps over the whole run; ``epoch`` is the epoch in progress and
    ``step_in_epoch`` the batches of it already consumed (0 at an epoch boundary), so a resumed
    run skips exactly those and ends at the uninterrupted run's step count.
    """

    variant: str
    model: dict[str, Any]  # models.variants.ModelConfig as a dict, vocabulary sizes resolved
    lake_root: str
    samples_version: int
    sequences_version: int
    step: int
    epoch: int
    step_in_epoch: int
    steps_per_epoch: int
    total_steps: int
    world_size: int
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, default=float)

    @classmethod
    def from_json(cls, text: str, where: str) -> CheckpointMeta:
        return parse_record(cls, text, where, CheckpointError, version=FORMAT_VERSION)

    @property
    def sparse_sizes(self) -> dict[str, int]:
        return dict(self.model["ranker"]["sparse"])


# ---------------------------------------------------------------------------------------------
# Locations: local folders and object-store URIs (components/object_store.py)
# ---------------------------------------------------------------------------------------------
def run_dir(storage_path: str, run_name: str) -> str:
    """Where a training run's checkpoints live: ``storage_path/run_name``."""
    return object_store.join(object_store.absolute(storage_path), run_name)


def write_text(path: str, text: str, storage_options: Mapping[str, str] | None = None) -> None:
    """Write ``text`` to a local path or object-store URI through a temporary name and a move,
    so a reader never sees it half-written."""
    fs, inner = object_store.filesystem(path, storage_options)
    parent = inner.rsplit("/", 1)[0]
    with object_store.explained(path, storage_options):
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(f"{inner}.tmp") as stream:
            stream.write(text.encode())
        fs.move(f"{inner}.tmp", inner)


def read_meta(path: str, storage_options: Mapping[str, str] | None = None) -> CheckpointMeta:
    """The ``meta.json`` of checkpoint ``path``; CheckpointError when absent or incomplete.

    ``storage_options`` (``lake.storage_options``) reach a checkpoint on an object store."""
    with object_store.explained(path, storage_options):
        return _read_meta(path, *object_store.filesystem(path, storage_options))


def _read_meta(path: str, fs, base: str) -> CheckpointMeta:
    import pyarrow.fs as pafs

    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise CheckpointError(f"checkpoint {path} does not exist")
    if info.type != pafs.FileType.Directory:
        raise CheckpointError(f"checkpoint {path} is not a folder")
    meta_path, dcp_path = f"{base}/{META_FILE}", f"{base}/{DCP_METADATA}"
    if fs.get_file_info(meta_path).type == pafs.FileType.NotFound:
        raise CheckpointError(f"checkpoint {path} has no {META_FILE} (an incomplete save, or not a checkpoint)")
    if fs.get_file_info(dcp_path).type == pafs.FileType.NotFound:
        raise CheckpointError(f"checkpoint {path} has no {DCP_METADATA} (the tensor save did not finish)")
    with fs.open_input_stream(meta_path) as stream:
        meta = CheckpointMeta.from_json(stream.read().decode(), f"{path}/{META_FILE}")
    check_files(path, fs, base)
    return meta


def check_files(path: str, fs, base: str) -> None:
    """CheckpointError naming the first tensor file that is missing or shorter than the DCP
    index says: a truncated upload must never load as a partial (silently zero) state."""
    import io

    from torch.distributed.checkpoint.metadata import Metadata

    with fs.open_input_stream(f"{base}/{DCP_METADATA}") as stream:
        raw = stream.read()
    try:
        # DCP's own index (written by torch.distributed.checkpoint, restricted unpickler).
        metadata = _read_dcp_metadata(io.BytesIO(raw))
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path}: {DCP_METADATA} is unreadable ({exc}); the save did not finish"
        ) from exc
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"checkpoint {path}: {DCP_METADATA} is not a torch.distributed.checkpoint index")
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        found = fs.get_file_info(f"{base}/{name}")
        if found.size is None:
            raise CheckpointError(f"checkpoint {path} lacks tensor file {name}")
        if found.size < size:
            raise CheckpointError(f"checkpoint {path}: {name} is truncated ({found.size} of {size} bytes)")


class _IndexUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle; accept only the classes such an index is made of, so a
    crafted checkpoint cannot run code when it is vetted (DCP itself then reads a vetted file)."""

    ALLOWED_MODULES = ("torch.distributed.checkpoint", "torch.distributed._shard", "torch.distributed.tensor")
    ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("pathlib", "PosixPath"),  # the save's checkpoint_id
        ("pathlib", "WindowsPath"),
    }

    def find_class(self, module: str, name: str):
        if module.startswith(self.ALLOWED_MODULES) or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and name in _DTYPE_NAMES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


_DTYPE_NAMES = {
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int8",
    "uint8",
    "bool",
    "strided",
    "contiguous_format",
    "preserve_format",
    "channels_last",
}


def _read_dcp_metadata(stream):
    return _IndexUnpickler(stream).load()


def list_checkpoints(
    run_dir: str, storage_options: Mapping[str, str] | None = None
) -> list[tuple[str, CheckpointMeta]]:
    """Complete checkpoints directly under ``run_dir``, oldest first (by step); [] if none."""
    import pyarrow.fs as pafs

    fs, base = object_store.filesystem(run_dir, storage_options)
    with object_store.explained(run_dir, storage_options):
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        entries = fs.get_file_info(pafs.FileSelector(base))
    found = []
    for entry in entries:
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        path = object_store.join(run_dir, entry.base_name) if object_store.is_remote(run_dir) else entry.path
        try:
            found.append((path, read_meta(path, storage_options)))
        except CheckpointError:
            continue  # a save that died half-way is not a checkpoint
    return sorted(found, key=lambda pm: (pm[1].step, pm[0]))


def latest_checkpoint(
    run_dir: str, storage_options: Mapping[str, str] | None = None
) -> tuple[str, CheckpointMeta] | None:
    found = list_checkpoints(run_dir, storage_options)
    return found[-1] if found else None


BEST_METRIC = "valid/like_auc"  # what "best" means (pipelines/train_loop.py validates it every epoch)


def best_checkpoint(
    run_dir: str, storage_options: Mapping[str, str] | None = None
) -> tuple[str, CheckpointMeta] | None:
    """The run's checkpoint of the best valid like AUC (the earliest of equals); the latest when
    no checkpoint was validated (``train.valid_every_epoch=false``, mid-epoch saves only)."""
    found = list_checkpoints(run_dir, storage_options)
    scored = [
        (m.metrics[BEST_METRIC], -m.step, p, m) for p, m in found if math.isfinite(m.metrics.get(BEST_METRIC, math.nan))
    ]
    if scored:
        _, _, path, meta = max(scored, key=lambda s: s[:2])
        return path, meta
    return found[-1] if found else None


def find_checkpoint(
    checkpoint: str, storage_path: str, run_name: str, storage_options: Mapping[str, str] | None = None
) -> tuple[str, CheckpointMeta]:
    """``checkpoint`` when given, else the best-valid checkpoint of run ``run_name`` under
    ``storage_path`` (:func:`best_checkpoint`; what ``eval.checkpoint=""`` and ``export.checkpoint=""`` mean)."""
    if checkpoint:
        return checkpoint, read_meta(checkpoint, storage_options)
    where = run_dir(storage_path, run_name)
    found = best_checkpoint(where, storage_options)
    if found is None:
        object_store.check_bucket(where, storage_options)  # "no bucket" says more than "no checkpoint"
        raise CheckpointError(f"no checkpoint under {where} (train first: python -m pipelines.train, or name one)")
    return found


@contextmanager
def local_copy(path: str, storage_options: Mapping[str, str] | None = None) -> Iterator[str]:
    """A local folder holding checkpoint ``path`` (itself when local, a download otherwise):
    torch.distributed.checkpoint reads local files."""
    if not object_store.is_remote(path):
        yield object_store.filesystem(path)[1]
        return
    tmp = tempfile.mkdtemp(prefix="ultrarank-ckpt-")
    try:
        object_store.download_folder(path, tmp, storage_options)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Compatibility and loading
# ---------------------------------------------------------------------------------------------
def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted keys where two nested dicts differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{path}: checkpoint {a!r} vs asked {b!r}"]


def check_compatible(path: str, meta: CheckpointMeta, model: dict[str, Any]) -> None:
    """CheckpointError naming ``path`` and every model setting (variant, vocabulary sizes,
    sizes) where the checkpoint differs from the model being asked for."""
    if meta.variant != model["variant"]:
        raise CheckpointError(
            f"checkpoint {path} holds variant {meta.variant!r}, asked for {model['variant']!r} "
            "(set model.variant to match, or train.resume=never to start afresh)"
        )
    diffs = _diff(meta.model, model, "model")
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with other model settings: " + "; ".join(diffs[:8]))


def load_tensors(
    path: str, state: dict, *, distributed: bool, storage_options: Mapping[str, str] | None = None
) -> None:
    """``dcp.load`` checkpoint ``path`` into ``state`` in place (every rank when distributed).

    DCP reshards as needed: a checkpoint saved by N ranks loads into M ranks or into one
    unsharded process. A key or shape that does not fit becomes a CheckpointError naming it.
    """
    import torch.distributed.checkpoint as dcp

    with local_copy(path, storage_options) as local:
        try:
            dcp.load(state, checkpoint_id=local, no_dist=not distributed)
        except Exception as exc:  # DCP raises CheckpointException / RuntimeError with per-rank details
            raise CheckpointError(f"checkpoint {path} does not fit this model: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 600 else text[:600] + " ..."


def load_model(
    path: str, meta: CheckpointMeta | None = None, storage_options: Mapping[str, str] | None = None
) -> tuple[nn.Module, CheckpointMeta]:
    """The trained model of checkpoint ``path``, unsharded and in eval mode (one process, no Ray).

    Used by evaluation and export; tensors go through DCP (no pickle).
    """
    from components.config_loader import from_dict
    from models.variants import ModelConfig, build_model

    meta = meta or read_meta(path, storage_options)
    model = build_model(from_dict(ModelConfig, meta.model, "model"))
    state = {"model": model.state_dict()}
    load_tensors(path, state, distributed=False, storage_options=storage_options)
    model.load_state_dict(state["model"])
    return model.eval(), meta


def write_meta(directory: str, meta: CheckpointMeta) -> None:
    """Write ``meta.json`` into a checkpoint folder (never half-written)."""
    write_text(os.path.join(directory, META_FILE), meta.to_json())
