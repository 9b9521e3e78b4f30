"""What the hardware can do for the kernels whose choice depends on it: one record, probed once.

Every hardware-dependent decision of the project (the W8A16 ``auto`` kernel policy in
models/int8_matmul.py, whether a 16-bit GEMM is worth it, the perf bench's bf16 figure, the
timed dtype of the model bench, the warning for an emulated ``train.bf16``) is a pure function
of a ``Capability``, so each can be unit-tested for every machine kind (AVX2, AVX-512,
AVX-512-BF16/AMX, CUDA) on whichever machine runs the tests. ``probe()`` builds the record of
this process once.

The probe honours the two switches that force a lower ISA, so that an AVX-512 machine can
run the decisions (and the kernels) an AVX2 machine would:

- ``ATEN_CPU_CAPABILITY`` (``default`` / ``avx2`` / ``avx512``): ATen's own dispatch level,
  read by torch when it loads (``torch.backends.cpu.get_cpu_capability()`` then reports it;
  torch.compile's inductor picks its vector ISA from it too). The record takes the lower of
  the two, in case the variable was set after torch loaded.
- ``ONEDNN_MAX_CPU_ISA`` (or its old name ``DNNL_MAX_CPU_ISA``): the highest ISA oneDNN, which
  runs the CPU's bf16 GEMMs, may use. bf16 dot products need ``AVX512_CORE_BF16`` or above,
  AMX tiles ``AVX512_CORE_AMX`` or above.

``torch.cpu._is_avx512_bf16_supported()`` and ``_is_amx_tile_supported()`` read CPUID and
honour neither switch, which is why no other module calls them.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

# ATen's x86 dispatch levels, lowest first. Other architectures report "vsx", "z vector",
# "sve256" (or "default"): none of them has a native bf16 GEMM path the project relies on.
X86_LEVELS = ("default", "avx2", "avx512")
# oneDNN's CPU ISA names (dnnl_cpu_isa_t), lowest first; aliases map to the same rank.
ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "ALL",
)
ONEDNN_ALIASES = {
    "DEFAULT": "ALL",
    "AVX512_CORE_FP16": "AVX10_1_512",
    "AVX512_CORE_AMX": "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16": "AVX10_1_512_AMX_FP16",
}
ONEDNN_BF16 = "AVX512_CORE_BF16"
ONEDNN_AMX = "AVX10_1_512_AMX"


@dataclass(frozen=True)
class Capability:
    """The facts kernel choices depend on. Build one by hand to test a decision for a machine kind."""

    isa: str  # ATen's CPU dispatch level, lower case: "default", "avx2", "avx512" (x86), "vsx", "sve256", ...
    bf16_native: bool = False  # bf16 dot products in hardware that oneDNN may use (AVX512-BF16 or AMX)
    amx: bool = False  # AMX tiles that oneDNN may use
    cuda: bool = False  # a CUDA device is visible
    cuda_bf16: bool = False  # ... and it computes bf16 natively (Ampere and later)
    # (device type, dtype name) pairs for which torch._weight_int8pack_mm runs (it is probed by
    # running it: its availability depends on the torch build as well as on the hardware)
    int8pack: frozenset[tuple[str, str]] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.amx and not self.bf16_native:
            raise ValueError("amx=True implies bf16_native=True (AMX tiles compute bf16)")
        if self.cuda_bf16 and not self.cuda:
            raise ValueError("cuda_bf16=True needs cuda=True")

    def fast_16bit_gemm(self, device_type: str, dtype: torch.dtype) -> bool:
        """Whether a ``dtype`` GEMM beats fp32 on ``device_type``: CUDA (bf16 from Ampere on),
        or a CPU with native bf16 dot products. Elsewhere 16-bit GEMMs are emulated: ~100x
        slower than fp32 on an AVX2 CPU (1.2 vs 94 GFLOP/s measured)."""
        if device_type == "cuda":
            return self.cuda and (dtype != torch.bfloat16 or self.cuda_bf16)
        return device_type == "cpu" and dtype == torch.bfloat16 and self.bf16_native

    def int8pack_runs(self, device_type: str, dtype: torch.dtype) -> bool:
        """Whether ``torch._weight_int8pack_mm`` runs for ``dtype`` activations on ``device_type``."""
        return (device_type, _dtype_name(dtype)) in self.int8pack

    def describe(self) -> str:
        """One line for logs and bench JSON: "avx2, bf16 emulated" and the like."""
        parts = [self.isa, "bf16 native" if self.bf16_native else "bf16 emulated"]
        parts += ["amx"] if self.amx else []
        parts += [f"cuda{' bf16' if self.cuda_bf16 else ''}"] if self.cuda else []
        return ", ".join(parts)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def isa_level(reported: str, forced: str | None) -> str:
    """ATen's level as torch reports it, lowered to ``forced`` (ATEN_CPU_CAPABILITY) when that is lower."""
    level = reported.strip().lower()
    wanted = (forced or "").strip().lower()
    if level in X86_LEVELS and wanted in X86_LEVELS and X86_LEVELS.index(wanted) < X86_LEVELS.index(level):
        return wanted
    return level


def onednn_allows(max_isa: str | None, needed: str) -> bool:
    """Whether oneDNN capped at ``max_isa`` (ONEDNN_MAX_CPU_ISA; None: no cap) may use ``needed``.

    An unknown name is treated as no cap, as oneDNN itself ignores a value it cannot parse."""
    if not max_isa:
        return True
    name = max_isa.strip().upper()
    name = ONEDNN_ALIASES.get(name, name)
    if name not in ONEDNN_ISAS:
        logger.warning("ONEDNN_MAX_CPU_ISA=%s is not an ISA oneDNN knows; ignored", max_isa)
        return True
    return ONEDNN_ISAS.index(name) >= ONEDNN_ISAS.index(needed)


def cpu_record(
    reported_isa: str,
    hw_bf16: bool,
    hw_amx: bool,
    env: dict[str, str],
) -> tuple[str, bool, bool]:
    """(isa, bf16_native, amx) from what torch reports and the forcing variables in ``env``.

    Native bf16 needs the hardware, ATen at AVX-512 (its bf16 element-wise kernels and the
    conversions around a GEMM are AVX-512 code) and oneDNN allowed to use AVX512_CORE_BF16."""
    isa = isa_level(reported_isa, env.get("ATEN_CPU_CAPABILITY"))
    max_isa = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    bf16 = hw_bf16 and isa == "avx512" and onednn_allows(max_isa, ONEDNN_BF16)
    amx = bf16 and hw_amx and onednn_allows(max_isa, ONEDNN_AMX)
    return isa, bf16, amx


def _int8pack_probe(device_type: str, dtype: torch.dtype) -> bool:
    """Run ``torch._weight_int8pack_mm`` once on a shape every build takes (K = 32)."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        a = torch.ones(2, 32, dtype=dtype, device=device_type)
        b = torch.ones(8, 32, dtype=torch.int8, device=device_type)
        out = torch._weight_int8pack_mm(a, b, torch.ones(8, dtype=dtype, device=device_type))
        return bool(torch.allclose(out.float(), torch.full((2, 8), 32.0, device=device_type)))
    except Exception as err:  # a probe: any failure means 'use another path'
        logger.info("int8pack kernel unavailable for %s/%s (%s)", device_type, dtype, err)
        return False


@functools.cache
def probe() -> Capability:
    """This process's record: torch's CPU level and CPUID flags, the forcing variables, CUDA."""
    isa, bf16, amx = cpu_record(
        torch.backends.cpu.get_cpu_capability(),
        torch.cpu._is_avx512_bf16_supported(),
        torch.cpu._is_amx_tile_supported(),
        dict(os.environ),
    )
    cuda = torch.cuda.is_available()
    devices = ("cpu", "cuda") if cuda else ("cpu",)
    int8pack = frozenset(
        (device, _dtype_name(dtype))
        for device in devices
        for dtype in (torch.bfloat16, torch.float16)
        if _int8pack_probe(device, dtype)
    )
    record = Capability(
        isa=isa,
        bf16_native=bf16,
        amx=amx,
        cuda=cuda,
        cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
        int8pack=int8pack,
    )
    logger.debug("hardware capability: %s", record)
    return record
