"""Matmuls against int8 weights with per-output-row scales: the kernels behind W8A16 (models/quant.py).

A quantized weight is ``q`` int8 (..., N, K) (output rows, input columns: the layout the
int8pack kernel reads) and ``scale`` (..., N); the float weight it stands for is ``q * scale``.
Activations ``x`` (M, K) are multiplied by it in one of three ways (``Path``):

- ``"int8pack"``: ``torch._weight_int8pack_mm`` reads the int8 weight itself, activations in
  bf16. One 2-D call per weight matrix (a loop over tokens / experts). Rules: A (M, K) 2-D
  and contiguous, B int8 (N, K) contiguous, scales of A's dtype, no autograd. With bf16 A the
  torch 2.13 CPU kernel SEGFAULTS unless K % 16 == 0 (K = 3, 8, 17, 24, 100 crash; 16, 32,
  48, 112 run), so it is never called for such K. With fp32 A it is ~40x slower than fp32
  GEMM, with fp16 A ~50x, hence bf16 activations (the "A16").
- ``"upcast"``: the int8 weight is converted to bf16 (exact: |q| <= 127 fits bf16's 8-bit
  significand), a bf16 bmm runs over a chunk of matrices at a time (oneDNN on CPU), and the
  output rows are scaled in fp32. This is a transient bf16 copy of the weight per call, amortised over
  the M rows: a dequantisation without the multiply, not a kernel that reads int8.
- ``"reference"``: dequantise ``q * scale`` to the activation dtype, then a plain matmul in
  that dtype. Differentiable; the oracle the other two are tested against.

Measured on the 2-core AVX512-BF16 CPU, 1 thread: ``QuantizedPerTokenLinear`` layers as in
the ranker (6-11 token matrices of (N, K) = (128, 64), (256, 64), (88, 176)), microseconds
per layer call (casts included) at M rows per matrix, vs the float ``PerTokenLinear``:

    M     fp32 weights   int8pack   upcast   reference
    1        10-15         32-49     41-61     23-52
    16       26-78        61-153     47-82     40-107
    256     254-899      537-1897   143-394   269-927

These matrices fit in cache, so no path beats fp32 at M = 1: per-op overhead dominates.
int8pack's kernel does not block over M and falls behind above ~8 rows, where oneDNN's bf16
GEMM wins (2-3x over fp32 at 256 rows). ``KernelPolicy.path`` ("auto") follows that: up to
``int8pack_max_rows`` rows int8pack on matrices of at least ``int8pack_min_weights`` weights
(the kernel's memory-bound regime) and dequantise (reference) on smaller ones or where K
rules the kernel out; above, the bf16 upcast GEMM once a call has ``upcast_min_macs`` of
work to pay its fixed cost, else dequantise.

On a CPU without native bf16 (AVX2, or AVX-512 without BF16: ``models/capability.py``) a bf16
GEMM is emulated (~100x slower than fp32), so "auto" never upcasts there, and int8pack's bf16
kernel is slower than dequantising above a few rows. Measured on the 2-core AVX2 CPU, 1 thread,
microseconds per call of G matrices (N, K) at M rows:

    (G, N, K)          M    fp32 weights   int8pack   reference
    (11, 256, 64)      1        20            92          86
    (11, 256, 64)     64       381          1474        1497
    (11, 256, 64)    256      1972          5957        2072
    (8, 96, 176)     256       929          2848        1212
    (1, 4096, 1024)    1       629           458        4132
    (1, 4096, 1024)    8      3719          2532       30522
    (1, 4096, 1024)   32      6886          9617       10670

so there "auto" keeps int8pack for small calls on large matrices (memory-bound: it reads a
quarter of the bytes) and dequantises every call above ``int8pack_max_rows``. Every choice is a
pure function of the policy, a ``Capability`` record and the call's shape (``KernelPolicy.path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from models.capability import Capability, probe

Kernel = Literal["auto", "int8pack", "upcast", "reference"]
Path = Literal["int8pack", "upcast", "reference"]
KERNELS: tuple[Kernel, ...] = ("auto", "int8pack", "upcast", "reference")
# "auto" takes int8pack for calls of at most this many rows per matrix (crossover measured above) ...
INT8PACK_MAX_ROWS = 8
# ... on matrices of at least this many weights. At M = 1 a kernel call costs ~3.7 us per matrix
# and dequantising ~0.22 ns per weight, so they cross near 16k weights (6 tokens of 128 x 64:
# int8pack 32 us, reference 23 us; 11 tokens of 256 x 64: 49 vs 52 us); a 1536 x 768 matrix
# takes int8pack 27 us, its fp32 GEMV 48 us.
INT8PACK_MIN_WEIGHTS = 16384
# Larger calls take the bf16 upcast GEMM when they hold at least this many multiply-adds: bf16
# GEMM has a ~12 us fixed cost (64 x 64 at M = 32, 0.13M MACs: upcast 26 us, reference 14 us;
# 6 tokens of 64 x 64, 0.8M: 45 vs 34 us; 8 tokens of 176 x 88, 3.9M: 81 vs 119 us).
UPCAST_MIN_MACS = 1 << 21
# Weights upcast per bmm call: 2M bf16 values (4 MB) stay in cache and under glibc's 32 MB mmap
# threshold. An MoE bank of 16.7M upcast at once page-faults its buffer every call: 19.5 ms
# for upcast + bmm, vs 4.5 ms in chunks and 12.0 ms for the fp32 bmm (128 experts 256 -> 512).
UPCAST_CHUNK_ELEMENTS = 1 << 21


def int8pack_shape_ok(in_features: int, dtype: torch.dtype) -> bool:
    """Shape rule of the int8pack kernel: bf16 activations need K % 16 == 0 (else it segfaults)."""
    return dtype != torch.bfloat16 or in_features % 16 == 0


@dataclass(frozen=True)
class KernelPolicy:
    """Which path a quantized layer's matmul takes (``path``); one per layer, set by ``QuantConfig``.

    ``capability``: the machine the choices are made for; None (the default) probes this
    process's (``models.capability.probe``). Tests pass a record to check each machine kind."""

    kernel: Kernel = "auto"
    activation_dtype: torch.dtype = torch.bfloat16  # of the int8pack / upcast paths
    int8pack_max_rows: int = INT8PACK_MAX_ROWS
    int8pack_min_weights: int = INT8PACK_MIN_WEIGHTS
    upcast_min_macs: int = UPCAST_MIN_MACS
    capability: Capability | None = None

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r}; expected one of {KERNELS}")

    def machine(self) -> Capability:
        """The record the choices are made for."""
        return self.capability if self.capability is not None else probe()

    def int8pack_runs(self, device_type: str, in_features: int) -> bool:
        """Whether the int8pack kernel can take K = ``in_features`` here (never a shape that crashes)."""
        dtype = self.activation_dtype
        return int8pack_shape_ok(in_features, dtype) and self.machine().int8pack_runs(device_type, dtype)

    def serves_int8pack(self, device_type: str, out_features: int, in_features: int) -> bool:
        """Whether small calls (<= ``int8pack_max_rows`` rows) of an (N, K) matrix run int8pack."""
        if self.kernel not in ("auto", "int8pack") or not self.int8pack_runs(device_type, in_features):
            return False
        return self.kernel == "int8pack" or out_features * in_features >= self.int8pack_min_weights

    def path(self, x: Tensor, rows: int, out_features: int, in_features: int, matrices: int = 1) -> Path:
        """The path for input ``x`` with ``rows`` rows per (N, K) = (out, in) weight matrix, of ``matrices``."""
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        return self.choose(x.device.type, rows, out_features, in_features, matrices, needs_grad)

    def choose(
        self,
        device_type: str,
        rows: int,
        out_features: int,
        in_features: int,
        matrices: int = 1,
        needs_grad: bool = False,
    ) -> Path:
        """``path`` as a pure function of the policy, its machine record and the call's shape.

        "reference" always dequantises; "int8pack" takes the kernel wherever it runs (else
        reference); "upcast" always upcasts; "auto" (module docstring) picks by rows, matrix size
        and total work, and upcasts only where a 16-bit GEMM is native. A gradient needs the
        reference path: "auto" takes it, a forced kernel raises.
        """
        if self.kernel == "reference":
            return "reference"
        if needs_grad:
            if self.kernel != "auto":
                raise RuntimeError(f"the {self.kernel} kernel has no backward; use kernel='reference' to train")
            return "reference"
        if self.kernel == "upcast":
            return "upcast"
        if self.kernel == "int8pack" or rows <= self.int8pack_max_rows:
            return "int8pack" if self.serves_int8pack(device_type, out_features, in_features) else "reference"
        if not self.machine().fast_16bit_gemm(device_type, self.activation_dtype):  # emulated: dequantise
            return "reference"
        return "upcast" if matrices * rows * out_features * in_features >= self.upcast_min_macs else "reference"


DEFAULT_POLICY = KernelPolicy()


def int8_mm(x: Tensor, q: Tensor, scale: Tensor, path: Path, dtype: torch.dtype, bias: Tensor | None = None) -> Tensor:
    """``x`` (M, K) @ (``q`` (N, K) * ``scale`` (N,))ᵀ + ``bias`` (N,) -> (M, N) in ``x``'s dtype.

    The one-matrix case of ``int8_bmm``, with as few ops as possible: at M = 1 a 64 x 64 layer
    costs a few microseconds, most of them per-op overhead.
    """
    if path == "reference":  # in x's dtype throughout: a 16-bit input meets a float32 bias here too
        return F.linear(
            x, (q.float() * scale.float().unsqueeze(-1)).to(x.dtype), None if bias is None else bias.to(x.dtype)
        )
    if path == "upcast":
        out = torch.mm(x.to(dtype), q.to(dtype).t()).float().mul_(scale.float())  # (M, N) fp32
        return _finish(out, x.dtype, bias)
    a = x.to(dtype, memory_format=torch.contiguous_format)
    return _finish(torch._weight_int8pack_mm(a, q.contiguous(), scale.to(dtype)), x.dtype, bias)


def int8_bmm(
    x: Tensor,
    q: Tensor,
    scale: Tensor,
    path: Path,
    dtype: torch.dtype,
    rows: list[int] | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``x`` (G, M, K) @ (``q`` (G, N, K) * ``scale`` (G, N))ᵀ + ``bias`` (G, N) -> (G, M, N) in ``x``'s dtype.

    ``dtype`` is the activation dtype of the int8pack / upcast paths. ``rows[g]``: the real
    rows of group g (the rest is padding): int8pack runs only those and leaves padding at the
    bias. ``x`` may be a strided view; ``q`` should be contiguous (else int8pack copies it).
    """
    if path == "reference":
        weight = (q.float() * scale.float().unsqueeze(-1)).to(x.dtype).transpose(1, 2)  # (G, K, N)
        return torch.bmm(x, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1).to(x.dtype), x, weight)
    out = _upcast_bmm(x, q, scale, dtype) if path == "upcast" else _int8pack_bmm(x, q, scale, dtype, rows)
    return _finish(out, x.dtype, None if bias is None else bias.unsqueeze(1))


def _finish(out: Tensor, dtype: torch.dtype, bias: Tensor | None) -> Tensor:
    """``out + bias`` in ``dtype``: one op (the add promotes a bf16 ``out`` to the bias dtype)."""
    if bias is not None:
        out = torch.add(bias, out) if out.dtype != bias.dtype else out.add_(bias)
    return out if out.dtype == dtype else out.to(dtype)


def _upcast_bmm(x: Tensor, q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The "upcast" path of ``int8_bmm``: fp32 (G, M, N), a chunk of matrices at a time."""
    groups, n, k = q.shape
    chunk = max(1, UPCAST_CHUNK_ELEMENTS // (n * k))
    a = x.to(dtype)
    out = torch.empty(groups, x.shape[1], n, dtype=dtype, device=x.device)
    for start in range(0, groups, chunk):
        part = slice(start, start + chunk)
        torch.bmm(a[part], q[part].to(dtype).transpose(1, 2), out=out[part])  # (g, M, N)
    # Output rows scaled in fp32; float() then in-place mul_ is ~1.6x faster than a mixed-dtype mul.
    return out.float().mul_(scale.float().unsqueeze(1))


def _int8pack_bmm(x: Tensor, q: Tensor, scale: Tensor, dtype: torch.dtype, rows: list[int] | None) -> Tensor:
    """The "int8pack" path of ``int8_bmm``: (G, M, N) in ``dtype``, one kernel call per matrix with rows."""
    a = x.to(dtype, memory_format=torch.contiguous_format)  # the kernel wants contiguous rows ...
    q = q if q.is_contiguous() else q.contiguous()  # ... and weights (a copy only for undeclared splits)
    scale = scale.to(dtype)
    if rows is None:  # unbind + stack: ~1.5x less per-call overhead than indexing G times
        return torch.stack([torch._weight_int8pack_mm(*mats) for mats in zip(a.unbind(0), q.unbind(0), scale)])
    out = a.new_zeros(*x.shape[:2], q.shape[1])
    for g in [g for g, count in enumerate(rows) if count]:
        out[g, : rows[g]] = torch._weight_int8pack_mm(a[g, : rows[g]], q[g], scale[g])
    return out
