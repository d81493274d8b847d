"""`student`: the N deterministic DDIM steps a progressively distilled student was trained for (Salimans & Ho 2022).

Notation (PAPERS.md "Progressive distillation"): the student's grid is its ascending original indices
k_1 < ... < k_N (k_N = T - 1, SNR ~ 0); alpha = sqrt(abar_k), sigma = sqrt(1 - abar_k) from the training chain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from ddpmctl import Sampler, SampleRNG, SamplerError, StepInfo, student_predict_xstart

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl import LoadedCheckpoint, StudentConfig


class StudentSampler(Sampler):
    """z_{k_{i-1}} = alpha_{i-1} x_hat + sigma_{i-1} (z - alpha_i x_hat) / sigma_i, i = N..1; the last step
    returns x_hat (the student's v / x / both head turned into x_hat, clipped)."""

    name = "student"
    description = "the few deterministic steps of a distilled student (ddpmctl distill); --steps N or omitted"
    checkpoint_kinds = ("student",)

    class Options(Sampler.Options):
        clip_denoised: bool = Field(True, description="clamp the predicted x_0 to [-1, 1] at every step")

    @staticmethod
    def _student(checkpoint: LoadedCheckpoint) -> StudentConfig:
        student = checkpoint.config.student
        if checkpoint.kind != "student" or student is None:
            raise SamplerError(f"{checkpoint.path.name} is a {checkpoint.kind} checkpoint, not a distilled student "
                               "(make one with `ddpmctl distill`): use --sampler ddim, strided or ancestral")
        if checkpoint.config.diffusion.use_timesteps is not None:
            raise SamplerError(f"{checkpoint.path.name}: a student's diffusion must be its full training chain")
        return student

    def num_steps(self, checkpoint: LoadedCheckpoint, steps: int | None) -> int:
        n = len(self._student(checkpoint).steps)
        if steps is not None and steps != n:
            raise SamplerError(f"{checkpoint.path.name} is a {n}-step student: omit --steps or pass --steps {n}")
        return n

    def sample(self, checkpoint: LoadedCheckpoint, x_T: torch.Tensor, *, steps: int | None, rng: SampleRNG,
               callback: Any = None, model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        student = self._student(checkpoint)
        self.num_steps(checkpoint, steps)
        grid = list(student.steps)
        abar = checkpoint.diffusion.alphas_cumprod.double().cpu()
        shape = (-1,) + (1,) * (x_T.dim() - 1)

        def alpha_sigma(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            # k = -1 is clean data (abar 1); computed in float64, then the sample's dtype.
            a = abar[k] if k >= 0 else torch.ones((), dtype=torch.float64)
            return (a.sqrt().to(x_T.device, x_T.dtype).expand(x_T.shape[0]).view(shape),
                    (1 - a).sqrt().to(x_T.device, x_T.dtype).expand(x_T.shape[0]).view(shape))

        total = len(grid)
        x = x_T
        for index, j in enumerate(range(total - 1, -1, -1)):
            k, k_next = grid[j], grid[j - 1] if j > 0 else -1
            t = torch.full((x.shape[0],), k, dtype=torch.int64, device=x.device)
            with torch.no_grad():
                output = checkpoint.model(x, t, **(model_kwargs or {}))
            alpha, sigma = alpha_sigma(k)
            pred_xstart = student_predict_xstart(output.to(x.dtype), x, alpha, sigma, student.param)
            if self.options.clip_denoised:
                pred_xstart = pred_xstart.clamp(-1.0, 1.0)
            if k_next < 0:
                x = pred_xstart
            else:
                # DDIM (eta = 0) with eps re-derived from the (clipped) x_hat: the step the student was trained on.
                alpha_next, sigma_next = alpha_sigma(k_next)
                x = alpha_next * pred_xstart + sigma_next * (x - alpha * pred_xstart) / sigma
            if callback is not None:
                callback(StepInfo(index=index, total=total, t=k, x=x, pred_xstart=pred_xstart))
        return x
