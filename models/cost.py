"""Cost accounting: parameter counts (dense vs sparse), FLOPs per candidate, peak matmul rate.

MODELS.md §8: params are reported dense and sparse separately; FLOPs per candidate count a
matmul as 2mnk; MFU = achieved FLOP/s / the measured peak matmul FLOP/s of the same machine
and dtype (``measure_peak_matmul_flops``), never a datasheet number.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger(__name__)

# TorchRec table containers, matched by class name along the MRO so that this module never
# imports torchrec (models/ stays importable without it) and sharded/fused variants count too.
_TORCHREC_TABLE_CLASSES = frozenset(
    {
        "EmbeddingBagCollection",
        "EmbeddingCollection",
        "ShardedEmbeddingBagCollection",
        "ShardedEmbeddingCollection",
        "FusedEmbeddingBagCollection",
        "FusedEmbeddingCollection",
        "ShardedQuantEmbeddingBagCollection",
        "ShardedQuantEmbeddingCollection",
    }
)


def is_sparse_module(module: nn.Module) -> bool:
    """True for embedding tables: nn.Embedding, nn.EmbeddingBag, TorchRec EBC / EC (and subclasses)."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return True
    return any(
        cls.__name__ in _TORCHREC_TABLE_CLASSES and cls.__module__.startswith("torchrec")
        for cls in type(module).__mro__
    )


def sparse_tensor_ids(model: nn.Module) -> set[int]:
    """``id()`` of every parameter and buffer owned (at any depth) by an embedding table."""
    ids: set[int] = set()
    for module in model.modules():
        if is_sparse_module(module):
            ids.update(id(p) for p in module.parameters())
            ids.update(id(b) for b in module.buffers())
    return ids


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"dense": n, "sparse": n}``: numbers of parameter elements; shared tensors count once.

    Sparse = anything inside an embedding table (see ``is_sparse_module``); dense = the rest.
    Counts ``nn.Parameter``s only, so count the float model, not a quantized copy (whose
    int8 weights are buffers).
    """
    sparse_ids = sparse_tensor_ids(model)
    counts = {"dense": 0, "sparse": 0}
    for param in model.parameters():  # already de-duplicated by identity
        counts["sparse" if id(param) in sparse_ids else "dense"] += param.numel()
    return counts


def _int8pack_mm_flops(a_shape: tuple[int, ...], b_shape: tuple[int, ...], *args: Any, **kwargs: Any) -> int:
    """W8A16 matmul (models/quant.py): A (M, K) x int8 B (N, K)ᵀ is a GEMM of 2·M·N·K."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[0]


def _baddbmm_flops(
    self_shape: tuple[int, ...], a_shape: tuple[int, ...], b_shape: tuple[int, ...], *args: Any, **kwargs: Any
) -> int:
    """``C += A @ B`` in place, A (b, m, k), B (b, k, n): 2·b·m·n·k, as the out-of-place op."""
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


# FlopCounterMode knows no formula for the int8 kernel nor for in-place baddbmm_ (UG-Sep accumulates its
# cached user share that way); without these a quantized model looks free and UG-Sep looks cheaper than it is.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._weight_int8pack_mm: _int8pack_mm_flops,
    torch.ops.aten.baddbmm_: _baddbmm_flops,
}


def count_flops(fn: Callable[[], object], backward: bool = False) -> float:
    """FLOPs of ``fn()``: matmuls at 2mnk, element-wise ops free (MODELS.md §8). Run without
    gradients, unless ``backward`` (``fn`` runs forward and backward: a training step's count)."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with torch.set_grad_enabled(backward), counter:
        fn()
    return float(counter.get_total_flops())


def flops_per_candidate(model: nn.Module, batch: Any) -> float:
    """Forward FLOPs of ``model(batch)`` divided by B·N (every candidate slot, padded ones too).

    Counted with ``torch.utils.flop_counter.FlopCounterMode``: matmul/bmm/einsum/conv and the
    W8A16 int8 kernel at 2mnk; element-wise ops, softmax and embedding gathers count zero (MODELS.md §8). ``batch``
    must expose ``batch_size`` and ``num_candidates`` (``models.batch.GroupBatch`` does).
    """
    slots = int(batch.batch_size) * int(batch.num_candidates)
    if slots <= 0:
        raise ValueError(f"flops_per_candidate: batch has {slots} candidate slots (B·N must be > 0)")
    return count_flops(lambda: model(batch)) / slots


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_matmul_flops(
    dtype: torch.dtype = torch.float32,
    size: int = 2048,
    seconds: float = 1.0,
    device: torch.device | str = "cpu",
) -> float:
    """Best-observed FLOP/s of a ``size``² x ``size``² GEMM in ``dtype`` on ``device``.

    Repeats the GEMM for about ``seconds`` and keeps the fastest run: the denominator of
    MFU is what this machine can do at best, and shared machines only ever make runs slower.
    """
    if size <= 0 or seconds <= 0:
        raise ValueError(f"measure_peak_matmul_flops: size={size} and seconds={seconds} must be positive")
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool start, kernel selection
    _sync(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        end = time.perf_counter()
        best = min(best, end - start)
        if end >= deadline:
            break
    peak = 2.0 * size**3 / best
    logger.info("peak matmul %s n=%d on %s: %.3g FLOP/s", dtype, size, device, peak)
    return peak
