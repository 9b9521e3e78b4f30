"""The run manifest: what each stage of ``pipelines.run`` read, wrote and how long it took.

One ``manifest.json`` per run, in ``reports_dir/<run id>/``, rewritten (atomically) after every
stage, so a run that fails or is killed still records the stages it finished. A stage's
record holds a ``key``, the hash of everything it depends on (its config sections and the
ids of its inputs: Delta versions, the checkpoint, the bundle's model_version), and the ids
of what it produced. A later run reuses a stage when an earlier record has the same key and
its outputs are still there (:func:`find_reusable`); anything upstream that changed changes
the key of every stage after it, so they run again.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from components.checkpoint import write_text

MANIFEST = "manifest.json"
FORMAT = 1

Status = Literal["ran", "reused", "failed"]


def stage_key(inputs: Mapping[str, Any]) -> str:
    """A short stable hash of a stage's inputs (JSON with sorted keys)."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def new_run_id() -> str:
    """``YYYYMMDD-HHMMSS-xxxx`` (UTC): sorts by start time, unique within a second."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


@dataclass
class StageRecord:
    """One stage of one run."""

    name: str
    status: Status
    key: str
    inputs: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    from_run: str = ""  # reused: the run that produced the outputs
    error: str = ""


@dataclass
class RunManifest:
    """Everything ``report.md`` is written from (with the JSON files the outputs name)."""

    run_id: str
    preset: str
    argv: list[str]
    config: dict[str, Any]
    started: float = field(default_factory=time.time)
    host: str = field(default_factory=socket.gethostname)
    finished: float = 0.0
    status: Literal["running", "succeeded", "failed"] = "running"
    error: str = ""  # why a failed run failed
    stages: dict[str, StageRecord] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started

    def record(self, stage: StageRecord) -> None:
        self.stages[stage.name] = stage

    def outputs(self, name: str) -> dict[str, Any]:
        """The outputs of stage ``name`` in this run ({} when it has none)."""
        record = self.stages.get(name)
        return record.outputs if record is not None and record.status != "failed" else {}

    def save(self, folder: Path) -> Path:
        """Write ``folder/manifest.json`` through a temporary name (never half-written)."""
        path = folder / MANIFEST
        write_text(str(path), json.dumps(asdict(self), indent=1, sort_keys=True, default=str))
        return path

    @classmethod
    def load(cls, path: Path) -> RunManifest:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: manifest format {data.get('format')}, expected {FORMAT}")
        stages = {name: StageRecord(**record) for name, record in data.pop("stages").items()}
        return cls(**data, stages=stages)


def run_dir(reports_dir: str, run_id: str) -> Path:
    return Path(reports_dir) / run_id


def earlier_runs(reports_dir: str, exclude: str = "") -> Iterator[RunManifest]:
    """The manifests under ``reports_dir``, newest first (unreadable ones are skipped)."""
    root = Path(reports_dir)
    if not root.is_dir():
        return
    found = []
    for path in root.glob(f"*/{MANIFEST}"):
        if path.parent.name == exclude:
            continue
        try:
            found.append(RunManifest.load(path))
        except (OSError, ValueError, TypeError):
            continue  # a foreign or older file is not a reason to fail a run
    yield from sorted(found, key=lambda m: m.started, reverse=True)


def latest_run(reports_dir: str) -> RunManifest | None:
    return next(earlier_runs(reports_dir), None)


def find_reusable(
    reports_dir: str, name: str, key: str, still_there: Callable[[dict[str, Any]], bool], exclude: str = ""
) -> tuple[str, StageRecord] | None:
    """The newest earlier record of stage ``name`` with this key whose outputs are still there:
    (its run id, the record); None when there is none."""
    for manifest in earlier_runs(reports_dir, exclude):
        record = manifest.stages.get(name)
        if record is None or record.status == "failed" or record.key != key:
            continue
        if still_there(record.outputs):
            return record.from_run or manifest.run_id, record
    return None
