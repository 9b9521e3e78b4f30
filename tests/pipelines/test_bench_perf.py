"""``python -m pipelines.bench perf --quick`` writes every figure it measures (issue 11, baseline)."""

from __future__ import annotations

import json

from pipelines.bench import main

KEYS = ("train_step_mfu_fp32", "fwd_mfu_bf16", "moe_over_dense_equal_active")


def test_perf_quick_writes_its_figures(tmp_path):
    out = tmp_path / "perf.json"
    assert main(["perf", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in KEYS:
        assert 0.0 < result[key] < 5.0, (key, result[key])  # ratios to peak or to a baseline
    assert result["peak_fp32_flops_per_s"] > 1e9 and result["peak_bf16_flops_per_s"] > 1e9
    # the dense baseline really has the MoE's active FLOPs (within the router's share)
    assert abs(result["moe_flops_per_sample"] / result["dense_flops_per_sample"] - 1) < 0.01
