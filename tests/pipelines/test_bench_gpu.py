"""bench gpu's settings and infra/gpu_check.sh (the GPU run itself needs a GPU: README says where it ran)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from components.config_loader import ConfigError
from pipelines.bench_gpu import gpu_config

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_preset_trains_with_cuda_settings_and_fused_adam() -> None:
    t = gpu_config("gpu", [], "cuda").train
    assert t.use_gpu and t.bf16 and "row_wise" in t.sharding_types
    assert t.sparse_optimizer == "adam"


def test_cpu_smoke_run_turns_off_what_needs_cuda() -> None:
    t = gpu_config("gpu", ["--train.max_epochs=1"], "cpu").train
    assert (t.use_gpu, t.bf16, t.sparse_optimizer, t.max_epochs) == (False, False, "rowwise_adagrad", 1)
    assert "row_wise" not in t.sharding_types


def test_cuda_device_without_use_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="train.use_gpu=true"):
        gpu_config("gpu", ["--train.use_gpu=false", "--train.sparse_optimizer=rowwise_adagrad"], "cuda")


def test_adam_on_cpu_is_refused_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match="train.sparse_optimizer=adam"):
        gpu_config("gpu", ["--train.use_gpu=false", "--train.sharding_types=[table_wise]"], "cuda")


def test_gpu_check_script_parses() -> None:
    script = ROOT / "infra" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.stat().st_mode & 0o111, "infra/gpu_check.sh must be executable"
