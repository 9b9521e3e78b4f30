"""W8A16: int8 error bounds, int8pack kernel == reference path, bytes ratio, model output error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from models.baselines import DLRMMLP
from models.capability import probe
from models.int8_matmul import KernelPolicy, int8pack_shape_ok
from models.layers import PerTokenFFN, PerTokenLinear, PerTokenSwiGLU
from models.quant import QuantConfig, quantize_w8a16, relative_error, weight_bytes
from models.quant_layers import QuantizedLinear, QuantizedPerTokenLinear, quantize_int8
from tests.models.test_baselines import NUM_ITEMS, NUM_TAGS, NUM_USERS, random_batch

needs_int8pack = pytest.mark.skipif(
    not probe().int8pack_runs("cpu", torch.bfloat16), reason="torch._weight_int8pack_mm unavailable on this CPU build"
)


class TokenModel(nn.Module):
    """A per-token stack like the backbones: PFFN, SwiGLU, a linear head."""

    def __init__(self, tokens: int = 4, dim: int = 256) -> None:
        super().__init__()
        self.ffn = PerTokenFFN(tokens, dim, 2 * dim)
        self.swiglu = PerTokenSwiGLU(tokens, dim, dim, down_init_std=None)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ffn(x)
        x = x + self.swiglu(x)
        return self.head(x.mean(-2))


class RawPerTokenWeight(nn.Module):
    """A layer that owns a raw (T, d_in, d_out) weight and its own einsum (no opt-in)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btd,tdo->bto", x, self.weight)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), seed=st.integers(0, 1000), zero_row=st.booleans())
def test_quantize_int8_error_is_at_most_half_a_step(rows: int, cols: int, seed: int, zero_row: bool) -> None:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    if zero_row:
        weight[0] = 0
    q, scale = quantize_int8(weight, reduce_dim=1)
    assert q.dtype == torch.int8 and scale.shape == (rows,)
    assert int(q.abs().max()) <= 127
    error = (q.float() * scale.unsqueeze(1) - weight).abs()
    assert (error <= scale.unsqueeze(1) / 2 + 1e-6).all()
    if zero_row:
        assert (q[0] == 0).all()


def test_quantized_linear_reference_path_is_close_to_float() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    x = torch.randn(5, 7, 256)
    quant = QuantizedLinear.from_float(linear, KernelPolicy("reference"))
    with torch.no_grad():
        out, ref = quant(x), linear(x)
    assert out.shape == (5, 7, 128)
    assert relative_error(ref, out) < 1e-2
    # Rounding to the int8 grid (scale / 2) plus the fp16 scale's own rounding (127 * scale * 2**-11).
    torch.testing.assert_close(quant.weight, linear.weight, atol=float(quant.scale.max()) * 0.6 + 1e-6, rtol=0)


@needs_int8pack
@pytest.mark.parametrize("rows", [1, 8, 128])
def test_linear_kernels_agree_with_reference(rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(rows, 256)
    kernels = ("reference", "int8pack", "upcast", "auto")
    quant = {k: QuantizedLinear.from_float(linear, KernelPolicy(k)) for k in kernels}
    with torch.no_grad():
        out = {k: q(x) for k, q in quant.items()}
        # auto: the int8pack kernel up to 8 rows; above (3.1M multiply-adds at 128 rows) the bf16
        # upcast GEMM where bf16 is native, else dequantising (tests/models/test_int8_matmul.py
        # checks that choice for every machine kind); for fp32 and 16-bit input alike.
        auto_is = (
            "int8pack" if rows <= 8 else ("upcast" if probe().fast_16bit_gemm("cpu", torch.bfloat16) else "reference")
        )
        assert KernelPolicy().path(x, rows, 96, 256) == auto_is
        torch.testing.assert_close(out["auto"], out[auto_is], atol=0, rtol=0)
        torch.testing.assert_close(quant["auto"](x.bfloat16()), quant[auto_is](x.bfloat16()), atol=0, rtol=0)
    for kernel in ("int8pack", "upcast"):
        assert out[kernel].dtype == torch.float32
        assert relative_error(out["reference"], out[kernel]) < 2e-2, kernel  # bf16 activations
    # ... and auto falls back to the differentiable reference path when a gradient is needed.
    x_grad = x.clone().requires_grad_()
    auto_out = quant["auto"](x_grad)
    torch.testing.assert_close(auto_out.detach(), out["reference"], atol=0, rtol=0)
    auto_out.sum().backward()
    assert x_grad.grad is not None and x_grad.grad.shape == x.shape
    for kernel in ("int8pack", "upcast"):
        with pytest.raises(RuntimeError, match="no backward"):
            quant[kernel](x.clone().requires_grad_())


@pytest.mark.parametrize("in_features", [3, 8, 24, 100])
def test_int8pack_falls_back_where_the_kernel_would_crash(in_features: int) -> None:
    """bf16 int8pack segfaults for K % 16 != 0 on torch 2.13 CPU: those layers run the reference."""
    assert not int8pack_shape_ok(in_features, torch.bfloat16) and int8pack_shape_ok(in_features, torch.float16)
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 8)
    x = torch.randn(4, in_features)
    fast = QuantizedLinear.from_float(linear, KernelPolicy("int8pack"))
    ref = QuantizedLinear.from_float(linear, KernelPolicy("reference"))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), atol=0, rtol=0)


@pytest.mark.parametrize("kernel", ["reference", "int8pack", "upcast"])
@pytest.mark.parametrize("tokens", [slice(None), slice(1, 3)])
def test_quantized_per_token_linear_matches_float(kernel: str, tokens: slice) -> None:
    if kernel == "int8pack" and not probe().int8pack_runs("cpu", torch.bfloat16):
        pytest.skip("int8pack unavailable")
    torch.manual_seed(0)
    layer = PerTokenLinear(4, 64, 48)
    x = torch.randn(2, 5, len(range(4)[tokens]), 64)
    quant = QuantizedPerTokenLinear.from_float(layer, KernelPolicy(kernel))
    with torch.no_grad():
        ref, out = layer(x, tokens), quant(x, tokens)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert relative_error(ref, out) < (1e-2 if kernel == "reference" else 2e-2)
    assert quant.weight.shape == layer.weight.shape
    with pytest.raises(ValueError, match="QuantizedPerTokenLinear expects"):
        quant(torch.randn(2, 4, 63), tokens)


@pytest.mark.parametrize("kernel", ["reference", "int8pack"])
def test_quantized_token_model_bytes_and_error(kernel: str) -> None:
    if kernel == "int8pack" and not probe().int8pack_runs("cpu", torch.bfloat16):
        pytest.skip("int8pack unavailable")
    torch.manual_seed(0)
    model = TokenModel().eval()
    quant = quantize_w8a16(model, QuantConfig(kernel=kernel))
    x = torch.randn(16, 4, 256)
    with torch.no_grad():
        error = relative_error(model(x), quant(x))
    ratio = weight_bytes(quant) / weight_bytes(model)
    assert ratio <= 0.27, ratio
    assert error < 3e-2, error
    # The float model is untouched; the copy holds only quantized layers.
    assert isinstance(model.ffn.up, PerTokenLinear) and isinstance(model.head, nn.Linear)
    assert isinstance(quant.ffn.up, QuantizedPerTokenLinear) and isinstance(quant.head, QuantizedLinear)
    assert isinstance(quant.swiglu.gate_up, QuantizedPerTokenLinear)


def test_quantized_baseline_keeps_tables_and_stays_close() -> None:
    torch.manual_seed(0)
    model = DLRMMLP(NUM_ITEMS, num_users=NUM_USERS, num_tags=NUM_TAGS).eval()
    quant = quantize_w8a16(model, QuantConfig(skip=("head",)))
    assert isinstance(quant.features.item_emb, nn.Embedding)
    assert quant.features.item_emb.weight.dtype == torch.float32
    assert isinstance(quant.head, nn.Linear)  # skipped by prefix
    assert isinstance(quant.first.user, QuantizedLinear)
    data = random_batch(0, batch=8, cands=6, seq=9)
    with torch.no_grad():
        assert relative_error(model(data), quant(data)) < 3e-2
    assert weight_bytes(quant) < 0.4 * weight_bytes(model)
    assert weight_bytes(quant, include_sparse=True) > weight_bytes(quant)


def test_raw_3d_weight_is_int8_stored_through_parametrization() -> None:
    torch.manual_seed(0)
    model = RawPerTokenWeight()
    quant = quantize_w8a16(model)
    state = quant.state_dict()
    assert state["parametrizations.weight.original0"].dtype == torch.int8
    assert state["parametrizations.weight.original1"].shape == (3, 8)  # one scale per (t, out)
    x = torch.randn(5, 3, 16)
    with torch.no_grad():
        assert relative_error(model(x), quant(x)) < 1e-2
    assert weight_bytes(quant) / weight_bytes(model) <= 0.5  # d_in = 16: int8 + a scale per 16 weights
    unchanged = quantize_w8a16(model, QuantConfig(quantize_3d_params=False))
    assert "weight" in dict(unchanged.named_parameters())


def test_inplace_and_attention_modules() -> None:
    """In-place conversion; MultiheadAttention's out_proj (read via .weight) is left in float."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.MultiheadAttention(16, 2, batch_first=True))
    same = quantize_w8a16(model, inplace=True)
    assert same is model and isinstance(model[0], QuantizedLinear)
    x = model[0](torch.randn(2, 3, 16))
    out, _ = model[1](x, x, x)
    assert out.shape == (2, 3, 16)
    with pytest.raises(ValueError, match="kernel"):
        KernelPolicy(kernel="fast")
