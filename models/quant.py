"""W8A16 weight-only quantization (UG-Sep, arXiv 2602.10455; MODELS.md §4).

Weights become symmetric int8 with one fp16 scale per output channel; activations stay
16/32-bit. Embedding tables are left alone. ``quantize_w8a16(model)`` is the one entry point.

What gets quantized (the opt-in contract for other layers; the layers: models/quant_layers.py)
- ``nn.Linear`` (exact type; subclasses such as MultiheadAttention's ``out_proj`` are used
  by code that reads ``.weight`` directly and are skipped) -> ``QuantizedLinear``,
  one scale per output row.
- Per-token linears -> ``QuantizedPerTokenLinear``: ``models.layers.PerTokenLinear``, or any
  module whose class sets ``is_per_token_linear = True`` and then has a ``weight`` (T, d_in,
  d_out), an optional ``bias`` (T, d_out) and a forward that is exactly
  ``y[..., t, :] = x[..., t, :] @ weight[t] + bias[t]`` with an optional ``tokens`` slice.
  One scale per (t, out).
- MoE experts, ``models.layers.ExpertBank`` (T, E, d_in, d_out) -> ``QuantizedExpertBank``,
  one scale per (t, e, out); its grouped GEMM runs only the real rows of non-empty groups.
- Any other >= 3-D parameter whose name ends in ``weight`` (or that its module lists in
  ``quantizable_params``), laid out (..., d_in, d_out) and used as ``x @ w[g]``, gets a
  dequantising parametrization (``Int8Dequantize``): int8-stored, but the module's own
  forward sees the float tensor, so it ALWAYS dequantises. None is left in ``Ranker``.

Kernels (``QuantConfig.kernel``; paths and measurements in models/int8_matmul.py): "auto"
runs int8pack (the kernel that reads int8) for calls of <= ``int8pack_max_rows`` rows per
matrix of >= ``int8pack_min_weights`` weights, a bf16 upcast GEMM for more rows where the
machine computes bf16 natively (``models/capability.py``), and dequantises (reference) small
calls of small matrices or of a K the kernel cannot take (logged per layer here), larger calls
too small to pay bf16 GEMM's fixed cost, and every larger call on a CPU that emulates bf16;
"reference" always dequantises and is the oracle.

Column blocks (UG-Sep): a model lists the layers it calls on the two halves of their input
``[x_user ; x_group]`` (``input_splits()``, e.g. ``UGSepBackbone``); their int8 weights are
stored as those two column blocks (models/quant_layers.py).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from models.capability import probe
from models.cost import is_sparse_module, sparse_tensor_ids
from models.int8_matmul import (
    INT8PACK_MAX_ROWS,
    INT8PACK_MIN_WEIGHTS,
    UPCAST_MIN_MACS,
    Kernel,
    KernelPolicy,
)
from models.layers import ExpertBank, PerTokenLinear
from models.quant_layers import (
    Int8Dequantize,
    QuantizedExpertBank,
    QuantizedLinear,
    QuantizedPerTokenLinear,
    W8Module,
)

logger = logging.getLogger(__name__)

_ACTIVATION_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class QuantConfig:
    """How ``quantize_w8a16`` converts a model."""

    kernel: Kernel = "auto"
    # Dtype activations are cast to for the int8pack / upcast paths (only bf16 is fast on CPU).
    activation_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    # "auto": int8pack for calls of <= this many rows per matrix, the bf16 upcast GEMM above ...
    int8pack_max_rows: int = INT8PACK_MAX_ROWS
    # ... on matrices of >= this many weights (smaller ones dequantise faster than a kernel loop).
    int8pack_min_weights: int = INT8PACK_MIN_WEIGHTS
    # Larger calls upcast once they hold this many multiply-adds (bf16 GEMM has a fixed cost).
    upcast_min_macs: int = UPCAST_MIN_MACS
    # Also quantize stray 3-D ``*weight`` parameters through a dequantising parametrization.
    quantize_3d_params: bool = True
    # Module-name prefixes kept in float (e.g. ("heads",) for task towers).
    skip: tuple[str, ...] = ()

    def policy(self) -> KernelPolicy:
        """The ``KernelPolicy`` every quantized layer of the model gets."""
        act = _ACTIVATION_DTYPES[self.activation_dtype]
        return KernelPolicy(self.kernel, act, self.int8pack_max_rows, self.int8pack_min_weights, self.upcast_min_macs)


def _is_per_token_linear(module: nn.Module) -> bool:
    return isinstance(module, PerTokenLinear) or bool(getattr(type(module), "is_per_token_linear", False))


def _input_splits(model: nn.Module) -> dict[str, int]:
    """Module path -> first input feature of the second column block, from every module's
    ``input_splits()`` (layers called on ``[x_user ; x_group]`` halves, e.g. ``UGSepBackbone``)."""
    splits: dict[str, int] = {}
    for path, module in model.named_modules():
        declared = getattr(module, "input_splits", None)
        if callable(declared):
            splits.update({f"{path}.{name}" if path else name: k for name, k in declared().items()})
    return splits


def _quantized(child: nn.Module, policy: KernelPolicy, input_split: int) -> W8Module | None:
    """The quantized replacement of ``child``, or None when it is not a layer we quantize."""
    if type(child) is nn.Linear:
        return QuantizedLinear.from_float(child, policy)
    if _is_per_token_linear(child):
        return QuantizedPerTokenLinear.from_float(child, policy, input_split)
    if isinstance(child, ExpertBank):
        return QuantizedExpertBank.from_float(child, policy, input_split)
    return None


def _log_fallback(path: str, layer: W8Module) -> None:
    """One line per layer whose input width the int8pack kernel cannot take (bf16: K % 16 != 0)."""
    device = layer.scale.device.type
    widths = [stop - start for start, stop in layer.column_ranges()]
    bad = [k for k in widths if not layer.policy.int8pack_runs(device, k)]
    if bad and layer.kernel in ("auto", "int8pack"):
        logger.info(
            "w8a16 %s: no int8pack for input width %s of %s (bf16 needs K %% 16 == 0): calls of <= %d rows "
            "dequantise, larger ones the bf16 upcast GEMM where bf16 is native and the call holds enough work, "
            "else dequantise",
            path,
            bad,
            widths,
            layer.policy.int8pack_max_rows,
        )


def _swap_modules(
    module: nn.Module, prefix: str, config: QuantConfig, counts: dict[str, int], splits: dict[str, int]
) -> None:
    """Replace quantizable children of ``module`` in place, depth first."""
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if is_sparse_module(child) or any(path.startswith(s) for s in config.skip):
            continue
        quantized = _quantized(child, config.policy(), splits.get(path, 0))
        if quantized is None:
            _swap_modules(child, f"{path}.", config, counts, splits)
            continue
        setattr(module, name, quantized)
        counts[type(quantized).__name__] += 1
        _log_fallback(path, quantized)


def _parametrize_3d_weights(model: nn.Module, config: QuantConfig, counts: dict[str, int]) -> None:
    """Int8-store every remaining >= 3-D ``*weight`` parameter (or one a module lists in
    ``quantizable_params``) outside embedding tables; these always dequantise."""
    sparse_ids = sparse_tensor_ids(model)
    for path, module in list(model.named_modules()):
        if isinstance(module, W8Module) or any(path.startswith(s) for s in config.skip if s):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            opted_in = name in getattr(type(module), "quantizable_params", ())
            if param.dim() < 3 or not (name.endswith("weight") or opted_in) or id(param) in sparse_ids:
                continue
            param.requires_grad_(False)  # int8 storage cannot carry gradients
            parametrize.register_parametrization(module, name, Int8Dequantize(), unsafe=True)
            counts["Int8Dequantize"] += 1
            logger.info("w8a16 %s.%s %s: int8-stored, always dequantised", path, name, tuple(param.shape))


def quantize_w8a16(model: nn.Module, config: QuantConfig = QuantConfig(), inplace: bool = False) -> nn.Module:
    """W8A16 copy of ``model`` (or ``model`` itself when ``inplace``), in eval mode.

    Linear, per-token linear and expert-bank layers become int8 modules; stray 3-D weights are
    int8-stored via parametrization; embedding tables, norms and biases stay float.
    The result is for inference: the int8 tensors do not train.
    """
    target = model if inplace else copy.deepcopy(model)
    # Probe the machine now, not inside the first forward (where e.g. a FLOP counter would see it).
    if config.kernel != "reference":
        probe()
    counts = dict.fromkeys(("QuantizedLinear", "QuantizedPerTokenLinear", "QuantizedExpertBank", "Int8Dequantize"), 0)
    _swap_modules(target, "", config, counts, _input_splits(target))
    if config.quantize_3d_params:
        _parametrize_3d_weights(target, config, counts)
    logger.info(
        "quantize_w8a16: %s; small calls (<= %d rows) run the int8pack kernel on %.1f%% of the int8 weight bytes",
        counts,
        config.int8pack_max_rows,
        100 * int8pack_fraction(target),
    )
    return target.eval()


def int8pack_fraction(model: nn.Module) -> float:
    """Share of the int8 weight bytes that small calls (<= ``int8pack_max_rows`` rows) run through the
    int8pack kernel; the rest dequantises there (small matrices, K % 16 != 0, ``Int8Dequantize``)."""
    total = served = 0
    for module in model.modules():
        if isinstance(module, W8Module):
            module_total, module_served = module.int8pack_bytes()
            total, served = total + module_total, served + module_served
        if parametrize.is_parametrized(module):
            params = module.parametrizations.values()
            total += sum(p.original0.numel() for p in params if isinstance(p[0], Int8Dequantize))
    return served / total if total else 0.0


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
