"""The config loader: presets, overrides, and clear rejection of unknown keys and wrong types."""

from __future__ import annotations

import re

import pytest

from components.config_loader import ConfigError, load_config, parse_overrides
from pipelines.config import PipelineConfig


def test_demo_preset_loads_with_overrides():
    cfg = load_config(PipelineConfig, "demo", ["--features.max_seq_len=4000", "--ray.address=auto"])
    assert cfg.features.max_seq_len == 4000
    assert cfg.ray.address == "auto"
    assert cfg.ingest.source == "movielens"


def test_configs_are_frozen():
    cfg = load_config(PipelineConfig, "demo")
    with pytest.raises(AttributeError):
        cfg.features.max_seq_len = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--features.max_seq_lenn=3", "features.max_seq_lenn"),
        ("--feature.max_seq_len=3", "feature"),
        ("--features.max_seq_len=abc", "features.max_seq_len: expected an integer"),
        ("--features.max_seq_len=true", "expected an integer"),
        ("--ingest.source=kafka", "ingest.source"),
        ("--features.valid_frac=[1]", "features.valid_frac: expected a number"),
        ("features.max_seq_len", "--section.key=value"),
        ("--lake.num_buckets=-1", "lake: num_buckets must be >= 0"),
        ("--ingest.max_reject_frac=-1", "ingest: max_reject_frac must be in"),
        ("--ingest.value_max=-3", "ingest: value_min"),
        ("--lake.storage_options.AWS_ALLOW_HTTP=true", "lake.storage_options.AWS_ALLOW_HTTP: expected a string"),
    ],
)
def test_bad_overrides_rejected_with_path(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(PipelineConfig, "demo", [override])


@pytest.mark.parametrize(
    "override, message",
    [
        # A NaN or infinite float anywhere (YAML spells them .nan / .inf): comparisons with NaN are
        # all false, so range checks pass it and it ends in silent garbage downstream.
        ("--ingest.synthetic.zipf_exponent=.nan", "ingest.synthetic.zipf_exponent: must be a finite number, got nan"),
        ("--ingest.value_max=.inf", "ingest.value_max: must be a finite number, got inf"),
        ("--features.like_threshold=-.inf", "features.like_threshold: must be a finite number"),
        ("--ingest.max_tag_vocab=-1", "ingest.max_tag_vocab must be >= 0, got -1"),
        ("--ray.num_cpus=0", "ray.num_cpus must be >= 1, got 0"),  # 0 used to hang the features run
        ("--ray.num_cpus=-1", "ray.num_cpus must be >= 1, got -1"),  # and -1 was a traceback
        ("--lake.root=", "lake.root is empty"),
        ("--lake.root=/", "lake.root '/' is the root of the file system"),
        ("--lake.root=/tmp/..", "lake.root '/tmp/..' is the root of the file system"),
        ("--lake.root=s3://", "lake.root 's3://' names no bucket or folder"),
        ("--ingest.max_ts_ahead_s=-1", "ingest.max_ts_ahead_s must be >= 0"),
    ],
)
def test_settings_that_cannot_be_right_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(PipelineConfig, "demo", [override])


def test_synthetic_without_users_names_num_users():
    from components.ingest_sources import read_synthetic

    cfg = load_config(PipelineConfig, "synthetic", ["--ingest.synthetic.num_users=0"])
    with pytest.raises(ConfigError, match=r"ingest\.synthetic\.num_users must be >= 1, got 0"):
        read_synthetic(cfg.ingest.synthetic)


def test_mapping_entries_are_typed():
    cfg = load_config(
        PipelineConfig,
        "demo",
        ["--lake.storage_options.AWS_REGION=eu-west-1", '--lake.storage_options.AWS_ALLOW_HTTP="true"'],
    )
    assert cfg.lake.storage_options == {"AWS_REGION": "eu-west-1", "AWS_ALLOW_HTTP": "true"}


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="demo"):
        load_config(PipelineConfig, "nope")


def test_override_parsing_nests_and_types():
    assert parse_overrides(["--a.b.c=1", "--a.d=x", "--e=null"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": None}


def test_auto_bucket_count_scales_with_events():
    cfg = load_config(PipelineConfig, "demo")
    assert cfg.lake.num_buckets == 0  # auto
    assert cfg.lake.buckets_for(100_000) == cfg.lake.min_buckets
    assert cfg.lake.buckets_for(20_000_000) == 20
    fixed = load_config(PipelineConfig, "demo", ["--lake.num_buckets=3"])
    assert fixed.lake.buckets_for(20_000_000) == 3


def test_train_and_eval_sections_check_themselves_naming_the_key():
    from pipelines.config import PipelineConfig

    cases = {
        "--train.sharding_types=[row_wise]": "row_wise needs CUDA",
        "--train.sparse_optimizer=adam": "train.sparse_optimizer=adam",
        "--train.batch_size=0": "train.batch_size",
        "--train.lr=0": "train.lr",
        "--train.resume=": "train.resume",
        "--eval.split=dev": "eval.split",
        "--model.variant=gpt": "model.variant",
        "--train.max_seq_len=4000": "model.ranker.longer.max_seq_len",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_config(PipelineConfig, "demo", [override])
    config = load_config(PipelineConfig, "demo", ["--train.use_gpu=true", "--train.sharding_types=[row_wise]"])
    assert config.train.sharding_types == ("row_wise",)
    # YAML 1.1 reads 1e-3 as a string; a float key still takes it.
    assert load_config(PipelineConfig, "demo", ["--train.lr=1e-3"]).train.lr == 0.001
