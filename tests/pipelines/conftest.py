"""A small real lake shared by the training and evaluation tests (ingest + features, synthetic)."""

from __future__ import annotations

import pytest

from components.config_loader import load_config
from pipelines.config import PipelineConfig

SMALL_LAKE = [
    "--lake.num_buckets=2",
    "--ingest.source=synthetic",
    "--ingest.synthetic.num_events=4000",
    "--ingest.synthetic.num_users=40",
    "--ingest.synthetic.num_items=300",
    "--ingest.synthetic.max_history=600",
    "--features.max_seq_len=64",
    "--features.candidates_per_group=8",
    "--features.max_positives_per_group=4",
    "--ray.enable_progress_bars=false",
]

# A model small enough for a step in milliseconds, with every part of the variant live.
TINY_MODEL = [
    "--model.ranker.dim=16",
    "--model.ranker.sparse.embedding_dim=8",
    "--model.ranker.head_hidden=8",
    "--model.ranker.tokenmixer_large.num_layers=2",
    "--model.ranker.longer.d_model=16",
    "--model.ranker.longer.num_heads=2",
    "--model.ranker.longer.max_seq_len=64",
    "--model.ranker.msn_memory.num_slots=64",
    "--model.ranker.msn_memory.topk=4",
    "--model.ranker.lmn.memory.num_slots=64",
    "--model.ranker.lmn.memory.topk=4",
]


def lake_args(root: str) -> list[str]:
    return [f"--lake.root={root}", *SMALL_LAKE]


def train_args(root: str, storage: str, *extra: str) -> list[str]:
    """CLI args of a tiny in-process training run on the small lake."""
    return [
        "--config",
        "demo",
        *lake_args(root),
        *TINY_MODEL,
        "--model.variant=tokenmixer_large",
        f"--train.storage_path={storage}",
        "--train.num_workers=0",
        "--train.batch_size=8",
        "--train.max_seq_len=32",
        "--train.epochs=1",
        "--train.log_every_steps=2",
        *extra,
    ]


def config_of(args: list[str]) -> PipelineConfig:
    """The PipelineConfig a CLI call with ``args`` would load."""
    return load_config(PipelineConfig, args[1], args[2:])


@pytest.fixture(scope="session")
def small_lake(ray_session, tmp_path_factory) -> str:
    """Root of a real lake (ingest + features on ~4000 synthetic events), built once."""
    from pipelines.features import run_features
    from pipelines.ingest import run_ingest

    root = str(tmp_path_factory.mktemp("train_lake") / "lake")
    config = load_config(PipelineConfig, "demo", lake_args(root))
    run_ingest(config)
    run_features(config)
    return root


@pytest.fixture(scope="session")
def trained(small_lake, tmp_path_factory) -> tuple[str, str]:
    """One in-process training run of one epoch on the small lake; (storage, checkpoint path)."""
    from components.checkpoint import latest_checkpoint
    from pipelines.train import main

    storage = str(tmp_path_factory.mktemp("storage"))
    assert main(train_args(small_lake, storage, "--train.run_name=base")) == 0
    found = latest_checkpoint(f"{storage}/base")
    assert found is not None
    return storage, found[0]
