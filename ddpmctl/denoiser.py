"""The network as a sampler sees it (sampler API v2): ``Denoiser.predict(x, t)`` -> x_0, eps and the variance.

Index spaces. Four kinds of "timestep" exist in ddpmctl; this is the one place that names them all:

- ``t`` (type :data:`OriginalStep`): an ORIGINAL training-chain index 0..T-1, 0 the least noisy. Timestep lists
  handed to samplers, :meth:`Denoiser.predict`, :attr:`Denoiser.alphas_cumprod` (indexed by it),
  ``StepInfo.t``, a respaced checkpoint's ``use_timesteps`` and a student's grid all use it; the network is called
  with it.
- :data:`CLEAN` = -1: the point "clean data" (abar = 1, alpha = 1, sigma = 0) on a timestep grid: where a
  sampler's last step lands, and the step below the lowest point of a distillation grid (``ddpmctl.distill``).
- ``k``: an index into a (possibly respaced) :class:`~ddpmctl.diffusion.GaussianDiffusion`'s own steps 0..K-1;
  ``diffusion.timestep_map[k]`` is its ``t``. Only the diffusion (and this module, inside) use it; samplers never do.
- the U-Net's time input ``t * 1000 / T``: the network's own business (``ddpmctl.unet``), never seen outside it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from ddpmctl.build import build_diffusion
from ddpmctl.diffusion import alpha_sigma

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl.config import DiffusionConfig

__all__ = ["CLEAN", "OriginalStep", "Prediction", "Denoiser", "Head", "student_predict_xstart"]

OriginalStep = int  # an original training-chain index 0..T-1, or CLEAN
CLEAN: OriginalStep = -1

# What the network's first output channels mean: a trained model's mean_type (eps / x0 / v) or a distilled
# student's head (v / x / both).
Head = Literal["eps", "x0", "v", "x", "both"]
_STUDENT_HEADS = ("v", "x", "both")


def student_predict_xstart(model_output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                           param: str) -> torch.Tensor:
    """x_hat of a distilled student's output (Salimans & Ho Sec. 4): "v", "x" or "both" ([eps-head | x-head]).

    v: x_hat = alpha z - sigma v; x: the first C channels are x_hat; both: x_hat = sigma^2 x_head +
    alpha (z - sigma eps_head), which needs 2C output channels. Not clipped.
    """
    channels = z.shape[1]
    if param == "v":
        return alpha * z - sigma * model_output[:, :channels]
    if param == "x":
        return model_output[:, :channels]
    if param == "both":
        if model_output.shape[1] < 2 * channels:
            raise ValueError(f"param 'both' needs {2 * channels} output channels, got {model_output.shape[1]}")
        eps_head, x_head = model_output[:, :channels], model_output[:, channels:2 * channels]
        return sigma**2 * x_head + alpha * (z - sigma * eps_head)
    raise ValueError(f"unknown student parameterization {param!r} (v, x or both)")


@dataclass(frozen=True)
class Prediction:
    """What the network says about x_t at one step (tensors shaped like x).

    ``pred_xstart`` is the predicted clean image (clipped to [-1, 1] when asked; ``x0`` is an alias kept for
    plugins written against earlier versions), ``eps`` the noise it implies. For a trained model
    ``mean``/``variance``/``log_variance`` describe p(x_s | x_t) for s = the next lower step of the run's
    timestep list (IDDPM eq. 10-15, learned variances interpolated on that step: Sec. 4); a student has none.
    """

    pred_xstart: torch.Tensor
    eps: torch.Tensor
    mean: torch.Tensor | None = None
    variance: torch.Tensor | None = None
    log_variance: torch.Tensor | None = None

    @property
    def x0(self) -> torch.Tensor:
        """``pred_xstart`` under its earlier name (plugins of sampler API v2 written before 0.2 read ``pred.x0``)."""
        return self.pred_xstart


class Denoiser:
    """The network call plus the full chain's alphas-bar, for one sampling run over ``timesteps``.

    ``network(x, t, **model_kwargs)`` takes original indices (micro-batching and precision are its business:
    ``ddpmctl.inference``). ``diffusion`` describes the training chain (its ``use_timesteps`` is ignored);
    ``timesteps`` are the run's original steps, so learned variances can be rescaled to the run's own step
    sizes. ``student_head`` ("v", "x" or "both") marks a distilled student; a trained model's head is the
    diffusion's mean_type (eps, x0 or v). ``latent_dim`` marks a DDGAN generator: every :meth:`predict` then takes
    its latent z [N, latent_dim] (the sampler draws it).
    """

    def __init__(self, network: Callable[..., torch.Tensor], diffusion: DiffusionConfig,
                 timesteps: Sequence[OriginalStep], *, student_head: str | None = None,
                 model_kwargs: dict[str, Any] | None = None, latent_dim: int | None = None) -> None:
        full_config = diffusion.model_copy(update={"use_timesteps": None})
        self._full = build_diffusion(full_config)
        self.network = network
        self.num_timesteps: int = self._full.num_timesteps  # T
        self.alphas_cumprod: torch.Tensor = self._full.alphas_cumprod  # float64 [T], indexed by original t
        student = student_head is not None
        if student and student_head not in _STUDENT_HEADS:
            raise ValueError(f"a student's head is v, x or both, not {student_head!r}")
        self.student = student
        self.head: Head = student_head if student else diffusion.mean_type  # type: ignore[assignment]
        self.model_kwargs = dict(model_kwargs or {})
        self.latent_dim = latent_dim
        ascending = sorted({int(t) for t in timesteps})
        if not ascending or ascending[0] < 0 or ascending[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must be original indices in 0..{self.num_timesteps - 1}")
        self.timesteps: tuple[OriginalStep, ...] = tuple(reversed(ascending))  # noisiest first
        # The run's chain: the training chain respaced onto the run's steps (the full chain itself when the run
        # takes every step), built exactly as a `ddpmctl respace` checkpoint builds it.
        if student:
            self._chain = None
        elif ascending == list(range(self.num_timesteps)):
            self._chain = self._full
        else:
            self._chain = build_diffusion(full_config.model_copy(update={"use_timesteps": tuple(ascending)}))
        self._own_step = {t: k for k, t in enumerate(ascending)}  # original t -> the run chain's k

    def conditioned(self, **model_kwargs: Any) -> Denoiser:
        """The same denoiser passing ``model_kwargs`` (e.g. class labels ``y``) to every network call."""
        other = copy.copy(self)
        other.model_kwargs = dict(model_kwargs)
        return other

    # ------------------------------------------------------------------------------------------ noise levels
    def alpha_bar(self, t: OriginalStep) -> float:
        """abar_t of the training chain (float64); 1 at CLEAN."""
        return 1.0 if t == CLEAN else float(self.alphas_cumprod[t])

    def alpha_sigma(self, t: OriginalStep, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), computed in float64, shaped [1, 1, ...] like ``like``."""
        return alpha_sigma(torch.tensor(self.alpha_bar(t), dtype=torch.float64), like)

    def log_snr(self, t: OriginalStep) -> float:
        """lambda_t = log alpha_t - log sigma_t (half the log signal-to-noise ratio; DPM-Solver's lambda)."""
        abar = self.alpha_bar(t)
        return math.inf if abar >= 1.0 else 0.5 * (math.log(abar) - math.log1p(-abar))

    # ---------------------------------------------------------------------------------------------- predict
    def predict(self, x: torch.Tensor, t: OriginalStep, *, clip: bool = True,
                latent: torch.Tensor | None = None) -> Prediction:
        """Call the network at original step ``t`` (all of x at the same step) and turn its output into x_0, eps and,
        for a trained model, the reverse step's mean and variance (see :class:`Prediction`). A DDGAN generator
        needs its ``latent`` z [N, latent_dim]; its mean and variance are the posterior q(x_s | x_t, x_0')."""
        if not 0 <= t < self.num_timesteps:
            raise ValueError(f"predict: t = {t} is not an original step 0..{self.num_timesteps - 1}")
        if (latent is None) != (self.latent_dim is None):
            raise ValueError(f"predict: this generator needs its latent z [N, {self.latent_dim}]" if latent is None
                             else "predict: this network takes no latent")
        t_batch = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        kwargs = self.model_kwargs if latent is None else {**self.model_kwargs, "z": latent}
        output = self.network(x, t_batch, **kwargs)
        if self.student:
            alpha, sigma = self.alpha_sigma(t, x)
            pred_xstart = student_predict_xstart(output.to(x.dtype), x, alpha, sigma, self.head)
            if clip:
                pred_xstart = pred_xstart.clamp(-1.0, 1.0)
            # eps re-derived from the (clipped) x_hat: the DDIM step the student was trained on.
            return Prediction(pred_xstart=pred_xstart, eps=(x - alpha * pred_xstart) / sigma)
        # A step of the run's chain (its variance rescaled to the run's step), else the training chain's own step.
        k = self._own_step.get(t)
        chain, k = (self._chain, k) if k is not None else (self._full, t)
        out = chain.p_mean_variance_from_output(output, x, torch.full_like(t_batch, k), clip_denoised=clip)
        return Prediction(pred_xstart=out["pred_xstart"], eps=out["eps"], mean=out["mean"], variance=out["variance"],
                          log_variance=out["log_variance"])
