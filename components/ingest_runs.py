"""One ingest run = one consistent set of lake tables: ``items``, ``users`` and ``events``.

Ingest writes the three tables as three Delta commits (items, users, then events) and
records ONE run id, :data:`RUN_ID_KEY`, in the commit info of all three. Nothing else ties
them together: a reader that took the latest version of each table could combine the
events of one run with the vocabularies of another (an ingest killed between two commits,
or still running), and every item and user of the other run would silently map to
out-of-vocabulary. So every reader pins a TRIPLE with :func:`pin_ingest`: the latest
version of each table, all three from the same run, or a :class:`~components.lake.LakeError`
that says to re-run ingest. ``features`` records the triple it used in its commits
(:meth:`IngestSnapshot.metadata`); training and serving resolve theirs the same way.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow as pa

from components.lake import LakeError, PinnedTable, commit_metadata, table_uri, table_version, write_table

logger = logging.getLogger(__name__)

INGEST_TABLES = ("items", "users", "events")  # commit order: dimensions first, events last
RUN_ID_KEY = "ingest_run_id"
PARTITION_BY = {"events": ["bucket"]}
# Re-resolutions when an ingest run completes while a reader looks at the three tables.
RESOLVE_ATTEMPTS = 3


@dataclass(frozen=True)
class TableCommit:
    """One table written by an ingest run."""

    name: str
    uri: str
    version: int
    rows: int


def new_run_id() -> str:
    """A fresh ingest run id (unique per run, also across machines)."""
    return uuid.uuid4().hex


def write_ingest_tables(
    root: str,
    tables: Mapping[str, pa.Table],
    run_id: str,
    storage_options: Mapping[str, str] | None = None,
    items_metadata: Mapping[str, str] | None = None,
) -> tuple[TableCommit, ...]:
    """Overwrite ``items``, ``users``, ``events`` (in that order), each ONE commit recording ``run_id``.

    ``items_metadata`` (e.g. the genre vocabulary) is stored with the items commit. A crash
    between two commits leaves an incomplete run, which :func:`pin_ingest` refuses.
    """
    commits = []
    for name in INGEST_TABLES:
        uri = table_uri(root, name)
        metadata = {**(items_metadata or {}), RUN_ID_KEY: run_id} if name == "items" else {RUN_ID_KEY: run_id}
        version = write_table(
            uri,
            tables[name],
            mode="overwrite",
            partition_by=PARTITION_BY.get(name),
            storage_options=storage_options,
            custom_metadata=metadata,
        )
        commits.append(TableCommit(name, uri, version, tables[name].num_rows))
    logger.info("ingest run %s committed %s", run_id, ", ".join(f"{c.name} v{c.version}" for c in commits))
    return tuple(commits)


@dataclass(frozen=True)
class IngestSnapshot:
    """The three tables of ONE ingest run, each pinned at its version (what a reader reads)."""

    run_id: str
    items: PinnedTable
    users: PinnedTable
    events: PinnedTable
    storage_options: dict[str, str] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        """Commit info recording this triple in a downstream table's commit (all strings)."""
        return {
            RUN_ID_KEY: self.run_id,
            "items_version": str(self.items.version),
            "users_version": str(self.users.version),
            "events_version": str(self.events.version),
        }


@dataclass(frozen=True)
class _Latest:
    """The latest version of one table and the ingest run that committed it (None: no run id)."""

    uri: str
    version: int
    run_id: str | None


def _latest(root: str, name: str, storage_options: Mapping[str, str] | None) -> _Latest:
    uri = table_uri(root, name)
    version = table_version(uri, storage_options)
    if version is None:
        raise LakeError(f"no Delta table at {uri} (run the ingest stage first)")
    return _Latest(uri, version, commit_metadata(uri, version, storage_options).get(RUN_ID_KEY))


def _incomplete(latest: dict[str, _Latest]) -> LakeError:
    parts = ", ".join(f"{name} v{t.version} from run {t.run_id or '<none>'}" for name, t in latest.items())
    return LakeError(
        f"the lake's latest ingest run is incomplete: its tables' latest versions come from different "
        f"runs ({parts}); an ingest was killed between its commits or is still running. "
        "Re-run ingest (or wait for the running one to finish)"
    )


def pin_ingest(root: str, storage_options: Mapping[str, str] | None = None) -> IngestSnapshot:
    """The latest ``items``/``users``/``events`` triple, all three committed by ONE ingest run.

    Raises LakeError naming the tables when a table is missing, when ``events`` records no
    run id (written before run ids existed, or by another tool), or when the latest
    versions come from different runs (re-run ingest). ``events`` is read first: when it
    moves on while the other two are looked at, a run just completed and the triple is
    resolved again.
    """
    options = dict(storage_options or {})
    for _ in range(RESOLVE_ATTEMPTS):
        events = _latest(root, "events", options)
        if events.run_id is None:
            raise LakeError(
                f"events table {events.uri} version {events.version} records no {RUN_ID_KEY}, so the items "
                "and users versions of the same ingest run are unknown; re-run ingest"
            )
        latest = {name: _latest(root, name, options) for name in ("items", "users")} | {"events": events}
        if all(t.run_id == events.run_id for t in latest.values()):
            pinned = {name: PinnedTable(t.uri, t.version, options) for name, t in latest.items()}
            return IngestSnapshot(events.run_id, **pinned, storage_options=options)
        if table_version(events.uri, options) == events.version:
            raise _incomplete(latest)
        logger.info("an ingest run committed while resolving the lake's tables; resolving again")
    raise LakeError(f"the tables under {root} kept changing while being resolved (concurrent ingest runs?)")
