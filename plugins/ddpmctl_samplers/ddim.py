"""`ddim`: DDIM on K steps of the chain, deterministic at eta = 0 (Song et al. 2021 eq. 12)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from ddpmctl import CLEAN, Denoiser, Sampler, SampleRNG, StepCallback, StepInfo, ddim_step


class DDIMSampler(Sampler):
    """x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z, for each step t -> s.

    eps_hat is re-derived from the clipped x0_hat; sigma = eta * sqrt((1 - abar_s)/(1 - abar_t)) *
    sqrt(1 - abar_t/abar_s); the learned-variance channels of the network are ignored; abar = 1 after the last step.
    The step is ``ddpmctl.ddim_step`` (coefficients in float64), the one distillation's students are trained on.
    """

    api_version = 2
    name = "ddim"
    description = "DDIM on K steps: deterministic at eta=0, stochastic for eta>0 (Song et al. 2021)"

    class Options(Sampler.Options):
        # eta > 1 would ask for more noise than the step has variance (1 - abar_s - sigma^2 < 0).
        eta: float = Field(0.0, ge=0.0, le=1.0, description="noise scale: 0 = deterministic DDIM, 1 = DDPM-like")
        spacing: Literal["even", "ddim", "logsnr"] = Field(
            "even", description="even: K evenly spaced steps (IDDPM); ddim: the stride range(0, T, i) of DDIM; "
                                "logsnr: uniform in log-SNR")
        clip_denoised: bool = Field(True, description="clamp the predicted x_0 to [-1, 1] at every step")

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: Sequence[int], *, noise: SampleRNG,
               callback: StepCallback | None = None) -> torch.Tensor:
        eta = getattr(self.options, "eta", 0.0)
        x = x_T
        for i, t in enumerate(timesteps):
            s = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
            z = noise.randn_like(x)  # drawn at every step (even at eta = 0) so each image's stream stays aligned
            pred = denoiser.predict(x, t, clip=self.options.clip_denoised)
            abar_t, abar_s = (torch.tensor(denoiser.alpha_bar(k), dtype=torch.float64) for k in (t, s))
            x = ddim_step(pred.pred_xstart, pred.eps, abar_t, abar_s, eta=eta,
                          noise=z if s != CLEAN and eta > 0 else None)
            if callback is not None:
                callback(StepInfo(index=i, total=len(timesteps), t=t, x=x, pred_xstart=pred.pred_xstart))
        return x
