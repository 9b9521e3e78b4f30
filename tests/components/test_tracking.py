"""The W&B tracker: offline runs leave files under the given folder; disabled leaves none."""

from __future__ import annotations

from components.tracking import Tracker, wandb_mode


def test_offline_run_writes_its_files_and_reports_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tracker = Tracker.start("unit", {"model": {"variant": "full"}, "lr": 0.001}, str(tmp_path), job_type="test")
    assert tracker.active
    tracker.log({"train/loss": 0.5}, step=1)
    tracker.summary({"best": 0.7})
    path = tracker.path
    tracker.finish()
    assert path.startswith(str(tmp_path / "wandb" / "offline-run-"))
    assert any(p.suffix == ".wandb" for p in (tmp_path / "wandb").rglob("*"))


def test_disabled_and_other_ranks_track_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    tracker = Tracker.start("unit", {}, str(tmp_path))
    assert not tracker.active and tracker.path == ""
    tracker.log({"x": 1.0})
    tracker.finish()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not Tracker.start("unit", {}, str(tmp_path), active=False).active
    assert not (tmp_path / "wandb").exists()


def test_mode_follows_the_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
