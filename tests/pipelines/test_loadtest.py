"""The load test's latency axis: a few plain, distinct ticks over any range."""

from __future__ import annotations

import pytest

from pipelines.loadtest import log_ticks


@pytest.mark.parametrize(("low", "high"), [(30.2, 44.9), (1.3, 4800.0), (7.0, 7.0), (0.0, 12.0)])
def test_log_ticks_are_few_distinct_round_values_over_the_range(low, high):
    ticks = log_ticks(low, high)
    assert 1 <= len(ticks) <= 5 and ticks == sorted(set(ticks))
    assert all(float(f"{t:.2g}") == t for t in ticks)  # two significant digits: short labels
    assert ticks[0] <= max(low, 1e-3) * 1.05 and ticks[-1] >= high * 0.95


def test_a_narrow_range_still_gets_several_labels():
    assert log_ticks(30.2, 44.9) == [30.0, 33.0, 37.0, 41.0, 45.0]


def _thread_affinities(pid: int) -> list[set[int]]:
    import os

    return [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_the_generator_gets_a_core_of_its_own_and_its_descendants_every_thread_the_others():
    import os
    import subprocess
    import sys

    from pipelines.loadtest import generator_core

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one core: nothing to split (the one-core decision is tested below)")
    # A child with a second thread already running: affinity is per thread in Linux.
    code = (
        "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); "
        "print(1, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"1"
        before_child = _thread_affinities(child.pid)
        with generator_core() as core:
            assert core == cores[-1]
            assert os.sched_getaffinity(0) == {cores[-1]}
            assert _thread_affinities(child.pid) == [set(cores[:-1])] * len(before_child)
            assert len(before_child) >= 2
        assert os.sched_getaffinity(0) == set(cores)
        assert _thread_affinities(child.pid) == before_child
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_on_one_core_the_generator_is_not_pinned():
    import os

    from pipelines.loadtest import generator_core

    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        with generator_core() as core:
            assert core is None and os.sched_getaffinity(0) == {min(cores)}
    finally:
        os.sched_setaffinity(0, cores)


def test_with_pinning_off_nothing_is_pinned():
    import os

    from pipelines.loadtest import generator_core

    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    with generator_core(enabled=False) as core:
        assert core is None
        if cores is not None:
            assert os.sched_getaffinity(0) == cores
