"""ddpmctl.hardware: capability probes (monkeypatched: the test machine's own CPU must not decide the outcome)."""

from __future__ import annotations

import pytest
import torch

from ddpmctl import hardware


@pytest.fixture
def cpu_bf16(monkeypatch: pytest.MonkeyPatch):
    """``cpu_bf16(torch_probes, flags)``: pretend torch's probes answer ``torch_probes`` (name -> bool, missing =
    the probe does not exist in this torch) and /proc/cpuinfo lists ``flags``."""

    def set_machine(torch_probes: dict[str, bool], flags: set[str]) -> None:
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            if name in torch_probes:
                monkeypatch.setattr(torch.cpu, name, lambda value=torch_probes[name]: value, raising=False)
            else:
                monkeypatch.delattr(torch.cpu, name, raising=False)
        monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: frozenset(flags))

    return set_machine


@pytest.mark.parametrize(("probes", "flags", "native"), [
    ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, {"avx2", "fma"}, False),
    ({"_is_avx512_bf16_supported": True, "_is_amx_tile_supported": False}, {"avx2"}, True),
    ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": True}, set(), True),
    ({}, {"avx2", "avx512f", "avx512_bf16"}, True),   # an older torch without the probes: the flags decide
    ({}, {"amx_bf16", "amx_tile"}, True),
    ({}, {"avx2", "avx512f"}, False),                 # AVX-512 alone converts bf16 but has no bf16 dot products
    ({}, set(), False),                               # no /proc/cpuinfo (macOS): not native
])
def test_cpu_native_bf16(cpu_bf16, probes: dict[str, bool], flags: set[str], native: bool) -> None:
    cpu_bf16(probes, flags)
    assert hardware.native_bf16(torch.device("cpu")) is native
    assert hardware.native_bf16("cpu") is native


def test_a_failing_probe_counts_as_unknown(monkeypatch: pytest.MonkeyPatch, cpu_bf16) -> None:
    cpu_bf16({}, set())

    def broken() -> bool:
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    assert hardware.native_bf16("cpu") is False


def test_cuda_asks_torch(monkeypatch: pytest.MonkeyPatch, cpu_bf16) -> None:
    cpu_bf16({}, set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.native_bf16("cuda") is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hardware.native_bf16("cuda:0") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.native_bf16("cuda") is False


@pytest.mark.parametrize(("native", "requested", "expected", "warns"), [
    (False, "auto", "fp32", False),
    (True, "auto", "bf16", False),
    (False, "fp32", "fp32", False),
    (True, "fp32", "fp32", False),
    (True, "bf16", "bf16", False),
    (False, "bf16", "bf16", True),
])
def test_resolve_precision(monkeypatch: pytest.MonkeyPatch, native: bool, requested: str, expected: str,
                           warns: bool) -> None:
    monkeypatch.setattr(hardware, "native_bf16", lambda device: native)
    precision, warning = hardware.resolve_precision(requested, torch.device("cpu"))
    assert precision == expected
    assert (warning is not None) is warns
    if warns:
        assert "\n" not in warning and "emulated" in warning and "slower than fp32" in warning


def test_resolve_precision_refuses_unknown() -> None:
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        hardware.resolve_precision("fp16", "cpu")


def test_cpu_capability_is_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert hardware.cpu_capability() == torch.backends.cpu.get_cpu_capability()
    monkeypatch.delattr(torch.backends.cpu, "get_cpu_capability")
    assert hardware.cpu_capability() == "unknown"


def test_cpuinfo_flags_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    real_path = hardware.Path
    monkeypatch.setattr(hardware, "Path", lambda p: fake if p == "/proc/cpuinfo" else real_path(p))
    hardware._cpuinfo_flags.cache_clear()
    try:
        assert hardware._cpuinfo_flags() == frozenset({"fpu", "sse2", "avx2", "avx512_bf16"})
    finally:
        hardware._cpuinfo_flags.cache_clear()
