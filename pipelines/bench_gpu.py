"""The GPU path end to end: ``python -m pipelines.bench gpu --json PATH [--section.key=value ...]``.

What ``infra/gpu_check.sh`` runs on one GPU (issue 20): the ``gpu`` preset's ``full`` model
trained by the real stage (Ray Train, NCCL, TorchRec row-wise sharding, bf16 autocast, FBGEMM's
fused sparse optimizer of ``train.sparse_optimizer``) on a lake built beforehand, its best-valid
checkpoint evaluated on the test split, and the run held against the hardware:

- ``peak_gemm_flops``: the best GEMM rate of the training dtype (bf16 with ``train.bf16``, else
  fp32) on this device, measured before AND after training (the higher of the two).
- ``train_candidates_per_s``: the trainer's own rate, all workers, after its first two steps
  (validation and checkpoints included, so the step time is an upper bound).
- ``train_step_s``: groups per step (``batch_size`` x workers) x candidates per group / that rate.
- ``train_mfu``: 3 x the forward FLOPs per candidate (``models.cost.flops_per_candidate`` at the
  run's shape: the backward is two GEMMs per forward GEMM) x the rate / (peak x workers).
- ``test``: the evaluation's metrics (``like_auc``, its warm/cold parts, ...).

``--device cpu`` runs the same on the CPU (a smoke run of this tool on a machine without a GPU:
gloo, table-wise sharding, fp32, row-wise Adagrad, the preset's other settings); the figures are
then not the GPU's.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from components.config_loader import load_config
from components.training_data import pin_training_data, resolved_model
from models.cost import flops_per_candidate, measure_peak_matmul_flops
from models.variants import build_model
from pipelines.bench_models import BenchSizes, random_groups
from pipelines.cli import configure_logging
from pipelines.config import PipelineConfig, TrainConfig

logger = logging.getLogger(__name__)

KEYS = (
    "device_name",
    "peak_gemm_flops",
    "train_candidates_per_s",
    "train_step_s",
    "train_mfu",
    "train_s",
    "best_epoch",
    "test_like_auc",
    "test_like_uauc",
    "bench_s",
)
PEAK_SIZE = {"cuda": 8192, "cpu": 2048}


def gpu_config(preset: str, overrides: list[str], device: str) -> PipelineConfig:
    """The preset with ``overrides``; ``--device cpu`` turns off what needs CUDA (nccl, row-wise, bf16,
    fused Adam: FBGEMM's CPU kernel is row-wise Adagrad, at its own rate)."""
    cpu = TrainConfig()  # the CPU defaults: gloo, table/column-wise, fp32, row-wise Adagrad at its rates
    extra = [
        "--train.use_gpu=false",
        f"--train.sharding_types=[{','.join(cpu.sharding_types)}]",
        "--train.bf16=false",
        f"--train.sparse_optimizer={cpu.sparse_optimizer}",
        f"--train.sparse_lr={cpu.sparse_lr}",
        f"--train.memory_lr={cpu.memory_lr}",
    ]
    config = load_config(PipelineConfig, preset, [*overrides, *(extra if device == "cpu" else [])])
    if device == "cuda" and not config.train.use_gpu:
        raise ValueError("--device cuda needs train.use_gpu=true (the gpu preset sets it)")
    return config


def forward_flops_per_candidate(config: PipelineConfig) -> float:
    """Forward FLOPs per candidate slot of the run's model at its shape (L = train.max_seq_len)."""
    model_config = resolved_model(config.model, pin_training_data(config.lake.root, config.lake.storage_options))
    model = build_model(model_config).eval()
    shape = BenchSizes(
        batch_groups=4, num_candidates=config.features.candidates_per_group, seq_len=config.train.max_seq_len
    )
    with torch.no_grad():
        return flops_per_candidate(model, random_groups(shape, model_config.ranker.sparse, torch.device("cpu")))


def run(config: PipelineConfig, device: str) -> dict:
    """Peak GEMM, train, evaluate the best checkpoint, peak GEMM again; the record (module docstring)."""
    from pipelines.bench_quality import train_then_evaluate
    from pipelines.ray_runtime import ray_runtime

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"no CUDA device visible to torch (torch.version.cuda={torch.version.cuda}): install the CUDA builds "
            "of torch and fbgemm-gpu (infra/Dockerfile's GPU build arguments) or run with --device cpu"
        )
    dtype = torch.bfloat16 if config.train.bf16 else torch.float32
    size = PEAK_SIZE[device]
    peaks = [measure_peak_matmul_flops(dtype, size=size, seconds=2.0, device=device)]
    fwd = forward_flops_per_candidate(config)
    with ray_runtime(config.ray):
        summary, report = train_then_evaluate(config)
    peaks.append(measure_peak_matmul_flops(dtype, size=size, seconds=2.0, device=device))
    t, world = config.train, config.train.num_workers
    rate = summary.candidates_per_s
    step_candidates = t.batch_size * world * config.features.candidates_per_group
    peak = max(peaks)
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "peak_gemm_flops": peak,
        "peak_gemm_flops_before_after": peaks,
        "forward_flops_per_candidate": fwd,
        "train_candidates_per_s": rate,
        "train_step_s": step_candidates / rate if rate else None,
        "train_mfu": 3 * fwd * rate / (peak * world) if rate else None,
        "train_s": summary.train_s,
        "steps": summary.steps,
        "best_epoch": summary.best_epoch,
        "checkpoint": summary.checkpoint,
        "settings": {
            "workers": world,
            "groups_per_worker_step": t.batch_size,
            "candidates_per_group": config.features.candidates_per_group,
            "max_seq_len": t.max_seq_len,
            "sharding_types": list(t.sharding_types),
            "sparse_optimizer": t.sparse_optimizer,
            "bf16": t.bf16,
            "max_epochs": t.max_epochs,
        },
        "test": report.metrics,
        "test_like_auc": report.metrics.get("like_auc"),
        "test_like_uauc": report.metrics.get("like_uauc"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--preset", default="gpu", help="preset name or YAML path (default: gpu)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args, overrides = parser.parse_known_args(argv)
    configure_logging()
    started = time.perf_counter()
    result = run(gpu_config(args.preset, overrides, args.device), args.device)
    result["bench_s"] = time.perf_counter() - started
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result.get(k) for k in KEYS}, indent=1))
    return 0
