"""The dense learning rate over a run: one rule for the trainer and the reference loop.

``lr_factor(schedule, step, total_steps)`` multiplies the configured rate before the optimiser
step that follows ``step`` steps already taken. It is a function of the step alone (no scheduler
state), so a resumed run continues on the same curve from its checkpointed step.
"""

from __future__ import annotations

LR_SCHEDULES = ("constant", "linear")


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """1 for ``constant``; for ``linear``, ``1 - step / total_steps``: the first step at the full
    rate, falling in a straight line to ``1 / total_steps`` of it at the last step."""
    if schedule == "constant":
        return 1.0
    if schedule != "linear":
        raise ValueError(f"learning-rate schedule {schedule!r} is not one of {list(LR_SCHEDULES)}")
    if total_steps < 1 or not 0 <= step < total_steps:
        raise ValueError(f"linear schedule: step {step} outside [0, total_steps={total_steps})")
    return 1.0 - step / total_steps
