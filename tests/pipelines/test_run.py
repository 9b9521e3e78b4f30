"""The main job (what `make demo` runs): ingest -> features -> train -> evaluate -> export ->
report, on the session's Ray."""

from __future__ import annotations

import re

from pipelines.run import main
from tests.small_runs import TINY_MODEL


def test_run_synthetic_end_to_end(ray_session, tmp_path, capsys):
    code = main(
        [
            "--config",
            "demo",
            f"--lake.root={tmp_path / 'lake'}",
            "--lake.num_buckets=2",
            "--ingest.source=synthetic",
            "--ingest.synthetic.num_events=3000",
            "--ingest.synthetic.num_users=40",
            "--ingest.synthetic.num_items=300",
            "--ingest.synthetic.max_history=600",
            "--features.max_seq_len=50",
            "--ray.enable_progress_bars=false",
            *TINY_MODEL,
            "--model.ranker.sparse.embedding_dim=8",
            "--train.num_workers=0",
            "--train.max_steps=3",
            "--train.batch_size=4",
            "--train.max_seq_len=32",
            f"--train.storage_path={tmp_path / 'ckpt'}",
            f"--export.output={tmp_path / 'bundle'}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    # The full model trained 3 steps, was checkpointed and evaluated on the test split.
    assert re.search(r"^run full: 3 steps", out, re.M)
    assert "full on test (" in out and "like_auc " in out
    assert (tmp_path / "ckpt" / "full" / "metrics_test.json").is_file()
    # ... and exported as a serving bundle that loads.
    from components.bundle import load_bundle

    assert f"serving bundle {tmp_path / 'bundle'}" in out and "python -m pipelines.serve --config demo" in out
    assert load_bundle(str(tmp_path / "bundle")).manifest.variant == "full"
    for table in ("events", "items", "users", "sequences", "samples"):
        assert f"\n{table} " in out
    assert re.search(r"^events +0 +3000$", out, re.M)
    assert "one sample group:" in out and "labels (1, 32, 2)" in out
    # The lake is left where asked, Ray (owned by the fixture) is still up.
    assert (tmp_path / "lake" / "samples" / "_delta_log").is_dir()
    assert ray_session.is_initialized()


def test_run_rejects_bad_override(capsys):
    assert main(["--config", "demo", "--features.candidates_per_group=zero"]) == 2
    assert "features.candidates_per_group" in capsys.readouterr().err


def test_run_config_the_generator_cannot_honour_exits_2(tmp_path, capsys):
    code = main(
        [
            "--config",
            "demo",
            f"--lake.root={tmp_path / 'lake'}",
            "--ingest.source=synthetic",
            "--ingest.synthetic.num_items=1",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "num_items" in err and "Traceback" not in err
    assert not (tmp_path / "lake").exists()
