"""What the driver's console shows of its Ray workers' output: no library noise, no wall of text.

Ray streams every worker's stdout and stderr to the driver (``log_to_driver``). Most of it is
the project's own progress, but some library lines say nothing a user can act on, and a few
are walls of text (a Serve route table is ~700 characters). Here, in the driver only:

- ``NOISE``: lines dropped, each for the reason beside it;
- any other line longer than ``MAX_LINE_CHARS`` is cut there, saying where the whole line is:
  every worker's output stays complete in Ray's session logs (``/tmp/ray/session_latest/logs``
  on the head node);
- except the progress-bar updates of Ray's ``tqdm_ray`` (``TQDM_MAGIC``): JSON messages, not
  text, that the driver decodes into its progress bars. Cut, they failed to decode and Ray
  printed a 400-character warning with the broken message instead.

The hook is Ray's driver-side dispatcher of worker output (``ray._private``; the Ray version is
pinned): ``install_console_filter`` wraps its printing handler and does nothing where that
handler is absent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC as TQDM_MAGIC

logger = logging.getLogger(__name__)

MAX_LINE_CHARS = 300
CUT_NOTE = " … [cut: whole line in Ray's session logs]"
NOISE = (
    # Ray core (C++ error level), once per actor that Ray Train (PreemptionWatcher) or a Ray Data
    # actor pool creates: its constructor arguments sit in the object store while restarts are
    # enabled (ray-project/ray#53727). A known limitation of those libraries; nothing to act on.
    "has constructor arguments in the object store and max_restarts > 0",
    # Ray Serve's proxy prints the whole route table (~700 chars) on every deployment update.
    "Got updated endpoints:",
)


def console_lines(lines: list[str], max_chars: int = MAX_LINE_CHARS) -> list[str]:
    """``lines`` as the console shows them: ``NOISE`` dropped, lines longer than ``max_chars``
    cut to it (pure: tested)."""
    shown = []
    for line in lines:
        if any(noise in line for noise in NOISE):
            continue
        if len(line) > max_chars and TQDM_MAGIC not in line:
            line = line[: max_chars - len(CUT_NOTE)] + CUT_NOTE
        shown.append(line)
    return shown


def prefix_chars(batch: dict[str, Any]) -> int:
    """Characters Ray puts before each line of ``batch``: "(name pid=N, ip=...) " and two colour
    codes (an over-estimate by the IP, which it prints only for other nodes)."""
    name = batch.get("actor_name") or batch.get("task_name") or ""
    return len(f"({name} pid={batch.get('pid', '')}, ip={batch.get('ip', '')}) ") + 9


def _filtered(print_batch: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def handle(batch: dict[str, Any]) -> None:
        lines = console_lines(batch.get("lines", []), max(MAX_LINE_CHARS - prefix_chars(batch), 80))
        if lines:
            print_batch({**batch, "lines": lines})

    handle.is_console_filter = True  # type: ignore[attr-defined]
    return handle


def install_console_filter() -> bool:
    """Wrap the driver's printer of worker output (after ``ray.init``); True when installed."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray: print everything, as Ray does
        return False
    with dispatcher._lock:
        handlers = dispatcher.handlers
        for i, (name, handle) in enumerate(handlers):
            if name == "ray_print_logs" and not getattr(handle, "is_console_filter", False):
                handlers[i] = (name, _filtered(handle))
                return True
    return any(getattr(handle, "is_console_filter", False) for _, handle in dispatcher.handlers)
