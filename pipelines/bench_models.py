"""Model micro-benchmarks: ``python -m pipelines.bench models [--quick] --json PATH``.

Every figure is a ratio against a baseline measured in the same run (shared, noisy
machines): user-side reuse vs per-candidate recomputation, LONGER KV cache vs none,
TokenMixer-Large FLOP/s vs the measured peak GEMM FLOP/s, a 1M-slot MSN read vs the
ranker forward, sparse vs all-experts MoE, W8A16 vs fp32 weights. Times are the best of
several runs after a warm-up. On a CUDA device with native bf16 the timed models run in
bf16 (the exactness check stays fp32).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models.batch import GroupBatch
from models.capability import probe
from models.cost import count_flops, count_parameters, flops_per_candidate, measure_peak_matmul_flops
from models.layers import AuxLosses
from models.longer import LongerConfig, LongerEncoder
from models.memory import MSN, MSNConfig, PKMConfig
from models.quant import int8pack_fraction, quantize_w8a16, relative_error, weight_bytes
from models.ranker import Ranker, RankerConfig
from models.sparse import SparseConfig
from models.task import RankingTask
from models.tokenmixer_large import (
    SparseMoEConfig,
    SparsePerTokenMoE,
    TokenMixerLarge,
    TokenMixerLargeConfig,
    flops_per_sample,
)
from models.ugsep import UGSepBackbone, UGSepConfig
from models.ugsep import flops_per_candidate as ugsep_flops_per_candidate
from models.variants import VARIANTS, ModelConfig, build_model, ranker_config
from pipelines.cli import configure_logging

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSizes:
    """Sizes of one bench run; ``--quick`` shrinks everything but the issue's N and L."""

    batch_groups: int = 2
    num_candidates: int = 256
    seq_len: int = 2000
    embedding_dim: int = 32
    dim: int = 64
    tml_tokens: int = 16
    tml_dim: int = 512
    tml_layers: int = 4
    tml_batch: int = 1024
    moe_dim: int = 256
    moe_batch: int = 1024
    pkm_slots: int = 1 << 20
    repeats: int = 5
    peak_seconds: float = 2.0


QUICK = BenchSizes(batch_groups=1, tml_dim=256, tml_layers=2, tml_batch=256, moe_batch=256, repeats=3, peak_seconds=0.5)


def best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1, grad: bool = False) -> float:
    """Best wall time of ``fn`` over ``repeats`` runs (CUDA-synchronised); in inference mode
    unless ``grad`` (a training step)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.inference_mode(not grad):
        for _ in range(warmup):
            fn()
        sync()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - start)
    return best


def paired_best_seconds(
    fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int, grad: bool = False
) -> tuple[float, float]:
    """Best wall times of two functions timed in alternation, so a slow spell of a shared
    machine hits both sides of a ratio alike (``grad``: see ``best_seconds``)."""
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(best_seconds(fn_a, 1, warmup=0 if times_a else 1, grad=grad))
        times_b.append(best_seconds(fn_b, 1, warmup=0 if times_b else 1, grad=grad))
    return min(times_a), min(times_b)


def random_groups(sizes: BenchSizes, vocab: SparseConfig, device: torch.device, seed: int = 0) -> GroupBatch:
    """Full-length random groups (every sequence slot real; labels for a short training)."""
    g = torch.Generator().manual_seed(seed)
    b, n, length = sizes.batch_groups, sizes.num_candidates, sizes.seq_len
    ints = lambda low, high, *shape: torch.randint(low, high, shape, generator=g)
    batch = GroupBatch(
        user_id=ints(2, vocab.user_vocab, b),
        user_dense=torch.rand(b, 3, generator=g),
        seq_item=ints(2, vocab.item_vocab, b, length),
        seq_action=ints(1, 11, b, length),
        seq_gap=ints(1, 31, b, length),
        seq_len=torch.full((b,), length),
        cand_item=ints(2, vocab.item_vocab, b, n),
        cand_genres=(torch.rand(b, n, 20, generator=g) > 0.8).float(),
        cand_year=ints(0, 32, b, n),
        cand_tags=ints(0, vocab.tag_vocab, b, n, 3),
        cand_mask=torch.ones(b, n, dtype=torch.bool),
        labels=ints(0, 2, b, n, 2).float(),
    )
    return batch.to(device)


def bench_ranker_config(sizes: BenchSizes) -> RankerConfig:
    """The full ranker: LONGER + MSN (``pkm_slots`` slots) + LMN + TokenMixer-Large with UG-Sep."""
    sparse = SparseConfig(item_vocab=100_000, user_vocab=10_000, tag_vocab=2_000, embedding_dim=sizes.embedding_dim)
    msn_memory = PKMConfig(num_slots=sizes.pkm_slots, topk=16, key_dim=64, track_usage=False)
    return RankerConfig(
        sparse=sparse,
        dim=sizes.dim,
        use_ugsep=True,
        use_msn=True,
        use_lmn=True,
        msn_memory=msn_memory,
        longer=LongerConfig(num_recent=100, num_self_layers=2, max_seq_len=max(sizes.seq_len, 2000)),
    )


def bench_reuse(sizes: BenchSizes, device: torch.device) -> dict:
    """encode_user once per group vs the whole model recomputed per candidate (same outputs)."""
    torch.manual_seed(0)
    cfg = bench_ranker_config(sizes)
    model = Ranker(cfg).to(device).eval()
    batch = random_groups(sizes, cfg.sparse, device)
    with torch.inference_mode():
        diff = (model(batch).logits - model.forward_reference(batch).logits).abs().max().item()
    reuse_s = best_seconds(lambda: model(batch), sizes.repeats)
    full_s = best_seconds(lambda: model.forward_reference(batch), sizes.repeats)
    # The MSN read of THIS ranker (1M slots at full size), as it runs: one user-side query per group.
    context = torch.randn(sizes.batch_groups, cfg.user_dim + cfg.seq_dim, device=device)
    msn_s = best_seconds(lambda: model.msn.gate(context), sizes.repeats)
    params = count_parameters(model)
    return {
        "reuse_speedup": full_s / reuse_s,
        "reuse_max_abs_diff": diff,
        "ranker_forward_s": reuse_s,
        "pkm_overhead_frac": msn_s / reuse_s,
        "pkm_read_per_group_s": msn_s,
        "pkm_slots": sizes.pkm_slots,
        "ranker_full_recompute_s": full_s,
        "ranker_params_dense": params["dense"],
        "ranker_params_sparse": params["sparse"],
        "ranker_flops_per_candidate": flops_per_candidate(model, batch),
        "ranker_user_state_bytes_per_group": model.encode_user(batch).nbytes() // sizes.batch_groups,
    }


def bench_kv_cache(sizes: BenchSizes, device: torch.device) -> dict:
    """LONGER alone: encode_user (KV cache) + score vs the full stack per candidate."""
    torch.manual_seed(0)
    cfg = LongerConfig(
        item_dim=sizes.embedding_dim,
        d_model=sizes.dim,
        num_recent=100,
        num_self_layers=2,
        max_seq_len=max(sizes.seq_len, 2000),
    )
    enc = LongerEncoder(cfg).to(device).eval()
    b, n, length = sizes.batch_groups, sizes.num_candidates, sizes.seq_len
    seq = torch.randn(b, length, cfg.item_dim, device=device)
    act = torch.randint(1, 11, (b, length), device=device)
    gap = torch.randint(1, 31, (b, length), device=device)
    lens = torch.full((b,), length, device=device)
    cand = torch.randn(b, n, cfg.d_model, device=device)
    cached = lambda: enc.score(enc.encode_user(seq, act, gap, lens), cand)
    full = lambda: enc(seq, act, gap, lens, cand)
    with torch.inference_mode():
        diff = (cached() - full()).abs().max().item()
    cached_s = best_seconds(cached, sizes.repeats)
    full_s = best_seconds(full, sizes.repeats)
    return {
        "kv_cache_speedup": full_s / cached_s,
        "kv_cache_max_abs_diff": diff,
        "longer_cached_s": cached_s,
        "longer_full_s": full_s,
    }


def bench_mfu(sizes: BenchSizes, device: torch.device, dtype: torch.dtype) -> dict:
    """TokenMixer-Large forward FLOP/s over the measured peak GEMM FLOP/s (same dtype)."""
    torch.manual_seed(0)
    cfg = TokenMixerLargeConfig(
        num_tokens=sizes.tml_tokens, dim=sizes.tml_dim, num_layers=sizes.tml_layers, expansion=4.0
    )
    model = TokenMixerLarge(cfg).to(device=device, dtype=dtype).eval()
    x = torch.randn(sizes.tml_batch, cfg.num_tokens, cfg.dim, device=device, dtype=dtype)
    # Peak = best GEMM rate over two sizes, measured before AND after the model, so a noisy
    # neighbour during one measurement cannot inflate the ratio.
    peak_runs = lambda: [
        measure_peak_matmul_flops(dtype, size=n, seconds=sizes.peak_seconds / 2, device=device) for n in (1024, 2048)
    ]
    peaks = peak_runs()
    seconds = best_seconds(lambda: model(x), sizes.repeats)
    peak = max(peaks + peak_runs())
    achieved = flops_per_sample(cfg) * sizes.tml_batch / seconds
    return {
        "mfu_backbone": achieved / peak,
        "backbone_flops_per_s": achieved,
        "peak_matmul_flops_per_s": peak,
        "mfu_config": f"T={cfg.num_tokens} D={cfg.dim} L={cfg.num_layers} exp=4 batch={sizes.tml_batch}",
    }


def bench_pkm_per_candidate(sizes: BenchSizes, device: torch.device, ranker_forward_s: float) -> dict:
    """What the same 1M-slot read would cost issued once per candidate instead (B*N queries)."""
    torch.manual_seed(0)
    cfg = bench_ranker_config(sizes)
    msn = MSN(MSNConfig(token_dim=cfg.dim, memory=replace(cfg.msn_memory, input_dim=cfg.user_dim + cfg.seq_dim)))
    msn = msn.to(device).eval()
    per_cand = torch.randn(sizes.batch_groups * sizes.num_candidates, cfg.user_dim + cfg.seq_dim, device=device)
    return {
        "pkm_overhead_frac_if_per_candidate": best_seconds(lambda: msn.gate(per_cand), sizes.repeats) / ranker_forward_s
    }


def bench_moe(sizes: BenchSizes, device: torch.device, dtype: torch.dtype) -> dict:
    """Sparse-Pertoken MoE at 1:4 activation (E=8, k=2): real dispatch vs every expert computed."""
    torch.manual_seed(0)
    moe = SparsePerTokenMoE(sizes.tml_tokens, sizes.moe_dim, SparseMoEConfig(num_experts=8, top_k=2), 0.01)
    moe = moe.to(device=device, dtype=dtype).eval()
    x = torch.randn(sizes.moe_batch, sizes.tml_tokens, sizes.moe_dim, device=device, dtype=dtype)
    with torch.inference_mode():
        diff = (moe(x) - moe.forward_dense_reference(x)).abs().max().item()
    sparse_s = best_seconds(lambda: moe(x, aux=AuxLosses()), sizes.repeats)
    dense_s = best_seconds(lambda: moe.forward_dense_reference(x), sizes.repeats)
    return {
        "moe_sparse_speedup": dense_s / sparse_s,
        "moe_max_abs_diff": diff,
        "moe_sparse_s": sparse_s,
        "moe_dense_s": dense_s,
    }


W8A16_LATENCY_KEYS = (
    "w8a16_latency_ratio",
    "w8a16_latency_ratio_user_b1",
    "w8a16_latency_ratio_user_b256",
    "w8a16_latency_ratio_candidates_b1",
    "w8a16_latency_ratio_candidates_b256",
    "w8a16_latency_ratio_moe_b1",
    "w8a16_latency_ratio_moe_b256",
)


def _trained_ranker(sizes: BenchSizes, device: torch.device) -> tuple[Ranker, GroupBatch]:
    """The bench ranker after 10 Adam steps on one batch (weights away from their init), in eval mode."""
    model = Ranker(bench_ranker_config(sizes)).to(device)
    batch = random_groups(sizes, model.cfg.sparse, device, seed=1)
    task, optimizer = RankingTask(model), torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(10):
        optimizer.zero_grad()
        task(batch)[0].backward()
        optimizer.step()
    return model.eval(), batch


def _time_ratio(quantized_fn: Callable[[], object], float_fn: Callable[[], object], repeats: int) -> float:
    """Best quantized time ÷ best float time, the two timed alternately (a noisy neighbour hits both)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best = {quantized_fn: float("inf"), float_fn: float("inf")}
    with torch.inference_mode():
        for fn in best:  # warm-up
            fn()
        for _ in range(repeats):
            for fn in best:
                sync()
                start = time.perf_counter()
                fn()
                sync()
                best[fn] = min(best[fn], time.perf_counter() - start)
    return best[quantized_fn] / best[float_fn]


def _w8a16_path_ratios(model: Ranker, quantized: Ranker, sizes: BenchSizes, device: torch.device) -> dict:
    """Quantized ÷ fp32 time of the once-per-group user path (``encode_user``, 1 and 256 groups) and of
    the per-candidate path (``score_candidates`` on a cached ``UserState``, one group of 1 and 256)."""
    ratios = {}
    for groups in (1, 256):
        batch = random_groups(replace(sizes, batch_groups=groups, num_candidates=1), model.cfg.sparse, device, seed=2)
        # Milliseconds per call at one group: more rounds for the same confidence.
        repeats = sizes.repeats * (10 if groups == 1 else 1)
        ratios[f"w8a16_latency_ratio_user_b{groups}"] = _time_ratio(
            lambda batch=batch: quantized.encode_user(batch), lambda batch=batch: model.encode_user(batch), repeats
        )
    for cands in (1, 256):
        batch = random_groups(replace(sizes, batch_groups=1, num_candidates=cands), model.cfg.sparse, device, seed=3)
        with torch.inference_mode():
            float_state, quant_state = model.encode_user(batch), quantized.encode_user(batch)
        ratios[f"w8a16_latency_ratio_candidates_b{cands}"] = _time_ratio(
            lambda batch=batch, state=quant_state: quantized.score_candidates(state, batch),
            lambda batch=batch, state=float_state: model.score_candidates(state, batch),
            sizes.repeats * 10,
        )
    return ratios


def _w8a16_moe_ratios(sizes: BenchSizes, device: torch.device) -> dict:
    """The Sparse-Pertoken MoE of ``bench_moe`` (E=8, top-2), W8A16 vs fp32, at 1 and 256 rows."""
    torch.manual_seed(0)
    moe = SparsePerTokenMoE(sizes.tml_tokens, sizes.moe_dim, SparseMoEConfig(num_experts=8, top_k=2), 0.01)
    moe = moe.to(device).eval()
    quantized = quantize_w8a16(moe)
    ratios = {}
    for rows in (1, 256):
        x = torch.randn(rows, sizes.tml_tokens, sizes.moe_dim, device=device)
        repeats = sizes.repeats * (4 if rows == 1 else 2)  # tens of milliseconds per call: cheap rounds
        ratios[f"w8a16_latency_ratio_moe_b{rows}"] = _time_ratio(lambda x=x: quantized(x), lambda x=x: moe(x), repeats)
    return ratios


def bench_w8a16(sizes: BenchSizes, device: torch.device) -> dict:
    """Weight-only int8 of a (briefly) trained ranker vs its fp32 self: weight bytes, output error,
    the share of int8 bytes small calls run through the int8pack kernel, and latency per path."""
    torch.manual_seed(0)
    small = replace(sizes, num_candidates=32, seq_len=min(sizes.seq_len, 256), batch_groups=4, pkm_slots=4096)
    model, batch = _trained_ranker(small, device)
    quantized = quantize_w8a16(model)
    with torch.inference_mode():
        ref, approx = model(batch).logits, quantized(batch).logits
    per_logit = ((approx - ref).abs() / ref.abs().clamp_min(1e-3))[batch.cand_mask]  # (real slots, tasks)
    return {
        "w8a16_weight_bytes_ratio": weight_bytes(quantized) / weight_bytes(model),
        "w8a16_max_rel_err": relative_error(ref, approx),
        "w8a16_p99_per_logit_rel_err": float(per_logit.flatten().quantile(0.99)),
        "w8a16_int8pack_fraction": int8pack_fraction(quantized),
        "w8a16_latency_ratio": _time_ratio(lambda: quantized(batch), lambda: model(batch), sizes.repeats * 4),
        **_w8a16_path_ratios(model, quantized, small, device),
        **_w8a16_moe_ratios(sizes, device),
    }


def _ugsep_pair(variant: str, sizes: BenchSizes, device: torch.device) -> tuple[UGSepBackbone, TokenMixerLarge, int]:
    """The bench ranker's ``variant`` backbone with UG-Sep, the same backbone unmasked, and T_u."""
    cfg = ranker_config(ModelConfig(variant=variant, ranker=bench_ranker_config(sizes)))
    tml, num_user = cfg.backbone_config(), cfg.tokenizer_config().num_tokens("user")
    torch.manual_seed(0)
    ugsep = UGSepBackbone(UGSepConfig(num_user, cfg.use_compensation, tokenmixer_large=tml))
    return ugsep.to(device).eval(), TokenMixerLarge(tml).to(device).eval(), num_user


def _large_ugsep_pair(sizes: BenchSizes, device: torch.device) -> tuple[UGSepBackbone, TokenMixerLarge, int]:
    """A GEMM-bound backbone (T = 16, half of them user tokens, the MFU bench's width) with compensation."""
    tml = TokenMixerLargeConfig(num_tokens=16, dim=sizes.tml_dim // 2, num_layers=4, expansion=4.0)
    torch.manual_seed(0)
    ugsep = UGSepBackbone(UGSepConfig(8, True, tokenmixer_large=tml))
    return ugsep.to(device).eval(), TokenMixerLarge(tml).to(device).eval(), 8


def compare_ugsep(
    ugsep: UGSepBackbone, plain: TokenMixerLarge, num_user: int, sizes: BenchSizes, device: torch.device
) -> dict:
    """FLOPs (counted over what runs) and best latency per candidate: UG-Sep vs unmasked, same run."""
    b, n, tml = sizes.batch_groups, sizes.num_candidates, plain.cfg
    x_user = torch.randn(b, num_user, tml.dim, device=device)
    x_group = torch.randn(b, n, tml.num_tokens - num_user, tml.dim, device=device)
    x_all = torch.cat([x_user.unsqueeze(1).expand(b, n, *x_user.shape[1:]), x_group], -2)
    separated = lambda: ugsep.forward_group(ugsep.forward_user(x_user), x_group)
    unmasked = lambda: plain(x_all)
    with torch.inference_mode():
        diff = (separated().tokens - ugsep(x_user, x_group).tokens).abs().max().item()
    sep_s, plain_s = paired_best_seconds(separated, unmasked, sizes.repeats)
    return {
        "flops_ratio": count_flops(separated) / count_flops(unmasked),
        "latency_ratio": sep_s / plain_s,
        "max_abs_diff": diff,
        "flops_ratio_analytic": ugsep_flops_per_candidate(ugsep.cfg, n) / flops_per_sample(tml),
        "config": f"T={tml.num_tokens} (T_u={num_user}) D={tml.dim} H={tml.num_mix_heads} L={tml.num_layers} "
        f"expansion={tml.expansion} B={b} N={n}",
    }


def bench_ugsep(sizes: BenchSizes, device: torch.device) -> dict:
    """UG-Sep's backbone per candidate vs the same backbone unmasked, at N = ``num_candidates``.

    ``ugsep_*``: the bench ranker's ``ugsep`` variant (its token layout and width);
    ``ugsep_*_nocomp``: without Information Compensation; ``ugsep_*_large``: a GEMM-bound
    backbone, where latency can follow FLOPs. FLOPs count the user path once per group plus
    the group path at B*N, against every token at B*N.
    """
    results = {}
    pairs = {
        "": _ugsep_pair("ugsep", sizes, device),
        "_nocomp": _ugsep_pair("ugsep_nocomp", sizes, device),
        "_large": _large_ugsep_pair(sizes, device),
    }
    for suffix, (ugsep, plain, num_user) in pairs.items():
        for key, value in compare_ugsep(ugsep, plain, num_user, sizes, device).items():
            results[f"ugsep_{key}{suffix}"] = value
    return results


def bench_variants(sizes: BenchSizes, device: torch.device) -> dict:
    """Parameters (dense/sparse) and forward FLOPs per candidate of every variant (MODELS.md §7)."""
    base = bench_ranker_config(sizes)
    batch = random_groups(replace(sizes, batch_groups=1), base.sparse, device)
    rows = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        model = build_model(ModelConfig(variant=name, ranker=base)).to(device).eval()
        with torch.inference_mode():
            rows[name] = {**count_parameters(model), "flops_per_candidate": flops_per_candidate(model, batch)}
    return {"variants": rows}


def run(sizes: BenchSizes, device: torch.device) -> dict:
    # bf16 where the device computes it natively on CUDA (Ampere on); CPUs time fp32, the training dtype
    native = device.type == "cuda" and probe().fast_16bit_gemm("cuda", torch.bfloat16)
    timed_dtype = torch.bfloat16 if native else torch.float32
    results: dict = {
        "device": str(device),
        "timed_dtype": str(timed_dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "sizes": sizes.__dict__,
    }
    steps = [
        ("reuse", lambda: bench_reuse(sizes, device)),
        ("kv_cache", lambda: bench_kv_cache(sizes, device)),
        ("mfu", lambda: bench_mfu(sizes, device, timed_dtype)),
        ("pkm", lambda: bench_pkm_per_candidate(sizes, device, results["ranker_forward_s"])),
        ("moe", lambda: bench_moe(sizes, device, timed_dtype)),
        ("w8a16", lambda: bench_w8a16(sizes, device)),
        ("ugsep", lambda: bench_ugsep(sizes, device)),
        ("variants", lambda: bench_variants(sizes, device)),
    ]
    for name, step in steps:
        start = time.perf_counter()
        results.update(step())
        logger.info("bench models: %s done in %.1f s", name, time.perf_counter() - start)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench models", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under a minute on 2 cores")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present)")
    args = parser.parse_args(argv)
    configure_logging()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    started = time.perf_counter()
    results = run(QUICK if args.quick else BenchSizes(), device)
    results["quick"], results["total_s"] = args.quick, time.perf_counter() - started
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    keys = (
        "reuse_speedup",
        "reuse_max_abs_diff",
        "kv_cache_speedup",
        "mfu_backbone",
        "pkm_overhead_frac",
        "moe_sparse_speedup",
        "w8a16_weight_bytes_ratio",
        "w8a16_max_rel_err",
        "ugsep_flops_ratio",
        "ugsep_latency_ratio",
        "w8a16_int8pack_fraction",
        *W8A16_LATENCY_KEYS,
    )
    print(json.dumps({k: results[k] for k in keys}, indent=2))
    return 0
