"""ddpmctl.hardware: capability probes (monkeypatched: the test machine's own CPU must not decide the outcome), and
the CPU classes DDPMCTL_CPU simulates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ddpmctl import cpuclass, hardware
from ddpmctl.errors import ConfigError


@pytest.fixture
def native_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's own class (the probes decide), not the suite's simulated one."""
    monkeypatch.setenv("DDPMCTL_CPU", "native")


@pytest.fixture
def cpu_bf16(monkeypatch: pytest.MonkeyPatch, native_cpu: None):
    """``cpu_bf16(torch_probes, flags)``: pretend torch's probes answer ``torch_probes`` (name -> bool, missing =
    the probe does not exist in this torch) and /proc/cpuinfo lists ``flags``."""

    def set_machine(torch_probes: dict[str, bool], flags: set[str]) -> None:
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            if name in torch_probes:
                monkeypatch.setattr(torch.cpu, name, lambda value=torch_probes[name]: value, raising=False)
            else:
                monkeypatch.delattr(torch.cpu, name, raising=False)
        monkeypatch.setattr(cpuclass, "cpuinfo_flags", lambda: frozenset(flags))

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


def test_cpu_capability_is_torchs(monkeypatch: pytest.MonkeyPatch, native_cpu: None) -> None:
    assert hardware.cpu_capability() == torch.backends.cpu.get_cpu_capability()
    monkeypatch.delattr(torch.backends.cpu, "get_cpu_capability")
    assert hardware.cpu_capability() == "unknown"


def test_cpuinfo_flags_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    real_path = cpuclass.Path
    monkeypatch.setattr(cpuclass, "Path", lambda p: fake if p == "/proc/cpuinfo" else real_path(p))
    cpuclass.cpuinfo_flags.cache_clear()
    try:
        assert cpuclass.cpuinfo_flags() == frozenset({"fpu", "sse2", "avx2", "avx512_bf16"})
    finally:
        cpuclass.cpuinfo_flags.cache_clear()


# ------------------------------------------------------------------------------------------ DDPMCTL_CPU
# What a CPU of each class answers (torch's capability names; AVX-512-BF16 is AVX512 to torch).
CLASS_FACTS = {"default": ("DEFAULT", False), "avx2": ("AVX2", False), "avx512": ("AVX512", False),
               "avx512-bf16": ("AVX512", True)}


@pytest.mark.parametrize("name", cpuclass.CPU_CLASSES)
def test_a_simulated_class_decides_capability_bf16_and_auto(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("DDPMCTL_CPU", name.upper() if name == "avx2" else name)  # case does not matter
    capability, bf16 = CLASS_FACTS[name]
    assert (hardware.cpu_class(), hardware.cpu_capability(), hardware.cpu_native_bf16()) == (name, capability, bf16)
    assert hardware.resolve_precision("auto", "cpu") == ("bf16" if bf16 else "fp32", None)
    # The fast paths follow the class, whatever was cached for another one.
    paths = hardware.fast_paths("cpu")
    assert (paths.bf16_math_attention, paths.training_channels_last) == (bf16, capability == "AVX512")


def test_native_and_unset_are_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("native", ""):
        monkeypatch.setenv("DDPMCTL_CPU", value)
        assert hardware.cpu_class() == hardware.hardware_cpu_class()
        assert hardware.cpu_capability() == torch.backends.cpu.get_cpu_capability()
    monkeypatch.delenv("DDPMCTL_CPU")
    assert hardware.simulated_cpu_class() is None


def test_a_bad_class_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDPMCTL_CPU", "avx1024")
    with pytest.raises(ConfigError, match=r"^DDPMCTL_CPU=avx1024: choose one of native, default, avx2, avx512, "
                                          r"avx512-bf16$"):
        hardware.cpu_native_bf16()
    proc = subprocess.run([sys.executable, "-m", "ddpmctl", "samplers"], capture_output=True, text=True,
                          env={**os.environ, "DDPMCTL_CPU": "avx1024"}, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: DDPMCTL_CPU=avx1024: choose one of native, default, avx2, avx512, "
                                        "avx512-bf16"]


@pytest.mark.parametrize(("flags", "expected"), [
    (set(), "default"), ({"sse2", "avx"}, "default"), ({"avx2"}, "default"), ({"avx2", "fma"}, "avx2"),
    ({"avx2", "fma", "avx512f"}, "avx2"), ({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx512"),
    ({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}, "avx512-bf16"),
    ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "amx_bf16"}, "avx512-bf16"),
])
def test_the_class_from_cpuinfo_flags(flags: set[str], expected: str) -> None:
    assert cpuclass.flags_cpu_class(frozenset(flags)) == expected


@pytest.mark.parametrize(("hardware_flags", "simulated", "expected"), [
    ("avx512-bf16", "avx2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
    ("avx512-bf16", "avx512", {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}),
    ("avx512-bf16", "default", {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}),
    ("avx512-bf16", "avx512-bf16", {}),   # the machine's own class: nothing to lower
    ("avx2", "avx512-bf16", {}),          # above the hardware: chosen, never executed (would be SIGILL)
    ("avx2", "avx512", {}),
    ("avx2", "default", {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}),
    ("avx2", "native", {}),
])
def test_only_a_lower_class_lowers_the_kernels(monkeypatch: pytest.MonkeyPatch, hardware_flags: str,
                                               simulated: str, expected: dict[str, str]) -> None:
    flags = {"avx2": {"avx2", "fma"},
             "avx512-bf16": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}}
    monkeypatch.setattr(cpuclass, "cpuinfo_flags", lambda: frozenset(flags[hardware_flags]))
    monkeypatch.setenv("DDPMCTL_CPU", simulated)
    environ: dict[str, str] = {}
    assert cpuclass.lower_kernels_to_cpu_class(environ) == expected and environ == expected
    # A limit the user set is kept.
    mine = {"ATEN_CPU_CAPABILITY": "default"}
    cpuclass.lower_kernels_to_cpu_class(mine)
    assert mine["ATEN_CPU_CAPABILITY"] == "default"


def test_a_child_process_runs_the_lower_classs_kernels(tmp_path) -> None:
    """``ddpmctl info --json`` without a checkpoint reports the machine: simulated and real class, and the kernels
    torch dispatches to, which a class below the machine's really lowers."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    reports = {}
    for name in ("avx2", "avx512-bf16", "native"):
        proc = subprocess.run([sys.executable, "-m", "ddpmctl", "info", "--json"], capture_output=True, text=True,
                              env={**env, "DDPMCTL_CPU": name}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        reports[name] = json.loads(proc.stdout)["machine"]
    real = hardware.hardware_cpu_class()
    for name, report in reports.items():
        assert report["hardware_class"] == real
        assert report["cpu_class"] == (real if name == "native" else name)
        assert report["simulated"] is (name != "native")
        assert report["auto_precision"] == ("bf16" if report["cpu_class"] == "avx512-bf16" else "fp32")
    if cpuclass.CPU_CLASSES.index(real) > cpuclass.CPU_CLASSES.index("avx2"):
        assert reports["avx2"]["kernels"] == "AVX2"
    else:  # an AVX2-only machine cannot lower to avx2, and cannot run AVX-512 kernels at all
        assert reports["avx512-bf16"]["kernels"] == reports["native"]["kernels"]
