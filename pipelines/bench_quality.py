"""The quality table: ``python -m pipelines.bench quality [--quick] --json PATH``.

Every MODELS.md §7 variant is trained on the lake (the ``quality`` preset: same budget for
all) with ``--seeds`` seeds through the real pipeline (``pipelines.train`` then
``pipelines.evaluate`` on the test split), and reported as mean ± std beside non-learned
floors computed on the same split (components/floors.py). ``--quick``: ``dlrm_mlp``,
``din``, ``full``, one seed, one epoch.

``--seq-lens 16,64,256,1024,2000`` instead trains ``longer`` at each sequence length (the
question "does the long sequence pay?") and writes the table and a PNG plot beside the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from components.config_loader import load_config
from components.floors import floor_metrics
from models.variants import VARIANTS
from pipelines.config import PipelineConfig

logger = logging.getLogger(__name__)

QUICK_VARIANTS = ("dlrm_mlp", "din", "full")
REPORTED = ("like_auc", "like_uauc", "engage_auc", "engage_uauc", "like_auc_engaged", "like_logloss", "engage_logloss")


def train_and_evaluate(preset: str, overrides: list[str]) -> tuple[dict[str, float], float]:
    """One run through the real stages; (test metrics, seconds). Ray must be up."""
    from pipelines.evaluate import run_evaluate
    from pipelines.train import run_train

    started = time.perf_counter()
    config = load_config(PipelineConfig, preset, overrides)
    summary = run_train(config)
    report, _ = run_evaluate(
        dataclasses.replace(config, eval=dataclasses.replace(config.eval, checkpoint=summary.checkpoint))
    )
    return report.metrics, time.perf_counter() - started


def mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}


def targets(variants: dict[str, dict], floors: dict[str, dict]) -> dict[str, dict]:
    """The issue's targets, each met or missed with the numbers (only rows that were run)."""
    auc = lambda v, m="like_auc": variants[v][m]["mean"] if v in variants else math.nan
    out = {}

    def check(name: str, ok: bool, detail: str) -> None:
        out[name] = {"met": bool(ok), "detail": detail}

    for other in ("din", "dcnv2"):
        for metric in ("like_auc", "like_uauc"):
            if "full" in variants and other in variants:
                gap = auc("full", metric) - auc(other, metric)
                check(f"full_beats_{other}_{metric}", gap >= 0.005, f"full - {other} = {gap:+.4f} (target >= 0.005)")
    order = ("tokenmixer_large", "rankmixer", "dcnv2", "dlrm_mlp")
    present = [v for v in order if v in variants]
    if len(present) > 1:
        values = [auc(v) for v in present]
        check(
            "ordering_like_auc",
            all(a >= b for a, b in zip(values, values[1:])),
            " >= ".join(f"{v} {x:.4f}" for v, x in zip(present, values)),
        )
    if "ugsep" in variants and "tokenmixer_large" in variants:
        gap = auc("tokenmixer_large") - auc("ugsep")
        check("ugsep_within_0.002", gap <= 0.002, f"tokenmixer_large - ugsep = {gap:+.4f} (target <= 0.002)")
    best_floor = max(f["like_auc"] for f in floors.values())
    for v in variants:
        check(f"{v}_beats_floors", auc(v) > best_floor, f"{v} {auc(v):.4f} vs best floor {best_floor:.4f}")
    return out


def run_table(args: argparse.Namespace, variants: tuple[str, ...], seeds: int, extra: list[str]) -> dict:
    from pipelines.ray_runtime import ray_runtime

    base = load_config(PipelineConfig, args.preset, [f"--lake.root={args.lake}", *extra])
    floors = floor_metrics(base.lake.root, "test", base.lake.storage_options)
    rows, seconds = {}, {}
    with ray_runtime(base.ray):
        for variant in variants:
            runs = []
            for seed in range(seeds):
                overrides = [
                    f"--lake.root={args.lake}",
                    f"--model.variant={variant}",
                    f"--train.seed={seed}",
                    f"--train.run_name=quality-{variant}-s{seed}",
                    "--train.resume=never",
                    *extra,
                ]
                metrics, took = train_and_evaluate(args.preset, overrides)
                logger.info("quality %s seed %d: like_auc %.4f in %.0f s", variant, seed, metrics["like_auc"], took)
                runs.append(metrics)
                seconds[f"{variant}/{seed}"] = round(took, 1)
            rows[variant] = {m: mean_std([r[m] for r in runs]) for m in REPORTED}
    t = base.train
    return {
        "floors": {name: {m: v for m, v in f.items() if m in REPORTED} for name, f in floors.items()},
        "variants": rows,
        "seeds": seeds,
        "budget": {
            "preset": args.preset,
            "epochs": t.epochs,
            "batch_size_per_worker": t.batch_size,
            "num_workers": t.num_workers,
            "max_seq_len": t.max_seq_len,
            "lr": t.lr,
            "sparse_lr": t.sparse_lr,
            "embedding_dim": base.model.ranker.sparse.embedding_dim,
            "dim": base.model.ranker.dim,
            "run_seconds": seconds,
        },
        "targets": targets(rows, floors),
    }


def run_seq_lens(args: argparse.Namespace, lengths: list[int], extra: list[str]) -> dict:
    """``longer`` test metrics vs the sequence length it sees (one seed each)."""
    from pipelines.ray_runtime import ray_runtime

    base = load_config(PipelineConfig, args.preset, [f"--lake.root={args.lake}", *extra])
    out = {}
    with ray_runtime(base.ray):
        for length in lengths:
            overrides = [
                f"--lake.root={args.lake}",
                "--model.variant=longer",
                f"--train.max_seq_len={length}",
                f"--model.ranker.longer.max_seq_len={max(length, 2000)}",
                f"--train.run_name=seqlen-{length}",
                "--train.resume=never",
                *extra,
            ]
            metrics, took = train_and_evaluate(args.preset, overrides)
            out[str(length)] = {**{m: metrics[m] for m in REPORTED}, "seconds": round(took, 1)}
            logger.info("seq len %d: like_auc %.4f", length, metrics["like_auc"])
    return {"lake": args.lake, "variant": "longer", "by_max_seq_len": out}


def plot_seq_lens(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["by_max_seq_len"]
    lengths = sorted(int(k) for k in rows)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for metric in ("like_auc", "like_uauc", "engage_auc"):
        ax.plot(lengths, [rows[str(n)][metric] for n in lengths], marker="o", label=metric)
    ax.set_xscale("log")
    ax.set_xlabel("max_seq_len (events the model sees)")
    ax.set_ylabel("test metric")
    ax.set_title(f"longer, test split of the lake at {result['lake']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench quality", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="dlrm_mlp, din, full; 1 seed, 1 epoch")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--preset", default="quality")
    parser.add_argument("--lake", default="lake", help="lake root (built by make demo)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default="", help="comma-separated subset (default: all of MODELS.md §7)")
    parser.add_argument("--seq-lens", default="", help="e.g. 16,64,256,1024,2000: the sequence-length study")
    parser.add_argument("overrides", nargs="*", help="--section.key=value overrides of the preset")
    args, unknown = parser.parse_known_args(argv)
    extra = [*args.overrides, *unknown]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    started = time.perf_counter()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.seq_lens:
        lengths = [int(x) for x in args.seq_lens.split(",") if x]
        result = run_seq_lens(args, lengths, extra)
        plot_seq_lens(result, path.with_suffix(".png"))
    else:
        variants = QUICK_VARIANTS if args.quick else tuple(v for v in args.variants.split(",") if v) or VARIANTS
        unknown_variants = [v for v in variants if v not in VARIANTS]
        if unknown_variants:
            print(f"unknown variant(s) {unknown_variants}; known: {list(VARIANTS)}")
            return 2
        extra = ["--train.epochs=1", *extra] if args.quick else extra
        result = run_table(args, variants, 1 if args.quick else args.seeds, extra)
    result["quick"], result["total_s"] = args.quick, round(time.perf_counter() - started, 1)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result.get("targets", result.get("by_max_seq_len")), indent=2))
    return 0
