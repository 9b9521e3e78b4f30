"""Ranking metrics of scored groups: AUC, UAUC and logloss per task (docs MODELS.md §8).

Evaluation scores B groups at a time, each one user with N candidate slots and one logit per
task (``GroupBatch.TASKS``). :class:`MetricsAccumulator` keeps the real slots only, as flat
arrays (memory O(candidates)), and computes every metric exactly at the end: AUCs are
rank-based (Mann–Whitney U with tie-averaged ranks, the same numbers as scikit-learn's
``roc_auc_score``), never binned. Accumulators filled in several Ray workers travel to the
driver as :meth:`MetricsAccumulator.state` (a dict of plain NumPy arrays) and are combined
there with :meth:`MetricsAccumulator.from_states`.

Metric keys (a contract: reports and the quality table read them), for each task ``t``:
``{t}_auc``, ``{t}_uauc``, ``{t}_logloss``, ``num_users_uauc_{t}``; plus ``like_auc_engaged``,
``num_candidates`` and ``num_groups``. An AUC over one class only is undefined and reported as
NaN; so is a UAUC with no user having both classes (then ``num_users_uauc_{t}`` is 0).

Warm and cold candidates apart (docs/DATA.md "Warm and cold items"): when every update says
which candidates are warm (an item with train-period events), the same metrics are also given
over each part, suffixed ``_warm`` and ``_cold`` (``like_auc_warm``, ``engage_uauc_cold``,
``like_logloss_warm``, ...), with ``num_candidates_warm``/``_cold``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.batch import GroupBatch

TASKS = GroupBatch.TASKS
STATE_KEYS = ("logits", "labels", "user_id", "warm", "num_groups")
PARTS = ("warm", "cold")


class MetricsError(ValueError):
    """Inputs the metrics cannot use; the message names the argument and what is wrong."""


def _numpy(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """A torch tensor (any device, any grad state) or array-like as a NumPy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise MetricsError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")
    return x


# ---------------------------------------------------------------------------------------------
# Exact metrics on flat arrays
# ---------------------------------------------------------------------------------------------
def grouped_auc(score: np.ndarray, label: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC AUC of every group at once: (auc, num_candidates, has_both_classes) per group.

    Groups are the distinct values of ``group`` in ascending order. One lexsort by (group,
    score) replaces a per-group loop: within a group, tied scores share their average rank,
    and ``AUC = (R_pos - P (P + 1) / 2) / (P N)`` with ``R_pos`` the positives' rank sum
    (Mann–Whitney U), which equals scikit-learn's trapezoidal ROC area including ties.
    A group with one class only gets auc NaN.
    """
    score, label = np.asarray(score, np.float64), np.asarray(label).astype(bool)
    _, group_code = np.unique(group, return_inverse=True)
    group_code = group_code.reshape(-1)
    num_groups = int(group_code.max()) + 1 if group_code.size else 0
    order = np.lexsort((score, group_code))
    code_sorted, score_sorted = group_code[order], score[order]
    # A new tie block starts wherever the group or the score changes.
    starts_block = np.ones(score.size, bool)
    starts_block[1:] = (code_sorted[1:] != code_sorted[:-1]) | (score_sorted[1:] != score_sorted[:-1])
    block = np.cumsum(starts_block) - 1
    group_start = np.searchsorted(code_sorted, np.arange(num_groups))
    rank_in_group = np.arange(score.size) - group_start[code_sorted] + 1.0  # 1-based
    block_rank = np.bincount(block, weights=rank_in_group) / np.bincount(block)
    is_positive = label[order]
    rank_sum = np.bincount(code_sorted, weights=np.where(is_positive, block_rank[block], 0.0), minlength=num_groups)
    num_pos = np.bincount(code_sorted, weights=is_positive, minlength=num_groups)
    num = np.bincount(code_sorted, minlength=num_groups).astype(np.float64)
    num_neg = num - num_pos
    has_both = (num_pos > 0) & (num_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where(has_both, (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg), np.nan)
    return auc, num.astype(np.int64), has_both


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Exact ROC AUC (ties counted half, as scikit-learn); NaN when only one class is present."""
    if np.size(score) == 0:
        return float("nan")
    values, _, _ = grouped_auc(score, label, np.zeros(np.size(score), np.int64))
    return float(values[0])


def uauc(score: np.ndarray, label: np.ndarray, user_id: np.ndarray) -> tuple[float, int]:
    """(UAUC, number of users counted): per-user AUC averaged with weights = the user's candidates.

    Only users having both classes count (MODELS.md §8); NaN and 0 when there is none.
    """
    per_user, num, has_both = grouped_auc(score, label, user_id)
    if not has_both.any():
        return float("nan"), 0
    return float(np.average(per_user[has_both], weights=num[has_both])), int(has_both.sum())


def logloss(logit: np.ndarray, label: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(logit) vs label, from logits (no overflow, no log(0))."""
    x, y = np.asarray(logit, np.float64), np.asarray(label, np.float64)
    if x.size == 0:
        return float("nan")
    # -log sigmoid(x) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x); softplus(z) written
    # as max(z, 0) + log1p(exp(-|z|)) never overflows, and picking z by label keeps an infinite
    # logit on the right side at loss 0 (the textbook max(x, 0) - x y + ... gives inf - inf).
    z = np.where(y > 0.5, -x, x)
    return float(np.mean(np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))))


# ---------------------------------------------------------------------------------------------
# Accumulator
# ---------------------------------------------------------------------------------------------
class MetricsAccumulator:
    """Collects the real candidate slots of scored groups; :meth:`compute` returns the metrics.

    Per real slot it keeps the logits (float32, one per task), the labels (int8), the
    user id (int64, the raw id: UAUC groups by it, so an OOV vocabulary index would merge users)
    and whether the item is warm (int8: 1 warm, 0 cold, -1 not given).
    """

    def __init__(self) -> None:
        self._logits: list[np.ndarray] = []  # (M_i, T) float32 per update
        self._labels: list[np.ndarray] = []  # (M_i, T) int8
        self._user_id: list[np.ndarray] = []  # (M_i,) int64
        self._warm: list[np.ndarray] = []  # (M_i,) int8
        self._num_groups = 0

    def update(
        self,
        logits: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        cand_mask: torch.Tensor | np.ndarray,
        user_id: torch.Tensor | np.ndarray,
        warm: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Add B groups: logits and labels (B, N, T), cand_mask (B, N) bool, user_id (B,) and
        optionally warm (B, N) bool, True where the candidate is a warm item.

        Padded slots (``cand_mask`` False) are dropped before anything is read from them, so
        their logits and labels may hold anything. Raises MetricsError on wrong shapes, on a
        real slot whose label is not 0/1 or whose logit is NaN.
        """
        logits, labels = _numpy(logits, "logits"), _numpy(labels, "labels")
        mask, user_id = _numpy(cand_mask, "cand_mask").astype(bool), _numpy(user_id, "user_id")
        if logits.ndim != 3 or logits.shape[2] != len(TASKS):
            raise MetricsError(f"logits must be (B, N, {len(TASKS)}) for tasks {TASKS}, got shape {logits.shape}")
        if labels.shape != logits.shape:
            raise MetricsError(f"labels must have the shape of logits {logits.shape}, got {labels.shape}")
        if mask.shape != logits.shape[:2]:
            raise MetricsError(f"cand_mask must be (B, N) = {logits.shape[:2]}, got {mask.shape}")
        if user_id.shape != logits.shape[:1]:
            raise MetricsError(f"user_id must be (B,) = {logits.shape[:1]}, got {user_id.shape}")
        if warm is not None:
            warm = _numpy(warm, "warm")
            if warm.shape != mask.shape:
                raise MetricsError(f"warm must be (B, N) = {mask.shape}, got {warm.shape}")
        real_logits, real_labels = logits[mask], labels[mask]  # (M, T)
        if np.isnan(real_logits).any():
            raise MetricsError(f"logits hold {int(np.isnan(real_logits).sum())} NaN value(s) in real candidate slots")
        if not np.isin(real_labels, (0, 1)).all():
            bad = real_labels[~np.isin(real_labels, (0, 1))][0]
            raise MetricsError(f"labels of real candidate slots must be 0 or 1, found {bad}")
        self._logits.append(real_logits.astype(np.float32))
        self._labels.append(real_labels.astype(np.int8))
        self._user_id.append(np.repeat(user_id.astype(np.int64), mask.sum(axis=1)))
        self._warm.append(np.full(len(real_logits), -1, np.int8) if warm is None else warm[mask].astype(np.int8))
        self._num_groups += int(mask.shape[0])

    @property
    def num_candidates(self) -> int:
        """Real candidate slots added so far."""
        return sum(len(u) for u in self._user_id)

    @property
    def num_groups(self) -> int:
        """Groups added so far (rows of every ``update``, also those without a real slot)."""
        return self._num_groups

    def state(self) -> dict[str, np.ndarray]:
        """Everything added so far as plain NumPy arrays (keys ``STATE_KEYS``): what a Ray
        worker returns to the driver; :meth:`from_states` rebuilds and combines them."""
        tasks = len(TASKS)
        return {
            "logits": np.concatenate([np.empty((0, tasks), np.float32), *self._logits]),  # (M, T)
            "labels": np.concatenate([np.empty((0, tasks), np.int8), *self._labels]),  # (M, T)
            "user_id": np.concatenate([np.empty(0, np.int64), *self._user_id]),  # (M,)
            "warm": np.concatenate([np.empty(0, np.int8), *self._warm]),  # (M,)
            "num_groups": np.array(self._num_groups, np.int64),  # ()
        }

    @classmethod
    def from_states(cls, states: Sequence[dict[str, np.ndarray]]) -> MetricsAccumulator:
        """One accumulator holding the candidates of all ``states`` (from :meth:`state`)."""
        combined = cls()
        for i, state in enumerate(states):
            if set(state) != set(STATE_KEYS):
                raise MetricsError(f"state {i} has keys {sorted(state)}, expected {sorted(STATE_KEYS)}")
            combined._logits.append(np.asarray(state["logits"], np.float32))
            combined._labels.append(np.asarray(state["labels"], np.int8))
            combined._user_id.append(np.asarray(state["user_id"], np.int64))
            combined._warm.append(np.asarray(state["warm"], np.int8))
            combined._num_groups += int(state["num_groups"])
        return combined

    def merge(self, other: MetricsAccumulator) -> MetricsAccumulator:
        """Add ``other``'s candidates to this accumulator (in place); returns self."""
        self._logits.extend(other._logits)
        self._labels.extend(other._labels)
        self._user_id.extend(other._user_id)
        self._warm.extend(other._warm)
        self._num_groups += other._num_groups
        return self

    def compute(self) -> dict[str, float]:
        """Every metric of the module docstring; MetricsError when no candidate was added."""
        if self.num_candidates == 0:
            raise MetricsError("no real candidate slot was added (empty split, or every cand_mask False?)")
        state = self.state()
        logits, labels, user_id, warm = state["logits"], state["labels"], state["user_id"], state["warm"]
        metrics: dict[str, float] = {"num_candidates": int(user_id.size), "num_groups": self._num_groups}
        metrics |= _task_metrics(logits, labels, user_id)
        # Among real events only (engage = 1), like asks the rating question: which of the items
        # the user did watch did they rate highly; sampled negatives make the plain like AUC easier.
        engaged = labels[:, TASKS.index("engage")] == 1
        like = TASKS.index("like")
        metrics["like_auc_engaged"] = auc(logits[engaged, like], labels[engaged, like])
        if warm.size and (warm >= 0).all():  # every update said which items are warm
            for part, keep in zip(PARTS, (warm == 1, warm == 0)):
                metrics[f"num_candidates_{part}"] = int(keep.sum())
                part_metrics = _task_metrics(logits[keep], labels[keep], user_id[keep])
                metrics |= {f"{k}_{part}": v for k, v in part_metrics.items() if not k.startswith("num_")}
        return metrics


def _task_metrics(logits: np.ndarray, labels: np.ndarray, user_id: np.ndarray) -> dict[str, float]:
    """AUC, UAUC (with its user count) and logloss of every task over flat candidates."""
    metrics: dict[str, float] = {}
    for t, task in enumerate(TASKS):
        metrics[f"{task}_auc"] = auc(logits[:, t], labels[:, t])
        metrics[f"{task}_uauc"], metrics[f"num_users_uauc_{task}"] = uauc(logits[:, t], labels[:, t], user_id)
        metrics[f"{task}_logloss"] = logloss(logits[:, t], labels[:, t])
    return metrics
