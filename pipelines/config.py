"""Typed configuration of the pipeline: one frozen dataclass per section.

A component's own settings live beside the component and are nested here as sections:
``ingest.events`` is ``components.ingest_sources.EventsFileConfig``, ``ingest.synthetic``
is ``components.synthetic.SyntheticConfig``.

Presets live in ``pipelines/configs/*.yaml``; every CLI takes ``--config PRESET`` plus
``--section.key=value`` overrides (see ``components.config_loader``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from components import groups
from components.config_loader import ConfigError
from components.ingest_sources import EventsFileConfig
from components.lake import LakeConfig
from components.load_schedule import LoadConfig
from components.lr_schedule import LR_SCHEDULES
from components.synthetic import SyntheticConfig
from components.ts_units import DEFAULT_MAX_TS_AHEAD_S, DEFAULT_MIN_TS_S
from models.variants import ModelConfig
from serving.config import ServeConfig

# The folder the entry point started in, for relative defaults (the W&B folder). A driver of
# `ray job submit` runs in its uploaded working directory, and when a worker of the job starts
# on a node whose Ray shares that folder (two nodes on one host), Ray unpacks it again in place
# (runtime_env working_dir, overwrite=True): the driver's cwd is then a deleted directory and
# os.getcwd() raises FileNotFoundError midway through the run.
START_DIR = os.getcwd()


@dataclass(frozen=True)
class RayConfig:
    """Where Ray runs. ``address=None`` starts an embedded local instance."""

    address: str | None = None
    # Logical CPUs of the embedded instance. More than the physical cores on purpose:
    # Ray Data needs free slots beside training workers (STACK.md: 2 workers + num_cpus=2 hangs).
    num_cpus: int = 4
    enable_progress_bars: bool = True  # Ray Data's bars, on a terminal only (never in a log or pipe)

    def __post_init__(self) -> None:
        if self.num_cpus < 1:  # 0 hangs every Ray task for ever; negative fails inside ray.init
            raise ConfigError(f"ray.num_cpus must be >= 1, got {self.num_cpus}")


@dataclass(frozen=True)
class IngestConfig:
    """Where raw events come from and how strictly rows are validated (pipelines/ingest.py)."""

    source: Literal["movielens", "events", "synthetic"] = "movielens"
    movielens_dir: str = "../shared/data/movielens-latest-small"
    download_if_missing: bool = True
    # Where ml-latest-small.zip is unpacked when movielens_dir is absent.
    download_dir: str = "~/.cache/ultrarank"
    events: EventsFileConfig = field(default_factory=EventsFileConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    value_min: float = 0.0
    value_max: float = 5.0
    # Above this fraction of rejected rows the run fails and commits nothing.
    max_reject_frac: float = 0.01
    # Rejected rows logged as examples.
    reject_samples: int = 5
    # Tag vocabulary cap (most frequent tags; the rest are dropped from items.tag_ids).
    max_tag_vocab: int = 5000
    # Events before min_ts_s (default 1990-01-01) or more than max_ts_ahead_s after now are
    # rejected rows (ts_out_of_range): usually a unit or parsing mistake (components/ts_units.py).
    min_ts_s: int = DEFAULT_MIN_TS_S
    max_ts_ahead_s: int = DEFAULT_MAX_TS_AHEAD_S

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_reject_frac <= 1.0:
            raise ValueError(f"max_reject_frac must be in [0, 1], got {self.max_reject_frac}")
        if not self.value_min < self.value_max:
            raise ValueError(f"value_min ({self.value_min}) must be < value_max ({self.value_max})")
        if self.max_tag_vocab < 0:
            raise ConfigError(f"ingest.max_tag_vocab must be >= 0, got {self.max_tag_vocab}")
        if self.max_ts_ahead_s < 0:
            raise ConfigError(f"ingest.max_ts_ahead_s must be >= 0, got {self.max_ts_ahead_s}")


@dataclass(frozen=True)
class FeaturesConfig:
    max_seq_len: int = 2000
    candidates_per_group: int = 32
    # Real events per group; the rest of the candidates are sampled negatives.
    max_positives_per_group: int = 16
    session_gap_s: int = 1800
    valid_frac: float = 0.1
    test_frac: float = 0.1
    like_threshold: float = 4.0
    min_seq_len: int = 1
    tags_per_item: int = 3
    negatives_seed: int = 0
    # Negatives follow item popularity as of the request (components/groups.PopularitySnapshots):
    # counts before K global time edges at event quantiles. The bucket tasks hold K x items
    # int64 counts (64 x 20k items: 10 MiB), so K stays small for large catalogues.
    popularity_snapshots: int = 64
    # Counted over the last ``popularity_window`` snapshot intervals before the request (8 of 64:
    # the most recent eighth of all events); 0 = every event before it. docs/DATA.md has the
    # measurement: all-time counts leave new items 3.5% of negatives against 21% of positives.
    popularity_window: int = 8
    # Ids with fewer train-period events share the OOV row in training, evaluation and serving
    # (models/id_rows.py; read when a model is trained, written into its checkpoint and bundle).
    # 0 = every id keeps its own row; 1 = only ids never seen in training share it.
    min_item_count: int = 5
    min_user_count: int = 5

    def __post_init__(self) -> None:
        validate_features_config(self)


def validate_features_config(cfg: FeaturesConfig) -> None:
    """Reject settings that would build wrong groups, naming the offending key."""
    if cfg.candidates_per_group < 1:
        raise ConfigError(f"features.candidates_per_group must be >= 1, got {cfg.candidates_per_group}")
    if not 1 <= cfg.max_positives_per_group <= cfg.candidates_per_group:
        raise ConfigError(
            f"features.max_positives_per_group ({cfg.max_positives_per_group}) must be in "
            f"[1, candidates_per_group={cfg.candidates_per_group}]"
        )
    for name in ("popularity_window", "min_item_count", "min_user_count"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"features.{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("max_seq_len", "tags_per_item", "popularity_snapshots"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"features.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.session_gap_s < 0 or cfg.min_seq_len < 0:
        raise ConfigError("features.session_gap_s and features.min_seq_len must be >= 0")
    try:
        groups.cutoff_ranks(1, cfg.valid_frac, cfg.test_frac)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


# Sharding types TorchRec's CPU kernels accept (row_wise needs CUDA; STACK.md). data_parallel
# is left out on CPU: with it the process died in the first forward (no Python error) here.
CPU_SHARDING_TYPES = ("table_wise", "column_wise", "table_column_wise")
GPU_SHARDING_TYPES = (*CPU_SHARDING_TYPES, "data_parallel", "row_wise", "table_row_wise", "grid_shard")


@dataclass(frozen=True)
class TrainConfig:
    """Ray Train settings of ``pipelines.train`` (docs/DESIGN.md: DDP dense + sharded sparse)."""

    # Ray Train workers; 0 runs the loop in the driver process (one rank; unit tests).
    num_workers: int = 2
    use_gpu: bool = False  # nccl + CUDA kernels; untested until a GPU run's numbers are in README
    max_epochs: int = 3
    # Early stop: end the run once valid like AUC has not improved for this many epochs
    # (0 = run every epoch). Evaluation, export, the demo and the benches use the best-valid
    # checkpoint (components.checkpoint.best_checkpoint), whatever the run's last one.
    patience: int = 1
    # 0 = ``max_epochs`` whole epochs; > 0 stops after this many steps (smoke runs, benchmarks).
    max_steps: int = 0
    batch_size: int = 64  # groups per worker and step (the user side runs once per group)
    # Sequence length L the model sees (the most recent events); 0 = the features run's max_seq_len.
    max_seq_len: int = 256
    lr: float = 1e-3  # AdamW, dense parameters
    # The dense rate over the run (components/lr_schedule.py): "linear" falls from ``lr`` to ~0 at
    # the run's last step (max_epochs x steps per epoch, or max_steps; early stopping ends it
    # sooner). The fused table optimisers keep their rates (row-wise Adagrad decays by itself).
    # Linear lifted `full`'s valid like AUC on 3 of 3 seeds (docs/MODELS.md, "The schedule").
    lr_schedule: Literal["constant", "linear"] = "constant"
    weight_decay: float = 0.0
    # Fused TorchRec optimizer of the embedding tables, applied in the backward (never dense Adam state).
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    sparse_lr: float = 0.05
    # The MSN/LMN memory value tables: TorchRec tables with their own fused optimizer's rate.
    memory_lr: float = 0.05
    # Sharding types the planner may choose from (CPU: table_wise/column_wise; GPU: row_wise).
    sharding_types: tuple[str, ...] = ("table_wise", "column_wise")
    bf16: bool = False  # autocast the forward to bfloat16
    # Dense AdamW as one fused kernel over all parameters (torch's fused=True) instead of the
    # per-tensor loop; same update to rounding (tests/pipelines/test_train_perf.py).
    fused_optimizer: bool = True
    # torch.compile (inductor) the dense blocks: LONGER and the backbone (models/compiled.py).
    # Off by default: the first steps pay tens of seconds to minutes of compilation on 2 cores,
    # for 2-5% on a large backbone's step (README "Performance"). Eager is its tested oracle.
    compile: bool = False
    # glibc keeps freed activations for the next step instead of unmapping them
    # (components/host_memory.py): one config switch, values unchanged.
    retain_freed_memory: bool = True
    activation_checkpointing: bool = False  # recompute backbone/sequence blocks in the backward
    grad_clip_norm: float = 0.0  # 0 = off; dense parameters only
    seed: int = 0
    # Bit-for-bit repeatable: ordered data, deterministic kernels (slower; for resume checks).
    deterministic: bool = False
    # Groups are stored user by user: "global" shuffles the train split (seeded, Ray Data) so a
    # batch mixes users; "local" only shuffles within each worker's buffer; "none" keeps order.
    shuffle: Literal["global", "local", "none"] = "global"
    shuffle_buffer: int = 512  # groups in each worker's seeded local shuffle buffer (global/local)
    log_every_steps: int = 20
    checkpoint_every_steps: int = 0  # 0 = at the end of every epoch only
    num_checkpoints_to_keep: int = 2
    # Local folder or object-store URI (s3://bucket/checkpoints, gs://...); the run lives in
    # ``storage_path/run_name``. A URI is reached with ``lake.storage_options`` (the same store
    # as the lake: endpoint, credentials, region), given to Ray Train as a pyarrow filesystem.
    storage_path: str = "checkpoints"
    run_name: str = ""  # "" = the variant's name
    # auto: continue the run of the same name if it has a checkpoint; never: a fresh run;
    # anything else: the path of a checkpoint to start from.
    resume: str = "auto"
    max_failures: int = 1  # worker-group restarts from the latest checkpoint (Ray Train FailureConfig)
    valid_every_epoch: bool = True  # AUC/UAUC/logloss on the valid split after every epoch

    def __post_init__(self) -> None:
        counts = ("num_workers", "max_steps", "max_seq_len", "log_every_steps", "checkpoint_every_steps", "patience")
        for name in counts:
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_epochs", "batch_size", "num_checkpoints_to_keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "sparse_lr", "memory_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule={self.lr_schedule!r} is not one of {list(LR_SCHEDULES)}")
        if self.weight_decay < 0 or self.grad_clip_norm < 0 or self.shuffle_buffer < 0 or self.max_failures < -1:
            raise ConfigError("train.weight_decay, grad_clip_norm, shuffle_buffer must be >= 0, max_failures >= -1")
        allowed = GPU_SHARDING_TYPES if self.use_gpu else CPU_SHARDING_TYPES
        bad = [s for s in self.sharding_types if s not in allowed]
        if not self.sharding_types or bad:
            hint = " (row_wise needs CUDA: set train.use_gpu=true)" if "row_wise" in bad else ""
            raise ConfigError(f"train.sharding_types {list(self.sharding_types)}: use some of {list(allowed)}{hint}")
        if self.sparse_optimizer == "adam" and not self.use_gpu:
            raise ConfigError("train.sparse_optimizer=adam has no CPU kernel in FBGEMM; use rowwise_adagrad on CPU")
        if not self.resume.strip():
            raise ConfigError("train.resume is empty; use auto, never or a checkpoint path")
        if not self.storage_path.strip():
            raise ConfigError("train.storage_path is empty; set a folder or an object-store URI")

    @property
    def world_size(self) -> int:
        return max(self.num_workers, 1)


@dataclass(frozen=True)
class EvalConfig:
    """``pipelines.evaluate``: batch inference over a split from a training checkpoint."""

    # A checkpoint folder or URI; "" = the best-valid checkpoint of ``train.run_name`` in ``train.storage_path``.
    checkpoint: str = ""
    split: Literal["train", "valid", "test"] = "test"
    batch_size: int = 64  # groups per inference batch
    num_actors: int = 1  # actors in the inference pool, each loading the checkpoint once
    # metrics.json goes here; "" = beside the checkpoint's run (``storage_path/run_name/metrics_<split>.json``).
    output: str = ""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_actors < 1:
            raise ConfigError(
                f"eval.batch_size and eval.num_actors must be >= 1, got {self.batch_size}, {self.num_actors}"
            )


@dataclass(frozen=True)
class ExportConfig:
    """``pipelines.export``: a training checkpoint -> a serving bundle (components/bundle.py)."""

    # A checkpoint folder or URI; "" = the best-valid checkpoint of the train run the config names.
    checkpoint: str = ""
    w8a16: bool = False  # also write W8A16 weights (int8 weights, float activations)
    # The bundle folder or object-store URI (s3://bucket/bundles/full, reached with
    # ``lake.storage_options``); "" = ``bundles/<run name>``. Give an absolute path or a URI in a
    # preset meant for ``ray job submit`` (the job runs in an uploaded copy of the working directory).
    output: str = ""


@dataclass(frozen=True)
class RunSettings:
    """The ``run`` section: what ``pipelines.run`` writes besides the stages' own outputs."""

    # Each run's folder: ``reports_dir/<run id>/`` holds manifest.json, report.md, its plots and
    # the load test's files. A local or mounted folder; absolute in a preset for ``ray job submit``
    # (the job runs in an uploaded copy of the working directory, deleted when the job ends).
    reports_dir: str = "reports"
    # The short load test after serve: one open-loop run per offered rate (requests/s), each
    # ``loadtest_duration_s`` long, with the ``loadtest`` section's arrivals and request mix.
    loadtest_rates: tuple[float, ...] = (5.0, 10.0, 20.0)
    loadtest_duration_s: float = 10.0
    # W&B's local folder (runs go to ``<wandb_dir>/wandb``); "" = the folder the command started
    # in. Absolute on a cluster, for the same reason as ``reports_dir``.
    wandb_dir: str = ""

    def __post_init__(self) -> None:
        if "://" in self.reports_dir:
            raise ConfigError(f"run.reports_dir must be a local or mounted folder, got {self.reports_dir!r}")
        if not self.reports_dir.strip():
            raise ConfigError("run.reports_dir is empty")
        if not self.loadtest_rates or any(not r > 0 for r in self.loadtest_rates) or not self.loadtest_duration_s > 0:
            raise ConfigError(
                f"run.loadtest_rates must be rates > 0 and run.loadtest_duration_s > 0, "
                f"got {list(self.loadtest_rates)}, {self.loadtest_duration_s}"
            )


@dataclass(frozen=True)
class PipelineConfig:
    """Root config; one section per pipeline stage."""

    ray: RayConfig = field(default_factory=RayConfig)
    lake: LakeConfig = field(default_factory=LakeConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    # The model: a variant of MODELS.md §7 over base sizes; vocabulary sizes come from the lake.
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    loadtest: LoadConfig = field(default_factory=LoadConfig)
    run: RunSettings = field(default_factory=RunSettings)

    @property
    def wandb_dir(self) -> str:
        """Where train and evaluate put W&B's files (``run.wandb_dir``, else the start folder)."""
        return os.path.abspath(os.path.expanduser(self.run.wandb_dir)) if self.run.wandb_dir else START_DIR

    @property
    def run_name(self) -> str:
        """The training run's name: ``train.run_name``, or the model variant when empty."""
        return self.train.run_name or self.model.variant

    def __post_init__(self) -> None:
        # LONGER's position table has longer.max_seq_len rows; a longer training sequence
        # would fail inside the first forward.
        length, rows = self.train.max_seq_len or self.features.max_seq_len, self.model.ranker.longer.max_seq_len
        if length > rows:
            raise ConfigError(
                f"train.max_seq_len={length} exceeds model.ranker.longer.max_seq_len={rows} "
                "(LONGER's position table); raise the latter or lower the former"
            )
