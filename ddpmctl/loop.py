"""What every training loop of ddpmctl shares (``train`` and ``distill``): stop signals, seeds derived from
``--seed``, gradient norm and clipping, and the optimizer state as flat tensors for a run folder's state file.

Optimizer state keys are ``optim.{parameter index}.{name}`` (e.g. ``optim.3.exp_avg``); distillation states of
ddpmctl 0.1 used ``/`` as the separator, which :func:`dotted_keys` still reads.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["StopSignals", "clip_gradients", "derive_seed", "dotted_keys", "load_optimizer_state",
           "optimizer_state_tensors"]


class StopSignals:
    """SIGINT/SIGTERM set a flag (the loop saves and returns); a second Ctrl-C interrupts at once.

    ``on_first(signum)`` runs when the first signal arrives (e.g. to say the run will stop after this step).
    """

    def __init__(self, on_first: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self._on_first = on_first
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = self.signum is None
        self.signum = signum
        if first and self._on_first is not None:
            self._on_first(signum)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for the stream named by ``keys`` (a rank, a stage) of run seed ``seed``."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The gradients' global L2 norm (before clipping; a device tensor, read without a host sync), after scaling
    them down to ``max_norm`` when it is given. None only measures: max_norm = inf makes the scale exactly 1."""
    return torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm, foreach=True)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every per-parameter state value as a contiguous CPU tensor under ``optim.{index}.{name}``."""
    tensors: dict[str, torch.Tensor] = {}
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`optimizer_state_tensors` saved (other keys are ignored). The hyper-parameters stay the
    optimizer's own. Each loaded moment gets its parameter's memory layout: saved state is contiguous, and the
    fused/foreach update must see the strides it had before the save for a resumed run to stay bit-identical."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def dotted_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-file keys with ``/`` separators (distillation states of ddpmctl 0.1) written with ``.`` instead."""
    return {key.replace("/", "."): value for key, value in tensors.items()}
