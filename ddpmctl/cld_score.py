"""A CLD score network as a sampler sees it: :class:`CldScore`, the ``denoiser`` the sampler driver hands to the
samplers of kind ``cld`` checkpoints (``sscs``, ``em``, ``cld-ode``) in place of a :class:`~ddpmctl.denoiser.Denoiser`.

It holds the process (:class:`~ddpmctl.cld.CldProcess`, from the checkpoint's ``cld`` section) and the network
(wrapped for inference by the driver: precision, micro-batches), and answers one question: the mixed score
s(x, v, t) ~ grad_v log p_t(x, v) at SDE time t (docs/cld.md "Training", "Sampling"). A CLD model is continuous in
time, so there is no chain and no timestep index here: samplers choose their own times (``ddpmctl.cld.reverse_times``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ddpmctl.cld import CldProcess
from ddpmctl.cld_method import network_time

__all__ = ["CldScore"]


class CldScore:
    """``score(x, v, t)``: the mixed score of a CLD network (``network(cat(x, v), t * 1000)`` [N, C, H, W] through
    ``CldProcess.mixed_score``) at one SDE time t in (0, 1] for the whole batch, in x's dtype."""

    def __init__(self, network: Callable[..., torch.Tensor], process: CldProcess, *,
                 model_kwargs: dict[str, Any] | None = None) -> None:
        self.network = network
        self.process = process
        self.model_kwargs = dict(model_kwargs or {})

    def conditioned(self, **model_kwargs: Any) -> CldScore:
        """The same score passing ``model_kwargs`` to every network call (the driver's interface; CLD models are
        unconditional, so it only ever receives none)."""
        other = copy.copy(self)
        other.model_kwargs = dict(model_kwargs)
        return other

    def score(self, x: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
        """The mixed score at (x, v) and SDE time ``t`` (one network call)."""
        if not 0.0 < t <= 1.0:
            raise ValueError(f"score: the SDE time must lie in (0, 1], not {t}")
        t_batch = torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)
        output = self.network(torch.cat([x, v], dim=1), network_time(t_batch), **self.model_kwargs)
        return self.process.mixed_score(output.to(v.dtype), v, t_batch)
