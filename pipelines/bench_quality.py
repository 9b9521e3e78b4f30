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
from typing import TYPE_CHECKING

import numpy as np

from components.config_loader import load_config
from components.floors import floor_metrics
from models.variants import VARIANTS
from pipelines.cli import configure_logging
from pipelines.config import PipelineConfig

if TYPE_CHECKING:
    from pipelines.evaluate import EvalReport
    from pipelines.train import TrainSummary

logger = logging.getLogger(__name__)

QUICK_VARIANTS = ("dlrm_mlp", "din", "full")
REPORTED = (
    "like_auc",
    "like_uauc",
    "engage_auc",
    "engage_uauc",
    "like_auc_engaged",
    "like_logloss",
    "engage_logloss",
    # Warm (item with train-period events) and cold candidates apart: NaN on a lake whose
    # features run recorded no cut-off (docs/DATA.md "Warm and cold items").
    "like_auc_warm",
    "like_auc_cold",
    "like_uauc_warm",
    "like_uauc_cold",
    "engage_auc_warm",
    "engage_auc_cold",
    # MoE variants only (NaN elsewhere): what serving the inference path costs on the test split.
    "moe_bce_train_router",
    "moe_bce_served",
    "moe_logit_rel_diff",
)
MOE_VARIANTS = ("rankmixer_moe", "tokenmixer_large_moe")
MOE_GAP_GROUPS = 1024  # test groups the train-vs-served comparison reads


def train_then_evaluate(config: PipelineConfig) -> tuple[TrainSummary, EvalReport]:
    """``pipelines.train`` then ``pipelines.evaluate`` of the run's best-valid checkpoint:
    (TrainSummary, EvalReport). Ray must be up."""
    from pipelines.evaluate import run_evaluate
    from pipelines.train import run_train

    summary = run_train(config)
    report, _ = run_evaluate(
        dataclasses.replace(config, eval=dataclasses.replace(config.eval, checkpoint=summary.checkpoint))
    )
    return summary, report


def train_and_evaluate(preset: str, overrides: list[str]) -> tuple[dict[str, float], float]:
    """One run through the real stages; (test metrics, seconds). Ray must be up."""
    started = time.perf_counter()
    config = load_config(PipelineConfig, preset, overrides)
    summary, report = train_then_evaluate(config)
    metrics = dict(report.metrics)
    if config.model.variant in MOE_VARIANTS:
        metrics |= moe_serving_gap(config, summary.checkpoint)
    return metrics, time.perf_counter() - started


def moe_serving_gap(config: PipelineConfig, checkpoint: str, max_groups: int = MOE_GAP_GROUPS) -> dict[str, float]:
    """:func:`serving_gap` of checkpoint ``checkpoint`` on the first ``max_groups`` groups of
    ``eval.split`` (at the samples version it was trained on)."""
    from components.checkpoint import load_model
    from components.training_data import pin_training_data
    from pipelines.reference_train import load_split

    model, meta = load_model(checkpoint, storage_options=config.lake.storage_options)
    data = pin_training_data(config.lake.root, config.lake.storage_options, meta.samples_version)
    max_seq_len = config.train.max_seq_len or data.max_seq_len
    return serving_gap(model, load_split(data, config.eval.split, max_seq_len).slice(0, max_groups), max_seq_len)


def serving_gap(model, groups, max_seq_len: int) -> dict[str, float]:
    """Train mode (the training router: RankMixer's dense ReLU gates) against eval mode (the served
    sparse inference router) on resolved ``groups``: the BCE of each (mean over tasks) and the
    relative difference of their logits over real candidates (the served model must stay close
    to the trained one)."""
    import torch

    from components.collate import CollateConfig, collate_groups
    from models.task import logits_of, masked_bce

    collate = CollateConfig(max_seq_len=max_seq_len)
    bce = {"train": 0.0, "served": 0.0}
    diff = norm = 0.0
    total = 0
    was_training = model.training
    try:
        with torch.no_grad():
            for start in range(0, groups.num_rows, 256):
                batch = collate_groups(groups.slice(start, 256), collate)
                weight = int(batch.cand_mask.sum())
                total += weight
                logits = {}
                for mode, training in (("train", True), ("served", False)):
                    logits[mode] = logits_of(model.train(training)(batch))
                    bce[mode] += float(masked_bce(logits[mode], batch.labels, batch.cand_mask).mean()) * weight
                real = batch.cand_mask
                diff += float((logits["served"][real] - logits["train"][real]).pow(2).sum())
                norm += float(logits["train"][real].pow(2).sum())
    finally:
        model.train(was_training)
    return {
        "moe_bce_train_router": bce["train"] / max(total, 1),
        "moe_bce_served": bce["served"] / max(total, 1),
        "moe_logit_rel_diff": math.sqrt(diff / norm) if norm else math.nan,
    }


def mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}


def targets(variants: dict[str, dict], floors: dict[str, dict]) -> dict[str, dict]:
    """Issue 20's targets, each met or missed with the numbers (only rows that were run):
    ``full`` ahead of ``din`` and ``dcnv2`` by >= 0.01 like AUC and like UAUC; ``longer`` ahead of
    ``din``; tokenmixer_large >= rankmixer >= dlrm_mlp; ``ugsep`` within one seed std of
    tokenmixer_large; every variant >= 0.02 above the best floor."""
    auc = lambda v, m="like_auc": variants[v][m]["mean"] if v in variants else math.nan
    out = {}

    def check(name: str, ok: bool, detail: str) -> None:
        out[name] = {"met": bool(ok), "detail": detail}

    for other in ("din", "dcnv2"):
        for metric in ("like_auc", "like_uauc"):
            if "full" in variants and other in variants:
                gap = auc("full", metric) - auc(other, metric)
                check(f"full_beats_{other}_{metric}", gap >= 0.01, f"full - {other} = {gap:+.4f} (target >= 0.01)")
    if "longer" in variants and "din" in variants:
        gap = auc("longer") - auc("din")
        check("longer_beats_din", gap > 0, f"longer - din = {gap:+.4f} (target > 0)")
    order = ("tokenmixer_large", "rankmixer", "dlrm_mlp")
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
        std = variants["tokenmixer_large"]["like_auc"].get("std", 0.0)
        check(
            "ugsep_within_one_std",
            abs(gap) <= std,
            f"tokenmixer_large - ugsep = {gap:+.4f} (target |gap| <= {std:.4f})",
        )
    best_floor = max(f["like_auc"] for f in floors.values())
    for v in variants:
        margin = auc(v) - best_floor
        check(
            f"{v}_beats_floors",
            margin >= 0.02,
            f"{v} {auc(v):.4f} - best floor {best_floor:.4f} = {margin:+.4f} (>= 0.02)",
        )
    return out


class RunLedger:
    """Every finished (train, evaluate) run of a bench, kept on disk as it lands.

    A table is tens of runs and over an hour: each run's metrics are written to
    ``<json>.partial.json`` the moment it finishes, so a crash or Ctrl-C loses one run at most,
    and ``--resume`` picks up the finished runs, provided the same preset and overrides
    produced them (anything else would mix budgets in one table).
    """

    def __init__(self, json_path: Path, budget: dict, resume: bool) -> None:
        self.path = json_path.with_suffix(".partial.json")
        self.budget = budget
        self.runs: dict[str, dict[str, float]] = {}
        if resume and self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("budget") != budget:
                raise ValueError(
                    f"--resume: {self.path} was run with {saved.get('budget')}, this run is {budget}; "
                    "delete it or pass the same preset and overrides"
                )
            self.runs = saved["runs"]
            logger.info("resuming: %d finished run(s) from %s", len(self.runs), self.path)

    def run(self, key: str, preset: str, overrides: list[str]) -> dict[str, float]:
        """The run's test metrics (plus ``seconds``): from the ledger, or trained and evaluated now."""
        if key not in self.runs:
            metrics, took = train_and_evaluate(preset, overrides)
            self.runs[key] = {**{m: metrics.get(m, math.nan) for m in REPORTED}, "seconds": round(took, 1)}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"budget": self.budget, "runs": self.runs}, indent=1, sort_keys=True))
            tmp.replace(self.path)  # atomic: a kill mid-write keeps the previous ledger
            logger.info("%s: like_auc %.4f in %.0f s (%d runs done)", key, metrics["like_auc"], took, len(self.runs))
        return self.runs[key]

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def _ledger(args: argparse.Namespace, extra: list[str], kind: str) -> RunLedger:
    budget = {"kind": kind, "preset": args.preset, "lake": args.lake, "overrides": list(extra)}
    return RunLedger(Path(args.json), budget, args.resume)


def run_table(args: argparse.Namespace, variants: tuple[str, ...], seeds: int, extra: list[str]) -> dict:
    from pipelines.ray_runtime import ray_runtime

    base = load_config(PipelineConfig, args.preset, [f"--lake.root={args.lake}", *extra])
    floors = floor_metrics(base.lake.root, "test", base.lake.storage_options)
    ledger = _ledger(args, extra, "table")
    rows = {}
    with ray_runtime(base.ray):
        for variant in variants:
            runs = [
                ledger.run(
                    f"{variant}/{seed}",
                    args.preset,
                    [
                        f"--lake.root={args.lake}",
                        f"--model.variant={variant}",
                        f"--train.seed={seed}",
                        f"--train.run_name=quality-{variant}-s{seed}",
                        "--train.resume=never",
                        *extra,
                    ],
                )
                for seed in range(seeds)
            ]
            rows[variant] = {m: mean_std([r.get(m, math.nan) for r in runs]) for m in REPORTED}
    t = base.train
    result = {
        "floors": {name: {m: v for m, v in f.items() if m in REPORTED} for name, f in floors.items()},
        "variants": rows,
        "seeds": seeds,
        "budget": {
            "preset": args.preset,
            "epochs": t.max_epochs,
            "max_steps": t.max_steps,
            "batch_size_per_worker": t.batch_size,
            "num_workers": t.num_workers,
            "max_seq_len": t.max_seq_len,
            "lr": t.lr,
            "sparse_lr": t.sparse_lr,
            "embedding_dim": base.model.ranker.sparse.embedding_dim,
            "dim": base.model.ranker.dim,
            "overrides": list(extra),
            "run_seconds": {key: run["seconds"] for key, run in ledger.runs.items()},
        },
        "targets": targets(rows, floors),
        # Each run's test metrics by "variant/seed": what the mean ± std rows summarise.
        "runs": dict(ledger.runs),
    }
    ledger.done()
    return result


def run_seq_lens(args: argparse.Namespace, lengths: list[int], seeds: int, extra: list[str]) -> dict:
    """``longer`` test metrics (mean ± std over ``seeds``) vs the sequence length it sees."""
    from pipelines.ray_runtime import ray_runtime

    base = load_config(PipelineConfig, args.preset, [f"--lake.root={args.lake}", *extra])
    ledger = _ledger(args, extra, "seq_lens")
    out = {}
    with ray_runtime(base.ray):
        for length in lengths:
            runs = [
                ledger.run(
                    f"L{length}/{seed}",
                    args.preset,
                    [
                        f"--lake.root={args.lake}",
                        "--model.variant=longer",
                        f"--train.max_seq_len={length}",
                        f"--model.ranker.longer.max_seq_len={max(length, 2000)}",
                        f"--train.seed={seed}",
                        f"--train.run_name=seqlen-{length}-s{seed}",
                        "--train.resume=never",
                        *extra,
                    ],
                )
                for seed in range(seeds)
            ]
            out[str(length)] = {m: mean_std([r.get(m, math.nan) for r in runs]) for m in REPORTED}
            out[str(length)]["seconds"] = round(sum(r["seconds"] for r in runs) / len(runs), 1)
    t = base.train
    result = {
        "lake": args.lake,
        "variant": "longer",
        "seeds": seeds,
        "budget": {"preset": args.preset, "epochs": t.max_epochs, "max_steps": t.max_steps, "overrides": extra},
        "by_max_seq_len": out,
    }
    ledger.done()
    return result


def reuse_rows(result: dict, earlier: Path) -> None:
    """Add the rows of ``earlier`` (a table JSON) whose variants this run did not train, in place, and
    recompute the targets over every row. Refused unless both were run with the same budget (preset,
    seeds, epochs, sizes, learning rates, overrides): one table must never mix budgets."""
    if not earlier.is_file():
        raise ValueError(f"--reuse-rows: {earlier} does not exist")
    old = json.loads(earlier.read_text())
    if "variants" not in old:
        raise ValueError(f"--reuse-rows: {earlier} is not a quality table (no 'variants')")
    same = lambda budget: {k: v for k, v in budget.items() if k != "run_seconds"}
    mine, theirs = same(result["budget"]), same(old["budget"])
    theirs.setdefault("overrides", [])  # tables written before overrides were recorded ran with none
    if mine != theirs or old.get("seeds") != result["seeds"]:
        raise ValueError(
            f"--reuse-rows: {earlier} was run with {theirs} and {old.get('seeds')} seed(s), this table with "
            f"{mine} and {result['seeds']}; re-run those rows instead"
        )
    reused = [v for v in old["variants"] if v not in result["variants"]]
    result["variants"].update({v: old["variants"][v] for v in reused})
    seconds = old["budget"].get("run_seconds", {})
    result["budget"]["run_seconds"].update({k: s for k, s in seconds.items() if k.split("/")[0] in reused})
    runs = old.get("runs", {})  # tables written before per-run metrics were kept have none
    result.setdefault("runs", {}).update({k: r for k, r in runs.items() if k.split("/")[0] in reused})
    result["reused_rows"] = {"from": str(earlier), "variants": reused}
    result["targets"] = targets(result["variants"], result["floors"])


COLUMNS = ("like_auc", "like_uauc", "like_auc_warm", "like_auc_cold", "engage_auc", "like_auc_engaged", "like_logloss")


def markdown_table(result: dict) -> str:
    """The table README shows: floors, then each variant's mean ± std (and the seconds per run)."""
    head = "| test split | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    fmt = lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
    for name, floor in result["floors"].items():
        lines.append(f"| floor: {name.replace('_', ' ')} | " + " | ".join(fmt(floor.get(c)) for c in COLUMNS) + " |")
    for variant, row in result["variants"].items():
        blank = {"mean": math.nan, "std": math.nan}  # a column the run's results predate
        cells = [
            f"{row.get(c, blank)['mean']:.4f} ± {row.get(c, blank)['std']:.4f}"
            if result["seeds"] > 1
            else fmt(row.get(c, blank)["mean"])
            for c in COLUMNS
        ]
        lines.append(f"| `{variant}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_seq_lens(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = result["by_max_seq_len"]
    lengths = sorted(int(k) for k in rows)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for metric in ("like_auc", "like_uauc", "engage_auc"):
        means = [rows[str(n)][metric]["mean"] for n in lengths]
        stds = [rows[str(n)][metric]["std"] for n in lengths]
        ax.errorbar(lengths, means, yerr=stds, marker="o", capsize=3, label=metric)
    ax.set_xscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])  # the measured lengths, written plainly
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("max_seq_len (events the model sees)")
    ax.set_ylabel("test metric")
    ax.set_title(f"longer, test split of {result['lake']} ({result['seeds']} seed(s), mean ± std)", fontsize=9)
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
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (table and --seq-lens)")
    parser.add_argument(
        "--resume", action="store_true", help="reuse the finished runs of an interrupted bench (<json>.partial.json)"
    )
    parser.add_argument("--variants", default="", help="comma-separated subset (default: all of MODELS.md §7)")
    parser.add_argument(
        "--reuse-rows",
        default="",
        help="an earlier table JSON of the same preset and overrides: its rows of variants not in --variants "
        "join this table unchanged (for models whose code did not change; the result names them)",
    )
    parser.add_argument("--seq-lens", default="", help="e.g. 16,64,256,1024,2000: the sequence-length study")
    parser.add_argument("overrides", nargs="*", help="--section.key=value overrides of the preset")
    args, unknown = parser.parse_known_args(argv)
    extra = [*args.overrides, *unknown]
    configure_logging()
    started = time.perf_counter()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.seq_lens:
        lengths = [int(x) for x in args.seq_lens.split(",") if x]
        result = run_seq_lens(args, lengths, args.seeds, extra)
        plot_seq_lens(result, path.with_suffix(".png"))
    else:
        variants = QUICK_VARIANTS if args.quick else tuple(v for v in args.variants.split(",") if v) or VARIANTS
        unknown_variants = [v for v in variants if v not in VARIANTS]
        if unknown_variants:
            print(f"unknown variant(s) {unknown_variants}; known: {list(VARIANTS)}")
            return 2
        extra = ["--train.max_epochs=1", *extra] if args.quick else extra
        result = run_table(args, variants, 1 if args.quick else args.seeds, extra)
        if args.reuse_rows:
            reuse_rows(result, Path(args.reuse_rows))
    result["quick"], result["total_s"] = args.quick, round(time.perf_counter() - started, 1)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result.get("targets", result.get("by_max_seq_len")), indent=2))
    if "variants" in result:
        print(markdown_table(result))
    return 0
