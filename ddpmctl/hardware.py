"""What this machine can do natively: the CPU's vector capability and whether bf16 is a real fast path.

``--precision auto`` (train, sample, eval-nll, distill) resolves here: bf16 only where the device computes it
natively -- a CUDA GPU with bf16 support, or a CPU with AVX-512-BF16 or AMX tiles -- and fp32 everywhere else. On a
CPU without those instructions torch emulates bf16 arithmetic (convert, compute in fp32, round back), which measured
about 9x slower than plain fp32 for the demo network on an AVX2-only CPU, so bf16 there is never chosen by itself and
an explicit request gets one warning line.

Every probe is guarded: a torch build without one of its private probes, or a system without ``/proc/cpuinfo``, just
answers "not native".

``DDPMCTL_CPU=default|avx2|avx512|avx512-bf16`` makes ddpmctl choose as it would on a CPU of that class (precision
for ``auto``, the fast paths, the training layout); ``native`` or unset is this machine. A class below the hardware's
also lowers the kernels that really run (:func:`ddpmctl.cpuclass.lower_kernels_to_cpu_class`); a class above it can
only be chosen, never executed (docs/design.md, "CPU classes").
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

from ddpmctl import cpuclass
from ddpmctl.choices import Precision
from ddpmctl.errors import ConfigError

PrecisionRequest = Literal["auto", "fp32", "bf16"]
PRECISION_REQUESTS: tuple[str, ...] = ("auto", "fp32", "bf16")


# ------------------------------------------------------------------------------------------ the CPU class
# What torch's get_cpu_capability() answers on a CPU of each class.
_CLASS_CAPABILITY = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512", "avx512-bf16": "AVX512"}


def simulated_cpu_class() -> str | None:
    """The class ``DDPMCTL_CPU`` names, or None for this machine's own; ConfigError (one line) for a bad value."""
    try:
        return cpuclass.simulated_cpu_class()
    except cpuclass.CpuClassError as err:
        raise ConfigError(str(err)) from None


def hardware_cpu_class() -> str:
    """This machine's own class, whatever ``DDPMCTL_CPU`` says (bf16 from torch's probes where present)."""
    flags_class = cpuclass.flags_cpu_class(cpuclass.cpuinfo_flags())
    if _real_cpu_native_bf16():
        return "avx512-bf16"
    return "avx512" if flags_class == "avx512-bf16" else flags_class


def cpu_class() -> str:
    """The class ddpmctl chooses for: the one ``DDPMCTL_CPU`` names, else this machine's."""
    return simulated_cpu_class() or hardware_cpu_class()


def kernel_capability() -> str:
    """The SIMD level torch really dispatches its CPU kernels to here ('unknown' if torch cannot say)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_capability() -> str:
    """The SIMD level ddpmctl chooses for: 'AVX512', 'AVX2', 'DEFAULT', ... -- torch's, or that of the class
    ``DDPMCTL_CPU`` names."""
    simulated = simulated_cpu_class()
    return _CLASS_CAPABILITY[simulated] if simulated is not None else kernel_capability()


def _torch_probe(name: str) -> bool | None:
    """One of torch's private CPU-feature probes (``torch.cpu._is_avx512_bf16_supported`` ...), None if absent."""
    probe = getattr(torch.cpu, name, None)
    if probe is None:
        return None
    try:
        return bool(probe())
    except Exception:  # noqa: BLE001 - a private probe may fail on odd builds; treat as unknown
        return None


def cpu_native_bf16() -> bool:
    """Whether the CPU chosen for has AVX-512-BF16 or AMX: the class ``DDPMCTL_CPU`` names, else this machine."""
    simulated = simulated_cpu_class()
    if simulated is not None:
        return simulated == "avx512-bf16"
    return _real_cpu_native_bf16()


def _real_cpu_native_bf16() -> bool:
    """Whether this machine has AVX-512-BF16 or AMX (torch's own probes where present, else /proc/cpuinfo flags)."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if _torch_probe(name):
            return True
    return any(flag in cpuclass.cpuinfo_flags() for flag in cpuclass.BF16_CPU_FLAGS)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (so bf16 autocast is a speed-up there, not an emulation)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        except (AssertionError, RuntimeError):
            return False
    if device.type == "cpu":
        return cpu_native_bf16()
    return False


def resolve_precision(requested: str, device: torch.device | str) -> tuple[Precision, str | None]:
    """``auto`` | ``fp32`` | ``bf16`` on ``device`` -> (the precision to use, one warning line or None).

    ``auto`` is bf16 where :func:`native_bf16` says so, else fp32. An explicit ``bf16`` is honoured everywhere, with a
    warning where the device only emulates it. Raises ValueError for any other request.
    """
    if requested not in PRECISION_REQUESTS:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_REQUESTS)}, not {requested!r}")
    device = torch.device(device)
    if requested == "fp32":
        return "fp32", None
    native = native_bf16(device)
    if requested == "auto":
        return ("bf16" if native else "fp32"), None
    if native:
        return "bf16", None
    what = "this CPU has no AVX-512-BF16 or AMX" if device.type == "cpu" else f"{device} has no native bf16"
    return "bf16", f"--precision bf16: {what}, so bf16 is emulated and slower than fp32 (use auto or fp32)"


# ------------------------------------------------------------------------------------------ fast paths per machine
@dataclass(frozen=True)
class FastPaths:
    """The network's optional speed paths. Each is a measured win on the machines it is chosen for (``make bench``
    times every one against the plain network; benchmarks/README.md has the figures); none changes a result beyond
    float rounding."""

    channels_last: bool
    """Network weights and batches in channels_last when sampling and evaluating: oneDNN's convolutions run without
    layout round trips."""
    conv_projections: bool
    """Attention's qkv/output projections as 1x1 conv2d on channels_last maps (oneDNN) instead of matmuls over
    tokens (on an NCHW map the matmuls run: the conv's output would need a transposing copy)."""
    bf16_math_attention: bool
    """bf16 CPU attention as two GEMMs around the softmax instead of the fused SDPA kernel."""
    mixed_groupnorm: bool
    """Forward-only bf16 GroupNorm on large channels_last CPU maps through the mixed-type kernel."""
    training_channels_last: bool = False
    """Training steps in channels_last too. oneDNN's backward convolutions are slower in it on AVX2-only CPUs
    (fp32 training step of the 32 px config 0.97x of NCHW) and faster with AVX-512 (1.08-1.11x)."""

    def describe(self) -> str:
        return ", ".join(f"{name} {'on' if getattr(self, name) else 'off'}" for name in FAST_PATH_NAMES)


FAST_PATH_NAMES: tuple[str, ...] = ("channels_last", "conv_projections", "bf16_math_attention", "mixed_groupnorm",
                                     "training_channels_last")
# Every path off: NCHW, projections as matmuls, the fused attention kernel, GroupNorm on an fp32 copy.
PLAIN_PATHS = FastPaths(channels_last=False, conv_projections=False, bf16_math_attention=False,
                        mixed_groupnorm=False)


def choose_fast_paths(device_type: str) -> FastPaths:
    """The paths that win on this machine, or on the CPU class ``DDPMCTL_CPU`` names (measured on AVX2-only and
    AVX-512-BF16 CPUs; benchmarks/README.md).

    channels_last for sampling, the 1x1-conv projections and the mixed-type GroupNorm won on both CPUs;
    channels_last for training only with AVX-512 (and on GPUs). The bf16 attention GEMMs won only where bf16 is
    native: with emulated bf16 (AVX2) the fused kernel is about 2x faster.
    """
    # The network asks on every call: the answer is cached per device type and DDPMCTL_CPU value.
    return _choose_fast_paths(device_type, os.environ.get(cpuclass.CPU_ENV, ""))


@lru_cache(maxsize=16)
def _choose_fast_paths(device_type: str, cpu_setting: str) -> FastPaths:
    native = device_type == "cpu" and cpu_native_bf16()
    training_channels_last = device_type != "cpu" or cpu_capability().startswith("AVX512")
    return FastPaths(channels_last=True, conv_projections=True, bf16_math_attention=native, mixed_groupnorm=True,
                     training_channels_last=training_channels_last)


def clear_caches() -> None:
    """Forget every cached choice (the fast paths, the cpuinfo flags): after a probe or the environment changed."""
    _choose_fast_paths.cache_clear()
    cpuclass.cpuinfo_flags.cache_clear()


_forced: FastPaths | None = None


def fast_paths(device: torch.device | str) -> FastPaths:
    """The paths the network takes on ``device``: this machine's choice, unless :func:`forced_fast_paths` is on."""
    if _forced is not None:
        return _forced
    return choose_fast_paths(torch.device(device).type)


@contextmanager
def forced_fast_paths(paths: FastPaths) -> Iterator[None]:
    """Take ``paths`` instead of the machine's choice inside the block (the bench's A/B, tests)."""
    global _forced
    previous, _forced = _forced, paths
    try:
        yield
    finally:
        _forced = previous


def memory_format(device: torch.device | str, *, training: bool = False) -> torch.memory_format:
    """The layout networks and batches use on ``device`` when sampling (see :attr:`FastPaths.channels_last`) or
    ``training`` (:attr:`FastPaths.training_channels_last`)."""
    paths = fast_paths(device)
    channels_last = paths.training_channels_last if training else paths.channels_last
    return torch.channels_last if channels_last else torch.contiguous_format
