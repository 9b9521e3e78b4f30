"""Training and quality benchmarks: their pieces on tiny sizes (the numbers live in README)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipelines.bench_quality import mean_std, targets
from pipelines.bench_train import TrainBenchSizes, bench_group_vs_flat, bench_sparse_state


def test_group_vs_flat_times_the_same_candidates_and_counts_training_flops():
    torch.set_num_threads(1)
    out = bench_group_vs_flat(
        TrainBenchSizes(groups=1, num_candidates=4, seq_len=16, repeats=1, peak_seconds=0.05), "longer"
    )
    assert out["group_vs_flat_speedup"] == out["flat_step_s"] / out["group_step_s"]
    assert out["group_candidates_per_s"] / out["flat_candidates_per_s"] == pytest.approx(out["group_vs_flat_speedup"])
    # A training step counts the backward too: more than the forward alone.
    assert out["train_step_flops"] > 0 and 0 < out["train_mfu"] < 1


def test_row_wise_adagrad_keeps_one_float_per_row():
    out = bench_sparse_state("full")
    assert out["sparse_optimizer_state_ratio"] <= 0.05
    # The demo preset's tables are 32 wide: 1 float per row vs Adam's 2 x 32.
    assert out["sparse_optimizer_state_ratio"] == out["sparse_optimizer_state_bytes"] / (2 * out["sparse_table_bytes"])


def test_quality_targets_are_judged_from_the_numbers():
    row = lambda auc, uauc=0.7: {"like_auc": {"mean": auc, "std": 0.0}, "like_uauc": {"mean": uauc, "std": 0.0}}
    variants = {
        "full": row(0.80, 0.75),
        "din": row(0.795, 0.70),
        "dcnv2": row(0.77, 0.70),
        "longer": row(0.79),
        "tokenmixer_large": {**row(0.78), "like_auc": {"mean": 0.78, "std": 0.004}},
        "rankmixer": row(0.785),
        "dlrm_mlp": row(0.76),
        "ugsep": row(0.777),
    }
    floors = {"item_mean_rating": {"like_auc": 0.62}, "user_mean": {"like_auc": 0.75}}
    out = targets(variants, floors)
    assert not out["full_beats_din_like_auc"]["met"]  # ahead by 0.005, not 0.01
    assert out["full_beats_din_like_uauc"]["met"] and out["full_beats_dcnv2_like_auc"]["met"]
    assert not out["longer_beats_din"]["met"]
    assert not out["ordering_like_auc"]["met"]  # rankmixer above tokenmixer_large
    assert out["ugsep_within_one_std"]["met"]  # 0.003 apart, std 0.004
    assert not out["dlrm_mlp_beats_floors"]["met"]  # 0.01 above the best floor, not 0.02
    assert out["full_beats_floors"]["met"]
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": math.sqrt(2.0)}


def test_quality_ledger_keeps_finished_runs_and_refuses_another_budget(tmp_path):
    from pipelines.bench_quality import RunLedger

    budget = {"kind": "table", "preset": "quality", "lake": "lake", "overrides": []}
    ledger = RunLedger(tmp_path / "q.json", budget, resume=False)
    ledger.runs["din/0"] = {"like_auc": 0.7, "seconds": 1.0}
    ledger.path.write_text(json.dumps({"budget": budget, "runs": ledger.runs}))
    # A resumed bench reuses the finished run (no training: run() returns it as stored).
    resumed = RunLedger(tmp_path / "q.json", budget, resume=True)
    assert resumed.run("din/0", "quality", []) == {"like_auc": 0.7, "seconds": 1.0}
    assert RunLedger(tmp_path / "q.json", budget, resume=False).runs == {}
    with pytest.raises(ValueError, match=r"q\.partial\.json was run with"):
        RunLedger(tmp_path / "q.json", {**budget, "overrides": ["--train.max_epochs=3"]}, resume=True)
    resumed.done()
    assert not ledger.path.exists()


def test_reused_rows_join_the_table_only_from_the_same_budget(tmp_path):
    from pipelines.bench_quality import reuse_rows

    row = lambda auc: {"like_auc": {"mean": auc, "std": 0.0}, "like_uauc": {"mean": 0.7, "std": 0.0}}
    budget = {"preset": "quality", "epochs": 1, "lr": 0.001, "overrides": []}
    floors = {"item_mean_rating": {"like_auc": 0.62}}
    earlier = tmp_path / "old.json"
    old_budget = {k: v for k, v in budget.items() if k != "overrides"}  # written before overrides were recorded
    old_budget["run_seconds"] = {"din/0": 5.0, "full/0": 9.0}
    old_runs = {"din/0": {"like_auc": 0.76}, "full/0": {"like_auc": 0.70}}
    old = {"variants": {"din": row(0.76), "full": row(0.70)}, "budget": old_budget, "seeds": 1, "runs": old_runs}
    earlier.write_text(json.dumps(old))
    result = {
        "variants": {"full": row(0.80)},
        "floors": floors,
        "seeds": 1,
        "budget": {**budget, "run_seconds": {"full/0": 8.0}},
        "runs": {"full/0": {"like_auc": 0.80}},
    }
    reuse_rows(result, earlier)
    # din joins; this run's full is kept, not the earlier one; the targets see both rows.
    assert result["variants"]["din"] == row(0.76) and result["variants"]["full"] == row(0.80)
    assert result["reused_rows"] == {"from": str(earlier), "variants": ["din"]}
    assert result["budget"]["run_seconds"] == {"full/0": 8.0, "din/0": 5.0}
    assert result["runs"] == {"full/0": {"like_auc": 0.80}, "din/0": {"like_auc": 0.76}}  # per-seed runs too
    assert result["targets"]["full_beats_din_like_auc"]["met"]
    other = {**result, "budget": {**budget, "lr": 0.003, "run_seconds": {}}}
    with pytest.raises(ValueError, match="old.json was run with"):
        reuse_rows(other, earlier)
    with pytest.raises(ValueError, match="does not exist"):
        reuse_rows(result, tmp_path / "missing.json")


def test_serving_gap_compares_the_training_router_with_the_served_one(small_lake):
    """A RankMixer-MoE's served (sparse inference) router differs from its training router: the
    gap is measured on real groups; a model without MoE has none."""
    from components.training_data import pin_training_data, resolved_model
    from models.variants import build_model
    from pipelines.bench_quality import serving_gap
    from pipelines.reference_train import load_split
    from tests.small_runs import config_of, train_args

    data = pin_training_data(small_lake)
    groups = load_split(data, "test", 16).slice(0, 40)
    gaps = {}
    for variant in ("rankmixer_moe", "tokenmixer_large"):
        config = config_of(train_args(small_lake, "unused", f"--model.variant={variant}"))
        torch.manual_seed(0)
        gaps[variant] = serving_gap(build_model(resolved_model(config.model, data)), groups, 16)
    moe, plain = gaps["rankmixer_moe"], gaps["tokenmixer_large"]
    assert set(moe) == {"moe_bce_train_router", "moe_bce_served", "moe_logit_rel_diff"}
    assert 0 < moe["moe_bce_train_router"] < 5 and 0 < moe["moe_bce_served"] < 5
    assert 0 < moe["moe_logit_rel_diff"] < 10  # two routers, two gatings
    assert plain["moe_logit_rel_diff"] == 0.0 and plain["moe_bce_served"] == plain["moe_bce_train_router"]
