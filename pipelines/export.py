"""Export a training checkpoint as a serving bundle (components/bundle.py).

    python -m pipelines.export --config PRESET [--export.checkpoint=PATH] [--export.w8a16=true]

The bundle holds the consolidated weights (safetensors, no pickle), optional W8A16 weights,
the item and user vocabularies at the lake versions the checkpoint was trained on, the model
and serving config, and a content-hash ``model_version``. ``export.output`` may be an
object-store URI (reached with ``lake.storage_options``, like a checkpoint URI): the bundle is
written and checked locally, then uploaded with ``bundle.json`` last. Exit 0 done, 1 a missing
or bad checkpoint or lake, 2 a config error (also a store that cannot be reached as configured).
"""

from __future__ import annotations

import argparse
import logging
import time

from components import lake
from components.bundle import BundleError, BundleManifest, default_bundle_dir, load_bundle, write_bundle
from components.bundle_store import bundle_target
from components.checkpoint import CheckpointError, CheckpointMeta, find_checkpoint, load_model
from components.sequence_join import pinned_versions
from pipelines.cli import pipeline_main
from pipelines.config import PipelineConfig

logger = logging.getLogger(__name__)


def bundle_path(config: PipelineConfig) -> str:
    """Where ``export`` writes (and ``serve`` reads) the bundle of the run the config names."""
    return default_bundle_dir(config.export.output, config.run_name)


def tags_per_item(root: str, samples_version: int, options: dict[str, str]) -> int:
    """Tags per candidate in the features run's samples (read off one group)."""
    dataset = lake.open_table(lake.table_uri(root, "samples"), samples_version, options).to_pyarrow_dataset()
    for batch in dataset.to_batches(columns=["cand_item_idx", "cand_tags"], batch_size=64):
        for items, tags in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if items:
                return len(tags) // len(items)
    raise lake.LakeError(f"samples version {samples_version} under {root} has no group with candidates")


def run_export(config: PipelineConfig) -> tuple[str, BundleManifest]:
    """Write the bundle; (its folder, its manifest). Reads the lake, needs no Ray."""
    cfg = config.export
    options = config.lake.storage_options
    checkpoint, meta = find_checkpoint(cfg.checkpoint, config.train.storage_path, config.run_name, options)
    out = bundle_path(config)
    with bundle_target(out, options) as folder:
        manifest = _write(config, checkpoint, meta, folder)
    return out, manifest


def _write(config: PipelineConfig, checkpoint: str, meta: CheckpointMeta, out: str) -> BundleManifest:
    """Write the bundle of ``checkpoint`` into the local folder ``out`` and check that it loads."""
    options = config.lake.storage_options
    model, meta = load_model(checkpoint, meta, options)
    samples_version, sequences_version, info = pinned_versions(meta.lake_root, options, meta.samples_version)
    versions = {name: int(info[f"{name}_version"]) for name in ("items", "users")}
    tables = {
        name: lake.PinnedTable(lake.table_uri(meta.lake_root, name), version, options).read()
        for name, version in versions.items()
    }
    max_seq_len = int(meta.train.get("max_seq_len") or info["max_seq_len"])
    manifest = write_bundle(
        out,
        model,
        variant=meta.variant,
        model_config=meta.model,
        max_seq_len=max_seq_len,
        tags_per_item=tags_per_item(meta.lake_root, samples_version, options),
        items=tables["items"],
        users=tables["users"],
        lake={
            "root": meta.lake_root,
            "samples_version": samples_version,
            "sequences_version": sequences_version,
            **{f"{name}_version": v for name, v in versions.items()},
        },
        checkpoint={"path": checkpoint, "step": meta.step},
        w8a16=config.export.w8a16,
    )
    load_bundle(out, w8a16=config.export.w8a16)  # what was written loads: every check a replica will run
    return manifest


def _main(config: PipelineConfig, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out, manifest = run_export(config)
    sizes = {name: facts["bytes"] for name, facts in manifest.files.items()}
    print(f"bundle {out}")
    print(f"  model_version {manifest.model_version} ({manifest.variant}, step {manifest.checkpoint['step']})")
    print(f"  from {manifest.checkpoint['path']}")
    versions = ", ".join(f"{k} {v}" for k, v in manifest.lake.items() if k.endswith("_version"))
    print(f"  lake {manifest.lake['root']} ({versions})")
    for name, size in sorted(sizes.items()):
        print(f"  {name:28s} {size / 1e6:9.2f} MB")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return pipeline_main(
        "pipelines.export",
        __doc__.splitlines()[0],
        argv,
        _main,
        default_preset="demo",
        failures=(lake.LakeError, CheckpointError, BundleError),
    )


if __name__ == "__main__":
    raise SystemExit(main())
