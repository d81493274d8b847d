"""`student`: the N deterministic DDIM steps a progressively distilled student was trained for (Salimans & Ho 2022).

The driver hands it the student's grid (original indices, noisiest first, the top one at SNR ~ 0); the denoiser
turns the student's v / x / both head into x_hat and re-derives eps from it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ddpmctl import CLEAN, Denoiser, Sampler, SampleRNG, StepCallback, StepInfo

from . import ClipOptions


class StudentSampler(Sampler):
    """z_s = alpha_s x_hat + sigma_s eps_hat for each grid step t -> s; the last step returns x_hat (clipped)."""

    api_version = 2
    name = "student"
    description = "the few deterministic steps of a distilled student (ddpmctl distill); --steps N or omitted"
    checkpoint_kinds = ("student",)
    default_steps = None

    Options = ClipOptions

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: Sequence[int], *, noise: SampleRNG,
               callback: StepCallback | None = None) -> torch.Tensor:
        x = x_T
        for i, t in enumerate(timesteps):
            s = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
            pred = denoiser.predict(x, t, clip=self.options.clip_denoised)
            if s == CLEAN:
                x = pred.x0
            else:  # DDIM (eta = 0) with eps = (z - alpha x_hat) / sigma: the step the student was trained on
                alpha, sigma = denoiser.alpha_sigma(t, x)
                alpha_s, sigma_s = denoiser.alpha_sigma(s, x)
                x = alpha_s * pred.x0 + sigma_s * (x - alpha * pred.x0) / sigma
            if callback is not None:
                callback(StepInfo(index=i, total=len(timesteps), t=t, x=x, pred_xstart=pred.x0))
        return x
