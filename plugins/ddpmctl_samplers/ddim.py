"""`ddim`: DDIM on K steps of the chain, deterministic at eta = 0 (Song et al. 2021 eq. 12; PAPERS.md DDIM)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from ddpmctl import Sampler, SampleRNG, SamplerError, space_timesteps

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl import LoadedCheckpoint

from .ancestral import refuse_student, respaced_chain, run_chain

DEFAULT_STEPS = 50


def ddim_step_counts(total: int) -> list[int]:
    """Every K that the reference's "ddimK" stride rule (range(0, total, i)) can give on a chain of ``total``."""
    return sorted({len(range(0, total, stride)) for stride in range(1, total + 1)})


def ddim_spacing(total: int, k: int) -> set[int]:
    """The "ddimK" subsequence (convention 13), or a SamplerError naming the nearest K that work."""
    try:
        return space_timesteps(total, f"ddim{k}")
    except ValueError:
        counts = ddim_step_counts(total)
        below = [c for c in counts if c < k][-2:]
        above = [c for c in counts if c > k][:2]
        nearby = ", ".join(str(c) for c in below + above)
        raise SamplerError(f"spacing=ddim cannot give exactly {k} steps on a {total}-step chain "
                           f"(possible nearby: {nearby}); pick one of those or use spacing=even") from None


class DDIMSampler(Sampler):
    """DDIM on K steps: x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z.

    eps_hat is re-derived from the clipped x0_hat; sigma = eta * sqrt((1 - abar_prev)/(1 - abar)) *
    sqrt(1 - abar/abar_prev); the learned-variance channels of the network are ignored.
    """

    name = "ddim"
    description = "DDIM on K steps: deterministic at eta=0, stochastic for eta>0 (Song et al. 2021)"

    class Options(Sampler.Options):
        eta: float = Field(0.0, ge=0.0, description="noise scale: 0 = deterministic DDIM, 1 = DDPM-like")
        spacing: Literal["even", "ddim"] = Field(
            "even", description="even: K evenly spaced steps (IDDPM); ddim: the stride range(0, T, i) of DDIM")
        clip_denoised: bool = Field(True, description="clamp the predicted x_0 to [-1, 1] at every step")

    def _timesteps(self, checkpoint: LoadedCheckpoint, steps: int | None) -> set[int]:
        refuse_student(checkpoint)
        total = checkpoint.diffusion.num_timesteps
        k = min(DEFAULT_STEPS, total) if steps is None else steps
        if not 1 <= k <= total:
            raise SamplerError(f"--steps must be between 1 and the chain's {total} steps, not {k}")
        if self.options.spacing == "ddim":
            return ddim_spacing(total, k)
        return space_timesteps(total, str(k))

    def num_steps(self, checkpoint: LoadedCheckpoint, steps: int | None) -> int:
        return len(self._timesteps(checkpoint, steps))

    def sample(self, checkpoint: LoadedCheckpoint, x_T: torch.Tensor, *, steps: int | None, rng: SampleRNG,
               callback: Any = None, model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        use = self._timesteps(checkpoint, steps)
        # Built once per call: abar and abar_prev of the subsequence (abar_prev = 1 before its first step).
        spaced = respaced_chain(checkpoint, use)

        def step(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
            return spaced.ddim_sample(checkpoint.model, x, t, eta=self.options.eta,
                                      clip_denoised=self.options.clip_denoised, noise=noise, model_kwargs=model_kwargs)

        return run_chain(step, spaced, x_T, rng=rng, callback=callback)
