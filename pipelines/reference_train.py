"""Single-process reference training loop over ``models/``: the yardstick of the Ray Train path.

Plain PyTorch, no Ray, no TorchRec sharding: the pinned lake's train split is read and resolved
in memory (components/sequence_join.py), collated by the serving/training collator
(components/collate.py) into ``GroupBatch``\\ es, and the model of ``--model.variant`` is trained
by ONE Adam over every parameter (tables included) for ``--epochs`` epochs. After every epoch
it scores the valid and test splits in eval mode (what is served) and reports the test metrics
of the best-valid epoch. What this loop reaches, the real path (pipelines/train.py) must reach
too: a gap between the two is in the distributed path, not in the models.

    python -m pipelines.reference_train --config demo --model.variant=longer --epochs 3 --json ref.json

Also the tool of the bisect in MODELS.md ("The reference loop"): the same command on an older
checkout of ``models/`` tells whether a change to the models costs ranking quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from components import lake
from components.collate import CollateConfig, collate_groups
from components.lr_schedule import LR_SCHEDULES, lr_factor
from components.metrics import MetricsAccumulator
from components.sequence_join import SEQUENCE_COLUMNS, resolve_sequences
from components.training_data import TrainingData, pin_training_data, rare_id_maps, resolved_model, train_counts
from models.batch import GroupBatch
from models.task import RankingTask
from models.variants import build_model
from pipelines.cli import pipeline_main
from pipelines.config import PipelineConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceSpec:
    """The loop's own settings; the model, the lake and the sequence length (``train.max_seq_len``)
    come from the preset, as for the trainer."""

    epochs: int = 3
    batch_size: int = 64  # groups per step
    lr: float = 1e-3  # Adam, every parameter
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    warmup_steps: int = 0  # the rate rises linearly to ``lr`` over these first steps; 0 = none
    # The Adam's rate over the run, as the trainer's ``train.lr_schedule`` (components/lr_schedule.py).
    lr_schedule: str = "constant"
    # "adam": the one Adam above also updates the TorchRec tables; "rowwise_adagrad": the tables
    # get the real path's fused optimizer (FBGEMM's exact row-wise Adagrad, written out below) at
    # ``table_lr`` (the sequence tables) and ``memory_lr`` (MSN/LMN values), as pipelines/train.py.
    table_optimizer: str = "adam"
    table_lr: float = 0.05
    memory_lr: float = 0.05

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.table_optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"--table-optimizer must be one of {list(TABLE_OPTIMIZERS)}, got {self.table_optimizer!r}")
        if not (self.table_lr > 0 and self.memory_lr > 0):
            raise ValueError(f"--table-lr and --memory-lr must be > 0, got {self.table_lr}, {self.memory_lr}")


TABLE_OPTIMIZERS = ("adam", "rowwise_adagrad")


class RowwiseAdagrad(torch.optim.Optimizer):
    """FBGEMM's EXACT_ROWWISE_ADAGRAD on dense gradients: per row, ``state += mean(g²)`` and
    ``w -= lr · g / (sqrt(state) + eps)``. Rows outside the batch have zero gradient and move by
    nothing, as in the fused sparse kernel; weight decay 0, the real path's setting."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.reshape(p.shape[0], -1)
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=p.dtype)
                state["sum"] += g.pow(2).mean(1)
                p.reshape(p.shape[0], -1).addcdiv_(
                    g, state["sum"].sqrt().add_(group["eps"]).unsqueeze(1), value=-group["lr"]
                )


def table_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The TorchRec tables the real path shards and updates with its fused optimizer: the
    sequence tables (``EmbeddingCollection``) and the memory values (``EmbeddingBagCollection``)."""
    from torchrec import EmbeddingBagCollection, EmbeddingCollection

    sequence, memory = [], []
    for module in model.modules():
        if isinstance(module, EmbeddingCollection):
            sequence += list(module.parameters())
        elif isinstance(module, EmbeddingBagCollection):
            memory += list(module.parameters())
    return sequence, memory


def load_split(data: TrainingData, split: str, max_seq_len: int) -> pa.Table:
    """Every resolved group of ``split`` at the pinned versions, in (bucket, storage) order."""
    samples = lake.PinnedTable(lake.table_uri(data.lake_root, "samples"), data.samples_version, data.storage_options)
    sequences = lake.PinnedTable(
        lake.table_uri(data.lake_root, "sequences"), data.sequences_version, data.storage_options
    )
    rows = samples.read(filters=pc.field("split") == split)
    if rows.num_rows == 0:
        raise lake.LakeError(f"samples table {samples.uri} has no rows of split {split!r}")
    return resolve_sequences(rows, sequences.read(["user_id", *SEQUENCE_COLUMNS]), max_seq_len)


def id_counts(data: TrainingData, valid: pa.Table) -> dict[str, np.ndarray]:
    """:func:`components.training_data.train_counts`; a lake that records no cut-off (features runs
    before it was recorded) is given the first valid request's time."""
    counts = train_counts(data)
    if counts is None:
        counts = train_counts(dataclasses.replace(data, valid_start_ts=pc.min(valid["request_ts"]).as_py()))
    return counts


@torch.no_grad()
def served_logits(model: torch.nn.Module, batch: GroupBatch) -> torch.Tensor:
    """(B, N, tasks) logits in eval mode, as served. Written out here rather than through
    ``RankingTask.evaluate`` so the loop also runs over older checkouts of ``models/`` (bisects)."""
    model.eval()
    try:
        out = model(batch)
    finally:
        model.train()
    return getattr(out, "logits", out)


def score_split(model: torch.nn.Module, table: pa.Table, collate: CollateConfig, warm: np.ndarray) -> dict[str, float]:
    """Metrics of the model in eval mode over every group of ``table``, warm and cold apart too."""
    acc = MetricsAccumulator()
    for start in range(0, table.num_rows, 256):
        chunk = table.slice(start, 256)
        batch = collate_groups(chunk, collate)
        logits = served_logits(model, batch)
        acc.update(logits, batch.labels, batch.cand_mask, chunk.column("user_id").to_numpy(), warm[batch.cand_item])
    return acc.compute()


def warmup_schedule(
    optimizer: torch.optim.Optimizer, steps: int, schedule: str = "constant", total_steps: int = 1
) -> torch.optim.lr_scheduler.LambdaLR:
    """The rate times ``min(1, (step + 1) / steps)`` (linear warmup over ``steps``; 0: none) and
    times ``lr_factor(schedule, step, total_steps)``, the trainer's schedule."""
    steps = max(steps, 1)
    factor = lambda step: min(1.0, (step + 1) / steps) * lr_factor(schedule, min(step, total_steps - 1), total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_reference(config: PipelineConfig, spec: ReferenceSpec) -> dict:
    """Train, score valid and test after every epoch; the run's record (best epoch by valid like AUC)."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    data = pin_training_data(config.lake.root, config.lake.storage_options)
    started = time.perf_counter()
    max_seq_len = config.train.max_seq_len or data.max_seq_len
    splits = {s: load_split(data, s, max_seq_len) for s in ("train", "valid", "test")}
    counts = id_counts(data, splits["valid"])
    warm = counts["item"] > 0  # the warm items of evaluation (components.training_data.warm_items)
    logger.info(
        "reference: %s groups train/valid/test %s, %d warm items, loaded in %.1f s",
        config.model.variant,
        [t.num_rows for t in splits.values()],
        int(warm.sum()),
        time.perf_counter() - started,
    )
    model = build_model(resolved_model(config.model, data))
    f = config.features
    try:
        from models.id_rows import share_rare_ids
    except ImportError:  # an older checkout of models/ (a bisect): every id keeps its own row
        logger.info("reference: models/ has no id_rows: rare ids keep their own rows")
    else:
        shared = share_rare_ids(model, rare_id_maps(counts, f.min_item_count, f.min_user_count))
        logger.info("reference: rare ids share the OOV row: %s", shared)
    task = RankingTask(model)
    tables: list[torch.optim.Optimizer] = []
    params = list(task.parameters())
    if spec.table_optimizer == "rowwise_adagrad":
        sequence, memory = table_parameters(task)
        fused = {id(p) for p in sequence + memory}
        params = [p for p in params if id(p) not in fused]
        tables = [RowwiseAdagrad(ps, lr) for ps, lr in ((sequence, spec.table_lr), (memory, spec.memory_lr)) if ps]
    optimizer = torch.optim.Adam(params, lr=spec.lr)
    total_steps = spec.epochs * -(-splits["train"].num_rows // spec.batch_size)
    schedule = warmup_schedule(optimizer, spec.warmup_steps, spec.lr_schedule, total_steps)
    collate = CollateConfig(max_seq_len=max_seq_len)
    rng = np.random.default_rng(spec.seed)
    train = splits["train"]
    epochs = []
    for epoch in range(spec.epochs):
        task.train()
        order = rng.permutation(train.num_rows)
        losses = []
        for start in range(0, train.num_rows, spec.batch_size):
            batch = collate_groups(train.take(order[start : start + spec.batch_size]), collate)
            loss, _ = task(batch)
            for opt in (optimizer, *tables):
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in (optimizer, *tables):
                opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "valid": score_split(model, splits["valid"], collate, warm),
            "test": score_split(model, splits["test"], collate, warm),
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
        epochs.append(record)
        logger.info(
            "reference: epoch %d loss %.4f valid like_auc %.4f test like_auc %.4f (warm %.4f) %.0f s",
            epoch,
            record["train_loss"],
            record["valid"]["like_auc"],
            record["test"]["like_auc"],
            record["test"].get("like_auc_warm", float("nan")),
            record["elapsed_s"],
        )
    best = max(epochs, key=lambda r: r["valid"]["like_auc"])
    return {
        "variant": config.model.variant,
        "spec": asdict(spec),
        "max_seq_len": max_seq_len,
        "model": asdict(config.model),
        "samples_version": data.samples_version,
        "best_epoch": best["epoch"],
        "valid": best["valid"],
        "test": best["test"],
        "epochs": epochs,
    }


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ReferenceSpec()
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs (best-valid one reported)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="groups per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate of every parameter")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="model init and data order")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (0: default)")
    parser.add_argument(
        "--warmup-steps", type=int, default=defaults.warmup_steps, help="linear learning-rate warmup (0: none)"
    )
    parser.add_argument(
        "--lr-schedule", choices=LR_SCHEDULES, default=defaults.lr_schedule, help="the Adam's rate over the run"
    )
    parser.add_argument(
        "--table-optimizer",
        choices=TABLE_OPTIMIZERS,
        default=defaults.table_optimizer,
        help="the TorchRec tables' optimizer: the one Adam, or the real path's row-wise Adagrad",
    )
    parser.add_argument("--table-lr", type=float, default=defaults.table_lr, help="row-wise Adagrad rate, tables")
    parser.add_argument("--memory-lr", type=float, default=defaults.memory_lr, help="its rate, MSN/LMN values")
    parser.add_argument("--json", type=Path, default=None, help="write the run's record here")


def _main(config: PipelineConfig, args: argparse.Namespace) -> int:
    try:
        spec = ReferenceSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ReferenceSpec)})
    except ValueError as exc:
        print(f"reference_train: {exc}")
        return 2
    result = train_reference(config, spec)
    t = result["test"]
    print(
        f"{result['variant']}: best epoch {result['best_epoch']} valid like AUC {result['valid']['like_auc']:.4f}, "
        f"test like AUC {t['like_auc']:.4f} (warm {t.get('like_auc_warm', float('nan')):.4f}, "
        f"cold {t.get('like_auc_cold', float('nan')):.4f}), like UAUC {t['like_uauc']:.4f}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True))
        print(f"record: {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return pipeline_main(
        "pipelines.reference_train",
        __doc__.splitlines()[0],
        argv,
        _main,
        default_preset="demo",
        failures=(lake.LakeError,),
        add_arguments=_add_arguments,
    )


if __name__ == "__main__":
    raise SystemExit(main())
