"""``python -m pipelines.bench perf --quick`` writes every figure the issue names, each sane."""

from __future__ import annotations

import json
import math

import pytest

from pipelines.bench import main
from pipelines.bench_perf import KEYS
from pipelines.step_profile import DENSE_OPTIMIZER, OTHER, RANKER_COMPONENTS


def test_perf_quick_writes_every_figure(tmp_path):
    """Every figure but the features job's, which is the data bench's run (tests/pipelines/test_bench_data.py)."""
    out = tmp_path / "perf.json"
    assert main(["perf", "--quick", "--skip-features", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in [k for k in KEYS if not k.startswith("features_")]:
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    for key in ("train_step_mfu_fp32", "fwd_mfu_bf16", "full_ranker_train_mfu"):
        assert result[key] < 2.0, (key, result[key])  # a fraction of the peak measured in the same run
    assert result["peak_fp32_flops_per_s_eager"] > 1e9 and result["peak_bf16_flops_per_s"] > 1e9
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
