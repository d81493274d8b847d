"""GaussianDiffusion: forward process, posterior, model parameterizations, sampling steps and VLB terms.

Follows improved-diffusion's ``gaussian_diffusion.py`` (Nichol & Dhariwal 2021) and the reference conventions
#3-11 and #15 of docs/conventions.md to the letter, plus the v-parameterization of Salimans & Ho (2022).

Notation: ``t`` is an int64 tensor [N] of indices into THIS diffusion's steps (0 = least noisy); the network is
always called with ``timestep_map[t]``, the original training-chain indices. Coefficient tables are float64 on
the CPU; each call gathers them at ``t`` and casts to the input's dtype/device (float64 in -> float64 out,
float32 in -> float32 out), using per-(device, dtype) cached copies so loops do not re-upload them.

Reference-compatible public API: ``p_sample``, ``calc_bpd_loop`` and ``predict_eps_from_v`` are not called by
ddpmctl's own commands (the sampler plugins and ``nll.py`` have their own batched, keyed versions), yet they are not
dead code: they are part of the stable API (docs/design.md "The reference-compatible core"), kept with
improved-diffusion's names, arguments and results for library users porting code written against the reference,
and for checking this class against the reference and against closed forms (tests/test_diffusion.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, get_args

import numpy as np
import torch

from ddpmctl.choices import LossType, MeanType, VarType, is_learned_variance
from ddpmctl.losses import discretized_gaussian_log_likelihood, normal_kl

MEAN_TYPES: tuple[str, ...] = get_args(MeanType)
VAR_TYPES: tuple[str, ...] = get_args(VarType)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)

# The float64 tables every instance exposes (reference names) and the private ones the steps gather from.
_PUBLIC_TABLES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
_PRIVATE_TABLES = ("one_minus_alphas_cumprod", "log_betas", "fixed_large_variance", "fixed_large_log_variance")

_LN2 = math.log(2.0)

Model = Callable[..., torch.Tensor]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: [N, ...] -> [N]."""
    return x.mean(dim=list(range(1, x.dim())))


def _table_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 and float32 inputs keep their dtype; half-precision inputs get float32 coefficients (the
    # reference always used float32) so that e.g. 1/sqrt(abar) at the top of a T = 4000 chain stays finite.
    return x.dtype if x.dtype in (torch.float64, torch.float32) else torch.float32


def _tables(b: np.ndarray) -> dict[str, np.ndarray]:
    """Every table of a chain with betas ``b`` (float64), by the reference's names."""
    # All tables in numpy float64 with the reference's expressions, so they match it bit for bit.
    alphas = 1.0 - b
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])  # abar before step 0 is 1 (docs/conventions.md #3)
    alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
    # Posterior q(x_{k-1} | x_k, x0), IDDPM eq. 10-12.
    posterior_variance = b * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta_tilde_0 = 0, so its log is clipped to log(beta_tilde_1) (docs/conventions.md #3). A one-step chain has no
    # beta_tilde_1 (the reference raises there); beta_0 is the only variance it has, so it stands in.
    first_var = posterior_variance[1] if len(b) > 1 else b[0]
    fixed_large_variance = np.append(first_var, b[1:])  # docs/conventions.md #4
    return {
        "betas": b,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "alphas_cumprod_next": alphas_cumprod_next,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.append(first_var, posterior_variance[1:])),
        "posterior_mean_coef1": b * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        "one_minus_alphas_cumprod": 1.0 - alphas_cumprod,
        "log_betas": np.log(b),
        "fixed_large_variance": fixed_large_variance,
        "fixed_large_log_variance": np.log(fixed_large_variance),
    }


def alpha_sigma(alpha_bar: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = sqrt(abar), sigma = sqrt(1 - abar) (the forward process x_t = alpha x_0 + sigma eps), computed in
    abar's dtype (float64 from the schedule tables) and rounded once to ``like``'s dtype and device; a scalar or
    per-sample [N] abar is shaped [1 or N, 1, ..., 1] to broadcast against ``like``."""
    abar = alpha_bar.reshape(-1, *([1] * (like.dim() - 1)))
    return abar.sqrt().to(like.device, like.dtype), (1.0 - abar).sqrt().to(like.device, like.dtype)


def ddim_step(pred_xstart: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor,
              *, eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step from abar_t to abar_s (Song et al. 2021 eq. 12), the one every DDIM in ddpmctl takes:

        x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
        sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s).

    abar_s = 1 is clean data (the step returns x0_hat). The coefficients are computed in the dtype of the abar
    tensors (broadcastable against x): float64 for the samplers and distillation, x's dtype for
    ``GaussianDiffusion.ddim_sample`` as the reference computes it; float64 coefficients are rounded once to x's
    dtype. ``noise`` None adds no noise (eta = 0, or the last step).
    """
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    # 1 - abar_s - sigma^2 >= 0 in exact math for eta <= 1; the clamp only absorbs rounding.
    coef_x0, coef_eps = torch.sqrt(alpha_bar_prev), torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0))
    dtype = pred_xstart.dtype if coef_x0.dtype == torch.float64 else coef_x0.dtype
    coef_x0, coef_eps, sigma = (c.to(pred_xstart.device, dtype) for c in (coef_x0, coef_eps, sigma))
    x = pred_xstart * coef_x0 + coef_eps * eps
    return x if noise is None else x + sigma * noise


def _timestep_map(timestep_map: torch.Tensor | np.ndarray | list[int] | None, T: int) -> torch.Tensor:
    """Original index of each of the ``T`` steps, int64 (arange for an unrespaced chain)."""
    if timestep_map is None:
        tmap = torch.arange(T, dtype=torch.int64)
    elif isinstance(timestep_map, torch.Tensor):
        tmap = timestep_map.detach().to(device="cpu", dtype=torch.int64).clone()
    else:
        tmap = torch.from_numpy(np.array(timestep_map, dtype=np.int64))
    if timestep_map is not None:
        if tmap.shape != (T,):
            raise ValueError(f"timestep_map must have one entry per step ({T}), got shape {tuple(tmap.shape)}")
        if (tmap < 0).any():
            raise ValueError("timestep_map entries must be >= 0")
    return tmap


class GaussianDiffusion:
    """Utilities for training and sampling an IDDPM diffusion over ``len(betas)`` steps (Nichol & Dhariwal 2021).

    ``timestep_map[k]`` is the original training-chain index of step k (arange for an unrespaced chain);
    ``original_num_steps`` is the training chain's T (default: len(betas), or max(timestep_map) + 1 when only a
    map is given). Use :func:`ddpmctl.respace.respace` to build a respaced diffusion.
    """

    def __init__(
        self,
        betas: torch.Tensor | np.ndarray | list[float],
        *,
        mean_type: str,
        var_type: str,
        loss_type: str,
        timestep_map: torch.Tensor | np.ndarray | list[int] | None = None,
        original_num_steps: int | None = None,
    ) -> None:
        if mean_type not in MEAN_TYPES:
            raise ValueError(f"unknown mean_type {mean_type!r}: choose one of {', '.join(MEAN_TYPES)}")
        if var_type not in VAR_TYPES:
            raise ValueError(f"unknown var_type {var_type!r}: choose one of {', '.join(VAR_TYPES)}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
        self.mean_type = mean_type
        self.var_type = var_type
        self.loss_type = loss_type

        if isinstance(betas, torch.Tensor):
            betas = betas.detach().cpu().numpy()
        b = np.array(betas, dtype=np.float64)
        if b.ndim != 1 or b.shape[0] < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(b.shape)}")
        if not ((b > 0).all() and (b <= 1).all()):
            raise ValueError(
                f"every beta must lie in (0, 1], got {b.min():.4g}..{b.max():.4g} "
                "(the linear schedule needs T >= 20)"
            )
        T = int(b.shape[0])
        self.num_timesteps = T

        tables = _tables(b)
        self._cpu_tables = {name: torch.from_numpy(np.ascontiguousarray(arr)) for name, arr in tables.items()}
        for name in _PUBLIC_TABLES:
            setattr(self, name, self._cpu_tables[name])

        tmap = _timestep_map(timestep_map, T)
        self.timestep_map = tmap
        if original_num_steps is None:
            original_num_steps = T if timestep_map is None else int(tmap.max()) + 1
        if original_num_steps <= int(tmap.max()):
            raise ValueError(
                f"original_num_steps ({original_num_steps}) must exceed the largest mapped index ({int(tmap.max())})"
            )
        self.original_num_steps = int(original_num_steps)

        self._device_tables: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}
        self._device_maps: dict[torch.device, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def learned_sigma(self) -> bool:
        """True when the network outputs 2C channels: [mean part | variance values]."""
        return is_learned_variance(self.var_type)

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, original_num_steps={self.original_num_steps}, "
            f"mean_type={self.mean_type!r}, var_type={self.var_type!r}, loss_type={self.loss_type!r})"
        )

    def _tables(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The coefficient tables on x's device in x's dtype (cached: built once per device/dtype)."""
        key = (x.device, _table_dtype(x))
        tables = self._device_tables.get(key)
        if tables is None:
            tables = {name: arr.to(device=key[0], dtype=key[1]) for name, arr in self._cpu_tables.items()}
            self._device_tables[key] = tables
        return tables

    @staticmethod
    def _gather(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] shaped [N, 1, ..., 1] to broadcast against x (the reference's _extract_into_tensor)."""
        return table[t].reshape(-1, *([1] * (x.dim() - 1)))

    def _coef(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._gather(self._tables(x)[name], t, x)

    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """timestep_map[t]: the original training-chain indices the network sees for this diffusion's steps t."""
        tmap = self._device_maps.get(t.device)
        if tmap is None:
            tmap = self.timestep_map.to(t.device)
            self._device_maps[t.device] = tmap
        return tmap[t]

    def _call_model(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict[str, Any] | None
    ) -> torch.Tensor:
        return model(x, self.original_timesteps(t), **(model_kwargs or {}))

    def _split_output(self, model_output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[mean part | variance values] for learned sigma (docs/conventions.md #5), else (output, None).

        Checks the shapes."""
        B, C = x.shape[:2]
        channels = 2 * C if self.learned_sigma else C
        expected = (B, channels, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"the model returned shape {tuple(model_output.shape)}, expected {expected} "
                f"(var_type {self.var_type!r} needs {channels} output channels for {C} input channels)"
            )
        if not self.learned_sigma:
            return model_output, None
        mean_part, var_values = torch.split(model_output, C, dim=1)
        return mean_part, var_values

    # ---------------------------------------------------------------------------------------- forward process
    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0) = N(sqrt(abar) x_0, (1 - abar) I): (mean, variance, log_variance), all x_start's shape."""
        mean = self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._coef("one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        log_variance = self._coef("log_one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar) x_0 + sqrt(1 - abar) noise (DDPM eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, x_start {tuple(x_start.shape)}")
        return (
            self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior q(x_{t-1} | x_t, x_0), IDDPM eq. 10-12: (mean, variance, log_variance_clipped)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ in shape")
        tables = self._tables(x_t)
        posterior_mean = (
            self._gather(tables["posterior_mean_coef1"], t, x_t) * x_start
            + self._gather(tables["posterior_mean_coef2"], t, x_t) * x_t
        )
        posterior_variance = self._gather(tables["posterior_variance"], t, x_t).expand(x_t.shape)
        posterior_log_variance_clipped = self._gather(tables["posterior_log_variance_clipped"], t, x_t).expand(
            x_t.shape
        )
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ------------------------------------------------------------------------------------ parameterizations
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0_hat = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps (DDPM eq. 15)."""
        return (
            self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """eps_hat = (sqrt(1/abar) x_t - x0_hat) / sqrt(1/abar - 1): the inverse of predict_xstart_from_eps."""
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._coef(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v (Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1-abar) x0)."""
        return (
            self._coef("sqrt_alphas_cumprod", t, x_t) * x_t
            - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * v
        )

    def predict_eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps_hat = sqrt(1 - abar) x_t + sqrt(abar) v (Salimans & Ho 2022).

        Reference-compatible public API (see the module docstring), kept for users: the package's own steps
        convert through ``pred_xstart``."""
        return (
            self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t
            + self._coef("sqrt_alphas_cumprod", t, x_t) * v
        )

    def v_target(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, Sec. 4)."""
        return (
            self._coef("sqrt_alphas_cumprod", t, x_start) * noise
            - self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start
        )

    # ---------------------------------------------------------------------------------------- reverse process
    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        *,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from the network: {"mean", "variance", "log_variance", "pred_xstart", "eps"}.

        "eps" is the noise implied by the (clipped) pred_xstart, as DDIM uses it (docs/conventions.md #15).
        """
        model_output = self._call_model(model, x, t, model_kwargs)
        return self.p_mean_variance_from_output(
            model_output, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn
        )

    def p_mean_variance_from_output(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """p_mean_variance for an already computed network output (docs/conventions.md #4-6)."""
        mean_part, var_values = self._split_output(model_output, x)
        tables = self._tables(x)
        if var_values is None:
            # Fixed variances; fixed_large uses beta_tilde_1 at k = 0 for a better decoder NLL (docs/conventions.md #4).
            var_name, log_name = (
                ("fixed_large_variance", "fixed_large_log_variance")
                if self.var_type == "fixed_large"
                else ("posterior_variance", "posterior_log_variance_clipped")
            )
            model_variance = self._gather(tables[var_name], t, x).expand(x.shape)
            model_log_variance = self._gather(tables[log_name], t, x).expand(x.shape)
        elif self.var_type == "learned":
            model_log_variance = var_values
            model_variance = torch.exp(model_log_variance)
        else:
            # learned_range: interpolate the log-variance between beta_tilde (v = -1) and beta (v = +1),
            # v not clamped (IDDPM eq. 15, docs/conventions.md #5).
            min_log = self._gather(tables["posterior_log_variance_clipped"], t, x)
            max_log = self._gather(tables["log_betas"], t, x)
            frac = (var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)

        if self.mean_type == "eps":
            pred_xstart = self.predict_xstart_from_eps(x, t, mean_part)
        elif self.mean_type == "v":
            pred_xstart = self.predict_xstart_from_v(x, t, mean_part)
        else:
            pred_xstart = mean_part
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            # Clamp BEFORE the posterior mean (docs/conventions.md #6).
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean = (
            self._gather(tables["posterior_mean_coef1"], t, x) * pred_xstart
            + self._gather(tables["posterior_mean_coef2"], t, x) * x
        )
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "eps": self.predict_eps_from_xstart(x, t, pred_xstart),
        }

    def _nonzero_mask(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # No noise is added at k = 0 (the noise is still drawn, keeping a seeded stream aligned:
        # docs/conventions.md #15).
        return (t != 0).to(_table_dtype(x)).reshape(-1, *([1] * (x.dim() - 1)))

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        noise: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_{t-1} = mean + exp(log_var / 2) z (DDPM Alg. 2): {"sample", "pred_xstart"}.

        Reference-compatible public API (see the module docstring): improved-diffusion's ``p_sample``, kept for
        users and for checking against the reference; the ``ancestral`` sampler plugin takes its own step."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        if noise is None:
            noise = torch.randn_like(x)
        sample = out["mean"] + self._nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        eta: float = 0.0,
        clip_denoised: bool = True,
        noise: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step (Song et al. 2021, eq. 12) to this diffusion's previous step: {"sample", "pred_xstart"}.

        eps is re-derived from the clipped pred_xstart; learned variances are ignored; abar_prev is the previous
        entry of this (possibly respaced) diffusion's table, 1 before its first step.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        tables = self._tables(x)
        if noise is None:
            noise = torch.randn_like(x)
        sample = ddim_step(out["pred_xstart"], out["eps"], self._gather(tables["alphas_cumprod"], t, x),
                           self._gather(tables["alphas_cumprod_prev"], t, x), eta=eta,
                           noise=self._nonzero_mask(t, x) * noise)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # ----------------------------------------------------------------------------------- variational bound
    def vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """L_t in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the decoder NLL at t = 0
        (docs/conventions.md #8).

        Returns {"output": [N], "pred_xstart"}.
        """
        model_output = self._call_model(model, x_t, t, model_kwargs)
        return self.vb_terms_bpd_from_output(model_output, x_start, x_t, t, clip_denoised=clip_denoised)

    def vb_terms_bpd_from_output(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool = True,
    ) -> dict[str, torch.Tensor]:
        """vb_terms_bpd for an already computed network output."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LN2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LN2
        # At the first step the term is the decoder NLL -log p(x_0 | x_1), otherwise the KL.
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{T-1} | x_0) || N(0, I)) in bits/dim, [N] (docs/conventions.md #10).

        Not trainable, ~0 for a good schedule."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.int64, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)
        return mean_flat(kl_prior) / _LN2

    # ------------------------------------------------------------------------------------------- training
    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample training loss at steps t (IDDPM Sec. 3.1, docs/conventions.md #7): {"loss", "mse", "vb"},
        each [N].

        "vb" is the VLB term as it enters the loss (already multiplied by T/1000 for rescaled_mse, by T for
        rescaled_kl); zeros for a fixed variance with an MSE loss. For the KL losses "mse" is a detached
        diagnostic of the mean prediction. Training never clips pred_xstart.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._call_model(model, x_t, t, model_kwargs)
        mean_part, var_values = self._split_output(model_output, x_t)

        if self.mean_type == "eps":
            target = noise
        elif self.mean_type == "x0":
            target = x_start
        else:
            target = self.v_target(x_start, t, noise)

        if self.loss_type in ("kl", "rescaled_kl"):
            vb = self.vb_terms_bpd_from_output(model_output, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == "rescaled_kl":
                # T * L_t: an unbiased estimate of the whole bound for uniformly drawn t (k = 0 included).
                vb = vb * self.num_timesteps
            mse = mean_flat((target - mean_part.detach()) ** 2)
            return {"loss": vb, "mse": mse, "vb": vb}

        mse = mean_flat((target - mean_part) ** 2)
        if var_values is None:
            return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}
        # Learn the variance through the bound, but let the bound not move the mean: it sees the mean part
        # detached (IDDPM Sec. 3.1, stop-gradient).
        frozen_out = torch.cat([mean_part.detach(), var_values], dim=1)
        vb = self.vb_terms_bpd_from_output(frozen_out, x_start, x_t, t, clip_denoised=False)["output"]
        if self.loss_type == "rescaled_mse":
            # lambda = 0.001 of the paper, times T so that vb is T * L_t: (T / 1000) * L_t.
            vb = vb * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ------------------------------------------------------------------------------------------ bits/dim
    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        *,
        generator: torch.Generator | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The whole variational bound in bits/dim, one term per step from T-1 down to 0 (docs/conventions.md #11).

        Reference-compatible public API (see the module docstring): improved-diffusion's ``calc_bpd_loop``, kept for
        users and for checking against the reference; ``ddpmctl.nll`` computes the bound batched and keyed.

        Returns {"total_bpd" [N], "prior_bpd" [N], "vb" [N, T], "xstart_mse" [N, T], "mse" [N, T],
        "timesteps" [T]}. Columns are in loop order as in the reference: column j holds step
        ``timesteps[j] = T-1-j``. Fresh noise each step (torch.randn_like, or ``generator`` when given);
        ``progress(done, total)`` is called after each step.
        """
        N = x_start.shape[0]
        T = self.num_timesteps
        vb, xstart_mse, mse = [], [], []
        for done, k in enumerate(range(T - 1, -1, -1), start=1):
            t_batch = torch.full((N,), k, dtype=torch.int64, device=x_start.device)
            if generator is None:
                noise = torch.randn_like(x_start)
            else:
                noise = torch.randn(
                    x_start.shape, generator=generator, dtype=x_start.dtype, device=generator.device
                ).to(x_start.device)
            x_t = self.q_sample(x_start, t_batch, noise=noise)
            with torch.no_grad():
                out = self.vb_terms_bpd(
                    model, x_start, x_t, t_batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            # The eps implied by the (clipped) pred_xstart against the true noise.
            eps = self.predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
            if progress is not None:
                progress(done, T)
        vb_t = torch.stack(vb, dim=1)
        prior = self.prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior,
            "prior_bpd": prior,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
            "timesteps": torch.arange(T - 1, -1, -1, dtype=torch.int64, device=x_start.device),
        }
