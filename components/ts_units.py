"""Plausible event times, and hints when a log's timestamps are in the other unit.

Two unit mistakes are easy to make with ``ingest.events.ts_unit``:
- milliseconds declared as seconds: every time lands ~50,000 years ahead, so every row is
  out of range and the run fails; the message should say why (:func:`unit_hint`);
- seconds declared as milliseconds: every time lands in January 1970, which used to be
  accepted silently. :func:`near_epoch_message` refuses a log whose times ALL fall within
  a few weeks of the epoch, whatever range is configured.
Outside those, the plausible range (:class:`TsRange`, ``ingest.min_ts_s`` and
``ingest.max_ts_ahead_s``) turns stray times into rejected rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

DEFAULT_MIN_TS_S = 631_152_000  # 1990-01-01T00:00:00Z: older "events" are usually a unit or parse error
DEFAULT_MAX_TS_AHEAD_S = 86_400  # clocks drift and time zones slip, but not by more than a day
EPOCH_WINDOW_S = 8 * 7 * 86_400  # "a few weeks after 1970-01-01"
UNIT_KEY = "ingest.events.ts_unit"
_MS_PER_S = 1000


@dataclass(frozen=True)
class TsRange:
    """Event times accepted as rows: ``min_s <= ts < end_s`` (seconds since the epoch)."""

    min_s: int
    end_s: int

    @classmethod
    def from_config(cls, min_ts_s: int, max_ts_ahead_s: int, now_s: int | None = None) -> TsRange:
        """From ``ingest.min_ts_s`` and ``ingest.max_ts_ahead_s``: ``[min_ts_s, now + ahead]``."""
        now_s = int(time.time()) if now_s is None else now_s
        return cls(min_ts_s, now_s + max_ts_ahead_s + 1)

    def contains(self, ts: np.ndarray) -> np.ndarray:
        """Boolean mask of the times inside the range (float input allowed, no overflow)."""
        return (ts >= self.min_s) & (ts < self.end_s)


def unit_hint(ts_s: np.ndarray, declared_unit: str | None, valid: TsRange) -> str | None:
    """A hint naming the other unit when MOST times are out of range and fit it.

    ``ts_s`` are the parsed times in seconds (nulls dropped); ``declared_unit`` is the
    user's ``ingest.events.ts_unit`` ("s"/"ms"), None when the source fixes the unit.
    A few stray rows in a good log are rejected rows, not a unit problem: no hint.
    """
    if declared_unit not in ("s", "ms") or ts_s.size == 0:
        return None
    out = ts_s[~valid.contains(ts_s)].astype(np.float64)
    if out.size * 2 < ts_s.size:
        return None
    if declared_unit == "s" and valid.contains(out / _MS_PER_S).mean() >= 0.5:
        return f"looks like milliseconds: set {UNIT_KEY}=ms"
    if declared_unit == "ms" and valid.contains(out * _MS_PER_S).mean() >= 0.5:
        return f"looks like seconds: set {UNIT_KEY}=s"
    return None


def near_epoch_message(ts_s: np.ndarray, declared_unit: str | None) -> str | None:
    """Why a log whose times ALL fall within :data:`EPOCH_WINDOW_S` after 1970-01-01 is refused.

    No real behaviour log lives in the first weeks of 1970: it is seconds declared as
    milliseconds (divided by 1000) or a column of something else. None when plausible.
    """
    if ts_s.size == 0 or ts_s.min() < 0 or ts_s.max() >= EPOCH_WINDOW_S:
        return None
    if declared_unit == "ms":
        hint = f"looks like seconds: set {UNIT_KEY}=s"
    else:
        hint = f"timestamps must be seconds ({UNIT_KEY}=s) or milliseconds ({UNIT_KEY}=ms) since 1970-01-01"
    weeks = EPOCH_WINDOW_S // (7 * 86_400)
    return (
        f"every timestamp falls within {weeks} weeks after 1970-01-01 ({int(ts_s.min())}..{int(ts_s.max())} s): {hint}"
    )
