"""Every named variant of MODELS.md §7 builds from config and ranks a tiny batch."""

from __future__ import annotations

import pytest
import torch

from models.ranker import Ranker, RankerOutput
from models.variants import BASELINE_VARIANTS, VARIANTS, ModelConfig, build_model, ranker_config
from tests.models.ranker_factories import random_groups, tiny_ranker_config


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_builds_and_ranks(variant):
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant=variant, ranker=tiny_ranker_config())).eval()
    batch = random_groups(seed=1, batch=2, cands=3, seq=12)
    with torch.no_grad():
        out = model(batch)
    logits = out.logits if isinstance(out, RankerOutput) else out
    assert logits.shape == (2, 3, 2) and torch.isfinite(logits).all()
    assert isinstance(model, Ranker) == (variant not in BASELINE_VARIANTS)


def test_variant_switches_override_the_base():
    full = ranker_config(ModelConfig(variant="full", ranker=tiny_ranker_config()))
    assert full.use_ugsep and full.use_msn and full.use_lmn and full.sequence_encoder == "longer"
    # A variant never inherits switches from the base: "rankmixer" on a "full" base is plain.
    plain = ranker_config(ModelConfig(variant="rankmixer", ranker=full))
    assert (plain.backbone, plain.use_ugsep, plain.use_msn, plain.use_lmn) == ("rankmixer", False, False, False)
    moe = ranker_config(ModelConfig(variant="tokenmixer_large_moe", ranker=full))
    assert moe.tokenmixer_large.moe.num_experts == 4 and moe.tokenmixer_large.dim == full.tokenmixer_large.dim


def test_unknown_variant_named():
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig(variant="bogus")
