"""Performance against the hardware: ``python -m pipelines.bench perf [--quick] --json PATH``.

Every MFU is useful FLOPs / time / the peak GEMM rate of the same dtype, measured in the
same run before AND after the model (the higher of the two, so a noisy neighbour during one
peak measurement cannot inflate a ratio). The process runs with the training defaults:
glibc's retained heap (``components.host_memory``) and fused AdamW.

- ``train_step_mfu_fp32``: TokenMixer-Large T=17, D=544, L=4, expansion 4, batch 512;
  forward + backward + AdamW step; useful FLOPs = 3 x forward matmul FLOPs (the backward is
  two GEMMs per forward GEMM). The better of two measured steps, ``train_step_best`` says
  which: ``train_step_mfu_fp32_eager`` (eager model, fused AdamW) and
  ``train_step_mfu_fp32_compiled`` (the forward under ``torch.compile``, as ``train.compile``
  does; full runs only: compiling takes ~10-30 s here, ``train_step_compile_s``).
- ``fwd_mfu_bf16``: the same model's forward, weights and activations in bfloat16 / peak bf16.
  Null where bf16 GEMM is not native (a CPU without AVX512-BF16 or AMX, or a measured bf16
  peak below the fp32 one): ``bf16_native`` is false and ``bf16_reason`` says why.
- ``moe_over_dense_equal_active``: Sparse-Pertoken MoE (E=8, top-2, D=272, L=4) forward
  samples/s / those of the dense model with the same active FLOPs per token (the shared expert
  and two routed experts of width D are one dense SwiGLU of width 3D), at batch 512; the same
  ratio at batch 2048 beside it (experts see 4x the rows: GEMM efficiency is the limit).
- ``full_ranker_train_candidates_per_s`` and ``full_ranker_train_mfu``: the ``full`` variant
  (demo sizes) on group batches (N=32 candidates, L=512), the real training step: TorchRec
  DMP (one rank) with the fused sparse optimizer inside the backward, fused AdamW on the
  dense part. ``full_ranker_breakdown``: the step per component (``pipelines.step_profile``),
  and ``data_loading_s``: collating one such batch from Arrow (``GroupCollateFn``).
- ``features_events_per_s``: the data bench's Ray figure (start-up excluded) at 5M synthetic
  events (200k with ``--quick``), its phase breakdown, and whether the outputs are identical to
  the single-process reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from components.collate import CollateConfig, collate_groups
from components.distributed_model import ShardingSpec, dense_adamw
from components.host_memory import retain_freed_memory
from models.batch import GroupBatch
from models.capability import probe
from models.cost import count_flops, measure_peak_matmul_flops
from models.tokenmixer_large import SparseMoEConfig, TokenMixerLarge, TokenMixerLargeConfig, flops_per_sample
from pipelines.bench_models import BenchSizes, best_seconds, paired_best_seconds, random_groups
from pipelines.cli import configure_logging

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerfSizes:
    tokens: int = 17
    dim: int = 544
    layers: int = 4
    batch: int = 512
    moe_dim: int = 272
    moe_batch: int = 512
    moe_large_batch: int = 2048
    ranker_groups: int = 4  # as bench train: B groups of N candidates, sequences of L events
    ranker_candidates: int = 32
    ranker_seq_len: int = 512
    events: int = 5_000_000
    repeats: int = 5
    peak_seconds: float = 2.0
    peak_sizes: tuple[int, ...] = (1024, 2048)  # the best of these square GEMMs is the peak
    compiled: bool = True


QUICK = PerfSizes(
    dim=136,
    batch=64,
    moe_dim=136,
    moe_batch=64,
    moe_large_batch=256,
    ranker_groups=2,
    ranker_seq_len=128,
    events=200_000,
    repeats=2,
    peak_seconds=0.2,
    peak_sizes=(512,),
    compiled=False,
)


def peak(dtype: torch.dtype, sizes: PerfSizes) -> float:
    """Best GEMM FLOP/s over the square sizes of ``sizes.peak_sizes``."""
    seconds = sizes.peak_seconds / len(sizes.peak_sizes)
    return max(measure_peak_matmul_flops(dtype, size=n, seconds=seconds) for n in sizes.peak_sizes)


def against_peak(dtype: torch.dtype, sizes: PerfSizes, measure: Callable[[], float]) -> tuple[float, float]:
    """``measure()`` seconds, bracketed by peak GEMM measurements: (seconds, the higher peak)."""
    before = peak(dtype, sizes)
    seconds = measure()
    return seconds, max(before, peak(dtype, sizes))


def tml_config(sizes: PerfSizes) -> TokenMixerLargeConfig:
    return TokenMixerLargeConfig(num_tokens=sizes.tokens, dim=sizes.dim, num_layers=sizes.layers, expansion=4.0)


def bench_train_step(sizes: PerfSizes, compiled: bool = False) -> dict:
    """TokenMixer-Large forward + backward + fused AdamW: seconds and MFU (eager, or compiled)."""
    torch.manual_seed(0)
    cfg = tml_config(sizes)
    model = TokenMixerLarge(cfg)
    optimizer = dense_adamw(list(model.parameters()), ShardingSpec(lr=1e-4))
    x = torch.randn(sizes.batch, cfg.num_tokens, cfg.dim)

    def loss_of(inputs: torch.Tensor) -> torch.Tensor:
        out = model(inputs)
        return out.pooled.square().mean() + sum(s.square().mean() for s in out.shallow_logits)

    forward = torch.compile(loss_of) if compiled else loss_of

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward(x).backward()
        optimizer.step()

    suffix = "_compiled" if compiled else "_eager"
    if compiled:
        start = time.perf_counter()
        step()  # compiles forward and backward
        compile_s = time.perf_counter() - start
    seconds, top = against_peak(torch.float32, sizes, lambda: best_seconds(step, sizes.repeats, grad=True))
    useful = 3 * flops_per_sample(cfg) * sizes.batch
    result = {
        f"train_step_mfu_fp32{suffix}": useful / seconds / top,
        f"train_step{suffix}_s": seconds,
        f"peak_fp32_flops_per_s{suffix}": top,
    }
    if compiled:
        result["train_step_compile_s"] = compile_s
    else:
        result["train_step_config"] = (
            f"T={cfg.num_tokens} D={cfg.dim} L={cfg.num_layers} exp=4 batch={sizes.batch} AdamW(fused)"
        )
    return result


def best_train_step(result: dict) -> dict:
    """``train_step_mfu_fp32``: the better of the eager and (when measured) compiled steps."""
    modes = [m for m in ("eager", "compiled") if f"train_step_mfu_fp32_{m}" in result]
    best = max(modes, key=lambda m: result[f"train_step_mfu_fp32_{m}"])
    return {"train_step_mfu_fp32": result[f"train_step_mfu_fp32_{best}"], "train_step_best": best}


def bench_forward_bf16(sizes: PerfSizes, fp32_peak: float | None = None) -> dict:
    """``fwd_mfu_bf16``, or null with ``bf16_native: false`` and a reason where bf16 is not native.

    A CPU without bf16 dot products (models/capability.py) emulates bf16 GEMM ~100x slower than
    fp32: a ratio to that peak says nothing about the model, and the forward would take
    minutes. Such a machine gets only a small bf16 GEMM timed (``peak_bf16_flops_per_s``, the
    evidence); a machine said native whose measured bf16 peak is still below ``fp32_peak``
    gets null too, with that measurement as the reason."""
    machine = probe()
    if not machine.fast_16bit_gemm("cpu", torch.bfloat16):
        return {
            "fwd_mfu_bf16": None,
            "bf16_native": False,
            "bf16_reason": f"no native bf16 GEMM on this CPU ({machine.describe()}): bf16 is emulated",
            "peak_bf16_flops_per_s": measure_peak_matmul_flops(torch.bfloat16, size=256, seconds=0.2),
        }
    torch.manual_seed(0)
    cfg = tml_config(sizes)
    model = TokenMixerLarge(cfg).to(torch.bfloat16).eval()
    x = torch.randn(sizes.batch, cfg.num_tokens, cfg.dim, dtype=torch.bfloat16)
    seconds, top = against_peak(torch.bfloat16, sizes, lambda: best_seconds(lambda: model(x), sizes.repeats))
    result = {"fwd_bf16_s": seconds, "peak_bf16_flops_per_s": top}
    if fp32_peak is not None and top < fp32_peak:
        reason = f"measured bf16 peak {top:.3g} FLOP/s is below the fp32 peak {fp32_peak:.3g}: bf16 is not native here"
        return {**result, "fwd_mfu_bf16": None, "bf16_native": False, "bf16_reason": reason}
    return {**result, "fwd_mfu_bf16": flops_per_sample(cfg) * sizes.batch / seconds / top, "bf16_native": True}


def bench_moe_vs_dense(sizes: PerfSizes) -> dict:
    torch.manual_seed(0)
    moe = SparseMoEConfig(num_experts=8, top_k=2, expert_expansion=1.0)
    moe_cfg = TokenMixerLargeConfig(num_tokens=sizes.tokens, dim=sizes.moe_dim, num_layers=sizes.layers, moe=moe)
    dense_cfg = TokenMixerLargeConfig(
        num_tokens=sizes.tokens, dim=sizes.moe_dim, num_layers=sizes.layers, expansion=3.0
    )
    moe_model, dense_model = TokenMixerLarge(moe_cfg).eval(), TokenMixerLarge(dense_cfg).eval()
    result = {"moe_flops_per_sample": flops_per_sample(moe_cfg), "dense_flops_per_sample": flops_per_sample(dense_cfg)}
    for batch, suffix in ((sizes.moe_batch, ""), (sizes.moe_large_batch, f"_batch_{sizes.moe_large_batch}")):
        x = torch.randn(batch, sizes.tokens, sizes.moe_dim)
        moe_s, dense_s = paired_best_seconds(lambda x=x: moe_model(x), lambda x=x: dense_model(x), sizes.repeats)
        result[f"moe_over_dense_equal_active{suffix}"] = dense_s / moe_s
        result[f"moe_forward{suffix}_s"] = moe_s
        result[f"dense_equal_active_forward{suffix}_s"] = dense_s
    return result


def group_table(batch: GroupBatch, seed: int = 0) -> pa.Table:
    """The Arrow group rows a training batch of ``batch``'s shape is collated from (random values)."""
    rng = np.random.default_rng(seed)
    b, n, length = batch.batch_size, batch.num_candidates, batch.seq_item.shape[1]

    def lists(width: int, values: np.ndarray, type_: pa.DataType) -> pa.ListArray:
        offsets = pa.array(np.arange(b + 1, dtype=np.int32) * width)
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type_))

    return pa.table(
        {
            "user_idx": pa.array(batch.user_id.numpy().astype(np.int32)),
            "request_ts": pa.array(np.full(b, 10**9, np.int64)),
            "seq_item_idx": lists(length, batch.seq_item.numpy().astype(np.int32), pa.int32()),
            "seq_action": lists(length, batch.seq_action.numpy().astype(np.int8), pa.int8()),
            "seq_ts": lists(length, np.sort(rng.integers(0, 10**9, (b, length)), axis=1), pa.int64()),
            "cand_item_idx": lists(n, batch.cand_item.numpy().astype(np.int32), pa.int32()),
            "cand_genre_mask": lists(n, rng.integers(0, 1 << 18, (b, n)).astype(np.int32), pa.int32()),
            "cand_year": lists(n, rng.integers(1950, 2020, (b, n)).astype(np.int16), pa.int16()),
            "cand_tags": lists(3 * n, rng.integers(0, 100, (b, 3 * n)).astype(np.int32), pa.int32()),
            "label_engage": lists(n, rng.integers(0, 2, (b, n)).astype(np.int8), pa.int8()),
            "label_like": lists(n, rng.integers(0, 2, (b, n)).astype(np.int8), pa.int8()),
        }
    )


def bench_full_ranker(sizes: PerfSizes) -> dict:
    """The ``full`` variant's real training step on group batches: candidates/s, MFU, breakdown."""
    import torch.distributed as dist

    from components.distributed_model import DistributedRanker
    from models.task import RankingTask
    from models.variants import build_model
    from pipelines.bench_train import bench_model_config
    from pipelines.step_profile import profile_step
    from pipelines.train_loop import ensure_process_group

    torch.manual_seed(0)
    config = bench_model_config("full", sizes.ranker_seq_len)
    shape = BenchSizes(
        batch_groups=sizes.ranker_groups, num_candidates=sizes.ranker_candidates, seq_len=sizes.ranker_seq_len
    )
    batch = random_groups(shape, config.ranker.sparse, torch.device("cpu"))
    own = ensure_process_group()
    try:
        dr = DistributedRanker.build(RankingTask(build_model(config)).train(), ShardingSpec(), torch.device("cpu"))

        def forward_backward() -> None:
            loss, _ = dr.module(batch)
            dr.zero_grad()
            loss.backward()

        def step() -> None:
            forward_backward()
            dr.step()

        step_flops = count_flops(lambda: dr.module(batch)[0].backward(), backward=True)
        seconds, top = against_peak(torch.float32, sizes, lambda: best_seconds(step, sizes.repeats, grad=True))
        breakdown = profile_step(forward_backward, dr.task.model, dr.step)
    finally:
        if own:
            dist.destroy_process_group()
    table = group_table(batch)
    collate = CollateConfig(max_seq_len=sizes.ranker_seq_len)
    loading = best_seconds(lambda: collate_groups(table, collate), sizes.repeats)
    candidates = sizes.ranker_groups * sizes.ranker_candidates
    return {
        "full_ranker_train_candidates_per_s": candidates / seconds,
        "full_ranker_train_mfu": step_flops / seconds / top,
        "full_ranker_step_s": seconds,
        "full_ranker_step_flops": step_flops,
        "full_ranker_breakdown": {**breakdown, "data_loading_s": round(loading, 4)},
        "full_ranker_shape": f"B={sizes.ranker_groups} groups x N={sizes.ranker_candidates}, L={sizes.ranker_seq_len}",
    }


def bench_features(sizes: PerfSizes) -> dict:
    """The data bench's Ray features job at ``sizes.events`` synthetic events."""
    from pipelines.bench_data import run_bench
    from pipelines.config import RayConfig

    workdir = tempfile.mkdtemp(prefix="bench_perf_features_")
    try:
        record = run_bench(sizes.events, workdir, num_buckets=0, num_cpus=RayConfig().num_cpus, seed=0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "features_events_per_s": record["events_per_s"],
        "features_events": record["events"],
        "features_ray_s": record["ray_s"],
        "features_single_s": record["single_s"],
        "features_phases_s": record["ray_phases_s"],
        "features_identical": record["identical"],
        "features_differences": record["differences"],
    }


KEYS = (
    "train_step_mfu_fp32",
    "fwd_mfu_bf16",
    "moe_over_dense_equal_active",
    "full_ranker_train_candidates_per_s",
    "full_ranker_train_mfu",
    "features_events_per_s",
)
TARGETS = {
    "train_step_mfu_fp32": 0.8,
    "fwd_mfu_bf16": 0.8,
    "moe_over_dense_equal_active": 0.95,
    "features_events_per_s": 1.5e6,
}


def run(sizes: PerfSizes, skip_features: bool = False) -> dict:
    """Every figure of the module docstring. The features job runs first, on a fresh driver:
    after the model figures this process holds their retained heap (GBs at batch 512)."""
    result: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "capability": probe().describe(),
        },
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "sizes": sizes.__dict__,
    }
    steps: list[tuple[str, Callable[[], dict]]] = []
    if not skip_features:
        steps.append(("features", lambda: bench_features(sizes)))
    steps += [
        ("retained heap", lambda: {"retained_heap": retain_freed_memory()}),  # the training default
        ("train step", lambda: bench_train_step(sizes)),
        ("bf16 forward", lambda: bench_forward_bf16(sizes, result.get("peak_fp32_flops_per_s_eager"))),
        ("moe vs dense", lambda: bench_moe_vs_dense(sizes)),
        ("full ranker", lambda: bench_full_ranker(sizes)),
    ]
    if sizes.compiled:
        steps.append(("compiled train step", lambda: bench_train_step(sizes, compiled=True)))
    steps.append(("best train step", lambda: best_train_step(result)))
    for name, step in steps:
        start = time.perf_counter()
        result.update(step())
        logger.info("bench perf: %s done in %.1f s", name, time.perf_counter() - start)
    result["targets"] = {
        k: {"target": t, "value": result.get(k), "met": (result.get(k) or 0) >= t} for k, t in TARGETS.items()
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench perf", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run, not the figures)")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--skip-features", action="store_true", help="leave out the features job (no Ray)")
    parser.add_argument(
        "--events", type=int, default=0, help="synthetic events of the features job (0 = 5M, --quick 200k)"
    )
    args = parser.parse_args(argv)
    if args.events < 0:
        parser.error(f"--events must be >= 0, got {args.events}")
    configure_logging()
    started = time.perf_counter()
    sizes = QUICK if args.quick else PerfSizes()
    if args.events:
        sizes = replace(sizes, events=args.events)
    result = run(sizes, args.skip_features)
    result["quick"], result["bench_s"] = args.quick, time.perf_counter() - started
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result.get(k) for k in KEYS}, indent=1))
    return 0
