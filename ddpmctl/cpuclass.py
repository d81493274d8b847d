"""The CPU class ddpmctl chooses for: this machine's, or the one ``DDPMCTL_CPU`` names (no torch import here: the
command line reads it before torch starts, so that a lower class's kernel limits still take effect).

A class decides what ``--precision auto`` picks, which fast paths the network takes and the training layout
(``ddpmctl.hardware``). ``DDPMCTL_CPU=default|avx2|avx512|avx512-bf16`` simulates that class; ``native`` or unset
is this machine. A class below the hardware's also lowers the kernels that really run, through torch's
``ATEN_CPU_CAPABILITY`` and oneDNN's ``ONEDNN_MAX_CPU_ISA``; a class above it can only be chosen, never executed
(docs/design.md, "CPU classes").
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from functools import lru_cache
from pathlib import Path

__all__ = ["CPU_CLASSES", "CPU_ENV", "cpuinfo_flags", "flags_cpu_class", "lower_kernels_to_cpu_class",
           "simulated_cpu_class"]

CPU_ENV = "DDPMCTL_CPU"
# From the plainest to the richest: what DDPMCTL_CPU may name besides ``native``.
CPU_CLASSES: tuple[str, ...] = ("default", "avx2", "avx512", "avx512-bf16")
# The kernel limits that make torch and oneDNN run a lower class's code: ATEN_CPU_CAPABILITY picks torch's kernel
# set, ONEDNN_MAX_CPU_ISA caps oneDNN's JIT (AVX512_CORE has no bf16 dot products, AVX512_CORE_BF16 has them).
KERNEL_LIMITS: dict[str, dict[str, str]] = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx512-bf16": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}
# /proc/cpuinfo flags that give the CPU native bf16 dot products (AVX-512-BF16) or bf16 matrix tiles (AMX).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# What torch's AVX512 kernel set needs, and its AVX2 one.
_AVX512_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
_AVX2_FLAGS = frozenset({"avx2", "fma"})


class CpuClassError(ValueError):
    """``DDPMCTL_CPU`` names no class."""


def simulated_cpu_class() -> str | None:
    """The class ``DDPMCTL_CPU`` names, or None for this machine's own (unset, empty or ``native``).

    Raises CpuClassError, with a one-line message, for any other value."""
    value = os.environ.get(CPU_ENV, "").strip().lower()
    if value in ("", "native"):
        return None
    if value not in CPU_CLASSES:
        raise CpuClassError(f"{CPU_ENV}={value}: choose one of native, {', '.join(CPU_CLASSES)}")
    return value


@lru_cache(maxsize=1)
def cpuinfo_flags() -> frozenset[str]:
    """The ``flags`` of the first CPU in /proc/cpuinfo (empty where there is no such file, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def flags_cpu_class(flags: frozenset[str]) -> str:
    """The richest class whose instructions ``flags`` (a /proc/cpuinfo list) all has."""
    if not _AVX512_FLAGS <= flags:
        return "avx2" if _AVX2_FLAGS <= flags else "default"
    return "avx512-bf16" if any(flag in flags for flag in BF16_CPU_FLAGS) else "avx512"


def lower_kernels_to_cpu_class(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Where ``DDPMCTL_CPU`` names a class below this machine's, also run that class's kernels: set torch's and
    oneDNN's limits in ``environ`` (default: this process's, from where they reach every child process).

    In this process they take effect only before its first tensor operation (both libraries read them once); a
    value already set is kept. A class above the machine's sets nothing: its kernels cannot run on this CPU.
    Returns the variables set.
    """
    environ = os.environ if environ is None else environ
    simulated = simulated_cpu_class()
    hardware = flags_cpu_class(cpuinfo_flags())
    if simulated is None or CPU_CLASSES.index(simulated) >= CPU_CLASSES.index(hardware):
        return {}
    wanted = {key: value for key, value in KERNEL_LIMITS[simulated].items() if key not in environ}
    environ.update(wanted)
    return wanted
