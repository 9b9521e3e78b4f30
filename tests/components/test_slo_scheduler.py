"""The SLO-aware scheduler core, without Serve: ordering, rejection, credits, budget, and the
policies compared on one simulated schedule."""

from __future__ import annotations

import numpy as np
import pytest

from components.latency_model import BatchShape, LatencyModel
from components.slo_scheduler import Pending, SchedulerConfig, SloScheduler
from components.slo_simulation import Arrival, simulate, summarize

# overhead 2 ms; an uncached user 1 ms + 0.01 ms per event; a candidate 0.1 ms (+0 per event).
COEF = (2.0, 1.0, 0.01, 0.1, 0.0)


def scheduler(**kw) -> SloScheduler:
    return SloScheduler(SchedulerConfig(**{"margin_factor": 1.0, "margin_ms": 0.0, **kw}), LatencyModel(COEF))


def req(rid: str, deadline: float, n: int = 10, user: int = 0, arrival: float = 0.0, cached: bool = True) -> Pending:
    return Pending(rid, user, n, 100, cached, arrival, deadline)


# ---------------------------------------------------------------- latency model
def test_latency_model_recovers_known_coefficients_and_reports_its_fit():
    rng = np.random.default_rng(0)
    shapes = [
        BatchShape(
            tuple(int(x) for x in rng.integers(1, 300, k)),
            tuple(int(x) for x in rng.integers(10, 3000, k)),
            tuple(bool(x) for x in rng.random(k) < 0.5),
        )
        for k in rng.integers(1, 8, 60)
    ]
    truth = np.array([3.0, 2.0, 0.01, 0.05, 1e-4])
    times = [float(truth @ s.features()) for s in shapes]
    model = LatencyModel.fit(shapes, times)
    np.testing.assert_allclose(model.coef, truth, rtol=1e-6)
    assert model.report.r2 == pytest.approx(1.0) and model.report.mape < 1e-6 and model.report.samples == 60


def test_latency_model_fit_never_goes_negative_and_says_how_bad_it_is():
    # Times that fall with the candidate count: a negative slope is clipped to 0, and the
    # report shows a poor fit instead of a model that predicts faster batches for more work.
    shapes = [BatchShape((n,), (100,), (True,)) for n in (1, 50, 100, 150, 200, 250)]
    model = LatencyModel.fit(shapes, [10.0, 9.0, 8.0, 7.0, 6.0, 5.0])
    assert (model.coef >= 0).all() and model.coef[3] == 0.0
    assert model.report.r2 < 0.5 and model.report.max_abs_error_ms >= 2.0
    with pytest.raises(ValueError, match="at least 5 samples"):
        LatencyModel.fit(shapes[:3], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        LatencyModel.fit(shapes, [1.0, 2.0, float("nan"), 3.0, 4.0, 5.0])


def test_latency_model_tracks_drift_by_ewma():
    model = LatencyModel(COEF, ewma_alpha=0.5)
    shape = BatchShape((10,), (100,), (True,))
    assert model.predict_ms(shape) == pytest.approx(3.0)  # 2 + 10 x 0.1
    for _ in range(20):
        model.observe(shape, 6.0)  # the machine got twice as slow
    assert model.predict_ms(shape) == pytest.approx(6.0, rel=1e-4)


def test_latency_model_refits_on_served_batches_what_one_scale_cannot_fix():
    import numpy as np

    rng = np.random.default_rng(0)

    def shapes(n: int) -> list[BatchShape]:
        return [
            BatchShape((int(c),), (int(length),), (bool(h),))
            for c, length, h in zip(rng.integers(1, 300, n), rng.integers(1, 1000, n), rng.random(n) < 0.5)
        ]

    truth = LatencyModel((1.0, 5.0, 0.01, 0.2, 0.0), refit_every=0)
    # The startup sweep ran beside other replicas: overhead 10x, per candidate a quarter.
    skewed = LatencyModel((10.0, 5.0, 0.01, 0.05, 0.0), refit_every=0)
    sweep = shapes(30)
    served = shapes(256)

    def error(model: LatencyModel, batches: list[BatchShape]) -> float:
        return float(np.mean([abs(model.predict_ms(b) / truth.predict_ms(b) - 1) for b in batches]))

    refitting = LatencyModel.fit(sweep, [skewed.predict_ms(b) for b in sweep], refit_every=64)
    scale_only = LatencyModel.fit(sweep, [skewed.predict_ms(b) for b in sweep], refit_every=0)
    for model in (refitting, scale_only):
        for b in served[:192]:
            model.observe(b, truth.predict_ms(b))
    assert refitting.refits >= 1 and refitting.live is not None and refitting.live.mape < 0.1
    assert error(refitting, served[192:]) < 0.1 < 0.25 < error(scale_only, served[192:])
    assert scale_only.refits == 0 and scale_only.live is None


# ---------------------------------------------------------------- ordering and batching
def test_batches_are_formed_in_deadline_order_not_arrival_order():
    s = scheduler(max_batch_requests=1)
    for rid, deadline in (("late", 500.0), ("soon", 100.0), ("mid", 300.0)):
        assert s.submit(req(rid, deadline), 0.0).accepted
    order = []
    now = 0.0
    while (batch := s.next_batch(now)) is not None:
        order += [item.request.request_id for item in batch.items]
        now += batch.predicted_ms
        s.complete(batch, batch.predicted_ms, now)
    assert order == ["soon", "mid", "late"]


def test_fifo_policy_keeps_arrival_order():
    s = scheduler(policy="fifo", max_batch_requests=1)
    for rid, deadline in (("late", 500.0), ("soon", 100.0)):
        s.submit(req(rid, deadline), 0.0)
    assert s.next_batch(0.0).items[0].request.request_id == "late"


def test_batch_respects_candidate_budget_and_the_tightest_deadline():
    s = scheduler(max_batch_candidates=50)
    for i in range(6):
        s.submit(req(f"r{i}", 1000.0, n=20), 0.0)
    batch = s.next_batch(0.0)
    assert batch.candidates <= 50 and len(batch.items) == 2
    # A tight request (deadline 6 ms: overhead 2 + 20 x 0.1 = 4 ms fits, one more 20 does not).
    s2 = scheduler()
    s2.submit(req("tight", 6.0, n=20), 0.0)
    s2.submit(req("other", 5.5, n=20), 0.0)
    s2.submit(req("loose", 1000.0, n=20), 0.0)
    batch = s2.next_batch(0.0)
    assert [i.request.request_id for i in batch.items] == ["other"]
    assert 0.0 + batch.predicted_ms <= 5.5


def test_one_user_side_per_batch_even_with_two_requests_of_the_user():
    s = scheduler()
    s.submit(req("a", 1000.0, user=7, cached=False), 0.0)
    s.submit(req("b", 1000.0, user=7, cached=False), 0.0)
    batch = s.next_batch(0.0)
    assert batch.shape.cached == (False, True)
    assert batch.predicted_ms == pytest.approx(2.0 + (1.0 + 0.01 * 100) + 20 * 0.1)


# ---------------------------------------------------------------- rejection
def test_unattainable_request_is_rejected_at_arrival_with_503():
    s = scheduler()
    verdict = s.submit(req("hopeless", 3.0, n=100), 0.0)  # needs 2 + 10 ms
    assert (verdict.status, verdict.reason) == (503, "slo_unattainable") and verdict.retry_after_s > 0
    assert s.queue == [] and s.stats.rejected["slo_unattainable"] == 1


def test_queue_walk_rejects_what_the_work_ahead_makes_late_and_keeps_the_rest():
    s = scheduler()
    s.submit(req("first", 20.0, n=100), 0.0)  # 12 ms alone
    s.submit(req("second", 20.0, n=100), 0.0)  # also 12 ms alone: fits at arrival, not behind "first"
    s.submit(req("third", 200.0, n=100), 0.0)
    batch = s.next_batch(0.0)
    rejected = s.drain_rejected()
    assert [r.request_id for r, _ in rejected] == ["second"]
    assert rejected[0][1].status == 503 and s.drain_rejected() == []
    assert {i.request.request_id for i in batch.items} <= {"first", "third"}


def test_degradation_scores_fewer_candidates_instead_of_rejecting():
    s = scheduler(degrade=True, min_degraded_candidates=5)
    request = req("big", 7.0, n=100)  # 2 ms + 0.1 ms per candidate: 50 fit in 7 ms
    assert s.submit(request, 0.0).accepted
    assert request.degraded and request.target == 50 and s.stats.degraded == 1
    assert not s.submit(req("tiny", 2.2, n=100), 0.0).accepted  # 2 of them fit: below the minimum


@pytest.mark.parametrize("default", [False, True])
def test_a_requests_own_opt_in_overrides_the_degrade_default(default: bool):
    s = scheduler(degrade=default, min_degraded_candidates=5)
    opted_in, opted_out, unsaid = req("in", 7.0, n=100), req("out", 7.0, n=100), req("unsaid", 7.0, n=100)
    opted_in.allow_degraded, opted_out.allow_degraded = True, False
    assert s.submit(opted_in, 0.0).accepted and opted_in.target == 50  # 50 of 100 fit in 7 ms
    assert s.submit(opted_out, 0.0).status == 503 and not opted_out.degraded
    assert s.submit(unsaid, 0.0).accepted is default and unsaid.degraded is default


def test_edf_without_rejection_never_rejects_for_time_but_bounds_the_queue():
    s = scheduler(policy="edf", max_queue=2)
    assert s.submit(req("a", 1.0, n=100), 0.0).accepted  # hopeless, still queued
    assert s.submit(req("b", 1.0), 0.0).accepted
    verdict = s.submit(req("c", 1000.0), 0.0)
    assert (verdict.status, verdict.reason) == (429, "overloaded")
    s.next_batch(0.0)
    assert s.drain_rejected() == []


def test_reject_on_arrival_counts_the_queued_work_ahead():
    s = scheduler(policy="reject_on_arrival")
    assert s.submit(req("a", 20.0, n=100), 0.0).accepted
    assert not s.submit(req("b", 20.0, n=100), 0.0).accepted  # 12 + 10 ms > 20
    assert s.submit(req("c", 100.0, n=100), 0.0).accepted


# ---------------------------------------------------------------- chunks and credits
def test_large_loose_request_goes_in_short_chunks_around_tight_ones_and_finishes_in_time():
    s = scheduler(chunk_candidates=16, batch_quantum_ms=10.0)
    big = req("big", 300.0, n=1000)  # 102 ms of work alone, 300 ms to do it
    s.submit(big, 0.0)
    now, finished, longest = 0.0, {}, 0.0
    for k in range(20):  # a tight request every 10 ms, due 12 ms later
        now = max(now, 10.0 * k)
        assert s.submit(req(f"t{k}", 10.0 * k + 12.0, n=30, arrival=10.0 * k), now).accepted
        batch = s.next_batch(now)
        longest = max(longest, batch.predicted_ms)
        now += batch.predicted_ms
        finished.update({r.request_id: now for r in s.complete(batch, batch.predicted_ms, now)})
    while (batch := s.next_batch(now)) is not None:
        now += batch.predicted_ms
        finished.update({r.request_id: now for r in s.complete(batch, batch.predicted_ms, now)})
    assert s.drain_rejected() == []
    assert s.stats.chunks > 5 and longest <= 10.0 + 1e-9  # the big one went in quantum-sized pieces
    assert all(finished[f"t{k}"] <= 10.0 * k + 12.0 for k in range(20)), finished
    assert finished["big"] <= 300.0


def test_credit_owes_a_large_request_its_pace_even_when_tight_work_fills_the_quantum():
    s = scheduler(chunk_candidates=8, batch_quantum_ms=10.0)
    big = req("big", 1000.0, n=1000)
    s.submit(big, 0.0)
    s.submit(req("tight", 10.0, n=80), 0.0)  # 2 + 8 ms: the quantum is full
    first = s.next_batch(0.0)
    assert [i.request.request_id for i in first.items] == ["tight"]  # no credit yet: nothing for big
    s.complete(first, first.predicted_ms, 10.0)
    s.submit(req("tight2", 130.0, n=80, arrival=100.0), 100.0)
    second = s.next_batch(100.0)
    # 1000 left over 900 ms of slack: 10/9 candidate per ms, earned for 100 ms = 111 owed,
    # served past the quantum (10 + 11.1 ms) because tight2 still makes 130 ms.
    counts = {i.request.request_id: i.count for i in second.items}
    assert counts == {"tight2": 80, "big": 111} and big.credit == pytest.approx(1 / 9)  # the fraction carries


def test_credit_never_breaks_a_completing_deadline():
    s = scheduler(chunk_candidates=8, batch_quantum_ms=10.0)
    big = req("big", 1000.0, n=1000)
    s.submit(big, 0.0)
    s.next_batch(0.0)  # starts the credit clock; big alone takes a quantum-sized chunk
    s.submit(req("tight", 110.0, n=80, arrival=100.0), 100.0)
    batch = s.next_batch(100.0)
    assert [i.request.request_id for i in batch.items] == ["tight"] and big.credit > 100


def test_at_the_last_moment_a_large_request_is_served_whole():
    s = scheduler(chunk_candidates=16, batch_quantum_ms=10.0)
    big = req("big", 110.0, n=1000)  # 102 ms alone: chunks would add overhead and miss
    s.submit(big, 0.0)
    batch = s.next_batch(0.0)
    assert batch.items[0].count == 1000 and batch.predicted_ms <= 110.0


# ---------------------------------------------------------------- policies on one schedule
def _schedule(rate_per_s: float, seconds: float, seed: int) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    while t < seconds * 1000:
        t += rng.exponential(1000 / rate_per_s)
        tight = rng.random() < 0.6
        n = int(rng.integers(10, 60)) if tight else int(rng.integers(200, 800))
        name, slo = ("tight", 40.0) if tight else ("loose", 400.0)
        out.append(Arrival(t, f"r{len(out)}", int(rng.integers(0, 50)), n, 200, name, slo))
    return out


def test_slo_policy_beats_fifo_under_overload_in_simulated_time():
    arrivals = _schedule(rate_per_s=60, seconds=10, seed=1)
    rng = np.random.default_rng(0)
    true_ms = lambda shape: float(np.dot(COEF, shape.features())) * rng.lognormal(0, 0.05)
    results = {}
    for policy in ("fifo", "slo"):
        s = SloScheduler(SchedulerConfig(policy=policy, max_batch_candidates=1024), LatencyModel(COEF))
        results[policy] = summarize(simulate(arrivals, s, true_ms), 10_000)
    assert results["slo"]["goodput_per_s"] > 1.5 * results["fifo"]["goodput_per_s"], results
    assert results["slo"]["by_class"]["tight"]["attainment"] > results["fifo"]["by_class"]["tight"]["attainment"]
    assert sum(results["slo"]["rejected"].values()) > 0 and results["fifo"]["rejected"] == {}


def test_simulation_answers_every_request_exactly_once():
    arrivals = _schedule(rate_per_s=80, seconds=3, seed=2)
    s = SloScheduler(SchedulerConfig(max_queue=8), LatencyModel(COEF))
    outcomes = simulate(arrivals, s, lambda shape: float(np.dot(COEF, shape.features())))
    assert sorted(o.request_id for o in outcomes) == sorted(a.request_id for a in arrivals)
    assert {o.status for o in outcomes} <= {200, 429, 503}
    assert all(o.latency_ms >= 0 for o in outcomes)


def test_config_names_the_bad_knob():
    with pytest.raises(ValueError, match="scheduler.policy"):
        SchedulerConfig(policy="lifo")
    with pytest.raises(ValueError, match="scheduler.max_queue"):
        SchedulerConfig(max_queue=0)
    with pytest.raises(ValueError, match="scheduler.batch_quantum_ms"):
        SchedulerConfig(batch_quantum_ms=0)
    with pytest.raises(ValueError, match="margin_factor >= 1"):
        SchedulerConfig(margin_factor=0.5)
