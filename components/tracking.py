"""Experiment tracking with Weights & Biases: one small wrapper shared by train and evaluate.

Mode: ``WANDB_MODE`` when set (``disabled`` in tests), else online when ``WANDB_API_KEY`` is
set, else offline — files under ``<dir>/wandb`` that ``wandb sync`` uploads later. In Ray
Train only rank 0 tracks (Train V2 rejects Tune's W&B callback; this is what
``ray.air.integrations.wandb.setup_wandb(rank_zero_only=True)`` does, without its Tune
assumptions). A tracking failure never fails a run: it is logged and tracking turns off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

PROJECT = "ultrarank"


def wandb_mode() -> str:
    """The mode a run would use now (see module docstring)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


class Tracker:
    """``log``/``summary``/``finish`` on a W&B run, or nothing when inactive (other ranks, disabled)."""

    def __init__(self, run: Any = None) -> None:
        self._run = run

    @classmethod
    def start(
        cls,
        name: str,
        config: Mapping[str, Any],
        directory: str,
        job_type: str = "train",
        group: str | None = None,
        active: bool = True,
    ) -> Tracker:
        """A W&B run under ``directory``/wandb (``active=False``: a no-op tracker)."""
        mode = wandb_mode()
        if not active or mode == "disabled":
            return cls(None)
        try:
            import wandb

            directory = os.path.abspath(os.path.expanduser(directory))
            os.makedirs(directory, exist_ok=True)
            run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", PROJECT),
                name=name,
                group=group,
                job_type=job_type,
                config=dict(config),
                dir=directory,
                mode=mode,
                reinit="create_new",
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as exc:  # tracking is never worth a failed run
            logger.warning("W&B tracking off: wandb.init failed: %s", exc)
            return cls(None)
        return cls(run)

    @property
    def active(self) -> bool:
        return self._run is not None

    @property
    def path(self) -> str:
        """Where the run is: its URL online, its local folder offline; "" when inactive."""
        if self._run is None:
            return ""
        if wandb_mode() == "online" and getattr(self._run, "url", None):
            return str(self._run.url)
        return os.path.dirname(str(self._run.dir))  # .../wandb/offline-run-<time>-<id>

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(dict(metrics), step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(dict(values))

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
