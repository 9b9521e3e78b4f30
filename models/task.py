"""Training wrapper: adds the losses to a ranker and stays separate from it (TorchRec style).

The model returns logits (B, N, tasks) or a ``RankerOutput`` with auxiliary terms; the
wrapper adds per-task BCE over real candidate slots, shallow-layer auxiliary BCE
(TokenMixer-Large), and the model's own regularisers (MoE balance/sparsity, memory loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.batch import GroupBatch
from models.ranker import RankerOutput


def logits_of(out: RankerOutput | torch.Tensor) -> torch.Tensor:
    """(B, C, T) logits of any model's forward: rankers return a ``RankerOutput``, the
    baselines (models/baselines.py) their logits."""
    return out.logits if isinstance(out, RankerOutput) else out


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-task BCE averaged over real candidate slots: (B, N, tasks) -> (tasks,)."""
    weight = mask.unsqueeze(-1).to(logits.dtype)  # (B, N, 1)
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weight
    return loss.sum(dim=(0, 1)) / weight.sum().clamp_min(1.0)


@dataclass(frozen=True)
class TaskConfig:
    task_weights: tuple[float, ...] = (1.0, 1.0)
    # Shallow-layer auxiliary BCE weight (TokenMixer-Large; lambda is our choice, MODELS.md §3).
    aux_logit_weight: float = 0.1


class RankingTask(nn.Module):
    """``loss, logs = task(batch)``; the wrapped model is ``task.model``."""

    def __init__(self, model: nn.Module, config: TaskConfig = TaskConfig()) -> None:
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, batch: GroupBatch) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.labels is None:
            raise ValueError("RankingTask needs a batch with labels")
        out = self.model(batch)
        out = out if isinstance(out, RankerOutput) else RankerOutput(logits=out)
        weights = torch.tensor(self.config.task_weights, dtype=out.logits.dtype, device=out.logits.device)
        if weights.numel() != out.logits.shape[-1]:
            raise ValueError(f"task_weights has {weights.numel()} entries for {out.logits.shape[-1]} tasks")
        per_task = masked_bce(out.logits, batch.labels, batch.cand_mask)
        loss = (per_task * weights).sum()
        logs = {f"bce_{name}": float(v) for name, v in zip(GroupBatch.TASKS, per_task.detach())}
        for i, aux in enumerate(out.aux_logits):
            aux_loss = (masked_bce(aux, batch.labels, batch.cand_mask) * weights).sum()
            loss = loss + self.config.aux_logit_weight * aux_loss
            logs[f"aux_bce_{i}"] = float(aux_loss.detach())
        for name, value in out.aux_losses.items():
            loss = loss + value
            logs[name] = float(value.detach())
        logs.update(out.metrics)
        logs["loss"] = float(loss.detach())
        return loss, logs

    @torch.no_grad()
    def evaluate(self, batch: GroupBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Logits (B, N, tasks) and per-task BCE of the model as it is served: eval mode (the
        MoE inference router, no training-only terms), no gradients. Validation metrics come
        from here, so what is validated is what is served; the previous mode is restored."""
        if batch.labels is None:
            raise ValueError("RankingTask.evaluate needs a batch with labels")
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(batch)
        finally:
            self.model.train(was_training)
        logits = logits_of(out)
        per_task = masked_bce(logits, batch.labels, batch.cand_mask)
        return logits, {f"bce_{name}": float(v) for name, v in zip(GroupBatch.TASKS, per_task)}
