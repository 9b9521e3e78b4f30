"""W8A16 weight-only quantization (UG-Sep, arXiv 2602.10455; MODELS.md §4).

Weights become symmetric int8 with one fp16 scale per output channel; activations stay
16/32-bit and weights are dequantised inside the matmul. Embedding tables are left alone.

What gets quantized by ``quantize_w8a16`` (the opt-in contract for other layers)
- ``nn.Linear`` (exact type; subclasses such as MultiheadAttention's ``out_proj`` are used
  by code that reads ``.weight`` directly and are skipped) -> ``QuantizedLinear``,
  one scale per output row.
- Per-token linears -> ``QuantizedPerTokenLinear``: ``models.layers.PerTokenLinear``, or any
  module whose class sets ``is_per_token_linear = True`` and then has a ``weight`` (T, d_in,
  d_out), an optional ``bias`` (T, d_out) and a forward that is exactly
  ``y[..., t, :] = x[..., t, :] @ weight[t] + bias[t]`` with an optional ``tokens`` slice.
  One scale per (t, out).
- Any other 3-D parameter whose name ends in ``weight``, laid out (G, d_in, d_out) and used
  as ``x @ w[g]`` (e.g. expert weights), gets a dequantising parametrization: stored as int8
  + (G, d_out) scales, the module's own forward sees the float tensor. This keeps any
  forward correct but always runs the reference (dequantise-then-matmul) path.

Kernels (``QuantConfig.kernel``)
- ``"reference"``: dequantise to the activation dtype, then a plain matmul.
- ``"int8pack"``: ``torch._weight_int8pack_mm(A, B, scales)`` wherever its rules allow,
  reference elsewhere. It needs A (M, K) 2-D with a contiguous last dim, B int8 (N, K)
  contiguous, scales (N,) of A's dtype; no autograd. With bf16 A the torch 2.13 CPU kernel
  SEGFAULTS unless K % 16 == 0 (K = 3, 8, 17, 24, 100 crash; 16, 32, 48, 112 run; fp16
  and fp32 take any K), so layers with other K always use the reference path. With fp32
  A it is ~40x slower than fp32 GEMM, so activations are cast to ``activation_dtype``
  (bf16) - that is the "A16" of W8A16 - and the result cast back. fp16 A is as slow on
  CPU (~50x), so fp16 inputs are cast to ``activation_dtype`` too.
- ``"auto"`` (default): int8pack whenever the kernel runs on the device and no gradient is
  needed (fp32 inputs are cast to bf16 for the matmul and the output cast back); reference
  otherwise. The reference path dequantises the whole weight on every call, which at M = 1
  is ~50x slower than the float layer, so it is the oracle, not a serving path.

Measured on the 2-core CPU, 1 thread, Linear 768->1536 with M rows (noisy, shared machine):
fp32 0.067 / 0.84 / 11.7 ms at M = 1 / 32 / 512; int8pack 0.042 / 0.52 / 8.1 ms; bf16 GEMM
with bf16 weights 0.085 / 0.23 / 2.6 ms. W8A16 pays where the matmul is memory-bound
(small M: the per-group user path, serving); large-M compute-bound GEMMs prefer bf16.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from models.cost import is_sparse_module, sparse_tensor_ids
from models.layers import ALL_INPUTS, ALL_TOKENS, PerTokenLinear, broadcast_rows, per_token_matmul

logger = logging.getLogger(__name__)

Kernel = Literal["auto", "int8pack", "reference"]
_ACTIVATION_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class QuantConfig:
    """How ``quantize_w8a16`` converts a model."""

    kernel: Kernel = "auto"
    # Dtype activations are cast to for the int8pack kernel (only bf16 is fast on CPU).
    activation_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    # Also quantize stray 3-D ``*weight`` parameters through a dequantising parametrization.
    quantize_3d_params: bool = True
    # Module-name prefixes kept in float (e.g. ("heads",) for task towers).
    skip: tuple[str, ...] = ()


def quantize_int8(weight: Tensor, reduce_dim: int) -> tuple[Tensor, Tensor]:
    """Symmetric int8 over ``reduce_dim`` (the input axis): one scale per remaining index.

    Returns ``(q, scale)`` with ``q`` int8 of ``weight``'s shape in [-127, 127] and ``scale``
    fp32 with ``reduce_dim`` removed; ``q * scale`` approximates ``weight`` to scale/2.
    An all-zero channel gets a tiny scale and zeros, so it dequantises exactly.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=reduce_dim, keepdim=True)
    scale = (amax / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.squeeze(reduce_dim)


SCALE_DTYPE = torch.float16  # per-channel scales of the quantized layers


@functools.cache
def int8pack_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._weight_int8pack_mm`` runs for activations of ``dtype`` on ``device_type``."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        a = torch.ones(2, 32, dtype=dtype, device=device_type)
        b = torch.ones(8, 32, dtype=torch.int8, device=device_type)
        out = torch._weight_int8pack_mm(a, b, torch.ones(8, dtype=dtype, device=device_type))
        return bool(torch.allclose(out.float(), torch.full((2, 8), 32.0, device=device_type)))
    except Exception as err:  # a probe: any failure means 'use the reference path'
        logger.info("int8pack kernel unavailable for %s/%s (%s); using the reference path", device_type, dtype, err)
        return False


def int8pack_shape_ok(in_features: int, dtype: torch.dtype) -> bool:
    """Shape rule of the int8pack kernel: bf16 activations need K % 16 == 0 (else it segfaults)."""
    return dtype != torch.bfloat16 or in_features % 16 == 0


class _W8Module(nn.Module):
    """Kernel choice shared by the quantized layers."""

    def __init__(self, kernel: Kernel, activation_dtype: torch.dtype) -> None:
        super().__init__()
        if kernel not in ("auto", "int8pack", "reference"):
            raise ValueError(f"kernel={kernel!r}; expected 'auto', 'int8pack' or 'reference'")
        self.kernel = kernel
        self.activation_dtype = activation_dtype

    def _use_int8pack(self, x: Tensor) -> bool:
        """Kernel choice for input ``x`` (..., K); raises only for kernel='int8pack' + autograd."""
        if self.kernel == "reference":
            return False
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if needs_grad and self.kernel == "int8pack":
            raise RuntimeError("the int8pack kernel has no backward; use kernel='reference' to train through it")
        dtype = self.activation_dtype
        return not needs_grad and int8pack_shape_ok(x.shape[-1], dtype) and int8pack_supported(x.device.type, dtype)


def _int8pack_mm(rows: Tensor, qweight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """(M, K) rows @ dequant((N, K) int8)ᵀ in ``dtype``; the kernel wants contiguous rows."""
    return torch._weight_int8pack_mm(rows.to(dtype).contiguous(), qweight, scale.to(dtype))


class QuantizedLinear(_W8Module):
    """``nn.Linear`` with int8 weight (out, in) and one fp32 scale per output row."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        kernel: Kernel = "auto",
        activation_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(kernel, activation_dtype)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        # fp16 scales: half the bytes of fp32, and 11 mantissa bits keep dequantisation within 0.6 scale.
        self.register_buffer("scale", torch.ones(out_features, dtype=SCALE_DTYPE))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, kernel: Kernel = "auto", activation_dtype: torch.dtype = torch.bfloat16
    ) -> QuantizedLinear:
        """Quantize a float ``nn.Linear`` (its weights are copied, not shared)."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel, activation_dtype)
        q, scale = quantize_int8(linear.weight, reduce_dim=1)
        out.qweight.copy_(q)
        out.scale.copy_(scale)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out.to(linear.weight.device)

    @property
    def weight(self) -> Tensor:
        """Dequantised (out, in) fp32 weight, for code that reads ``.weight`` directly."""
        return self.qweight.float() * self.scale.unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear expects last dim {self.in_features}, got shape {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features)  # (M, in)
        if self._use_int8pack(rows):
            out = _int8pack_mm(rows, self.qweight, self.scale, self.activation_dtype).to(x.dtype)
        else:
            out = rows @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)  # (..., out)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, kernel={self.kernel}"


class QuantizedPerTokenLinear(_W8Module):
    """Per-token linear ``y[..., t, :] = x[..., t, :] @ W[t] + b[t]`` with int8 W, scale per (t, out).

    The int8 weight is stored (T, d_out, d_in), each token's matrix contiguous in the
    (N, K) layout the int8pack kernel reads; ``weight`` dequantises back to (T, d_in, d_out).
    """

    def __init__(
        self,
        num_tokens: int,
        d_in: int,
        d_out: int,
        bias: bool = True,
        kernel: Kernel = "auto",
        activation_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(kernel, activation_dtype)
        self.num_tokens, self.d_in, self.d_out = num_tokens, d_in, d_out
        self.register_buffer("qweight", torch.zeros(num_tokens, d_out, d_in, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_tokens, d_out, dtype=SCALE_DTYPE))
        self.register_buffer("bias", torch.zeros(num_tokens, d_out) if bias else None)

    @classmethod
    def from_float(
        cls, module: nn.Module, kernel: Kernel = "auto", activation_dtype: torch.dtype = torch.bfloat16
    ) -> QuantizedPerTokenLinear:
        """Quantize a module following the per-token linear contract (see module docstring)."""
        weight, bias = module.weight, getattr(module, "bias", None)
        if weight.dim() != 3:
            raise ValueError(f"per-token weight must be (T, d_in, d_out), got shape {tuple(weight.shape)}")
        num_tokens, d_in, d_out = weight.shape
        out = cls(num_tokens, d_in, d_out, bias is not None, kernel, activation_dtype)
        q, scale = quantize_int8(weight, reduce_dim=1)  # q (T, d_in, d_out), scale (T, d_out)
        out.qweight.copy_(q.transpose(1, 2))
        out.scale.copy_(scale)
        if bias is not None:
            out.bias.copy_(bias.detach())
        return out.to(weight.device)

    @property
    def weight(self) -> Tensor:
        """Dequantised (T, d_in, d_out) fp32 weight."""
        return (self.qweight.float() * self.scale.unsqueeze(-1)).transpose(1, 2)

    @property
    def in_features(self) -> int:
        return self.d_in

    def forward(
        self, x: Tensor, tokens: slice = ALL_TOKENS, inputs: slice = ALL_INPUTS, per_group: Tensor | None = None
    ) -> Tensor:
        """``x``: (..., T', d_in') with T' the positions selected by ``tokens`` and d_in' the input
        features selected by ``inputs`` (a bias-free layer's partial product), plus ``per_group``
        (B, T', d_out) added to the rows of each group, as ``PerTokenLinear``."""
        out = self._forward(x, tokens, inputs)
        return out if per_group is None else out + broadcast_rows(per_group.to(out.dtype), out)

    def _forward(self, x: Tensor, tokens: slice, inputs: slice) -> Tensor:
        qweight, scale = self.qweight[tokens], self.scale[tokens]
        bias = None if self.bias is None else self.bias[tokens]
        if inputs != ALL_INPUTS:
            if bias is not None:
                raise ValueError("QuantizedPerTokenLinear: a partial input needs a bias-free layer")
            qweight = qweight[:, :, inputs].contiguous()  # (T', d_out, d_in'): the kernel wants K contiguous
        if x.shape[-2:] != qweight.shape[::2]:
            raise ValueError(
                f"QuantizedPerTokenLinear expects (..., {qweight.shape[0]}, {qweight.shape[2]}), "
                f"got shape {tuple(x.shape)}"
            )
        if not self._use_int8pack(x):
            weight = (qweight.float() * scale.unsqueeze(-1)).transpose(1, 2).to(x.dtype)
            return per_token_matmul(x, weight, None if bias is None else bias.to(x.dtype))
        dtype = self.activation_dtype
        rows = x.reshape(-1, *x.shape[-2:]).to(dtype).transpose(0, 1).contiguous()  # (T', M, d_in)
        out = torch.stack(
            [_int8pack_mm(rows[t], qweight[t], scale[t], dtype) for t in range(rows.shape[0])]
        )  # (T', M, d_out)
        out = out.transpose(0, 1).to(x.dtype).reshape(*x.shape[:-1], self.d_out)  # (..., T', d_out)
        return out if bias is None else out + bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"tokens={self.num_tokens}, in={self.d_in}, out={self.d_out}, "
            f"bias={self.bias is not None}, kernel={self.kernel}"
        )


class Int8Dequantize(nn.Module):
    """Parametrization of a (..., d_in, d_out) weight stored as int8 + (..., d_out) scales."""

    def forward(self, qweight: Tensor, scale: Tensor) -> Tensor:
        return qweight.to(torch.float32) * scale.to(torch.float32).unsqueeze(-2)  # (..., d_in, d_out)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        q, scale = quantize_int8(weight, reduce_dim=-2)
        return q, scale.to(SCALE_DTYPE)


def _is_per_token_linear(module: nn.Module) -> bool:
    return isinstance(module, PerTokenLinear) or bool(getattr(type(module), "is_per_token_linear", False))


def _swap_modules(module: nn.Module, prefix: str, config: QuantConfig, counts: dict[str, int]) -> None:
    """Replace quantizable children of ``module`` in place, depth first."""
    act = _ACTIVATION_DTYPES[config.activation_dtype]
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if is_sparse_module(child) or any(path.startswith(s) for s in config.skip):
            continue
        if type(child) is nn.Linear:
            setattr(module, name, QuantizedLinear.from_float(child, config.kernel, act))
            counts["linear"] += 1
        elif _is_per_token_linear(child):
            setattr(module, name, QuantizedPerTokenLinear.from_float(child, config.kernel, act))
            counts["per_token_linear"] += 1
        else:
            _swap_modules(child, f"{path}.", config, counts)


def _parametrize_3d_weights(model: nn.Module, config: QuantConfig, counts: dict[str, int]) -> None:
    """Int8-store every remaining >= 3-D ``*weight`` parameter (or one a module lists in
    ``quantizable_params``, e.g. MoE expert tensors (T, E, d_in, d_out)) outside embedding tables."""
    sparse_ids = sparse_tensor_ids(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, _W8Module) or any(path.startswith(s) for s in config.skip if s):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            opted_in = name in getattr(type(module), "quantizable_params", ())
            if param.dim() < 3 or not (name.endswith("weight") or opted_in) or id(param) in sparse_ids:
                continue
            param.requires_grad_(False)  # int8 storage cannot carry gradients
            parametrize.register_parametrization(module, name, Int8Dequantize(), unsafe=True)
            counts["param_3d"] += 1


def quantize_w8a16(model: nn.Module, config: QuantConfig = QuantConfig(), inplace: bool = False) -> nn.Module:
    """W8A16 copy of ``model`` (or ``model`` itself when ``inplace``), in eval mode.

    Linear and per-token linear layers become int8 modules; stray 3-D weights are
    int8-stored via parametrization; embedding tables, norms and biases stay float.
    The result is for inference: the int8 tensors do not train.
    """
    target = model if inplace else copy.deepcopy(model)
    # Probe the kernel now, not inside the first forward (where e.g. a FLOP counter would see it).
    for device_type in {t.device.type for t in [*target.parameters(), *target.buffers()]} | {"cpu"}:
        for dtype in _ACTIVATION_DTYPES.values():
            int8pack_supported(device_type, dtype)
    counts = {"linear": 0, "per_token_linear": 0, "param_3d": 0}
    _swap_modules(target, "", config, counts)
    if config.quantize_3d_params:
        _parametrize_3d_weights(target, config, counts)
    logger.info("quantize_w8a16: %s", counts)
    return target.eval()


def weight_bytes(model: nn.Module, include_sparse: bool = False) -> int:
    """Bytes of every parameter and weight buffer (shared tensors once), embedding tables excluded by default.

    Integer buffers other than int8 (e.g. PKM slot-hit counters) are statistics, not weights.
    """
    sparse_ids = set() if include_sparse else sparse_tensor_ids(model)
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen or id(tensor) in sparse_ids:
            continue
        if not (tensor.is_floating_point() or tensor.dtype == torch.int8):
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def relative_error(reference: Tensor, approx: Tensor) -> float:
    """``max |approx - reference| / max |reference|``: the error scale of a quantized output."""
    reference, approx = reference.detach().float(), approx.detach().float()
    denom = reference.abs().max().clamp_min(1e-12)
    return float((approx - reference).abs().max() / denom)
