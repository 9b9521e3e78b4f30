"""The serving bench's headline keys and plots come from its runs (literal hand-made runs here)."""

from __future__ import annotations

import pytest

from pipelines.bench_serving import headline, plot


def _run(goodput: float, tight: float = 1.0, lag: float = 0.5) -> dict:
    return {
        "goodput_per_s": goodput,
        "attainment": tight,
        "by_class": {"tight": {"attainment": tight}},
        "lag_p99_ms": lag,
        "valid": lag <= 2,
    }


def _result() -> dict:
    return {
        "in_process": {"cache_hit_p50_ratio": 0.4, "predictor_mape": 0.12},
        "serve": {
            "runs": {
                "slo": {"0.8x": [_run(8.0, 0.98), _run(8.0, 1.0)], "1.2x": [_run(12.0), _run(10.0, lag=2.5)]},
                "stock": {"0.8x": [_run(8.0)], "1.2x": [_run(4.0)]},
            },
            "light": {
                "e2e_p50_ms": 30.0,
                "compute_p50_ms": 22.5,
                "outside_model_p50_ms": 8.0,
                "forwarded_outside_model_p50_ms": 12.5,
            },
            "floor": {"e2e_p50_ms": 4.0, "e2e_p99_ms": 9.0},
            "capacity_per_s": 10.0,
            "rejections_checked": {"0.2x": {"rejected": 8, "edf_served_in_time": 2}},
        },
    }


def test_headline_keys_are_computed_from_the_runs():
    out = headline(_result())
    assert out["goodput_ratio_vs_stock"] == pytest.approx(11.0 / 4.0)
    assert out["attainment_tight"] == pytest.approx(0.99)
    assert out["serve_overhead_p50_ms"] == pytest.approx(7.5)
    assert (out["serve_floor_p50_ms"], out["serve_floor_p99_ms"]) == (4.0, 9.0)
    assert out["serve_overhead_over_floor_p50_ms"] == pytest.approx(3.5)
    assert out["serve_forwarding_hop_p50_ms"] == pytest.approx(4.5)
    assert out["generator_lag_p99_ms"] == 2.5 and out["invalid_runs"] == 1
    assert (out["cache_hit_p50_ratio"], out["predictor_mape"]) == (0.4, 0.12)
    assert out["slo_wrong_rejection_share_0.2x"] == pytest.approx(0.25)


def test_plots_show_every_policy_against_load(tmp_path):
    from PIL import Image

    written = plot(_result(), tmp_path, "serving")
    assert written == ["serving_goodput.png", "serving_attainment.png"]
    for name in written:
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 300 and image.size[1] > 200


def test_runs_kept_from_before_the_floor_give_nan_floor_keys():
    import math

    result = _result()
    del result["serve"]["floor"]
    out = headline(result)
    assert math.isnan(out["serve_floor_p50_ms"]) and math.isnan(out["serve_overhead_over_floor_p50_ms"])
    del result["serve"]["rejections_checked"]
    assert math.isnan(headline(result)["slo_wrong_rejection_share_0.2x"])


def _outcome(status: int, good: bool) -> dict:
    return {"status": status, "good": good}


def test_slos_rejections_are_checked_against_edf_on_the_same_schedule():
    """Per load, summed over seeds: slo's 429/503 answers, and how many of the same request
    ids edf served in time; a load or seed edf did not run is not checked."""
    from pipelines.bench_serving import check_rejections

    slo = {"a": _outcome(503, False), "b": _outcome(429, False), "c": _outcome(200, True), "d": _outcome(503, False)}
    edf = {"a": _outcome(200, True), "b": _outcome(200, False), "c": _outcome(200, True), "d": _outcome(0, False)}
    outcomes = {
        ("slo", "0.2x", 0): slo,
        ("edf", "0.2x", 0): edf,
        ("slo", "0.2x", 1): {"x": _outcome(503, False)},
        ("edf", "0.2x", 1): {"x": _outcome(200, True)},
        ("slo", "0.8x", 0): slo,  # no edf run at 0.8x
        ("stock", "0.2x", 0): slo,
    }
    assert check_rejections(outcomes) == {"0.2x": {"rejected": 4, "edf_served_in_time": 2}}


def _answered(scheduled_ms: float, latency_ms: float, status: int = 200) -> dict:
    return {"scheduled_ms": scheduled_ms, "latency_ms": latency_ms, "status": status}


def test_backlog_is_read_from_the_generators_clock_not_the_callers():
    """Drain: from the schedule's end to the last answer (the generator's start-up is not in it);
    unanswered requests (status 0) are not answers; served rate over the time to the last answer."""
    from pipelines.bench_serving import backlog

    kept_up = [_answered(100.0 * i, 40.0) for i in range(60)]  # 6 s at 10/s, answered in 40 ms
    assert backlog(kept_up, 6.0) == {"drain_s": 0.0, "served_per_wall_s": 10.0}
    behind = [_answered(100.0 * i, 40.0 + 20.0 * i) for i in range(60)]  # each answer 20 ms later
    out = backlog(behind, 6.0)
    assert out["drain_s"] == pytest.approx((5900.0 + 40.0 + 1180.0) / 1000.0 - 6.0)
    assert out["served_per_wall_s"] == pytest.approx(60 / 7.12)
    lost = [*kept_up[:-1], _answered(5900.0, 30000.0, status=0)]  # a time-out is no answer
    assert backlog(lost, 6.0)["drain_s"] == 0.0
    assert backlog(lost, 6.0)["served_per_wall_s"] == pytest.approx(59 / 6.0)
    rejected = [*kept_up[:-1], _answered(5900.0, 900.0, status=503)]  # a late rejection is an answer
    assert backlog(rejected, 6.0)["drain_s"] == pytest.approx(0.8)


class _Saturating:
    """A stand-in for the bench's ``Service`` (``fire`` only): it answers within 0.3 s below
    ``capacity`` req/s and, above it, leaves a backlog that grows with the probe's length."""

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity

    def fire(self, rate: float, seed: int, duration_s: float) -> tuple[dict, list]:
        excess = max(rate - self.capacity, 0.0) * duration_s  # requests left at the schedule's end
        return {"drain_s": 0.3 + excess / self.capacity, "served_per_wall_s": min(rate, self.capacity)}, []


@pytest.mark.parametrize("seconds", [6.0, 15.0])
def test_the_capacity_probe_finds_the_same_capacity_in_short_and_long_probes(seconds):
    from pipelines.bench_serving import probe_capacity

    found = probe_capacity(_Saturating(20.0), guess=8.0, duration_s=seconds)
    assert found["capacity_per_s"] == pytest.approx(20.0, rel=0.1)
    assert [p["drain_s"] <= 0.5 for p in found["probes"]][:3] == [True, True, True]
