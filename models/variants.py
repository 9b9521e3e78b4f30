"""Named model variants (MODELS.md §7): each an honest, separately reported row.

``build_model(ModelConfig(variant="longer"))`` builds the ranker with that variant's
settings applied over ``ModelConfig.ranker``; the three baselines are separate models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from models.baselines import build_baseline
from models.ranker import Ranker, RankerConfig

# Each ranker variant is a nested update of RankerConfig fields. Every variant sets all the
# switches (backbone, sequence encoder, UG-Sep, memories), so the base config only gives sizes.
_OFF = {"use_ugsep": False, "use_msn": False, "use_lmn": False, "sequence_encoder": "pooling"}
RANKER_VARIANTS: dict[str, dict[str, Any]] = {
    "rankmixer": {**_OFF, "backbone": "rankmixer"},
    "rankmixer_moe": {
        **_OFF,
        "backbone": "rankmixer",
        "rankmixer": {"moe": {"num_experts": 4, "target_active_ratio": 0.5}},
    },
    "tokenmixer_large": {**_OFF, "backbone": "tokenmixer_large"},
    "tokenmixer_large_moe": {
        **_OFF,
        "backbone": "tokenmixer_large",
        "tokenmixer_large": {"moe": {"num_experts": 4, "top_k": 1}},
    },
    "ugsep": {**_OFF, "backbone": "tokenmixer_large", "use_ugsep": True, "use_compensation": True},
    "ugsep_nocomp": {**_OFF, "backbone": "tokenmixer_large", "use_ugsep": True, "use_compensation": False},
    "longer": {**_OFF, "backbone": "tokenmixer_large", "use_ugsep": True, "sequence_encoder": "longer"},
    "msn": {**_OFF, "backbone": "tokenmixer_large", "use_ugsep": True, "sequence_encoder": "longer", "use_msn": True},
    "lmn": {**_OFF, "backbone": "tokenmixer_large", "use_ugsep": True, "sequence_encoder": "longer", "use_lmn": True},
    "full": {
        **_OFF,
        "backbone": "tokenmixer_large",
        "use_ugsep": True,
        "sequence_encoder": "longer",
        "use_msn": True,
        "use_lmn": True,
    },
}
BASELINE_VARIANTS = ("dlrm_mlp", "dcnv2", "din")
VARIANTS = (*BASELINE_VARIANTS, *RANKER_VARIANTS)


@dataclass(frozen=True)
class ModelConfig:
    """Which variant, over which base ranker settings (sizes, vocabularies)."""

    variant: str = "longer"
    ranker: RankerConfig = field(default_factory=RankerConfig)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"model.variant {self.variant!r} is not one of {list(VARIANTS)}")


def apply_updates(config: Any, updates: dict[str, Any]) -> Any:
    """``dataclasses.replace`` through nested dataclasses: {"rankmixer": {"moe": {...}}}."""
    changes = {}
    for name, value in updates.items():
        current = getattr(config, name)
        is_nested = dataclasses.is_dataclass(current) and isinstance(value, dict)
        changes[name] = apply_updates(current, value) if is_nested else value
    return dataclasses.replace(config, **changes)


def ranker_config(config: ModelConfig) -> RankerConfig:
    """The ranker settings of a (non-baseline) variant."""
    if config.variant in BASELINE_VARIANTS:
        raise ValueError(f"{config.variant!r} is a baseline, not a ranker variant")
    return apply_updates(config.ranker, RANKER_VARIANTS[config.variant])


def build_model(config: ModelConfig) -> nn.Module:
    """The model of ``config.variant``; baselines share the ranker's vocabulary sizes."""
    if config.variant in BASELINE_VARIANTS:
        sparse = config.ranker.sparse
        return build_baseline(config.variant, sparse.item_vocab, num_users=sparse.user_vocab, num_tags=sparse.tag_vocab)
    return Ranker(ranker_config(config))
