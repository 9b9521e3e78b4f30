"""``python -m pipelines.bench perf --quick`` writes every figure the issue names, each sane."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models.capability import probe
from pipelines.bench import main
from pipelines.bench_perf import KEYS
from pipelines.step_profile import DENSE_OPTIMIZER, OTHER, RANKER_COMPONENTS


def test_perf_quick_writes_every_figure(tmp_path):
    """Every figure but the features job's, which is the data bench's run (tests/pipelines/test_bench_data.py)."""
    out = tmp_path / "perf.json"
    assert main(["perf", "--quick", "--skip-features", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # No bound on a ratio: the hardware and a loaded machine can put any of them anywhere.
    for key in [k for k in KEYS if not k.startswith("features_") and k != "fwd_mfu_bf16"]:
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert result["peak_fp32_flops_per_s_eager"] > 0 and result["peak_bf16_flops_per_s"] > 0
    # bf16: a figure only where this machine computes bf16 natively, else null and why
    assert result["machine"]["capability"] == probe().describe()
    if result["bf16_native"]:
        assert math.isfinite(result["fwd_mfu_bf16"]) and result["fwd_mfu_bf16"] > 0
    else:
        assert result["fwd_mfu_bf16"] is None and "bf16" in result["bf16_reason"]
        assert result["targets"]["fwd_mfu_bf16"] == {"target": 0.8, "value": None, "met": False}
    if not probe().fast_16bit_gemm("cpu", torch.bfloat16):
        assert result["bf16_native"] is False and "fwd_bf16_s" not in result  # the emulated forward never ran
    # --quick measures no compiled step: the headline is the eager one
    assert result["train_step_best"] == "eager" and result["train_step_mfu_fp32"] == result["train_step_mfu_fp32_eager"]
    # the dense baseline really has the MoE's active FLOPs (within the router's share)
    assert abs(result["moe_flops_per_sample"] / result["dense_flops_per_sample"] - 1) < 0.01
    assert "features_events_per_s" not in result and result["targets"]["features_events_per_s"]["met"] is False

    # the full ranker's step breakdown accounts for the whole profiled step
    breakdown = result["full_ranker_breakdown"]
    components = [*RANKER_COMPONENTS, DENSE_OPTIMIZER, OTHER]
    assert list(breakdown["seconds"]) == components
    assert sum(breakdown["seconds"].values()) == pytest.approx(breakdown["step_s"], rel=0.01)
    # every part of the full model does real work in the step: none is charged nothing
    assert all(breakdown["seconds"][c] > 0 for c in components), breakdown
    assert breakdown["data_loading_s"] > 0


def test_perf_rejects_bad_arguments(tmp_path):
    assert main(["perf", "--events", "-1", "--json", str(tmp_path / "x.json")]) == 2


def test_an_op_is_charged_to_its_outermost_component_scope_only():
    import torch

    from pipelines.step_profile import SCOPE_PREFIX, _component_of

    x = torch.ones(4)
    with torch.profiler.profile() as prof, torch.profiler.record_function("outside"):
        with torch.profiler.record_function(SCOPE_PREFIX + "a"), torch.profiler.record_function(SCOPE_PREFIX + "b"):
            torch.add(x, 1)
        torch.mul(x, 2)  # a sibling of the scopes, under the same unscoped parent
    cache: dict = {}
    ops = {ev.name: ev for ev in prof.events() if ev.name in ("aten::add", "aten::mul")}
    assert _component_of(ops["aten::add"], cache) == "a"
    assert _component_of(ops["aten::mul"], cache) is None  # the shared parent's cache entry stays unscoped
