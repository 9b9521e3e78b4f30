"""The models bench at tiny sizes: every contracted key present, exactness holds, JSON written."""

from __future__ import annotations

import json
import math

import torch

from pipelines.bench import main
from pipelines.bench_models import W8A16_LATENCY_KEYS, BenchSizes, run

KEYS = (
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

TINY = BenchSizes(
    batch_groups=1,
    num_candidates=8,
    seq_len=64,
    embedding_dim=16,
    dim=32,
    tml_tokens=8,
    tml_dim=64,
    tml_layers=2,
    tml_batch=32,
    moe_dim=32,
    moe_batch=32,
    pkm_slots=4096,
    repeats=1,
    peak_seconds=0.05,
)


def test_tiny_run_reports_every_key_and_exactness():
    results = run(TINY, torch.device("cpu"))
    for key in KEYS:
        assert math.isfinite(results[key]) and results[key] >= 0, key
    assert results["reuse_max_abs_diff"] <= 1e-5
    assert results["kv_cache_max_abs_diff"] <= 1e-5
    assert results["moe_max_abs_diff"] <= 1e-4
    assert 0.25 <= results["w8a16_weight_bytes_ratio"] < 0.5
    assert 0 <= results["w8a16_p99_per_logit_rel_err"] < 1.0
    assert 0 <= results["w8a16_int8pack_fraction"] <= 1.0
    assert {
        "w8a16_latency_ratio_user_b1",
        "w8a16_latency_ratio_user_b256",
        "w8a16_latency_ratio_candidates_b1",
        "w8a16_latency_ratio_candidates_b256",
    } <= set(W8A16_LATENCY_KEYS)
    for key in W8A16_LATENCY_KEYS:  # quantized time / fp32 time of the same run: positive and finite
        assert 0 < results[key] < math.inf, key
    assert 0 < results["mfu_backbone"] < 1.0  # above 1 the peak was mis-measured
    for suffix in ("", "_nocomp", "_large"):
        assert results[f"ugsep_max_abs_diff{suffix}"] <= 1e-5
        # FLOPs counted over what runs agree with the formula (models/ugsep.py) and undercut the unmasked backbone.
        counted, formula = results[f"ugsep_flops_ratio{suffix}"], results[f"ugsep_flops_ratio_analytic{suffix}"]
        assert abs(counted - formula) < 1e-6 and 0 < counted < 1, suffix
    assert results["ugsep_flops_ratio_nocomp"] < results["ugsep_flops_ratio"]
    assert set(results["variants"]) >= {"dlrm_mlp", "rankmixer", "tokenmixer_large_moe", "full"}
    assert all(row["flops_per_candidate"] > 0 and row["dense"] > 0 for row in results["variants"].values())
    json.dumps(results)


def test_cli_rejects_unknown_benchmark(capsys):
    assert main(["nope", "--json", "x.json"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_cli_requires_json(capsys):
    assert main(["models", "--quick"]) == 2  # returned: a raise, or any other code, fails the test
    assert "--json" in capsys.readouterr().err
