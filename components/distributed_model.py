"""The model as it trains: TorchRec-sharded embedding tables + DDP dense parameters, one step.

``DistributedRanker.build`` wraps ``RankingTask(model)`` in TorchRec's
``DistributedModelParallel`` (DMP). DMP shards every TorchRec table — the ranker's
``SparseArch`` (an ``EmbeddingCollection``) and the MSN/LMN memory value tables (weighted
``EmbeddingBagCollection``\\ s) — over the ranks with a planner restricted to the configured
sharding types, and wraps the rest in DDP. The tables' optimizers are FBGEMM's fused ones,
applied inside the backward (row-wise Adagrad by default: one float of state per row, where
Adam would hold two per element); the dense parameters get AdamW. One ``step()`` after one
backward updates both, synchronously on every rank.

Baselines (``models/baselines.py``) have plain ``nn.Embedding`` tables and no TorchRec module:
DMP then only wraps them in DDP and AdamW updates everything densely.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from models.task import RankingTask

logger = logging.getLogger(__name__)

# TrainConfig.sparse_optimizer -> FBGEMM's fused optimizer name (EmbOptimType member).
FUSED_OPTIMIZERS = {
    "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD",
    "adagrad": "EXACT_ADAGRAD",
    "sgd": "EXACT_SGD",
    "adam": "ADAM",
}


@dataclass(frozen=True)
class ShardingSpec:
    """What the planner and the fused optimizers need (from ``TrainConfig``)."""

    sharding_types: tuple[str, ...] = ("table_wise", "column_wise")
    sparse_optimizer: str = "rowwise_adagrad"
    sparse_lr: float = 0.05
    memory_lr: float = 0.05
    lr: float = 1e-3
    weight_decay: float = 0.0
    fused_optimizer: bool = True  # AdamW(fused=True): one kernel over every dense parameter


def torchrec_tables(module: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """(module path, table name, owning TorchRec module) of every TorchRec table in ``module``."""
    from torchrec import EmbeddingBagCollection, EmbeddingCollection

    for path, sub in module.named_modules():
        if isinstance(sub, EmbeddingCollection):
            for config in sub.embedding_configs():
                yield path, config.name, sub
        elif isinstance(sub, EmbeddingBagCollection):
            for config in sub.embedding_bag_configs():
                yield path, config.name, sub


def _table_values(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every TorchRec table weight of the unsharded ``module``, by state-dict key."""
    state = module.state_dict()
    keys = (
        f"{path}.{attr}.{name}.weight"
        for path, name, _ in torchrec_tables(module)
        for attr in ("embeddings", "embedding_bags")
    )
    return {key: state[key].detach().clone() for key in keys if key in state}


@torch.no_grad()
def _copy_into_shards(module: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    """Write each full table of ``initial`` into this rank's shards of it (row and column offsets)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    state = module.state_dict()
    missing = sorted(set(initial) - set(state))
    if missing:
        raise RuntimeError(f"sharded model has no state entries {missing} for the tables' initial values")
    for key, full in initial.items():
        value = state[key]
        if not isinstance(value, ShardedTensor):  # a table DMP left whole (data_parallel)
            value.copy_(full)
            continue
        for shard in value.local_shards():
            index = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
            shard.tensor.copy_(full[index])


def _fused_params(optimizer: str, lr: float) -> dict:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    if optimizer not in FUSED_OPTIMIZERS:
        raise ValueError(f"sparse optimizer {optimizer!r} is not one of {list(FUSED_OPTIMIZERS)}")
    return {"optimizer": getattr(EmbOptimType, FUSED_OPTIMIZERS[optimizer]), "learning_rate": lr}


class DistributedRanker:
    """``RankingTask`` under DMP with its combined (fused sparse + AdamW dense) optimizer.

    ``module`` is the DMP; ``module(batch)`` returns ``(loss, logs)`` like ``RankingTask``.
    """

    def __init__(self, module: nn.Module, dense_optimizer: torch.optim.Optimizer, dense_names: list[str]) -> None:
        self.module = module
        self.dense_optimizer = dense_optimizer
        self.dense_names = dense_names

    @classmethod
    def build(cls, task: RankingTask, spec: ShardingSpec, device: torch.device) -> DistributedRanker:
        """Shard ``task`` over the default process group (which must be initialised)."""
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        if not dist.is_initialized():
            raise RuntimeError("DistributedRanker.build needs an initialised torch.distributed process group")
        # Sequence tables (EmbeddingCollection) at the sparse rate; memory values (the only
        # EmbeddingBagCollections) at the memory's own rate (MODELS.md §6): one sharder each.
        sharders = [
            EmbeddingCollectionSharder(fused_params=_fused_params(spec.sparse_optimizer, spec.sparse_lr)),
            EmbeddingBagCollectionSharder(fused_params=_fused_params(spec.sparse_optimizer, spec.memory_lr)),
        ]
        tables = [name for _, name, _ in torchrec_tables(task)]
        if len(set(tables)) != len(tables):
            raise ValueError(f"TorchRec table names must be unique in a model, got {tables}")
        constraints = {name: ParameterConstraints(sharding_types=list(spec.sharding_types)) for name in tables}
        topology = Topology(world_size=dist.get_world_size(), compute_device=device.type)
        planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
        plan = planner.collective_plan(task, sharders, dist.GroupMember.WORLD)
        # DMP re-draws every sharded table shard by shard with its init_fn, so the values would
        # not be the ones the seed gave the unsharded model: keep those and copy them back.
        initial = _table_values(task)
        module = DistributedModelParallel(task, device=device, sharders=sharders, plan=plan)
        _copy_into_shards(module, initial)
        dense = dict(in_backward_optimizer_filter(module.named_parameters()))
        optimizer = dense_adamw(list(dense.values()), spec)
        init_adamw_state(optimizer)
        return cls(module, optimizer, list(dense))

    # ---------------------------------------------------------------- parts
    @property
    def task(self) -> RankingTask:
        return self.module.module  # DMP -> RankingTask (its dense part is DDP-wrapped inside)

    def fused_optimizer(self):
        return self.module.fused_optimizer

    def zero_grad(self) -> None:
        self.dense_optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Dense AdamW step (the tables were already updated in the backward by the fused optimizer)."""
        self.dense_optimizer.step()

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.dense_optimizer.param_groups for p in group["params"]]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Tensors only (``torch.distributed.checkpoint`` layout): model, fused sparse and dense
        optimizer state. Keys of ``model`` are the unsharded model's (loadable without DMP)."""
        prefix = "model."
        model = {k[len(prefix) :]: v for k, v in self.module.state_dict().items() if k.startswith(prefix)}
        return {"model": model, "sparse_opt": self.fused_optimizer().state_dict()["state"], "dense_opt": self._dense()}

    def _dense(self) -> dict[str, dict[str, torch.Tensor]]:
        state = self.dense_optimizer.state
        return {name: state[p] for name, p in zip(self.dense_names, self.dense_parameters())}

    def load_state_dict(self, state: dict) -> None:
        """Copy a :meth:`state_dict`-shaped mapping (as filled in place by ``dcp.load``) back."""
        self.module.load_state_dict({f"model.{k}": v for k, v in state["model"].items()})
        fused = self.fused_optimizer()
        current = fused.state_dict()  # param_groups too when TorchRec saves them
        fused.load_state_dict({**current, "state": state["sparse_opt"]})
        for name, p in zip(self.dense_names, self.dense_parameters()):
            for key, value in state["dense_opt"][name].items():
                self.dense_optimizer.state[p][key].copy_(value)

    def sparse_state_bytes(self) -> int:
        """Bytes of the fused sparse optimizer state held by this rank."""
        total = 0
        for per_param in self.fused_optimizer().state_dict()["state"].values():
            for value in per_param.values():
                total += _local_bytes(value)
        return total


def _local_bytes(value) -> int:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


def dense_adamw(params: list[nn.Parameter], spec: ShardingSpec) -> torch.optim.AdamW:
    """AdamW of the dense parameters: torch's fused kernel when ``spec.fused_optimizer``, else
    its per-tensor (foreach) loop. Both compute the same update; the state dict is the same."""
    fused = {"fused": True} if spec.fused_optimizer else {"foreach": True}
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, **fused)


def init_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """Create AdamW's state now (it is lazy): a checkpoint then always holds every entry, and
    ``dcp.load`` can fill it in place. Zeros and step 0 are exactly what the first step creates."""
    for group in optimizer.param_groups:
        if group.get("amsgrad"):
            raise ValueError("init_adamw_state: amsgrad is not supported")
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.tensor(0.0, dtype=torch.float32),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
