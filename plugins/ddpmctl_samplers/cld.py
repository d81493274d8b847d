"""The samplers of critically-damped Langevin diffusions (kind ``cld``; Dockhorn, Vahdat and Kreis 2022):

- ``sscs``: symmetric splitting (App. D): an exact half-step of the reverse SDE's linear part (the
  Ornstein-Uhlenbeck and Hamiltonian flow, ``CldProcess.linear_reverse_step``), a full Euler step of the score part
  v += 2 Gamma beta (s + M^-1 v) h, another exact half-step; one network call per step;
- ``em``: Euler-Maruyama on the reverse SDE, the baseline the paper beats; one network call per step;
- ``cld-ode``: the probability-flow ODE by Heun's method (deterministic); two network calls per step.

Each walks K = --steps steps from t = 1 down to t = ``eps`` (``ddpmctl.cld.reverse_times``: even or quadratic
striding), then takes the official final denoising step: the reverse SDE's Euler step at t = eps of length eps,
keeping its mean. Its x part, x - M^-1 beta v eps, does not involve the score (the score enters only v, which is
discarded), so it costs no network call here: K steps are K network calls (2K for ``cld-ode``), where the official
code spends one call on the step's v. The prior is x ~ N(0, I) (the driver's x_T) and v ~ N(0, M I) from the
image's own noise stream, so image i depends only on (seed, i). The output is x (docs/cld.md "Sampling").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from ddpmctl import CldProcess, CldScore, Sampler, SampleRNG, StepCallback, StepInfo, cld_reverse_times


def _beta(process: CldProcess, t: float) -> float:
    return float(process.beta_at(torch.tensor(t, dtype=torch.float64)))


class CldOptions(Sampler.Options):
    """What every CLD sampler has: where its steps go, where it stops, and the final denoising step."""

    striding: Literal["even", "quadratic"] = Field(
        "even", description="even: equal steps in t; quadratic: steps shrinking towards the data (official striding)")
    eps: float = Field(1e-3, gt=0.0, lt=0.5, description="the SDE time where the steps stop (official sampling_eps)")
    denoise: bool = Field(True, description="end with the official denoising step x -= M^-1 beta v eps")


class _CldSampler(Sampler):
    """The loop the three share: the prior, K steps on the striding's grid, the denoising step; x is returned."""

    api_version = 2
    checkpoint_kinds = ("cld",)
    default_steps = 50
    Options = CldOptions

    def step(self, score: CldScore, x: torch.Tensor, v: torch.Tensor, t: float, s: float,
             noise: SampleRNG) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from SDE time t down to s < t."""
        raise NotImplementedError

    def sample(self, denoiser: CldScore, x_T: torch.Tensor, timesteps: Sequence[int], *,  # type: ignore[override]
               noise: SampleRNG, callback: StepCallback | None = None) -> torch.Tensor:
        if not isinstance(denoiser, CldScore):
            raise ValueError(f"the {self.name} sampler needs the score of a CLD checkpoint (kind cld)")
        options: CldOptions = self.options  # type: ignore[assignment]
        process = denoiser.process
        times = cld_reverse_times(len(timesteps), options.eps, options.striding)
        x = x_T
        v = noise.randn_like(x_T) * math.sqrt(process.mass)  # the prior's velocities N(0, M I)
        for i, step in enumerate(timesteps):
            x, v = self.step(denoiser, x, v, times[i], times[i + 1], noise)
            if callback is not None:
                callback(StepInfo(index=i, total=len(timesteps), t=step, x=x, pred_xstart=None))
        if options.denoise:
            # The official denoising step's mean, x part: an Euler step of length eps of dx = -M^-1 beta v dt.
            x = x - (_beta(process, options.eps) * options.eps / process.mass) * v
        return x


def _quadratic() -> Any:
    return Field("quadratic", description="even: equal steps in t; quadratic: steps shrinking towards the data "
                                          "(official striding; on Gaussian data the more accurate for sscs and em)")


class EMOptions(CldOptions):
    striding: Literal["even", "quadratic"] = _quadratic()


class SSCSOptions(CldOptions):
    striding: Literal["even", "quadratic"] = _quadratic()
    score_time: Literal["start", "mid"] = Field(
        "start", description="where the score step reads the score: start = the step's start time, as the official "
                             "code does (the more accurate on Gaussian data, docs/cld.md); mid = the step's midpoint, "
                             "the time of the state after the first half-step")


class SSCSSampler(_CldSampler):
    """Symmetric splitting CLD sampler (paper App. D): exact half-step, score step, exact half-step."""

    name = "sscs"
    description = "symmetric splitting CLD sampler, one network call per step (Dockhorn et al. 2022)"
    Options = SSCSOptions

    def step(self, score: CldScore, x: torch.Tensor, v: torch.Tensor, t: float, s: float,
             noise: SampleRNG) -> tuple[torch.Tensor, torch.Tensor]:
        process = score.process
        mid = 0.5 * (t + s)
        x, v = process.linear_reverse_step(x, v, t, mid, noise.randn_like(x), noise.randn_like(v))
        at = mid if self.options.score_time == "mid" else t  # type: ignore[attr-defined]
        rate = float(process.diffusion_squared(torch.tensor(_beta(process, at)))) * (t - s)
        v = v + rate * (score.score(x, v, at) + v / process.mass)
        return process.linear_reverse_step(x, v, mid, s, noise.randn_like(x), noise.randn_like(v))


class EulerMaruyamaSampler(_CldSampler):
    """Euler-Maruyama on the reverse SDE: dx = -M^-1 beta v dt, dv = ((x + Gamma M^-1 v) beta + 2 Gamma beta s) dt
    + sqrt(2 Gamma beta) dW, in reverse time."""

    name = "em"
    description = "Euler-Maruyama on the CLD reverse SDE, one network call per step (the paper's baseline)"
    Options = EMOptions

    def step(self, score: CldScore, x: torch.Tensor, v: torch.Tensor, t: float, s: float,
             noise: SampleRNG) -> tuple[torch.Tensor, torch.Tensor]:
        process, h = score.process, t - s
        beta = torch.tensor(_beta(process, t), dtype=torch.float64)
        g2 = float(process.diffusion_squared(beta))
        z = noise.randn_like(v)
        drift_x, drift_v = process.drift(x, v, float(beta))
        new_v = v + (g2 * h) * score.score(x, v, t) - h * drift_v + math.sqrt(g2 * h) * z
        return x - h * drift_x, new_v


class CldODESampler(_CldSampler):
    """The probability-flow ODE du/dt = f(u) - (1/2) G G^T grad log p_t, integrated from t = 1 to eps by Heun's
    method (second order, deterministic): two network calls per step."""

    name = "cld-ode"
    description = "CLD probability-flow ODE by Heun's method: deterministic, two network calls per step"
    default_steps = 25

    @staticmethod
    def velocity(score: CldScore, x: torch.Tensor, v: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(dx/dt, dv/dt) of the probability-flow ODE at time t."""
        process = score.process
        return process.probability_flow(x, v, _beta(process, t), score.score(x, v, t))

    def step(self, score: CldScore, x: torch.Tensor, v: torch.Tensor, t: float, s: float,
             noise: SampleRNG) -> tuple[torch.Tensor, torch.Tensor]:
        h = s - t  # negative: the ODE runs backwards in time
        k1x, k1v = self.velocity(score, x, v, t)
        k2x, k2v = self.velocity(score, x + h * k1x, v + h * k1v, s)
        return x + (0.5 * h) * (k1x + k2x), v + (0.5 * h) * (k1v + k2v)
