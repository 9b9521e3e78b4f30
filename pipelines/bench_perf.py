"""Performance against the hardware: ``python -m pipelines.bench perf [--quick] --json PATH``.

Work in progress (issue 11), on branch ``perf``. The baseline figures of the eager models,
each measured against the peak GEMM of the same dtype, taken in the same run before AND after
the model (the best of both, so a noisy neighbour during one measurement cannot inflate a
ratio):

- ``train_step_mfu_fp32``: TokenMixer-Large T=17, D=544, L=4, expansion 4, batch 512; forward +
  backward + AdamW step; useful FLOPs = 3 x forward matmul FLOPs (the backward is two GEMMs per
  forward GEMM) / time / peak fp32.
- ``fwd_mfu_bf16``: the same model's forward, weights and activations in bfloat16 / peak bf16.
- ``moe_over_dense_equal_active``: Sparse-Pertoken MoE (E=8, top-2, D=272, L=4) forward
  samples/s / those of the dense model with the same active FLOPs per token (the shared expert
  and two routed experts of width D are one dense SwiGLU of width 3D).

Not yet measured here: ``full_ranker_train_candidates_per_s`` with its breakdown, and
``features_events_per_s`` (the data bench's Ray figure).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.cost import measure_peak_matmul_flops
from models.tokenmixer_large import SparseMoEConfig, TokenMixerLarge, TokenMixerLargeConfig, flops_per_sample


@dataclass(frozen=True)
class PerfSizes:
    tokens: int = 17
    dim: int = 544
    layers: int = 4
    batch: int = 512
    moe_dim: int = 272
    moe_batch: int = 512
    repeats: int = 5
    peak_seconds: float = 2.0


QUICK = PerfSizes(dim=272, batch=128, moe_dim=136, moe_batch=128, repeats=3, peak_seconds=0.5)


def peak(dtype: torch.dtype, seconds: float) -> float:
    """Best GEMM FLOP/s over two sizes."""
    return max(measure_peak_matmul_flops(dtype, size=n, seconds=seconds / 2) for n in (1024, 2048))


def best_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_train_step(sizes: PerfSizes) -> dict:
    torch.manual_seed(0)
    cfg = TokenMixerLargeConfig(num_tokens=sizes.tokens, dim=sizes.dim, num_layers=sizes.layers, expansion=4.0)
    model = TokenMixerLarge(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(sizes.batch, cfg.num_tokens, cfg.dim)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = out.pooled.square().mean() + sum(s.square().mean() for s in out.shallow_logits)
        loss.backward()
        opt.step()

    before = peak(torch.float32, sizes.peak_seconds)
    seconds = best_seconds(step, sizes.repeats)
    top = max(before, peak(torch.float32, sizes.peak_seconds))
    useful = 3 * flops_per_sample(cfg) * sizes.batch
    return {
        "train_step_mfu_fp32": useful / seconds / top,
        "train_step_s": seconds,
        "peak_fp32_flops_per_s": top,
        "train_step_config": f"T={cfg.num_tokens} D={cfg.dim} L={cfg.num_layers} exp=4 batch={sizes.batch} AdamW",
    }


def bench_forward_bf16(sizes: PerfSizes) -> dict:
    torch.manual_seed(0)
    cfg = TokenMixerLargeConfig(num_tokens=sizes.tokens, dim=sizes.dim, num_layers=sizes.layers, expansion=4.0)
    model = TokenMixerLarge(cfg).to(torch.bfloat16).eval()
    x = torch.randn(sizes.batch, cfg.num_tokens, cfg.dim, dtype=torch.bfloat16)
    before = peak(torch.bfloat16, sizes.peak_seconds)
    with torch.inference_mode():
        seconds = best_seconds(lambda: model(x), sizes.repeats)
    top = max(before, peak(torch.bfloat16, sizes.peak_seconds))
    return {
        "fwd_mfu_bf16": flops_per_sample(cfg) * sizes.batch / seconds / top,
        "fwd_bf16_s": seconds,
        "peak_bf16_flops_per_s": top,
    }


def bench_moe_vs_dense(sizes: PerfSizes) -> dict:
    torch.manual_seed(0)
    moe_cfg = TokenMixerLargeConfig(
        num_tokens=sizes.tokens,
        dim=sizes.moe_dim,
        num_layers=sizes.layers,
        moe=SparseMoEConfig(num_experts=8, top_k=2, expert_expansion=1.0),
    )
    dense_cfg = TokenMixerLargeConfig(
        num_tokens=sizes.tokens, dim=sizes.moe_dim, num_layers=sizes.layers, expansion=3.0
    )
    x = torch.randn(sizes.moe_batch, sizes.tokens, sizes.moe_dim)
    seconds = {}
    for name, cfg in (("moe", moe_cfg), ("dense", dense_cfg)):
        model = TokenMixerLarge(cfg).eval()
        with torch.inference_mode():
            seconds[name] = best_seconds(lambda m=model: m(x), sizes.repeats)
    return {
        "moe_over_dense_equal_active": seconds["dense"] / seconds["moe"],
        "moe_forward_s": seconds["moe"],
        "dense_equal_active_forward_s": seconds["dense"],
        "moe_flops_per_sample": flops_per_sample(moe_cfg),
        "dense_flops_per_sample": flops_per_sample(dense_cfg),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench perf", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run, not the figures)")
    parser.add_argument("--json", required=True, help="where to write the results")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else PerfSizes()
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
        "quick": args.quick,
        **bench_train_step(sizes),
        **bench_forward_bf16(sizes),
        **bench_moe_vs_dense(sizes),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0
