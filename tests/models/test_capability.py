"""The capability record: what each machine kind (and each forcing variable) makes of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from models.capability import Capability, cpu_record, isa_level, onednn_allows, probe

BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    ("reported", "hw_bf16", "hw_amx", "env", "expected"),
    [
        ("AVX2", False, False, {}, ("avx2", False, False)),
        ("AVX512", False, False, {}, ("avx512", False, False)),  # Skylake-X: no bf16 dot products
        ("AVX512", True, False, {}, ("avx512", True, False)),  # Cooper Lake, Zen 4
        ("AVX512", True, True, {}, ("avx512", True, True)),  # Sapphire Rapids
        # the CI guard: an AVX-512-BF16/AMX machine made to decide as an AVX2 one
        ("AVX512", True, True, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, ("avx2", False, False)),
        ("AVX512", True, True, {"ATEN_CPU_CAPABILITY": "avx2"}, ("avx2", False, False)),
        ("AVX512", True, True, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, ("avx512", False, False)),
        ("AVX512", True, True, {"DNNL_MAX_CPU_ISA": "avx512_core_bf16"}, ("avx512", True, False)),
        ("AVX512", True, True, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, ("avx512", True, True)),
        ("AVX512", True, True, {"ONEDNN_MAX_CPU_ISA": "ALL"}, ("avx512", True, True)),
        # a variable can lower the level, never raise it
        ("AVX2", True, True, {"ATEN_CPU_CAPABILITY": "avx512"}, ("avx2", False, False)),
        ("DEFAULT", False, False, {}, ("default", False, False)),
        ("SVE256", False, False, {"ATEN_CPU_CAPABILITY": "avx2"}, ("sve256", False, False)),  # ARM
    ],
)
def test_cpu_record_of_each_machine_kind_and_forcing_variable(reported, hw_bf16, hw_amx, env, expected) -> None:
    assert cpu_record(reported, hw_bf16, hw_amx, env) == expected


def test_isa_level_and_onednn_cap_rules() -> None:
    assert isa_level("AVX512", "default") == "default"
    assert isa_level("AVX512", "nonsense") == "avx512"  # torch warns and ignores it too
    assert isa_level("Z VECTOR", None) == "z vector"
    assert onednn_allows(None, "AVX512_CORE_BF16") and onednn_allows("", "AVX512_CORE_BF16")
    assert not onednn_allows("avx512_core_vnni", "AVX512_CORE_BF16")
    assert onednn_allows("AVX512_CORE_FP16", "AVX512_CORE_BF16")  # an alias of AVX10_1_512
    assert onednn_allows("not_an_isa", "AVX512_CORE_BF16")  # oneDNN ignores what it cannot parse


def test_fast_16bit_gemm_for_each_machine_kind() -> None:
    avx2, avx512 = Capability("avx2"), Capability("avx512")
    bf16 = Capability("avx512", bf16_native=True)
    amx = Capability("avx512", bf16_native=True, amx=True)
    ampere = Capability("avx2", cuda=True, cuda_bf16=True)
    volta = Capability("avx2", cuda=True)
    assert not avx2.fast_16bit_gemm("cpu", BF16) and not avx512.fast_16bit_gemm("cpu", BF16)
    assert bf16.fast_16bit_gemm("cpu", BF16) and amx.fast_16bit_gemm("cpu", BF16)
    assert not amx.fast_16bit_gemm("cpu", FP16)  # no fp16 GEMM path is relied on on CPU
    assert ampere.fast_16bit_gemm("cuda", BF16) and ampere.fast_16bit_gemm("cuda", FP16)
    assert not ampere.fast_16bit_gemm("cpu", BF16)  # its CPU is AVX2
    assert volta.fast_16bit_gemm("cuda", FP16) and not volta.fast_16bit_gemm("cuda", BF16)
    assert not avx2.fast_16bit_gemm("cuda", FP16)  # no CUDA device
    assert avx2.describe() == "avx2, bf16 emulated" and amx.describe() == "avx512, bf16 native, amx"


def test_inconsistent_records_are_refused() -> None:
    with pytest.raises(ValueError, match="amx"):
        Capability("avx512", amx=True)
    with pytest.raises(ValueError, match="cuda"):
        Capability("avx2", cuda_bf16=True)


def test_probe_is_cached_and_a_valid_record() -> None:
    record = probe()
    assert probe() is record
    assert record == Capability(**record.__dict__)  # passes the record's own consistency checks
    assert record.describe().startswith(record.isa)


def test_probe_honours_the_forcing_variables_in_a_fresh_process() -> None:
    """ATEN_CPU_CAPABILITY is read by torch when it loads: a fresh interpreter shows the record
    CI's AVX2 guard gets, whatever this machine is."""
    code = (
        "import json; from models.capability import probe; r = probe(); "
        "print(json.dumps([r.isa, r.bf16_native, r.amx]))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["default", False, False]
