"""A run's report: ``report.md`` and its PNG plots, from the run's own JSON outputs only.

Inputs are the run manifest (pipelines/run_manifest.py) and the JSON files its stages name:
``train.json`` (summary and curves), ``metrics_<split>.json`` and ``floors_<split>.json``,
``bundle.json``, and the load test's ``summary.json`` and ``requests_<rate>.jsonl``. Nothing is
recomputed or read from the lake, so the report of a run can be written again at any time
(``python -m pipelines.run --only report``) and says exactly what that run measured.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from components.checkpoint import write_text
from pipelines.run_manifest import RunManifest

REPORT = "report.md"
# Metrics shown per variant: (key in metrics.json, label).
QUALITY = (
    ("like_auc", "like AUC"),
    ("like_uauc", "like UAUC"),
    ("engage_auc", "engage AUC"),
    ("engage_uauc", "engage UAUC"),
    # Warm items have train-period events, cold ones do not (docs/DATA.md); absent on old lakes.
    ("like_auc_warm", "like AUC warm"),
    ("like_auc_cold", "like AUC cold"),
)


def _read_json(path: str | None) -> Any:
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    _pyplot().close(fig)
    return name


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def plot_training(history: list[dict], folder: Path) -> str | None:
    """training_curves.png: the logged losses by step, and each epoch's valid AUCs."""
    steps = [h for h in history if "loss" in h]
    epochs = [h for h in history if any(k.startswith("valid/") for k in h)]
    if not steps and not epochs:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in ("loss", "bce_like", "bce_engage"):
        points = [(h["step"], h[key]) for h in steps if key in h]
        if points:
            left.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
    left.set_xlabel("step")
    left.set_ylabel("training loss (mean over workers)")
    left.grid(alpha=0.3)
    if steps:
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no step logged (train.log_every_steps)", ha="center", transform=left.transAxes)
    for key in ("valid/like_auc", "valid/like_uauc", "valid/engage_auc"):
        points = [(h["step"], h[key]) for h in epochs if key in h]
        if points:
            right.plot(*zip(*points), marker="o", label=key)
    right.set_xlabel("step (end of epoch)")
    right.set_ylabel("validation metric")
    right.grid(alpha=0.3)
    if epochs:
        right.legend(fontsize=8)
    return _save(fig, folder, "training_curves.png")


def plot_quality(rows: Mapping[str, Mapping[str, float]], folder: Path) -> str | None:
    """metrics_per_variant.png: grouped bars, one group per metric, one bar per variant/floor."""
    if not rows:
        return None
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 3.4))
    width = 0.8 / len(rows)
    x = np.arange(len(QUALITY))
    for i, (name, metrics) in enumerate(rows.items()):
        values = [metrics.get(key, float("nan")) for key, _ in QUALITY]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(x, [label for _, label in QUALITY])
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    known = (v for m in rows.values() for k, _ in QUALITY if (v := m.get(k)) is not None and not math.isnan(v))
    lowest = min(known, default=0.4)
    ax.set_ylim(min(0.4, lowest - 0.05), 1.0)
    ax.set_ylabel("test split")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, folder, "metrics_per_variant.png")


def plot_cache(summary: Mapping[str, Any], folder: Path) -> str:
    """cache_hit_rate.png: the share of served requests answered from the user-side cache, by load."""
    plt = _pyplot()
    rates = sorted(summary["runs"], key=float)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([float(r) for r in rates], [summary["runs"][r]["cache_hit_rate"] for r in rates], marker="o")
    ax.set_ylim(0, 1)
    ax.set_xlabel("offered load (requests / s)")
    ax.set_ylabel("user-side cache hit rate")
    ax.grid(alpha=0.3)
    return _save(fig, folder, "cache_hit_rate.png")


# ---------------------------------------------------------------------------------------------
# The markdown
# ---------------------------------------------------------------------------------------------
def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _num(value: Any, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _image(name: str | None, alt: str) -> list[str]:
    return [f"![{alt}]({name})", ""] if name else []


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _link(path: str, folder: Path) -> str:
    """A markdown link: relative inside the report folder's parent tree, the URI otherwise."""
    if not path:
        return "–"
    if "://" in path:
        return f"`{path}`"
    try:
        rel = os.path.relpath(path, folder)
    except ValueError:
        rel = path
    return f"[`{path}`]({rel})"


def write_report(manifest: RunManifest, folder: Path) -> Path:
    """Write ``folder/report.md`` and its plots; returns the report's path."""
    folder.mkdir(parents=True, exist_ok=True)
    config, stages = manifest.config, manifest.stages
    out = manifest.outputs
    lines = [f"# ultrarank run {manifest.run_id}", ""]
    done = [r for name, r in stages.items() if name != "report"]
    ran, reused = sum(r.status == "ran" for r in done), sum(r.status == "reused" for r in done)
    failed = [r.name for r in done if r.status == "failed"]
    status = f"failed in {', '.join(failed)}" if failed else "succeeded"
    lines += [
        f"Preset `{manifest.preset}`, started {_when(manifest.started)} on `{manifest.host}`: {status}, "
        f"{ran} stages ran and {reused} were reused from earlier runs, {manifest.seconds:.0f} s up to this report.",
        "",
        *_headline(manifest),
        "```",
        f"python -m pipelines.run {' '.join(manifest.argv)}",
        "```",
        "",
        "## Stages",
        "",
    ]
    lines += _table(
        ("stage", "status", "seconds", "from run", "key"),
        (
            (name, r.status, f"{r.seconds:.1f}", r.from_run or "this", f"`{r.key}`")
            for name, r in stages.items()
            if name != "report"
        ),
    )
    lines += _data_section(manifest)
    lines += _training_section(out("train"), config, folder)
    lines += _quality_section(out("evaluate"), folder)
    lines += _serving_section(out("serve"), out("export"))
    lines += _loadtest_section(out("loadtest"), folder)
    lines += _artifacts_section(manifest, folder)
    path = folder / REPORT
    write_text(str(path), "\n".join(lines))
    return path


def _headline(manifest: RunManifest) -> list[str]:
    """Two sentences: what was trained on what, and how well it ranked and served."""
    out, config = manifest.outputs, manifest.config
    parts = []
    ingest, metrics = out("ingest"), _read_json(out("evaluate").get("metrics"))
    if ingest:
        rows = ingest.get("rows", {})
        parts.append(
            f"`{config['model']['variant']}` trained on {config['ingest']['source']} data "
            f"({rows.get('events', '?')} events, {rows.get('users', '?')} users, {rows.get('items', '?')} items)"
        )
    if metrics:
        floors = _read_json(out("evaluate").get("floors")) or {}
        best = max(floors.items(), key=lambda kv: kv[1].get("like_auc", 0.0), default=None)
        text = f"test like AUC {_num(metrics['metrics']['like_auc'])}"
        if best:
            text += f" (best floor, {best[0]}: {_num(best[1]['like_auc'])})"
        parts.append(text)
    summary = _read_json(out("loadtest").get("summary"))
    if summary:
        top = max(summary["runs"], key=float)
        run = summary["runs"][top]
        parts.append(
            f"at {top} requests/s offered the service answered {_num(run['goodput_per_s'], 2)} good "
            f"responses/s (SLO attainment {_num(run['attainment'], 3)}, "
            f"cache hit rate {_num(run['cache_hit_rate'], 2)})"
        )
    return ["**" + "; ".join(parts) + ".**", ""] if parts else []


def _data_section(manifest: RunManifest) -> list[str]:
    config, out = manifest.config, manifest.outputs
    ingest, features = out("ingest"), out("features")
    if not ingest and not features:
        return []
    source = config["ingest"]["source"]
    where = {
        "movielens": config["ingest"]["movielens_dir"],
        "events": (config["ingest"]["events"] or {}).get("path"),
        "synthetic": "seeded generator",
    }[source]
    root = ingest.get("lake") or config["lake"]["root"]
    lines = ["## Data", "", f"Source `{source}` ({where}), lake `{root}`.", ""]
    rows = []
    counts = {**ingest.get("rows", {}), **features.get("rows", {})}
    for name, version in {**ingest.get("versions", {}), **features.get("versions", {})}.items():
        rows.append((name, version, counts.get(name, "")))
    lines += _table(("Delta table", "version", "rows"), rows)
    summary = features.get("summary") or {}
    if summary:
        f = config["features"]
        groups = ", ".join(f"{s} {summary.get(f'groups_{s}', 0)}" for s in ("train", "valid", "test"))
        lines += [
            f"Groups (one user, one request time, {f['candidates_per_group']} candidates): {groups}. "
            f"Sequences keep up to {f['max_seq_len']} events per user.",
            "",
        ]
    return lines


def _training_section(train: Mapping[str, Any], config: Mapping[str, Any], folder: Path) -> list[str]:
    summary = _read_json(train.get("summary"))
    if not summary:
        return []
    t = config["train"]
    lines = [
        "## Training",
        "",
        f"Variant `{config['model']['variant']}` on "
        + (f"{t['num_workers']} Ray Train worker(s)" if t["num_workers"] else "the driver (train.num_workers=0)")
        + " x "
        f"{t['batch_size']} groups per step, the last {t['max_seq_len']} events per user: "
        f"{summary['steps']} steps, {summary['epochs']} epochs in {summary['train_s']:.1f} s "
        f"({summary['candidates_per_s']:.0f} candidates/s after the first steps)"
        + (f", resumed from {summary['resumed_from']}" if summary.get("resumed_from") else "")
        + ".",
        "",
    ]
    best = {k[len("valid/") :]: v for k, v in summary.get("best_valid", {}).items() if not k.startswith("valid/num_")}
    if best:
        lines += ["Best validation epoch: " + ", ".join(f"{k} {_num(v)}" for k, v in sorted(best.items())), ""]
    lines += _image(plot_training(summary.get("history", []), folder), "training curves")
    return lines


def _quality_section(evaluate: Mapping[str, Any], folder: Path) -> list[str]:
    metrics, floors = _read_json(evaluate.get("metrics")), _read_json(evaluate.get("floors")) or {}
    if not metrics:
        return []
    rows = {metrics["variant"]: metrics["metrics"], **{f"floor: {k}": v for k, v in floors.items()}}
    lines = [
        "## Quality",
        "",
        f"Split `{metrics['split']}` ({metrics['num_groups']} groups, samples version "
        f"{metrics['samples_version']}), checkpoint step {metrics['step']}. Floors are non-learned "
        "scores from past events (components/floors.py): a model is worth its cost only above them.",
        "",
    ]
    lines += _table(
        ("model", *(label for _, label in QUALITY), "like logloss"),
        ((name, *(_num(m.get(k)) for k, _ in QUALITY), _num(m.get("like_logloss"))) for name, m in rows.items()),
    )
    lines += _image(plot_quality(rows, folder), "metrics per variant")
    return lines


def _serving_section(serve: Mapping[str, Any], export: Mapping[str, Any]) -> list[str]:
    bundle = _read_json(export.get("summary"))
    if not bundle and not serve:
        return []
    lines = ["## Serving", ""]
    if bundle:
        size = sum(f["bytes"] for f in bundle["files"].values()) / 1e6
        lines += [
            f"Bundle `{bundle['model_version']}` ({bundle['variant']}, checkpoint step "
            f"{bundle['checkpoint']['step']}, {size:.1f} MB, W8A16 weights: {bundle['w8a16']}).",
            "",
        ]
    if serve:
        classes = ", ".join(f"{k} {v:g} ms" for k, v in serve["slo_classes"].items())
        lines += [
            f"Served at {serve['url']} by {serve['num_replicas']} replica(s), ready in "
            f"{serve['ready_s']:.1f} s: {serve['routing']} routing, {serve['batching']} batching "
            f"(policy {serve['policy']}), user-side cache {'on' if serve['cache'] else 'off'}; "
            f"SLO classes {classes}.",
            "",
        ]
    return lines


def _loadtest_section(loadtest: Mapping[str, Any], folder: Path) -> list[str]:
    from pipelines.loadtest import plot

    summary_path = loadtest.get("summary")
    summary = _read_json(summary_path)
    if not summary:
        return []
    runs = summary["runs"]
    rates = sorted(runs, key=float)
    load = summary["load"]
    lines = [
        "## Load test",
        "",
        f"Open loop, {load['arrivals']} arrivals, {load['duration_s']:g} s per offered rate, "
        f"class mix {load['class_mix']}, Zipf users (s={load['user_zipf']}). Latency counts from the "
        "scheduled send time; a rate whose generator lag p99 exceeds 2 ms measured the generator, "
        "not the service, and is marked invalid.",
        "",
    ]
    classes = sorted({c for r in rates for c in runs[r]["by_class"]})
    header = ("req/s", "goodput/s", "attainment", *(f"{c}: attainment, p99 ms" for c in classes))
    header += ("cache hits", "rejected", "lag p99 ms", "valid")
    rows = []
    for r in rates:
        run = runs[r]
        per_class = [run["by_class"].get(c, {}) for c in classes]
        rows.append(
            (
                r,
                _num(run["goodput_per_s"], 2),
                _num(run["attainment"], 3),
                *(f"{_num(c.get('attainment'), 3)}, {_num(c.get('p99_ms'), 1)}" for c in per_class),
                _num(run["cache_hit_rate"], 2),
                sum(run["rejected"].values()),
                _num(run["lag_p99_ms"], 2),
                "yes" if run["valid"] else "**no**",
            )
        )
    lines += _table(header, rows)
    base = Path(summary_path).parent
    records = {r: _read_jsonl(base / f"requests_{r}.jsonl") for r in rates}
    for name in plot(summary, records, folder):
        lines += _image(name, name.removesuffix(".png").replace("_", " "))
    lines += _image(plot_cache(summary, folder), "cache hit rate")
    return lines


def _artifacts_section(manifest: RunManifest, folder: Path) -> list[str]:
    out = manifest.outputs
    train, evaluate, export = out("train"), out("evaluate"), out("export")
    root = out("ingest").get("lake") or manifest.config["lake"]["root"]
    versions = {**out("ingest").get("versions", {}), **out("features").get("versions", {})}
    items = [
        ("manifest (every stage's inputs and outputs)", str(folder / "manifest.json")),
        ("W&B run folder (training)", train.get("wandb", "")),
        ("W&B run folder (evaluation)", evaluate.get("wandb", "")),
        ("checkpoint", train.get("checkpoint", "")),
        ("test metrics", evaluate.get("written_to", "")),
        ("bundle", export.get("bundle", "")),
        ("load test files", str(Path(out("loadtest")["summary"]).parent) if out("loadtest") else ""),
    ]
    lines = ["## Artifacts", ""]
    lines += [f"- {label}: {_link(path, folder)}" for label, path in items if path]
    if versions:
        pinned = ", ".join(f"{name} v{v}" for name, v in versions.items())
        lines += [f"- Delta tables under `{root}`: {pinned}"]
    return lines + [""]
