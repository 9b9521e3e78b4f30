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
