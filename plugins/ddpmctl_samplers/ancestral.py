"""`ancestral`: the checkpoint's own chain, one p_sample per step with its learned or fixed variance (DDPM Alg. 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from ddpmctl import Sampler, SampleRNG, SamplerError, StepInfo, build_diffusion

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl import GaussianDiffusion, LoadedCheckpoint


def refuse_student(checkpoint: LoadedCheckpoint) -> None:
    """A distilled student predicts on its own few-step grid: the teacher's samplers would misuse it."""
    if checkpoint.kind == "student":
        raise SamplerError(f"{checkpoint.path.name} is a distilled student: sample it with --sampler student")


def respaced_chain(checkpoint: LoadedCheckpoint, use: set[int]) -> GaussianDiffusion:
    """The checkpoint's chain restricted to ``use`` (indices into its own steps), built once per sampling call.

    Built from the original abar table through the checkpoint's DiffusionConfig with the ORIGINAL indices, exactly
    as loading a ``ddpmctl respace`` checkpoint builds it: so strided K == ancestral on the respaced file, bit for
    bit, and respacing an already-respaced chain composes.
    """
    diffusion = checkpoint.diffusion
    if len(use) == diffusion.num_timesteps:
        return diffusion
    original = tuple(sorted(int(diffusion.timestep_map[k]) for k in use))
    return build_diffusion(checkpoint.config.diffusion.model_copy(update={"use_timesteps": original}))


def run_chain(step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
              diffusion: GaussianDiffusion, x_T: torch.Tensor, *, rng: SampleRNG,
              callback: Any = None) -> torch.Tensor:
    """Walk ``diffusion``'s own steps k = K-1 .. 0: x = step(x, t, noise)["sample"], reporting each to ``callback``.

    ``step`` is one reverse update (p_sample, ddim_sample) of ``diffusion`` with its options bound.
    """
    total = diffusion.num_timesteps
    x = x_T
    for index, k in enumerate(range(total - 1, -1, -1)):
        t = torch.full((x.shape[0],), k, dtype=torch.int64, device=x.device)
        # Convention 15: draw at every step (p_sample masks it at k = 0; DDIM draws even at eta = 0) so each
        # image's stream stays aligned.
        noise = rng.randn_like(x)
        with torch.no_grad():
            out = step(x, t, noise)
        x = out["sample"]
        if callback is not None:
            callback(StepInfo(index=index, total=total, t=int(diffusion.timestep_map[k]), x=x,
                              pred_xstart=out["pred_xstart"]))
    return x


def ancestral_loop(diffusion: GaussianDiffusion, model: torch.nn.Module, x_T: torch.Tensor, *, rng: SampleRNG,
                   clip_denoised: bool, callback: Any = None,
                   model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """x_{k-1} ~ p(x_{k-1} | x_k) for k = K-1 .. 0 of ``diffusion``'s own steps (IDDPM eq. 1-2, 15)."""
    def step(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        return diffusion.p_sample(model, x, t, clip_denoised=clip_denoised, noise=noise, model_kwargs=model_kwargs)

    return run_chain(step, diffusion, x_T, rng=rng, callback=callback)


class AncestralSampler(Sampler):
    """Ancestral sampling over every step of the checkpoint's chain (all T, or a respaced checkpoint's K)."""

    name = "ancestral"
    description = "DDPM ancestral sampling over the checkpoint's whole chain (learned or fixed variance)"

    class Options(Sampler.Options):
        clip_denoised: bool = Field(True, description="clamp the predicted x_0 to [-1, 1] at every step")

    def num_steps(self, checkpoint: LoadedCheckpoint, steps: int | None) -> int:
        refuse_student(checkpoint)
        total = checkpoint.diffusion.num_timesteps
        if steps is not None and steps != total:
            raise SamplerError(
                f"ancestral walks the checkpoint's whole chain of {total} steps, not {steps}: use --sampler strided "
                f"or ddim for fewer steps, or `ddpmctl respace --steps {steps}` first")
        return total

    def sample(self, checkpoint: LoadedCheckpoint, x_T: torch.Tensor, *, steps: int | None, rng: SampleRNG,
               callback: Any = None, model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        self.num_steps(checkpoint, steps)
        return ancestral_loop(checkpoint.diffusion, checkpoint.model, x_T, rng=rng,
                              clip_denoised=self.options.clip_denoised, callback=callback,
                              model_kwargs=model_kwargs)
