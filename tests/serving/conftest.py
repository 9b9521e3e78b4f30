"""A bundle exported from the session's trained checkpoint, for the serving tests."""

from __future__ import annotations

import pytest

from tests.small_runs import train_args


@pytest.fixture(scope="session")
def bundle_dir(small_lake, trained, tmp_path_factory) -> str:
    from pipelines.export import main

    storage, checkpoint = trained
    out = str(tmp_path_factory.mktemp("serving") / "bundle")
    assert main(train_args(small_lake, storage, f"--export.checkpoint={checkpoint}", f"--export.output={out}")) == 0
    return out
