"""W8A16 kernels: every fast path == the dequantise-then-matmul reference within what bf16
activations explain, and the policy picks paths by the measured rules (never a crashing shape)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from models import int8_matmul
from models.capability import Capability, probe
from models.int8_matmul import KERNELS, KernelPolicy, int8_bmm, int8_mm, int8pack_shape_ok

BF16 = torch.bfloat16
HAS_INT8PACK = probe().int8pack_runs("cpu", BF16)
needs_int8pack = pytest.mark.skipif(not HAS_INT8PACK, reason="torch._weight_int8pack_mm unavailable here")

# One record per machine kind: the policy's choices are checked for each on any machine.
KERNEL_BUILD = frozenset({("cpu", "bfloat16"), ("cpu", "float16")})
AVX2 = Capability("avx2", int8pack=KERNEL_BUILD)
AVX512 = Capability("avx512", int8pack=KERNEL_BUILD)
AVX512_BF16 = Capability("avx512", bf16_native=True, int8pack=KERNEL_BUILD)
AMX = Capability("avx512", bf16_native=True, amx=True, int8pack=KERNEL_BUILD)
CUDA = Capability("avx2", cuda=True, cuda_bf16=True, int8pack=KERNEL_BUILD | {("cuda", "bfloat16")})
NO_KERNEL = Capability("avx512", bf16_native=True)  # a torch build without _weight_int8pack_mm


def random_int8_weight(gen: torch.Generator, groups: int, n: int, k: int) -> tuple[Tensor, Tensor]:
    q = torch.randint(-127, 128, (groups, n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-3).half()
    return q, scale


def bf16_bound(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """Per-element error bf16 activations explain: x rounded to bf16 and the product rounded to
    bf16 (2^-9 relative each, the product bounded by |x| @ |w|ᵀ), with 2x slack for the order
    of accumulation."""
    weight = q.float() * scale.float().unsqueeze(-1)  # (G, N, K)
    return 2**-7 * torch.bmm(x.abs(), weight.abs().transpose(1, 2)) + 1e-6


def fast_paths(k: int) -> list[str]:
    return ["upcast"] + (["int8pack"] if HAS_INT8PACK and int8pack_shape_ok(k, BF16) else [])


@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 4),
    rows=st.integers(1, 12),
    n=st.integers(1, 40),
    k=st.sampled_from([8, 16, 24, 32, 48, 88, 96]),
    use_bias=st.booleans(),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fast_paths_equal_reference_within_bf16_rounding(
    groups: int, rows: int, n: int, k: int, use_bias: bool, strided: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, scale = random_int8_weight(gen, groups, n, k)
    # A strided view, as the per-token layers pass their (T, M, K) transposed activations.
    x = torch.randn(rows, groups, k, generator=gen).transpose(0, 1) if strided else torch.randn(groups, rows, k)
    bias = torch.randn(groups, n, generator=gen) if use_bias else None
    ref = int8_bmm(x, q, scale, "reference", BF16, bias=bias)
    bound = bf16_bound(x, q, scale)
    for path in fast_paths(k):
        out = int8_bmm(x, q, scale, path, BF16, bias=bias)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert ((out - ref).abs() <= bound).all(), path
        # The one-matrix entry point computes the same thing.
        one = int8_mm(x[0], q[0], scale[0], path, BF16, None if bias is None else bias[0])
        assert ((one - ref[0]).abs() <= bound[0]).all(), path


@needs_int8pack
@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 6), capacity=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_int8pack_runs_only_real_rows_of_non_empty_groups(groups: int, capacity: int, seed: int) -> None:
    """A padded (G, C, K) expert buffer: rows[g] real rows per group, the rest never computed."""
    gen = torch.Generator().manual_seed(seed)
    q, scale = random_int8_weight(gen, groups, 24, 32)
    x = torch.randn(groups, capacity, 32, generator=gen)
    rows = torch.randint(0, capacity + 1, (groups,), generator=gen).tolist()
    bias = torch.randn(groups, 24, generator=gen)
    out = int8_bmm(x, q, scale, "int8pack", BF16, rows, bias)
    ref = int8_bmm(x, q, scale, "reference", BF16, bias=bias)
    bound = bf16_bound(x, q, scale)
    for g, count in enumerate(rows):
        assert ((out[g, :count] - ref[g, :count]).abs() <= bound[g, :count]).all()
        torch.testing.assert_close(out[g, count:], bias[g].expand(capacity - count, -1), atol=0, rtol=0)


def test_upcast_in_chunks_covers_every_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    q, scale = random_int8_weight(gen, 5, 16, 32)
    x = torch.randn(5, 3, 32, generator=gen)
    whole = int8_bmm(x, q, scale, "upcast", BF16)
    monkeypatch.setattr(int8_matmul, "UPCAST_CHUNK_ELEMENTS", 2 * 16 * 32)  # chunks of 2, 2 and 1 matrices
    # Other inputs than before: a chunk left out would hold stale memory, likely ``whole``'s.
    chunked = int8_bmm(2 * x, q, scale, "upcast", BF16)
    assert ((chunked - 2 * whole).abs() <= 2 * bf16_bound(x, q, scale)).all()


def small_calls_and_forced_kernels(policy: KernelPolicy, device: str = "cpu") -> None:
    """What every machine with the int8pack kernel chooses: rows <= 8 and the forced kernels."""
    auto, forced = policy, lambda kernel: KernelPolicy(kernel, capability=policy.capability)
    assert auto.choose(device, rows=1, out_features=256, in_features=64) == "int8pack"  # 16k weights
    assert auto.choose(device, rows=8, out_features=256, in_features=64) == "int8pack"
    assert auto.choose(device, rows=1, out_features=128, in_features=64) == "reference"  # 8k: dequantise
    assert auto.choose(device, rows=1, out_features=352, in_features=88) == "reference"  # bf16 needs K % 16
    assert forced("int8pack").choose(device, 512, 64, 64) == "int8pack"
    assert forced("int8pack").choose(device, 1, 352, 88) == "reference"
    assert forced("upcast").choose(device, 1, 8, 8) == "upcast"
    assert forced("reference").choose(device, 1, 256, 64) == "reference"
    assert auto.choose(device, 1, 256, 64, needs_grad=True) == "reference"
    with pytest.raises(RuntimeError, match="no backward"):
        forced("int8pack").choose(device, 1, 256, 64, needs_grad=True)


@pytest.mark.parametrize("machine", [AVX512_BF16, AMX], ids=["avx512_bf16", "amx"])
def test_auto_policy_with_native_bf16_upcasts_calls_with_enough_work(machine: Capability) -> None:
    auto = KernelPolicy(capability=machine)
    small_calls_and_forced_kernels(auto)
    assert auto.choose("cpu", rows=9, out_features=256, in_features=64, matrices=16) == "upcast"  # 2.4M MACs
    assert auto.choose("cpu", rows=32, out_features=64, in_features=64) == "reference"  # 131k MACs: fixed cost
    assert auto.choose("cpu", rows=512, out_features=256, in_features=256) == "upcast"


@pytest.mark.parametrize("machine", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_auto_policy_where_bf16_is_emulated_never_upcasts(machine: Capability) -> None:
    """Emulated bf16 GEMM is ~100x slower than fp32 and int8pack loses to dequantising above a
    few rows (models/int8_matmul.py): larger calls dequantise, however much work they hold."""
    auto = KernelPolicy(capability=machine)
    small_calls_and_forced_kernels(auto)
    assert auto.choose("cpu", rows=9, out_features=256, in_features=64, matrices=16) == "reference"
    assert auto.choose("cpu", rows=512, out_features=256, in_features=256) == "reference"
    assert auto.choose("cpu", rows=512, out_features=4096, in_features=1024) == "reference"


def test_auto_policy_on_cuda_upcasts_and_keeps_the_cpu_rules_for_cpu_tensors() -> None:
    auto = KernelPolicy(capability=CUDA)
    small_calls_and_forced_kernels(auto, "cuda")
    assert auto.choose("cuda", rows=512, out_features=256, in_features=256) == "upcast"
    assert auto.choose("cpu", rows=512, out_features=256, in_features=256) == "reference"  # its CPU is AVX2
    # fp16 activations: no int8pack kernel on this CUDA build, fp16 GEMM is native on any CUDA device
    fp16 = KernelPolicy(activation_dtype=torch.float16, capability=CUDA)
    assert fp16.choose("cuda", rows=1, out_features=4096, in_features=1024) == "reference"
    assert fp16.choose("cuda", rows=512, out_features=256, in_features=256) == "upcast"


def test_auto_policy_without_the_kernel_dequantises_small_calls() -> None:
    auto = KernelPolicy(capability=NO_KERNEL)
    assert auto.choose("cpu", rows=1, out_features=4096, in_features=1024) == "reference"
    assert KernelPolicy("int8pack", capability=NO_KERNEL).choose("cpu", 1, 4096, 1024) == "reference"
    assert auto.choose("cpu", rows=512, out_features=256, in_features=256) == "upcast"


def test_the_policy_decides_for_this_machine_by_default() -> None:
    x = torch.zeros(1)
    for rows, n, k, matrices in [(1, 256, 64, 1), (9, 256, 64, 16), (512, 256, 256, 1), (32, 64, 64, 1)]:
        assert KernelPolicy().path(x, rows, n, k, matrices) == KernelPolicy(capability=probe()).choose(
            "cpu", rows, n, k, matrices
        )
    assert KernelPolicy().path(torch.zeros(1, requires_grad=True), 1, 256, 64) == "reference"


@settings(max_examples=60, deadline=None)
@given(
    kernel=st.sampled_from(KERNELS),
    rows=st.integers(1, 4096),
    n=st.integers(1, 4096),
    k=st.integers(1, 4096),
    matrices=st.integers(1, 64),
)
def test_int8pack_is_never_chosen_for_a_width_that_crashes_it(
    kernel: str, rows: int, n: int, k: int, matrices: int
) -> None:
    """bf16 int8pack segfaults on torch 2.13 CPU unless K % 16 == 0: no policy may pick it there."""
    for machine in (AVX2, AVX512, AVX512_BF16, AMX, CUDA, None):
        path = KernelPolicy(kernel, capability=machine).choose("cpu", rows, n, k, matrices)
        assert path in ("int8pack", "upcast", "reference")
        if k % 16:
            assert path != "int8pack"
