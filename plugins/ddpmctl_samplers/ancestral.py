"""`ancestral`: the checkpoint's own chain, one p_sample per step with its learned or fixed variance (DDPM Alg. 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ddpmctl import Denoiser, Sampler, SampleRNG, StepCallback, StepInfo

from . import ClipOptions


class AncestralSampler(Sampler):
    """x_s ~ p(x_s | x_t) = N(mean, variance) for each step t -> s of the timesteps (IDDPM eq. 1-2, 15).

    The denoiser rescales learned variances to the run's own step sizes (IDDPM Sec. 4), so the same loop samples
    the whole chain (``ancestral``) or K strided steps of it (``strided``).
    """

    api_version = 2
    name = "ancestral"
    description = "DDPM ancestral sampling over the checkpoint's whole chain (learned or fixed variance)"
    default_steps = None
    whole_chain = True

    Options = ClipOptions

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: Sequence[int], *, noise: SampleRNG,
               callback: StepCallback | None = None) -> torch.Tensor:
        x = x_T
        for i, t in enumerate(timesteps):
            z = noise.randn_like(x)  # drawn at every step, the last too, so each image's stream stays aligned
            pred = denoiser.predict(x, t, clip=self.options.clip_denoised)
            assert pred.mean is not None and pred.log_variance is not None
            last = i == len(timesteps) - 1
            x = pred.mean if last else pred.mean + torch.exp(0.5 * pred.log_variance) * z  # no noise onto x_0
            if callback is not None:
                callback(StepInfo(index=i, total=len(timesteps), t=t, x=x, pred_xstart=pred.pred_xstart))
        return x
