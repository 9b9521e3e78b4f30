"""The main job (what `make demo` runs): ingest -> features -> train -> evaluate -> export ->
serve -> loadtest -> report on the session's Ray, then reuse, --from, --only and --keep-serving."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipelines.run import STAGES, main, plan, unfinished_run_of
from pipelines.run_manifest import MANIFEST, RunManifest, StageRecord, find_reusable, stage_key
from tests.serving.live_service import free_port
from tests.small_runs import TINY_MODEL, config_of

PLOTS = (
    "training_curves.png",
    "metrics_per_variant.png",
    "goodput_vs_load.png",
    "attainment_vs_load.png",
    "latency_cdf.png",
    "cache_hit_rate.png",
)


def run_args(tmp: Path, port: int) -> list[str]:
    return [
        "--config",
        "demo",
        f"--lake.root={tmp / 'lake'}",
        "--lake.num_buckets=2",
        "--ingest.source=synthetic",
        "--ingest.synthetic.num_events=3000",
        "--ingest.synthetic.num_users=40",
        "--ingest.synthetic.num_items=300",
        "--ingest.synthetic.max_history=600",
        "--features.max_seq_len=50",
        "--ray.enable_progress_bars=false",
        *TINY_MODEL,
        "--train.num_workers=0",
        "--train.max_steps=4",
        "--train.batch_size=4",
        "--train.max_seq_len=32",
        "--train.log_every_steps=2",
        f"--train.storage_path={tmp / 'ckpt'}",
        f"--export.output={tmp / 'bundle'}",
        f"--serve.port={port}",
        "--serve.replica_cpus=0.25",
        "--serve.profile_batches=8",
        f"--run.reports_dir={tmp / 'reports'}",
        "--run.loadtest_rates=[4,8]",
        "--run.loadtest_duration_s=2",
    ]


def manifests(tmp: Path) -> list[RunManifest]:
    found = [RunManifest.load(p) for p in (tmp / "reports").glob(f"*/{MANIFEST}")]
    return sorted(found, key=lambda m: m.started)


def statuses(manifest: RunManifest) -> dict[str, str]:
    return {name: record.status for name, record in manifest.stages.items()}


@pytest.fixture(scope="module")
def first_run(ray_session, tmp_path_factory):
    """One whole run on a small synthetic lake, as ``make demo --keep-serving`` runs it: a fresh
    process with its own embedded Ray (beside the session's: two instances on the machine),
    training on a real Ray Train worker, serving after the report until SIGTERM.
    (its folder, its args, its console: stdout and stderr as one, /readyz while it served, port)."""
    tmp = tmp_path_factory.mktemp("run")
    port = free_port()
    args = [*run_args(tmp, port), "--train.num_workers=1"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    child = subprocess.Popen(
        [sys.executable, "-m", "pipelines.run", *args, "--keep-serving"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines, ready = [], {}
    try:
        deadline = time.time() + 1800  # generous: a loaded machine
        for line in child.stdout:
            lines.append(line)
            if "Ctrl-C (or SIGTERM) stops it." in line or time.time() > deadline:
                break
        if any(f"at http://127.0.0.1:{port}" in line for line in lines):
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).json()
        child.send_signal(signal.SIGTERM)
        rest, _ = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    log = "".join(lines) + (rest or "")
    assert child.returncode == 0, log[-3000:]
    return tmp, args, log, ready, port


def test_a_demo_run_logs_quietly(first_run):
    """No traceback and no line over 300 characters: FBGEMM's per-table argument dumps and Ray
    Train's PlacementGroupCleaner (which looked Ray up by scanning the machine) used to print both."""
    log = first_run[2]
    assert "Traceback" not in log, log[log.index("Traceback") - 200 :][:3000]
    long_lines = [line[:200] for line in log.splitlines() if len(line) > 300]
    assert not long_lines, long_lines[:3]
    assert "Arguments:" not in log and "Found multiple active Ray instances" not in log
    assert re.search(r"\(RayTrainWorker pid=\d+\).* epoch 0 step 4/4 ", log)  # the worker's progress still shows


def test_the_whole_run_serves_load_tests_and_reports(first_run):
    tmp, _, out, *_ = first_run
    # What the stages print: the lake's tables, one resolved group, training, test metrics, bundle.
    assert re.search(r"^events +0 +3000$", out, re.M)
    for table in ("events", "items", "users", "sequences", "samples"):
        assert f"\n{table} " in out
    assert "one sample group:" in out and "labels (1, 32, 2)" in out
    assert re.search(r"^run full: 4 steps", out, re.M)
    assert "full on test (" in out and "like_auc " in out
    assert f"serving bundle {tmp / 'bundle'}" in out
    from components.bundle import load_bundle

    assert load_bundle(str(tmp / "bundle")).manifest.variant == "full"
    # The manifest: every stage ran, with its inputs' key and its outputs.
    (manifest,) = manifests(tmp)
    assert manifest.status == "succeeded"
    assert statuses(manifest) == dict.fromkeys(STAGES, "ran")
    folder = tmp / "reports" / manifest.run_id
    assert f"report: {folder / 'report.md'}" in out
    assert manifest.stages["export"].outputs["model_version"] == load_bundle(str(tmp / "bundle")).model_version
    assert manifest.stages["ingest"].outputs["versions"] == {"items": 0, "users": 0, "events": 0}
    # The load test hit the served model at both rates and it answered (the service was up).
    # Answered with 200, not "within its SLO": on a loaded machine every request of a rate can miss
    # its deadline (goodput 0) while the service works; latency is the serving bench's business.
    summary = json.loads((folder / "loadtest" / "summary.json").read_text())
    assert sorted(summary["runs"], key=float) == ["4", "8"]
    for rate, run in summary["runs"].items():
        answered = run["offered"] - sum(run["rejected"].values())
        assert run["offered"] > 0 and answered > 0, f"{rate} req/s: {run}"
    # The report: every section, its plots written beside it, numbers from the run's JSON.
    report = (folder / "report.md").read_text()
    for heading in ("## Stages", "## Data", "## Training", "## Quality", "## Serving", "## Load test", "## Artifacts"):
        assert heading in report
    for plot in PLOTS:
        assert (folder / plot).stat().st_size > 1000 and f"]({plot})" in report
    metrics = json.loads((folder / "metrics_test.json").read_text())["metrics"]
    assert f"| full | {metrics['like_auc']:.4f} |" in report
    assert "floor: item_popularity" in report
    assert str(tmp / "ckpt" / "full") in report and manifest.stages["export"].outputs["model_version"] in report


def test_a_failed_stage_is_recorded_with_its_error(ray_session, tmp_path, capsys):
    args = run_args(tmp_path, free_port())
    assert main([*args, "--features.min_seq_len=100000", "--stages", "train"]) == 1
    assert "run: failed:" in capsys.readouterr().err
    (manifest,) = manifests(tmp_path)
    assert manifest.status == "failed"
    assert statuses(manifest) == {"ingest": "ran", "features": "failed"}
    assert manifest.stages["features"].error.startswith("FeaturesError")
    assert manifest.error == manifest.stages["features"].error


def test_keep_serving_serves_until_sigterm_then_shuts_down(first_run):
    """The first run's --keep-serving: ready after the report, and a clean stop on SIGTERM."""
    _, _, log, ready, port = first_run
    assert f"at http://127.0.0.1:{port}" in log, log[-3000:]
    assert ready.get("ready") is True, ready
    assert "stopped serving" in log and "driver died" not in log
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)


def test_unchanged_stages_are_reused_and_from_and_only_rerun_what_they_name(first_run):
    tmp, args, *_ = first_run
    first = manifests(tmp)[0]
    assert main([*args, "--stages", "export"]) == 0
    reuse = manifests(tmp)[-1]
    assert statuses(reuse) == dict.fromkeys(STAGES[:5], "reused")
    assert {r.from_run for r in reuse.stages.values()} == {first.run_id}
    assert reuse.stages["train"].outputs == first.stages["train"].outputs

    assert main([*args, "--from", "export", "--stages", "export"]) == 0
    assert statuses(manifests(tmp)[-1]) == {**dict.fromkeys(STAGES[:4], "reused"), "export": "ran"}

    # --only report: a new report of the reused outputs, the load test's included.
    assert main([*args, "--only", "report"]) == 0
    only = manifests(tmp)[-1]
    assert statuses(only) == {**dict.fromkeys(STAGES[:7], "reused"), "report": "ran"}
    assert "## Load test" in (tmp / "reports" / only.run_id / "report.md").read_text()

    # A features setting changes: features runs again, and so does everything downstream of it.
    # (trained in this process: a Ray Train worker would add ~20 s and nothing to this check)
    assert main([*args, "--features.session_gap_s=900", "--train.num_workers=0", "--stages", "train"]) == 0
    changed = manifests(tmp)[-1]
    assert statuses(changed) == {"ingest": "reused", "features": "ran", "train": "ran"}
    assert changed.stages["features"].outputs["versions"]["samples"] == 1
    # The old run folder's checkpoint was trained on samples v0: a fresh run started beside it.
    checkpoint = changed.stages["train"].outputs["checkpoint"]
    assert re.search(r"/ckpt/full-\d{8}-\d{6}/checkpoint_", checkpoint)


def test_only_fails_clearly_without_earlier_outputs(tmp_path, capsys):
    args = run_args(tmp_path, free_port())
    assert main([*args, "--only", "evaluate"]) == 1
    err = capsys.readouterr().err
    assert "--only needs the outputs of ingest" in err and "Traceback" not in err
    (manifest,) = manifests(tmp_path)
    assert manifest.status == "failed" and "RunError" in manifest.error


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------
def test_plan_modes():
    assert plan() == {**dict.fromkeys(STAGES[:5], "reuse_or_run"), "serve": "run", "loadtest": "run", "report": "run"}
    assert plan(start="train", last="export") == {
        **dict.fromkeys(STAGES[:2], "reuse_or_run"),
        **dict.fromkeys(STAGES[2:5], "run"),
        **dict.fromkeys(STAGES[5:], "skip"),
    }
    assert plan(only="evaluate") == {
        **dict.fromkeys(STAGES[:3], "reuse"),
        "evaluate": "run",
        **dict.fromkeys(STAGES[4:], "skip"),
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--from", "train", "--stages", "ingest"], "--from train comes after --stages ingest"),
        (["--keep-serving", "--stages", "train"], "--keep-serving needs a bundle"),
    ],
)
def test_contradictory_flags_exit_2(tmp_path, capsys, extra, message):
    assert main([*run_args(tmp_path, 1), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "lake").exists()


def test_reuse_needs_the_same_key_and_outputs_still_there(tmp_path):
    reports = str(tmp_path)
    old = RunManifest("20260101-000000-aaaa", "demo", [], {}, started=1.0)
    old.record(StageRecord("train", "ran", stage_key({"lr": 1}), {"lr": 1}, {"checkpoint": "a"}))
    old.save(tmp_path / old.run_id)
    new = RunManifest("20260102-000000-bbbb", "demo", [], {}, started=2.0)
    new.record(StageRecord("train", "ran", stage_key({"lr": 1}), {"lr": 1}, {"checkpoint": "b"}))
    new.save(tmp_path / new.run_id)
    key = stage_key({"lr": 1})
    assert find_reusable(reports, "train", key, lambda out: True)[1].outputs == {"checkpoint": "b"}
    # The newest one's outputs are gone: the older one is used.
    found = find_reusable(reports, "train", key, lambda out: out["checkpoint"] == "a")
    assert found[0] == old.run_id
    assert find_reusable(reports, "train", stage_key({"lr": 2}), lambda out: True) is None
    assert find_reusable(reports, "evaluate", key, lambda out: True) is None


def test_a_checkpoint_of_other_settings_is_not_continued(small_lake, trained):
    from components.checkpoint import read_meta
    from tests.small_runs import train_args

    storage, path = trained
    args = train_args(small_lake, storage, "--train.run_name=base")
    meta = read_meta(path)
    config = config_of(args)
    assert unfinished_run_of(meta, config, meta.samples_version) == ""
    assert "max_epochs" not in unfinished_run_of(meta, config_of([*args, "--train.max_epochs=5"]), meta.samples_version)
    assert "(lr)" in unfinished_run_of(meta, config_of([*args, "--train.lr=0.5"]), meta.samples_version)
    assert "samples version" in unfinished_run_of(meta, config, meta.samples_version + 1)
    assert "ranker.dim" in unfinished_run_of(meta, config_of([*args, "--model.ranker.dim=32"]), meta.samples_version)


def test_evaluation_of_a_checkpoint_rewritten_in_place_is_not_reused(trained, tmp_path):
    """Another training run of the same name and best step writes the same checkpoint path: the
    evaluate and export stages' inputs see the new meta (weights, settings, metrics) and re-run."""
    import dataclasses
    import shutil

    from components.checkpoint import read_meta, write_meta
    from pipelines.run import checkpoint_identity, stage_inputs

    _, path = trained
    copy = str(tmp_path / "checkpoint_000000142")
    shutil.copytree(path, copy)
    manifest = RunManifest("20260101-000000-aaaa", "demo", [], {}, started=1.0)
    manifest.record(StageRecord("train", "ran", stage_key({}), {}, {"checkpoint": copy}))
    config = config_of(["--config", "demo"])
    before = {stage: stage_inputs(stage, config, manifest) for stage in ("evaluate", "export")}
    assert before["evaluate"]["checkpoint_meta"] == checkpoint_identity(copy, {}) is not None
    meta = read_meta(copy)
    write_meta(copy, dataclasses.replace(meta, metrics={**meta.metrics, "valid/like_auc": 0.5}))
    for stage in ("evaluate", "export"):
        after = stage_inputs(stage, config, manifest)
        assert after["checkpoint"] == before[stage]["checkpoint"]
        assert stage_key(after) != stage_key(before[stage]), stage
    assert checkpoint_identity(str(tmp_path / "missing"), {}) is None


def test_run_rejects_bad_override(capsys):
    assert main(["--config", "demo", "--features.candidates_per_group=zero"]) == 2
    assert "features.candidates_per_group" in capsys.readouterr().err


def test_run_config_the_generator_cannot_honour_exits_2(tmp_path, capsys):
    code = main(
        [
            "--config",
            "demo",
            f"--lake.root={tmp_path / 'lake'}",
            f"--run.reports_dir={tmp_path / 'reports'}",
            "--ingest.source=synthetic",
            "--ingest.synthetic.num_items=1",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "num_items" in err and "Traceback" not in err
    assert not (tmp_path / "lake").exists()
