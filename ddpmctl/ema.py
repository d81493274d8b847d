"""Exponential moving average of the network's parameters, with a warm-up so it never keeps the random init.

``warmup="power"`` (the default): the decay of the t-th update (t = 0, 1, ... counts earlier updates) is

    decay_t = min(rate, 1 - (1 + t) ** -POWER),     POWER = 2/3,

the warm-up of k-diffusion's ``EMAWarmup`` and diffusers' ``EMAModel`` (inv_gamma = 1). The first update has decay
0, so the average starts at the first trained weights, not at the initialisation; its window (1 / (1 - decay), about
t^(2/3) steps) grows with the run, so a short run gets a short average and a long one reaches ``rate``
(0.9999 after 10^6 updates). Measured on builtin:digits: see the README section "EMA".

``warmup="none"``: improved-diffusion's ``update_ema`` exactly (the average starts at the initial weights and every
update uses ``rate``): after n updates a share rate^n of the random initialisation is still in the average.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

EmaWarmup = Literal["power", "none"]
EMA_WARMUPS: tuple[str, ...] = ("power", "none")
# k-diffusion / diffusers' exponent for runs of a million steps or more (3/4 for shorter ones); on builtin:digits
# after 2,000 steps both measured the same (4.387 and 4.388 bits/dim, README "EMA").
POWER = 2.0 / 3.0


def ema_decay(rate: float, warmup: str, updates: int) -> float:
    """The decay of the update that follows ``updates`` earlier ones."""
    if warmup == "none":
        return rate
    if warmup == "power":
        return min(rate, 1.0 - (1.0 + updates) ** -POWER)
    raise ValueError(f"EMA warm-up must be one of {', '.join(EMA_WARMUPS)}, not {warmup!r}")


def reached_decay(rate: float, warmup: str, updates: int) -> float:
    """The decay of the last of ``updates`` updates: the average's current weight on its past (its window is about
    1 / (1 - decay) updates). Without a warm-up that is ``rate`` itself; with one it is below ``rate`` until
    1 - (1 + t)^-POWER reaches it (0.9999 after 10^6 updates): 0.9937 after 2,000."""
    return ema_decay(rate, warmup, max(updates - 1, 0))


def decay_summary(rate: float, warmup: str, updates: int, final_updates: int | None = None) -> str:
    """The EMA decay a run has reached and will reach by ``final_updates`` (the progress header): the cap ``rate``
    alone would overstate a warm-up's average by orders of magnitude on a short run."""
    if warmup == "none":
        return f"EMA decay {rate:g} (no warm-up)"
    reached = [f"{reached_decay(rate, warmup, updates):.6g} after {updates:,} updates"] if updates > 0 else []
    if final_updates is not None and final_updates > updates:
        reached.append(f"{reached_decay(rate, warmup, final_updates):.6g} by update {final_updates:,}")
    return f"EMA decay {', '.join(reached) or 'warming up'} (cap {rate:g})"


class EMA:
    """fp32 shadow copies of a module's parameters: ema <- decay * ema + (1 - decay) * param after every step."""

    def __init__(self, module: nn.Module, rate: float, warmup: str = "power") -> None:
        ema_decay(rate, warmup, 0)  # refuses an unknown warm-up here rather than at the first step
        self.rate = float(rate)
        self.warmup = warmup
        self.updates = 0  # updates so far (the training step minus skipped steps); saved with the run state
        self.names = [name for name, _ in module.named_parameters()]
        # The reference starts the average at the initial weights (copy of the master params), no bias correction;
        # with a warm-up the first update overwrites this copy (decay 0).
        self.params = [p.detach().clone().float() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step, written as the reference does (mul by decay, add (1 - decay) * param)."""
        decay = ema_decay(self.rate, self.warmup, self.updates)
        current = [p.detach().float() for p in module.parameters()]
        torch._foreach_mul_(self.params, decay)
        torch._foreach_add_(self.params, current, alpha=1.0 - decay)
        self.updates += 1

    def describe(self) -> str:
        """What a checkpoint's lineage records: e.g. 'rate 0.9999, warm-up power 2/3' or 'rate 0.999, no warm-up'."""
        if self.warmup == "none":
            return f"rate {self.rate}, no warm-up (improved-diffusion)"
        return f"rate {self.rate}, warm-up 1-(1+t)^-2/3"

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with EMA values in place of its parameters (buffers copied as they are)."""
        ema = dict(zip(self.names, self.params))
        return {name: (ema[name] if name in ema else value).detach().cpu().contiguous()
                for name, value in module.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the shadow parameters from a state dict written by :meth:`state_dict` (exact resume; the caller
        restores :attr:`updates`)."""
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise KeyError(f"EMA weights lack {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                                   else ""))
        for name, param in zip(self.names, self.params):
            source = tensors[name]
            if source.shape != param.shape:
                raise KeyError(f"EMA weight {name!r} has shape {tuple(source.shape)}, expected {tuple(param.shape)}")
            param.copy_(source)
