"""The driver's console of worker output: known library noise dropped, long lines cut."""

from __future__ import annotations

from pipelines.ray_console import CUT_NOTE, MAX_LINE_CHARS, TQDM_MAGIC, console_lines, prefix_chars


def test_noise_is_dropped_and_the_rest_kept_in_order():
    lines = [
        "INFO pipelines.train_loop: step 2 loss=0.7",
        "[2026-12-06 E 1 2] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: 'd9' "
        "has constructor arguments in the object store and max_restarts > 0. If the arguments ...",
        "INFO proxy 192.0.2.2 -- Got updated endpoints: {Deployment(name='Ingress'): ...}.",
        "Traceback (most recent call last):",
    ]
    assert console_lines(lines) == [lines[0], lines[3]]


def test_a_long_line_is_cut_to_the_limit_and_says_so():
    long = "epoch 0 " + "x" * 1000
    (shown,) = console_lines([long])
    assert len(shown) == MAX_LINE_CHARS and shown.endswith(CUT_NOTE) and shown.startswith("epoch 0 xxx")
    exact = "y" * MAX_LINE_CHARS
    assert console_lines([exact]) == [exact]


def test_the_cut_leaves_room_for_rays_worker_prefix():
    batch = {"actor_name": "RayTrainWorker", "pid": 8160, "ip": "192.0.2.2", "lines": ["z" * 1000]}
    budget = MAX_LINE_CHARS - prefix_chars(batch)
    (shown,) = console_lines(batch["lines"], budget)
    printed = f"\x1b[36m(RayTrainWorker pid=8160)\x1b[0m {shown}"  # as Ray prints a local worker's line
    assert len(printed) <= MAX_LINE_CHARS


def test_the_worker_setup_hook_imports_nothing_heavy():
    """The hook runs in every worker of the embedded Ray (Ray Data tasks, Serve's proxy, Train's
    controller): importing torch there cost each of them ~4.5 s of CPU before it did any work."""
    from tests.import_probe import heavy_imports

    assert heavy_imports("pipelines.ray_worker_setup", {"torch", "torchrec", "pipelines.config"}) == []


def test_progress_bar_messages_pass_whole():
    """Ray's tqdm_ray sends each progress-bar update as one JSON line that the driver decodes: a
    cut one failed to decode, and Ray printed a 400-character warning with it."""
    import json

    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    assert TQDM_MAGIC == RAY_TQDM_MAGIC
    update = json.dumps({"__magic_token__": RAY_TQDM_MAGIC, "desc": "Running Dataset " + "d" * 400, "x": 0})
    assert console_lines([update]) == [update]


def test_progress_bars_only_on_a_terminal(tmp_path):
    """Bars drawn into a file or a pipe are walls of carriage returns and cursor-up codes."""
    import io
    import os

    from pipelines.config import RayConfig
    from pipelines.ray_runtime import progress_bars_on

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with open(tmp_path / "log", "w") as log_file:
        assert not progress_bars_on(RayConfig(), log_file)
    read_end, write_end = os.pipe()
    with os.fdopen(read_end), os.fdopen(write_end, "w") as pipe:
        assert not progress_bars_on(RayConfig(), pipe)
    assert progress_bars_on(RayConfig(), Terminal())
    assert not progress_bars_on(RayConfig(enable_progress_bars=False), Terminal())
