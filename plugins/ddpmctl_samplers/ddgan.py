"""`ddgan`: the T generator steps of a denoising diffusion GAN (Xiao, Kreis and Vahdat 2022, Alg. 2).

At each step t -> t-1 (noisiest first) the generator predicts x_0' = G(x_t, z, t) from a fresh latent z, and
x_{t-1} is drawn from the posterior q(x_{t-1} | x_t, x_0') the denoiser computes on the checkpoint's chain. The
last step returns the posterior mean, which at t = 0 is x_0' itself (the official ``sample_from_model`` adds no
noise there). z and the step noise come from the image's own stream, so image i depends only on (seed, i).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ddpmctl import Denoiser, Sampler, SampleRNG, StepCallback, StepInfo


class DDGANSampler(Sampler):
    """x_{t-1} ~ q(x_{t-1} | x_t, G(x_t, z, t)), z ~ N(0, I) drawn anew at every step (DDGAN eq. 4)."""

    api_version = 2
    name = "ddgan"
    description = "the T generator steps of a denoising diffusion GAN (ddpmctl train --method ddgan)"
    checkpoint_kinds = ("ddgan",)
    default_steps = None
    whole_chain = True

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: Sequence[int], *, noise: SampleRNG,
               callback: StepCallback | None = None) -> torch.Tensor:
        if denoiser.latent_dim is None:
            raise ValueError("the ddgan sampler needs a generator with a latent input (a ddgan checkpoint)")
        x = x_T
        for i, t in enumerate(timesteps):
            # z first, then the step's noise: both drawn at every step (the last too), so the streams stay aligned.
            z = noise.randn((denoiser.latent_dim,)).to(x.dtype)
            step_noise = noise.randn_like(x)
            pred = denoiser.predict(x, t, latent=z)
            assert pred.mean is not None and pred.variance is not None
            last = i == len(timesteps) - 1
            x = pred.mean if last else pred.mean + pred.variance.sqrt() * step_noise
            if callback is not None:
                callback(StepInfo(index=i, total=len(timesteps), t=t, x=x, pred_xstart=pred.pred_xstart))
        return x
