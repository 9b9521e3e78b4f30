"""Arguments of the small real runs the tests share: a lake of ~4000 synthetic events and a tiny
model (the ``small_lake`` and ``trained`` fixtures of tests/conftest.py use them)."""

from __future__ import annotations

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
        "--train.max_epochs=1",
        "--train.log_every_steps=2",
        *extra,
    ]


def config_of(args: list[str]) -> PipelineConfig:
    """The PipelineConfig a CLI call with ``args`` would load."""
    return load_config(PipelineConfig, args[1], args[2:])
