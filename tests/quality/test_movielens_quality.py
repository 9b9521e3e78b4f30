"""Ranking quality on real data, guarded (``make test-quality``, which .ci/run calls).

A small real run on MovieLens (ingest and features as the demo builds them, the new protocol's
popularity-as-of negatives) through the single-process reference loop over ``models/``
(pipelines/reference_train.py): the mean of its valid and test like AUC must stay above a bound
set from measured seeds. The toy-task tests in tests/models check that the models *learn*; this one checks how
well they *rank real data*, which is what commit c94b70f lost (README "Quality") without
failing a test. Minutes, not an hour: deselected from ``make test`` (marker ``quality``).
"""

from __future__ import annotations

import pytest

from components.config_loader import load_config
from pipelines.config import PipelineConfig
from pipelines.reference_train import ReferenceSpec, train_reference

pytestmark = pytest.mark.quality

# A small LONGER (embeddings 32, one self-attention layer, the last 64 events), one epoch.
LONGER = [
    "--model.variant=longer",
    "--model.ranker.sparse.embedding_dim=32",
    "--train.max_seq_len=64",
]
SPEC = ReferenceSpec(epochs=1, batch_size=64, lr=1e-3, seed=0, threads=2)
# Measured on this code (README "Quality regression test"), seeds 0, 1, 2 with the dense arch:
# valid like AUC 0.7303, 0.7374, 0.7375; test 0.7899, 0.7628, 0.7850. Their mean (0.7601, 0.7501,
# 0.7613: mean 0.7572, std 0.0062) is steadier than either split alone (test std 0.0144); the
# bound sits three of its standard deviations below (0.7386, rounded down). c94b70f cost this
# mean 0.031 on the old protocol, the dense scale 0.030 and the dense arch 0.009: the first two
# are caught. (The bound was 0.700 from the seeds before the dense fix.)
HELD_OUT_LIKE_AUC_BOUND = 0.735


@pytest.fixture(scope="module")
def movielens_lake(ray_session, tmp_path_factory) -> str:
    from pipelines.features import run_features
    from pipelines.ingest import run_ingest

    root = str(tmp_path_factory.mktemp("quality") / "lake")
    config = load_config(PipelineConfig, "demo", [f"--lake.root={root}", "--ray.enable_progress_bars=false"])
    run_ingest(config)
    run_features(config)
    return root


def test_longer_ranks_movielens_above_its_measured_bound(movielens_lake):
    config = load_config(PipelineConfig, "demo", [f"--lake.root={movielens_lake}", *LONGER])
    record = train_reference(config, SPEC)
    valid, test = record["valid"]["like_auc"], record["test"]["like_auc"]
    held_out = (valid + test) / 2
    print(
        f"longer on MovieLens: valid like AUC {valid:.4f}, test {test:.4f}, mean {held_out:.4f} "
        f"(bound {HELD_OUT_LIKE_AUC_BOUND:.3f})"
    )
    assert held_out >= HELD_OUT_LIKE_AUC_BOUND, record
