"""Optimizer plumbing every training method shares: gradient norm and clipping, and an optimizer's state as flat
tensors for a run folder's state file.

Optimizer state keys are ``optim.{parameter index}.{name}`` (e.g. ``optim.3.exp_avg``); distillation states of
ddpmctl 0.1 used ``/`` as the separator, which :func:`dotted_keys` still reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

__all__ = ["adamw", "clip_gradients", "dotted_keys", "load_optimizer_state", "optimizer_state_tensors"]


def adamw(params: list[torch.nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where this torch/device supports it, else multi-tensor (foreach)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The gradients' global L2 norm (before clipping; a device tensor, read without a host sync), after scaling
    them down to ``max_norm`` when it is given. None only measures: max_norm = inf makes the scale exactly 1."""
    return torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm, foreach=True)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim.") -> dict[str, torch.Tensor]:
    """Every per-parameter state value as a contiguous CPU tensor under ``{prefix}{index}.{name}`` (a method with
    two optimizers gives each its own prefix, e.g. ``optim.generator.``)."""
    tensors: dict[str, torch.Tensor] = {}
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            tensors[f"{prefix}{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                         prefix: str = "optim.") -> None:
    """Restore what :func:`optimizer_state_tensors` saved under ``prefix`` (other keys are ignored). The
    hyper-parameters stay the optimizer's own. Each loaded moment gets its parameter's memory layout: saved state is
    contiguous, and the fused/foreach update must see the strides it had before the save for a resumed run to stay
    bit-identical."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0].isdigit():
            index, name = key[len(prefix):].split(".", 1)
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
