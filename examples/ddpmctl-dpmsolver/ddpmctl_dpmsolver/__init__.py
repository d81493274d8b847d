"""DPM-Solver++(2M) for ddpmctl checkpoints (Lu et al. 2022, Algorithm 2), on the checkpoint's discrete abar table.

A complete third-party sampler plugin: it imports only ``ddpmctl``'s public names, torch and pydantic.
Notation: alpha_k = sqrt(abar_k), sigma_k = sqrt(1 - abar_k), lambda_k = log alpha_k - log sigma_k (half log-SNR),
x_hat = the network's data prediction (clipped like ddpmctl's other samplers).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from ddpmctl import Sampler, SampleRNG, SamplerError, StepInfo, space_timesteps

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl import LoadedCheckpoint

__version__ = "0.1.0"

DEFAULT_STEPS = 20
# Below this many steps the last ODE step is first order (the reference's lower_order_final).
LOWER_ORDER_FINAL_BELOW = 10


class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M): a second-order multistep solver of the probability-flow ODE in data prediction."""

    name = "dpmsolver"
    description = "DPM-Solver++(2M): deterministic multistep ODE solver, good samples in 10-20 steps (Lu et al. 2022)"

    class Options(Sampler.Options):
        spacing: Literal["even", "ddim"] = Field(
            "even", description="even: K evenly spaced steps (IDDPM); ddim: the stride range(0, T, i) of DDIM")
        clip_denoised: bool = Field(True, description="clamp the predicted x_0 to [-1, 1] at every step")

    def _timesteps(self, checkpoint: LoadedCheckpoint, steps: int | None) -> list[int]:
        if checkpoint.kind == "student":
            raise SamplerError(f"{checkpoint.path.name} is a distilled student: sample it with --sampler student")
        total = checkpoint.diffusion.num_timesteps
        k = min(DEFAULT_STEPS, total) if steps is None else steps
        if not 1 <= k <= total:
            raise SamplerError(f"--steps must be between 1 and the chain's {total} steps, not {k}")
        spec = f"ddim{k}" if self.options.spacing == "ddim" else str(k)
        try:
            use = space_timesteps(total, spec)
        except ValueError:
            raise SamplerError(f"spacing=ddim cannot give exactly {k} steps on a {total}-step chain; "
                               f"use spacing=even or another --steps") from None
        return sorted(use, reverse=True)

    def num_steps(self, checkpoint: LoadedCheckpoint, steps: int | None) -> int:
        return len(self._timesteps(checkpoint, steps))

    def sample(self, checkpoint: LoadedCheckpoint, x_T: torch.Tensor, *, steps: int | None, rng: SampleRNG,
               callback: Any = None, model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        ks = self._timesteps(checkpoint, steps)  # own indices of the diffusion, noisiest first
        diffusion, model = checkpoint.diffusion, checkpoint.model
        total = len(ks)
        abar = diffusion.alphas_cumprod  # float64
        alpha = [math.sqrt(float(abar[k])) for k in ks]
        sigma = [math.sqrt(1.0 - float(abar[k])) for k in ks]
        lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]

        x = x_T
        x_hat_prev: torch.Tensor | None = None
        h_prev = 0.0
        for i, k in enumerate(ks):
            t = torch.full((x.shape[0],), k, dtype=torch.int64, device=x.device)
            # 1. Data prediction at (x, k); p_mean_variance handles eps/x0/v heads, variance channels and the
            #    original-index mapping of respaced chains.
            with torch.no_grad():
                x_hat = diffusion.p_mean_variance(model, x, t, clip_denoised=self.options.clip_denoised,
                                                  model_kwargs=model_kwargs)["pred_xstart"]
            if i == total - 1:
                # 2. Last step: to sigma = 0 the first-order update is x_hat itself.
                x = x_hat
            else:
                h = lam[i + 1] - lam[i]
                last_ode_step = i == total - 2
                first_order = x_hat_prev is None or (last_ode_step and total < LOWER_ORDER_FINAL_BELOW)
                if first_order:
                    d = x_hat  # 3a. DDIM step (DPM-Solver++ order 1)
                else:
                    r = h_prev / h  # 3b. 2M: linear extrapolation of x_hat in lambda
                    d = x_hat + (x_hat - x_hat_prev) / (2.0 * r)
                # 4. x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D (exact for the linear part).
                x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
                h_prev = h
            x_hat_prev = x_hat
            if callback is not None:
                callback(StepInfo(index=i, total=total, t=int(diffusion.timestep_map[k]), x=x, pred_xstart=x_hat))
        return x
