"""Quantized W8A16 layers: int8 weights + fp16 per-output-channel scales (MODELS.md §4).

``QuantizedLinear``, ``QuantizedPerTokenLinear`` and ``QuantizedExpertBank`` replace
``nn.Linear``, per-token linears and ``ExpertBank`` with the same forward interfaces; their
matmuls run through ``models/int8_matmul.py`` on the path their ``KernelPolicy`` picks per
call. ``Int8Dequantize`` int8-stores any other weight and always dequantises.
``models.quant.quantize_w8a16`` builds them from a float model.

An int8 weight is stored (*lead, d_out, d_in) so that every matrix is contiguous in the
(N, K) layout the int8pack kernel reads. A layer whose input arrives in two halves (UG-Sep's
``[x_user ; x_group]``, called with ``inputs=``) stores it as two contiguous column blocks
(``input_split``): ``qweight_head`` [0, k) and ``qweight_tail`` [k, d_in) instead of one
``qweight``, so each half runs on its own block with no extra bytes and no per-call copy.
A full-width call on such a layer reassembles the weight (the UG-Sep reference path only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.int8_matmul import DEFAULT_POLICY, KernelPolicy, Path, int8_bmm, int8_mm
from models.layers import ALL_INPUTS, ALL_TOKENS, ExpertBank, select_tokens

SCALE_DTYPE = torch.float16  # per-channel scales of the quantized layers


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


class W8Module(nn.Module):
    """An int8 weight (*lead, d_out, d_in) in contiguous column blocks, its scales (*lead, d_out)
    and the ``KernelPolicy`` of its matmuls; shared by the quantized layers."""

    def __init__(self, policy: KernelPolicy) -> None:
        super().__init__()
        self.policy = policy

    @property
    def kernel(self) -> str:
        return self.policy.kernel

    def _register_int8(self, lead: tuple[int, ...], d_out: int, d_in: int, input_split: int = 0) -> None:
        is_split = 0 < input_split < d_in
        self.column_starts = (0, input_split, d_in) if is_split else (0, d_in)
        self.block_names = ("qweight_head", "qweight_tail") if is_split else ("qweight",)
        for name, (start, stop) in zip(self.block_names, self.column_ranges()):
            self.register_buffer(name, torch.zeros(*lead, d_out, stop - start, dtype=torch.int8))
        # fp16 scales: half the bytes of fp32, and 11 mantissa bits keep dequantisation within 0.6 scale.
        self.register_buffer("scale", torch.ones(*lead, d_out, dtype=SCALE_DTYPE))

    def column_ranges(self) -> list[tuple[int, int]]:
        """The stored column blocks, as [start, stop) input-feature ranges."""
        return list(zip(self.column_starts, self.column_starts[1:]))

    def _copy_quantized(self, weight: Tensor) -> None:
        """Quantize a float weight laid out (*lead, d_out, d_in) into the blocks and scales."""
        q, scale = quantize_int8(weight, reduce_dim=-1)
        for name, (start, stop) in zip(self.block_names, self.column_ranges()):
            getattr(self, name).copy_(q[..., start:stop])
        self.scale.copy_(scale)

    def full_qweight(self) -> Tensor:
        """The int8 weight (*lead, d_out, d_in); a copy when it is stored in two blocks."""
        blocks = [getattr(self, name) for name in self.block_names]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, -1)

    def dequantized(self) -> Tensor:
        """fp32 (*lead, d_out, d_in)."""
        return self.full_qweight().float() * self.scale.float().unsqueeze(-1)

    def _columns(self, inputs: slice) -> tuple[int, Tensor]:
        """Width and int8 weight (*lead, d_out, width) of the input columns ``inputs``: a stored
        block when they are one (no copy), else a slice of ``full_qweight``."""
        cols = range(self.column_starts[-1])[inputs]
        if cols.step != 1 or not cols:
            raise ValueError(f"{type(self).__name__}: inputs={inputs} must be a non-empty contiguous slice")
        for name, block in zip(self.block_names, self.column_ranges()):
            if block == (cols.start, cols.stop):
                return len(cols), getattr(self, name)
        return len(cols), self.full_qweight()[..., cols.start : cols.stop]

    def _path(self, x: Tensor, rows: int, in_features: int, matrices: int = 1) -> Path:
        return self.policy.path(x, rows, self.scale.shape[-1], in_features, matrices)

    def int8pack_bytes(self) -> tuple[int, int]:
        """(int8 weight bytes, the part small calls run through the int8pack kernel)."""
        total = served = 0
        for name, (start, stop) in zip(self.block_names, self.column_ranges()):
            block = getattr(self, name)
            total += block.numel()
            if self.policy.serves_int8pack(block.device.type, self.scale.shape[-1], stop - start):
                served += block.numel()
        return total, served

    def _kernel_repr(self) -> str:
        split = f", input_split={self.column_starts[1]}" if len(self.block_names) > 1 else ""
        return f"kernel={self.kernel}{split}"


class QuantizedLinear(W8Module):
    """``nn.Linear`` with int8 weight (out, in) and one scale per output row."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, policy: KernelPolicy = DEFAULT_POLICY
    ) -> None:
        super().__init__(policy)
        self.in_features, self.out_features = in_features, out_features
        self._register_int8((), out_features, in_features)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, policy: KernelPolicy = DEFAULT_POLICY) -> QuantizedLinear:
        """Quantize a float ``nn.Linear`` (its weights are copied, not shared)."""
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, policy)
        out._copy_quantized(linear.weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out.to(linear.weight.device)

    @property
    def weight(self) -> Tensor:
        """Dequantised (out, in) fp32 weight, for code that reads ``.weight`` directly."""
        return self.dequantized()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear expects last dim {self.in_features}, got shape {tuple(x.shape)}")
        rows = x.reshape(-1, self.in_features)  # (M, in)
        path = self._path(x, rows.shape[0], self.in_features)
        out = int8_mm(rows, self.qweight, self.scale, path, self.policy.activation_dtype, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)  # (..., out)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {self._kernel_repr()}"


class QuantizedPerTokenLinear(W8Module):
    """Per-token linear ``y[..., t, :] = x[..., t, :] @ W[t] + b[t]`` with int8 W, scale per (t, out).

    The int8 weight is stored (T, d_out, d_in) (two column blocks with ``input_split``);
    ``weight`` dequantises back to (T, d_in, d_out).
    """

    def __init__(
        self,
        num_tokens: int,
        d_in: int,
        d_out: int,
        bias: bool = True,
        policy: KernelPolicy = DEFAULT_POLICY,
        input_split: int = 0,
    ) -> None:
        super().__init__(policy)
        self.num_tokens, self.d_in, self.d_out = num_tokens, d_in, d_out
        self._register_int8((num_tokens,), d_out, d_in, input_split)
        self.register_buffer("bias", torch.zeros(num_tokens, d_out) if bias else None)

    @classmethod
    def from_float(
        cls, module: nn.Module, policy: KernelPolicy = DEFAULT_POLICY, input_split: int = 0
    ) -> QuantizedPerTokenLinear:
        """Quantize a module following the per-token linear contract (models/quant.py)."""
        weight, bias = module.weight, getattr(module, "bias", None)
        if weight.dim() != 3:
            raise ValueError(f"per-token weight must be (T, d_in, d_out), got shape {tuple(weight.shape)}")
        num_tokens, d_in, d_out = weight.shape
        out = cls(num_tokens, d_in, d_out, bias is not None, policy, input_split)
        out._copy_quantized(weight.transpose(1, 2))  # (T, d_out, d_in)
        if bias is not None:
            out.bias.copy_(bias.detach())
        return out.to(weight.device)

    @property
    def weight(self) -> Tensor:
        """Dequantised (T, d_in, d_out) fp32 weight."""
        return self.dequantized().transpose(1, 2)

    @property
    def in_features(self) -> int:
        return self.d_in

    def forward(
        self, x: Tensor, tokens: slice = ALL_TOKENS, inputs: slice = ALL_INPUTS, per_group: Tensor | None = None
    ) -> Tensor:
        """``x``: (..., T', d_in') with T' the positions selected by ``tokens`` and d_in' the input
        features selected by ``inputs`` (a bias-free layer's partial product), plus ``per_group``
        (B, T', d_out) added to the rows of each group, as ``PerTokenLinear``."""
        width, qweight = self._columns(inputs)
        if width != self.d_in and self.bias is not None:
            raise ValueError("QuantizedPerTokenLinear: a partial input needs a bias-free layer")
        qweight, scale = select_tokens(qweight, tokens), select_tokens(self.scale, tokens)  # (T', d_out, K')
        num_tokens = qweight.shape[0]
        if x.shape[-2:] != (num_tokens, width):
            raise ValueError(
                f"QuantizedPerTokenLinear expects (..., {num_tokens}, {width}), got shape {tuple(x.shape)}"
            )
        rows = x.reshape(-1, num_tokens, width).transpose(0, 1)  # (T', M, K'), a strided view
        path = self._path(x, rows.shape[1], width, num_tokens)
        bias = None if self.bias is None else select_tokens(self.bias, tokens)
        out = int8_bmm(rows, qweight, scale, path, self.policy.activation_dtype, bias=bias)  # (T', M, d_out), fresh
        if per_group is not None:  # in place, token-major: rows of group b are the b-th block of M / B
            groups = per_group.shape[0]
            out.view(num_tokens, groups, -1, self.d_out).add_(per_group.transpose(0, 1).unsqueeze(2).to(out.dtype))
        return out.transpose(0, 1).reshape(*x.shape[:-1], self.d_out)  # (..., T', d_out), a view

    def extra_repr(self) -> str:
        return (
            f"tokens={self.num_tokens}, in={self.d_in}, out={self.d_out}, "
            f"bias={self.bias is not None}, {self._kernel_repr()}"
        )


class QuantizedExpertBank(W8Module):
    """``models.layers.ExpertBank`` with int8 weights, one scale per (t, e, out).

    Stored (T, E, d_out, d_in): every expert's matrix contiguous, and each token's E matrices
    one (E*d_out, d_in) block, so ``all_experts`` is one kernel call per token.
    """

    def __init__(
        self,
        num_tokens: int,
        num_experts: int,
        d_in: int,
        d_out: int,
        policy: KernelPolicy = DEFAULT_POLICY,
        input_split: int = 0,
    ) -> None:
        super().__init__(policy)
        self.num_tokens, self.num_experts, self.d_in, self.d_out = num_tokens, num_experts, d_in, d_out
        self._register_int8((num_tokens, num_experts), d_out, d_in, input_split)

    @classmethod
    def from_float(
        cls, bank: ExpertBank, policy: KernelPolicy = DEFAULT_POLICY, input_split: int = 0
    ) -> QuantizedExpertBank:
        """Quantize a float ``ExpertBank``."""
        num_tokens, num_experts, d_in, d_out = bank.weight.shape
        out = cls(num_tokens, num_experts, d_in, d_out, policy, input_split)
        out._copy_quantized(bank.weight.transpose(2, 3))  # (T, E, d_out, d_in)
        return out.to(bank.weight.device)

    @property
    def weight(self) -> Tensor:
        """Dequantised (T, E, d_in, d_out) fp32 weight."""
        return self.dequantized().transpose(2, 3)

    @property
    def in_features(self) -> int:
        return self.d_in

    def grouped_mm(
        self,
        buf: Tensor,
        counts: Tensor | None = None,
        tokens: slice = ALL_TOKENS,
        inputs: slice = ALL_INPUTS,
        bias: Tensor | None = None,
    ) -> Tensor:
        """As ``ExpertBank.grouped_mm``: (G, C, d_in') -> (G, C, d_out). With ``counts`` the int8pack
        path runs only the real rows of non-empty groups (padding rows come out as the bias)."""
        width, qweight = self._columns(inputs)
        qweight = select_tokens(qweight, tokens).flatten(0, 1)  # (G, d_out, K'), a view
        scale = select_tokens(self.scale, tokens).flatten(0, 1)  # (G, d_out)
        if buf.dim() != 3 or buf.shape[0] != qweight.shape[0] or buf.shape[-1] != width:
            raise ValueError(f"QuantizedExpertBank expects ({qweight.shape[0]}, C, {width}), got {tuple(buf.shape)}")
        path = self._path(buf, buf.shape[1], width, buf.shape[0])
        rows = counts.tolist() if counts is not None and path == "int8pack" else None
        return int8_bmm(buf, qweight, scale, path, self.policy.activation_dtype, rows, bias)  # (G, C, d_out)

    def all_experts(self, x: Tensor, tokens: slice = ALL_TOKENS, inputs: slice = ALL_INPUTS) -> Tensor:
        """Every expert on every row: (..., T', d_in') -> (..., T', E, d_out)."""
        width, qweight = self._columns(inputs)
        qweight = select_tokens(qweight, tokens)  # (T', E, d_out, K')
        num_tokens, experts = qweight.shape[:2]
        rows = x.reshape(-1, num_tokens, width).transpose(0, 1)  # (T', M, K')
        # One (E*d_out, K') matrix per token: the int8pack rule sees the whole block.
        out_per_token = experts * self.d_out
        path = self.policy.path(x, rows.shape[1], out_per_token, width, num_tokens)
        scale = select_tokens(self.scale, tokens).flatten(1)  # (T', E*d_out)
        out = int8_bmm(rows, qweight.flatten(1, 2), scale, path, self.policy.activation_dtype)  # (T', M, E*d_out)
        return out.transpose(0, 1).reshape(*x.shape[:-1], experts, self.d_out)  # (..., T', E, d_out)

    def extra_repr(self) -> str:
        return (
            f"tokens={self.num_tokens}, experts={self.num_experts}, in={self.d_in}, out={self.d_out}, "
            f"{self._kernel_repr()}"
        )


class Int8Dequantize(nn.Module):
    """Parametrization of a (..., d_in, d_out) weight stored as int8 + (..., d_out) scales."""

    def forward(self, qweight: Tensor, scale: Tensor) -> Tensor:
        return qweight.to(torch.float32) * scale.to(torch.float32).unsqueeze(-2)  # (..., d_in, d_out)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        q, scale = quantize_int8(weight, reduce_dim=-2)
        return q, scale.to(SCALE_DTYPE)
