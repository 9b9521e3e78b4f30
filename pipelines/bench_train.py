"""Training benchmarks: ``python -m pipelines.bench train [--quick] --json PATH``.

- ``group_vs_flat_speedup``: training candidates/s of one model on group batches (B groups x
  N = 32 candidates, L = 512) vs the same rows flattened to one candidate per row (the user
  side recomputed per candidate), timed in alternation in one process.
- ``train_mfu``: dense FLOPs of that group training step (forward + backward, counted) per
  second, divided by the peak fp32 GEMM rate measured in the same run on the same threads.
- ``sparse_optimizer_state_ratio``: bytes of the fused sparse optimizer state of the sharded
  tables (embeddings and MSN/LMN memory values) / what Adam would hold for the same tables.
- ``candidates_per_s`` and ``scaling_2_over_1_workers``: real Ray Train runs (TorchRec DMP,
  gloo) of the same model on the MovieLens lake (built by ``make demo``) with 1 and 2 workers,
  same per-worker batch; throughput after the first two steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.config_loader import load_config
from models.cost import count_flops, measure_peak_matmul_flops
from models.task import RankingTask
from models.variants import ModelConfig, build_model
from pipelines.bench_models import BenchSizes, paired_best_seconds, random_groups
from pipelines.cli import configure_logging
from pipelines.config import PipelineConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainBenchSizes:
    groups: int = 4  # B of the group batch; the flat batch has B * N rows
    num_candidates: int = 32
    seq_len: int = 512
    repeats: int = 3
    ray_steps: int = 40  # steps of each Ray Train run
    ray_batch: int = 32  # groups per worker and step
    peak_seconds: float = 2.0


QUICK = TrainBenchSizes(groups=2, repeats=2, ray_steps=12, ray_batch=16, peak_seconds=0.5)


def bench_model_config(variant: str, seq_len: int) -> ModelConfig:
    """The demo preset's model (embeddings 32, width 64), LONGER's positions covering ``seq_len``."""
    base = load_config(PipelineConfig, "demo").model
    longer = dataclasses.replace(base.ranker.longer, max_seq_len=max(seq_len, base.ranker.longer.max_seq_len))
    return dataclasses.replace(base, variant=variant, ranker=dataclasses.replace(base.ranker, longer=longer))


def _train_step(task: RankingTask, optimizer: torch.optim.Optimizer, batch) -> None:
    loss, _ = task(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def bench_group_vs_flat(sizes: TrainBenchSizes, variant: str) -> dict:
    """Group batches vs the same candidates flattened (one per row), same model and optimizer."""
    torch.manual_seed(0)
    config = bench_model_config(variant, sizes.seq_len)
    task = RankingTask(build_model(config)).train()
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
    shape = BenchSizes(batch_groups=sizes.groups, num_candidates=sizes.num_candidates, seq_len=sizes.seq_len)
    group = random_groups(shape, config.ranker.sparse, torch.device("cpu"))
    flat = group.per_candidate()
    timed = lambda batch: lambda: _train_step(task, optimizer, batch)
    group_s, flat_s = paired_best_seconds(timed(group), timed(flat), sizes.repeats, grad=True)
    step_flops = count_flops(lambda: task(group)[0].backward(), backward=True)
    candidates = sizes.groups * sizes.num_candidates
    peak = measure_peak_matmul_flops(torch.float32, seconds=sizes.peak_seconds)
    return {
        "group_vs_flat_speedup": flat_s / group_s,
        "group_step_s": group_s,
        "flat_step_s": flat_s,
        "group_candidates_per_s": candidates / group_s,
        "flat_candidates_per_s": candidates / flat_s,
        "train_step_flops": step_flops,
        "peak_matmul_flops": peak,
        "train_mfu": step_flops / group_s / peak,
    }


def bench_sparse_state(variant: str) -> dict:
    """Fused sparse optimizer state vs Adam's two moments, on the sharded tables of one rank."""
    import torch.distributed as dist

    from components.distributed_model import DistributedRanker, ShardingSpec, torchrec_tables
    from pipelines.train_loop import ensure_process_group

    own = ensure_process_group()
    try:
        task = RankingTask(build_model(bench_model_config(variant, 256)))
        modules = {id(m): m for _, _, m in torchrec_tables(task)}.values()  # one per collection
        table_bytes = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
        dr = DistributedRanker.build(task, ShardingSpec(), torch.device("cpu"))
        state = dr.sparse_state_bytes()
    finally:
        if own:
            dist.destroy_process_group()
    return {
        "sparse_optimizer_state_bytes": state,
        "sparse_table_bytes": table_bytes,
        "sparse_optimizer_state_ratio": state / (2 * table_bytes),
    }


def bench_ray_scaling(sizes: TrainBenchSizes, variant: str, lake_root: str) -> dict:
    """Candidates/s of real 1- and 2-worker TorchTrainer runs (the same per-worker batch)."""
    from pipelines.ray_runtime import ray_runtime
    from pipelines.train import run_train

    rates = {}
    for workers in (1, 2):
        config = load_config(
            PipelineConfig,
            "demo",
            [
                f"--lake.root={lake_root}",
                f"--model.variant={variant}",
                f"--train.num_workers={workers}",
                f"--train.batch_size={sizes.ray_batch}",
                f"--train.max_steps={sizes.ray_steps}",
                "--train.valid_every_epoch=false",
                "--train.resume=never",
                f"--train.run_name=bench-{variant}-{workers}w",
                "--train.storage_path=checkpoints/bench",
                "--train.log_every_steps=0",
                "--ray.enable_progress_bars=false",
            ],
        )
        with ray_runtime(config.ray):
            summary = run_train(config)
        rates[workers] = summary.candidates_per_s
        logger.info("%d worker(s): %.0f candidates/s", workers, rates[workers])
    return {
        "candidates_per_s": rates[2],
        "candidates_per_s_1_worker": rates[1],
        "scaling_2_over_1_workers": rates[2] / rates[1] if rates[1] else float("nan"),
    }


def run(sizes: TrainBenchSizes, variant: str, lake_root: str | None) -> dict:
    torch.set_num_threads(1)  # as one Ray Train worker of a 2-core machine
    results: dict = {"variant": variant, "sizes": sizes.__dict__, "torch": torch.__version__}
    results["machine"], results["torch_threads"] = platform.machine(), torch.get_num_threads()
    steps = [
        ("group_vs_flat", lambda: bench_group_vs_flat(sizes, variant)),
        ("sparse", lambda: bench_sparse_state(variant)),
    ]
    if lake_root:
        steps.append(("ray_scaling", lambda: bench_ray_scaling(sizes, variant, lake_root)))
    for name, step in steps:
        start = time.perf_counter()
        results.update(step())
        logger.info("bench train: %s done in %.1f s", name, time.perf_counter() - start)
    return results


KEYS = (
    "group_vs_flat_speedup",
    "candidates_per_s",
    "scaling_2_over_1_workers",
    "train_mfu",
    "sparse_optimizer_state_ratio",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench train", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and shorter runs")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--variant", default="full", help="model variant (default: the demo's full model)")
    parser.add_argument("--lake", default="lake", help="lake for the Ray Train runs ('' skips them)")
    args = parser.parse_args(argv)
    configure_logging()
    started = time.perf_counter()
    lake_root = args.lake or None
    if lake_root and not (Path(lake_root) / "samples").is_dir() and "://" not in lake_root:
        print(f"bench train: no lake at {lake_root} (run `make demo` first, or pass --lake '')", flush=True)
        return 1
    results = run(QUICK if args.quick else TrainBenchSizes(), args.variant, lake_root)
    results["quick"], results["total_s"] = args.quick, time.perf_counter() - started
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: results.get(k) for k in KEYS}, indent=2))
    return 0
