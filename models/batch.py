"""The model's input contract: one batch of user-candidate groups, as tensors.

B groups, each one user with a behaviour sequence and N candidates. Built by
``components.collate`` from sample rows (training) or from a request (serving).

Conventions
- Index 0 is padding in every id field; ``1`` is the out-of-vocabulary row.
- Sequences are LEFT-padded: the most recent event sits at position L-1, and the
  valid events of row b are positions ``L - seq_len[b] .. L-1`` (oldest first).
- Candidate slots ``n >= num_candidates`` are padding (``cand_mask`` False).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

# Fixed vocabulary sizes of the categorical side features (shared by data and models).
NUM_ACTIONS = 12  # 0 pad, 1..11 value buckets (ratings 0.5..5 -> 1..10, 11 = other)
NUM_GAP_BUCKETS = 32  # log2 buckets of (request_ts - event_ts) in seconds, 0 = pad
NUM_GENRES = 20  # genre multi-hot width
NUM_YEAR_BUCKETS = 32  # 0 unknown, 1..31 five-year buckets
# Width of GroupBatch.user_dense: history size, mean action, recency (components/collate.py).
NUM_USER_DENSE = 3


@dataclass
class GroupBatch:
    """A batch of B groups; every tensor's leading dim is B."""

    user_id: torch.Tensor  # (B,) int64, vocabulary index of the user (hashed into a table)
    user_dense: torch.Tensor  # (B, F_ud) float32, user features known at request time
    seq_item: torch.Tensor  # (B, L) int64, item index, left-padded with 0
    seq_action: torch.Tensor  # (B, L) int64, action bucket 1..NUM_ACTIONS-1, 0 = pad
    seq_gap: torch.Tensor  # (B, L) int64, time-gap bucket 1..NUM_GAP_BUCKETS-1, 0 = pad
    seq_len: torch.Tensor  # (B,) int64, number of valid events (<= L)
    cand_item: torch.Tensor  # (B, N) int64, item index, 0 = padding slot
    cand_genres: torch.Tensor  # (B, N, NUM_GENRES) float32 multi-hot
    cand_year: torch.Tensor  # (B, N) int64 year bucket
    cand_tags: torch.Tensor  # (B, N, n_tags) int64 tag index, 0 = none
    cand_mask: torch.Tensor  # (B, N) bool, True for real candidate slots
    labels: torch.Tensor | None = None  # (B, N, n_tasks) float32, tasks = ("engage", "like")

    TASKS = ("engage", "like")
    # Fields by axis: per candidate slot (B, N, ...), and the left-padded sequence (B, L).
    CANDIDATE_FIELDS = ("cand_item", "cand_genres", "cand_year", "cand_tags", "cand_mask", "labels")
    SEQUENCE_FIELDS = ("seq_item", "seq_action", "seq_gap")

    @property
    def batch_size(self) -> int:
        return int(self.user_id.shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.cand_item.shape[1])

    def to(self, device: torch.device | str) -> GroupBatch:
        return replace(
            self,
            **{f.name: getattr(self, f.name).to(device) for f in fields(self) if getattr(self, f.name) is not None},
        )

    def candidate_slice(self, index: torch.Tensor) -> GroupBatch:
        """Keep candidate slots ``index`` (1-D LongTensor) of every group, same order."""
        return replace(
            self,
            **{
                name: getattr(self, name).index_select(1, index)
                for name in self.CANDIDATE_FIELDS
                if getattr(self, name) is not None
            },
        )

    @staticmethod
    def stack(batches: list[GroupBatch]) -> GroupBatch:
        """Groups of several batches in one, in order: sequences left-padded to the longest,
        candidate slots right-padded (``cand_mask`` False) to the most candidates. A group's real
        slots score as they did alone (serving scores a whole scheduler batch in one call)."""
        if not batches:
            raise ValueError("GroupBatch.stack needs at least one batch")
        if len({b.labels is None for b in batches}) != 1:
            raise ValueError("GroupBatch.stack: batches with and without labels")
        length = max(b.seq_item.shape[1] for b in batches)
        slots = max(b.num_candidates for b in batches)

        def left(t: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, length), zeros in front
            return torch.nn.functional.pad(t, (length - t.shape[1], 0))

        def right(t: torch.Tensor) -> torch.Tensor:  # (B, N, ...) -> (B, slots, ...), zeros behind
            pad = [0, 0] * (t.dim() - 2) + [0, slots - t.shape[1]]
            return torch.nn.functional.pad(t, pad)

        out = {}
        for f in fields(GroupBatch):
            parts = [getattr(b, f.name) for b in batches]
            if parts[0] is None:
                out[f.name] = None
            elif f.name in GroupBatch.SEQUENCE_FIELDS:
                out[f.name] = torch.cat([left(p) for p in parts])
            elif f.name in GroupBatch.CANDIDATE_FIELDS:
                out[f.name] = torch.cat([right(p) for p in parts])
            else:
                out[f.name] = torch.cat(parts)
        return GroupBatch(**out)

    def per_candidate(self) -> GroupBatch:
        """B*N groups of ONE candidate each (user fields repeated): the no-reuse layout.

        Row ``b * N + n`` holds group b's user side and its candidate n.
        """
        n = self.num_candidates
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif f.name not in self.CANDIDATE_FIELDS:  # the user side, repeated per candidate
                out[f.name] = value.repeat_interleave(n, dim=0)
            else:
                out[f.name] = value.reshape(self.batch_size * n, 1, *value.shape[2:])
        return GroupBatch(**out)
