"""Exponential moving average of the network's parameters (improved-diffusion ``update_ema``; no warm-up)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """fp32 shadow copies of a module's parameters: ema <- rate * ema + (1 - rate) * param after every step."""

    def __init__(self, module: nn.Module, rate: float) -> None:
        self.rate = float(rate)
        self.names = [name for name, _ in module.named_parameters()]
        # The reference starts the average at the initial weights (copy of the master params), no bias correction.
        self.params = [p.detach().clone().float() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step, written as the reference does (mul by rate, add (1 - rate) * param)."""
        current = [p.detach().float() for p in module.parameters()]
        torch._foreach_mul_(self.params, self.rate)
        torch._foreach_add_(self.params, current, alpha=1.0 - self.rate)

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with EMA values in place of its parameters (buffers copied as they are)."""
        ema = dict(zip(self.names, self.params))
        return {name: (ema[name] if name in ema else value).detach().cpu().contiguous()
                for name, value in module.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the shadow parameters from a state dict written by :meth:`state_dict` (exact resume)."""
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise KeyError(f"EMA weights lack {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                                   else ""))
        for name, param in zip(self.names, self.params):
            source = tensors[name]
            if source.shape != param.shape:
                raise KeyError(f"EMA weight {name!r} has shape {tuple(source.shape)}, expected {tuple(param.shape)}")
            param.copy_(source)
