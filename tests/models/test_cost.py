"""Cost accounting against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.baselines import DLRMMLP
from models.batch import GroupBatch
from models.cost import count_parameters, flops_per_candidate, is_sparse_module, measure_peak_matmul_flops
from models.layers import PerTokenLinear
from tests.models.test_baselines import NUM_ITEMS, NUM_TAGS, NUM_USERS, random_batch


class Tiny(nn.Module):
    """Known costs: sparse 10*4 + 6*4 = 64; dense (4*8+8) + (2*8*3+2*3) + 6*2 = 106.

    FLOPs per candidate: proj 2*4*8 = 64, per-token 2*(2*8*3) = 96, out 2*6*2 = 24 -> 184.
    """

    def __init__(self) -> None:
        super().__init__()
        self.item = nn.Embedding(10, 4)
        self.tags = nn.EmbeddingBag(6, 4, mode="mean")
        self.proj = nn.Linear(4, 8)
        self.per_token = PerTokenLinear(2, 8, 3)
        self.out = nn.Linear(6, 2, bias=False)

    def forward(self, batch: GroupBatch) -> torch.Tensor:
        hidden = self.proj(self.item(batch.cand_item % 10))  # (B, N, 8)
        tokens = hidden.unsqueeze(-2).expand(*hidden.shape[:-1], 2, 8)  # (B, N, 2, 8)
        return self.out(self.per_token(tokens).flatten(-2))  # (B, N, 2)


def test_count_parameters_on_known_model() -> None:
    assert count_parameters(Tiny()) == {"dense": 106, "sparse": 64}


def test_shared_tensors_count_once() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied (10, 4) output projection lives in the table
    assert count_parameters(model) == {"dense": 0, "sparse": 40}


def test_flops_per_candidate_on_known_model() -> None:
    batch = random_batch(0, batch=3, cands=5)
    assert flops_per_candidate(Tiny(), batch) == 184


def test_quantized_model_counts_the_same_flops() -> None:
    """The int8 kernel has no built-in formula; ours makes W8A16 cost what the float GEMM costs."""
    from models.quant import QuantConfig, quantize_w8a16

    class TokenHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.item = nn.Embedding(NUM_ITEMS, 32)
            self.per_token = PerTokenLinear(2, 32, 16)
            self.out = nn.Linear(32, 2)

        def forward(self, batch: GroupBatch) -> torch.Tensor:
            x = self.item(batch.cand_item).unsqueeze(-2).expand(-1, -1, 2, -1)  # (B, N, 2, 32)
            return self.out(self.per_token(x).flatten(-2))  # (B, N, 2)

    model = TokenHead().eval()
    batch = random_batch(2, batch=2, cands=3)
    expected = 2 * (2 * 32 * 16 + 32 * 2)
    assert flops_per_candidate(model, batch) == expected
    assert flops_per_candidate(quantize_w8a16(model, QuantConfig(kernel="int8pack")), batch) == expected


def test_dlrm_flops_count_the_user_half_once_per_group() -> None:
    """Default DLRM (d=32, hidden 256-128-64): user-side layers run at B, the rest at B·N."""
    model = DLRMMLP(NUM_ITEMS, num_users=NUM_USERS, num_tags=NUM_TAGS).eval()
    cands = 6
    batch = random_batch(1, batch=4, cands=cands)
    per_candidate = 2 * (20 * 32 + 128 * 256 + 256 * 128 + 128 * 64 + 64 * 2)  # genre, first.cand, tower, head
    per_group = 2 * (3 * 32 + 96 * 256)  # dense_proj, first.user
    assert flops_per_candidate(model, batch) == pytest.approx(per_candidate + per_group / cands)


def test_torchrec_tables_are_sparse() -> None:
    pytest.importorskip("torchrec")
    from models.sparse import SparseArch, SparseConfig

    arch = SparseArch(SparseConfig(item_vocab=10, user_vocab=5, tag_vocab=7, embedding_dim=4))
    assert is_sparse_module(arch.embedding_collection)
    assert count_parameters(arch) == {"dense": 0, "sparse": (10 + 5 + 7) * 4}


def test_measure_peak_matmul_flops() -> None:
    peak = measure_peak_matmul_flops(torch.float32, size=64, seconds=0.05)
    assert math.isfinite(peak) and peak > 1e6
    with pytest.raises(ValueError, match="size"):
        measure_peak_matmul_flops(size=0)


def test_in_place_baddbmm_counts_like_the_out_of_place_one() -> None:
    """UG-Sep accumulates its cached user share with baddbmm_; a counter blind to it undercounts."""
    from models.cost import count_flops

    c, a, b = torch.zeros(3, 4, 5), torch.randn(3, 4, 6), torch.randn(3, 6, 5)
    assert (
        count_flops(lambda: c.clone().baddbmm_(a, b))
        == count_flops(lambda: torch.baddbmm(c, a, b))
        == 2 * 3 * 4 * 5 * 6
    )
