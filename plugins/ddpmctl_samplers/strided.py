"""`strided`: ancestral sampling on K evenly spaced steps of the chain (IDDPM Sec. 4, the reference's respacing)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ddpmctl import Sampler, SampleRNG, SamplerError, space_timesteps

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl import LoadedCheckpoint

from .ancestral import AncestralSampler, ancestral_loop, refuse_student, respaced_chain

DEFAULT_STEPS = 50


class StridedSampler(Sampler):
    """Respace the checkpoint's chain onto K evenly spaced steps, then sample it ancestrally.

    The learned variances are rescaled automatically: the respaced diffusion interpolates the network's v between
    its own (new) beta and beta_tilde. Strided K on a checkpoint equals ``ancestral`` on its ``respace --steps K``
    checkpoint, bit for bit.
    """

    name = "strided"
    description = "ancestral sampling on K evenly spaced steps, learned variances rescaled (IDDPM Sec. 4)"

    Options = AncestralSampler.Options  # the same chain walk, so the same options

    def num_steps(self, checkpoint: LoadedCheckpoint, steps: int | None) -> int:
        refuse_student(checkpoint)
        total = checkpoint.diffusion.num_timesteps
        if steps is None:
            return min(DEFAULT_STEPS, total)
        if not 1 <= steps <= total:
            raise SamplerError(f"--steps must be between 1 and the chain's {total} steps, not {steps}")
        return steps

    def sample(self, checkpoint: LoadedCheckpoint, x_T: torch.Tensor, *, steps: int | None, rng: SampleRNG,
               callback: Any = None, model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        k = self.num_steps(checkpoint, steps)
        spaced = respaced_chain(checkpoint, space_timesteps(checkpoint.diffusion.num_timesteps, str(k)))
        return ancestral_loop(spaced, checkpoint.model, x_T, rng=rng, clip_denoised=self.options.clip_denoised,
                              callback=callback, model_kwargs=model_kwargs)
