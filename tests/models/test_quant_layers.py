"""Quantized layers beyond Linear: UG-Sep column blocks, the int8 expert bank, quantized MoEs
(fast kernels == the reference kernel), and which layers fall back (logged, counted)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from models.capability import probe
from models.int8_matmul import KernelPolicy
from models.layers import ExpertBank, ExpertDispatch, PerTokenLinear
from models.quant import QuantConfig, int8pack_fraction, quantize_w8a16, relative_error, weight_bytes
from models.quant_layers import QuantizedExpertBank, QuantizedPerTokenLinear
from models.rankmixer import ReLUMoEConfig, ReLUPerTokenMoE
from models.tokenmixer_large import SparseMoEConfig, SparsePerTokenMoE

FAST = ["int8pack", "upcast", "auto"]
needs_int8pack = pytest.mark.skipif(not probe().int8pack_runs("cpu", torch.bfloat16), reason="no int8pack kernel")


@pytest.mark.parametrize("kernel", ["reference", *FAST])
@pytest.mark.parametrize("rows", [1, 64])
def test_split_layer_serves_each_input_half_from_its_own_block(kernel: str, rows: int) -> None:
    """UG-Sep calls [x_user ; x_group] halves separately; each runs on a stored block, no copy, no extra bytes."""
    torch.manual_seed(0)
    layer = PerTokenLinear(3, 88, 64, bias=False)  # split at 40: widths 40 (no int8pack) and 48
    quant = QuantizedPerTokenLinear.from_float(layer, KernelPolicy(kernel), input_split=40)
    buffers = dict(quant.named_buffers())
    assert buffers["qweight_head"].shape == (3, 64, 40) and buffers["qweight_tail"].shape == (3, 64, 48)
    assert "qweight" not in buffers and buffers["qweight_tail"].is_contiguous()
    assert quant._columns(slice(40, None))[1] is quant.qweight_tail  # the stored block itself
    unsplit = QuantizedPerTokenLinear.from_float(layer, KernelPolicy(kernel))
    assert weight_bytes(quant) == weight_bytes(unsplit)
    torch.testing.assert_close(quant.weight, unsplit.weight, atol=0, rtol=0)
    x = torch.randn(rows, 3, 88)
    with torch.no_grad():
        for inputs in (slice(0, 40), slice(40, None), slice(None)):
            ref = layer(x[..., inputs], inputs=inputs)
            assert relative_error(ref, quant(x[..., inputs], inputs=inputs)) < 2e-2, inputs


def random_dispatch(seed: int, rows: int, groups: int, per_row: int) -> tuple[torch.Tensor, ExpertDispatch]:
    gen = torch.Generator().manual_seed(seed)
    group_ids = torch.randint(0, groups, (rows * per_row,), generator=gen)
    src = torch.arange(rows).repeat_interleave(per_row)
    return torch.randn(rows, 32, generator=gen), ExpertDispatch.build(group_ids, src, groups)


@pytest.mark.parametrize("kernel", ["reference", *FAST])
@pytest.mark.parametrize("rows", [2, 200])  # capacity ~1 (int8pack on non-empty groups) and ~50 (upcast)
def test_quantized_expert_bank_matches_the_float_bank(kernel: str, rows: int) -> None:
    torch.manual_seed(1)
    bank = ExpertBank(3, 4, 32, 48, lambda w: w.normal_(0.0, 0.2))  # 12 groups of 48 x 32 (1536 weights)
    quant = QuantizedExpertBank.from_float(bank, KernelPolicy(kernel, int8pack_min_weights=0), input_split=16)
    x, plan = random_dispatch(seed=rows, rows=rows, groups=12, per_row=2)
    bias = torch.randn(12, 48)
    with torch.no_grad():
        for inputs in (slice(None), slice(0, 16), slice(16, None)):
            buf = plan.permute(x[:, inputs])  # (G, C, d_in')
            ref = plan.gather(bank.grouped_mm(buf, plan.counts, inputs=inputs, bias=bias))  # real rows only
            out = plan.gather(quant.grouped_mm(buf, plan.counts, inputs=inputs, bias=bias))
            assert relative_error(ref, out) < 2e-2, inputs
        x_user = torch.randn(rows, 3, 16)  # every expert on the user columns (UG-Sep's first_partial)
        ref_all, out_all = bank.all_experts(x_user, inputs=slice(0, 16)), quant.all_experts(x_user, inputs=slice(0, 16))
        assert out_all.shape == ref_all.shape == (rows, 3, 4, 48)
        assert relative_error(ref_all, out_all) < 2e-2


def moe_pair(kind: str) -> tuple[nn.Module, int]:
    """A float MoE whose output is continuous in its input (no top-k ties to flip), and its width."""
    torch.manual_seed(2)
    if kind == "sparse":  # top_k = E: every expert is picked, the gates are smooth softmax weights
        return SparsePerTokenMoE(4, 64, SparseMoEConfig(num_experts=4, top_k=4), down_init_std=0.2).eval(), 64
    return ReLUPerTokenMoE(4, 64, ReLUMoEConfig(num_experts=4, expert_expansion=1.0)).eval(), 64


@pytest.mark.parametrize("kind", ["sparse", "relu"])
@pytest.mark.parametrize("kernel", FAST)
@pytest.mark.parametrize("batch", [1, 96])
def test_quantized_moe_fast_kernels_match_the_reference_kernel(kind: str, kernel: str, batch: int) -> None:
    moe, dim = moe_pair(kind)
    config = QuantConfig(kernel=kernel, int8pack_min_weights=0)
    fast, ref = quantize_w8a16(moe, config), quantize_w8a16(moe, QuantConfig(kernel="reference"))
    assert isinstance(fast.gate_up if kind == "sparse" else fast.w_in, QuantizedExpertBank)
    x = torch.randn(batch, 4, dim)
    with torch.no_grad():
        expected, got = ref(x), fast(x)
        assert relative_error(moe(x), expected) < 3e-2  # int8 weights
        assert relative_error(expected, got) < 2e-2  # + bf16 activations


def test_fallback_layers_are_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    """Layers whose K the bf16 int8pack kernel cannot take are named at quantize time and left out
    of ``int8pack_fraction``, as are matrices too small to run it (dequantising those is faster)."""
    model = nn.Sequential(nn.Linear(24, 512), nn.Linear(512, 32), nn.Linear(32, 64))  # K = 24, 512, 32
    with caplog.at_level(logging.INFO, logger="models.quant"):
        quant = quantize_w8a16(model)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("w8a16 0: no int8pack for input width [24]") for line in lines)
    assert not any(line.startswith(("w8a16 1:", "w8a16 2:")) for line in lines)
    if probe().int8pack_runs("cpu", torch.bfloat16):
        # served: 512 x 32 (16384 weights); not: K = 24 (12288), 32 x 64 < 16384 weights (2048)
        assert int8pack_fraction(quant) == pytest.approx(16384 / (12288 + 16384 + 2048))
    assert int8pack_fraction(quantize_w8a16(model, QuantConfig(kernel="reference"))) == 0.0
