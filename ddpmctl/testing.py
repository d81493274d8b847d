"""Contract checks shipped to sampler-plugin authors (scikit-learn's ``check_estimator`` habit).

``check_sampler(MySampler)`` runs a sampler (contract v2) the way ``ddpmctl sample`` does -- the driver picks the
timesteps and builds the :class:`~ddpmctl.denoiser.Denoiser` -- against exact networks in closed form: for data
that is one fixed image x*, eps(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t) and a correct sampler returns
x* (also in a single step from the top); for Gaussian data N(m, s^2) (elementwise) E[x_0 | x_t] is linear in x_t,
which gives seed-dependent samples to check reproducibility and batch independence. It raises AssertionError with
a message saying what is wrong. A sampler of CLD checkpoints (kind cld) is run on :class:`ExactCldGaussianScore`,
the exact score of Gaussian (or, at std 0, one-point) data under critically-damped Langevin diffusion.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

import ddpmctl
from ddpmctl.build import build_diffusion
from ddpmctl.checkpoint import LoadedCheckpoint
from ddpmctl.choices import is_learned_variance
from ddpmctl.cld import CldProcess
from ddpmctl.config import (CLD_DIFFUSION, CheckpointConfig, CldConfig, DiffusionConfig, LatentConfig, ModelConfig,
                            StudentConfig)
from ddpmctl.progressive import student_grid  # re-exported: the one grid k_i = round(i T / N) - 1
from ddpmctl.samplers import API_VERSION, Sampler, SampleRNG, StepInfo, build_denoiser, sampling_timesteps

__all__ = ["ExactPointDenoiser", "ExactGaussianDenoiser", "ExactGenerator", "ExactCldGaussianScore",
           "cld_gaussian_marginal", "exact_checkpoint", "student_grid", "check_sampler", "gaussian_ode_error"]


class ExactPointDenoiser(torch.nn.Module):
    """The exact eps-predictor for data that is one image x* (per class when ``x_star`` is [K, C, H, W] and y given).

    Takes ``(x, t, y=None)`` with ORIGINAL training-chain indices t, like the U-Net; outputs C channels, or 2C with
    a constant v channel when ``learned_sigma`` (the variance is irrelevant to the point-mass limit).
    """

    def __init__(self, x_star: torch.Tensor, alphas_cumprod: torch.Tensor, *, learned_sigma: bool = False,
                 class_cond: bool = False, head: str = "eps") -> None:
        super().__init__()
        self.register_buffer("x_star", x_star.to(torch.float64))
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))
        self.learned_sigma = learned_sigma
        self.class_cond = class_cond
        self.head = head  # "eps" (a trained model) or "x" (a distilled student with an x head)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        abar = self.alphas_cumprod[t].view(-1, *([1] * (x.dim() - 1)))
        if self.class_cond:
            if y is None:
                raise AssertionError("the network was called without the class labels y (model_kwargs)")
            x_star = self.x_star[y]
        else:
            x_star = self.x_star
        if self.head == "x":
            eps = x_star.expand_as(x).to(x.dtype)
        else:
            # float64 inside: at the top of a cosine chain sqrt(1/abar) is ~1e4 and float32 would lose x*.
            eps = ((x.to(torch.float64) - abar.sqrt() * x_star) / (1.0 - abar).sqrt()).to(x.dtype)
        if self.learned_sigma:
            eps = torch.cat([eps, torch.zeros_like(eps)], dim=1)
        return eps


class ExactGaussianDenoiser(torch.nn.Module):
    """The exact eps-predictor for data x_0 ~ N(mean, std^2) elementwise (Bayes' rule for a linear Gaussian).

    E[x_0 | x_t] = m + sqrt(abar) s^2 / (abar s^2 + 1 - abar) * (x_t - sqrt(abar) m); eps is re-derived from it.
    With ``learned_sigma`` the v channel encodes (learned_range, docs/conventions.md #5) the exact reverse variance
    of the original chain, Var[x_{t-1} | x_t] = beta_tilde_t + coef1_t^2 Var[x_0 | x_t], which makes ancestral
    sampling on that chain exact for this data; ``betas`` (the original chain's) is then required.
    """

    def __init__(self, mean: float, std: float, alphas_cumprod: torch.Tensor, *, betas: torch.Tensor | None = None,
                 learned_sigma: bool = False, head: str = "eps") -> None:
        super().__init__()
        self.mean, self.std = float(mean), float(std)
        self.head = head  # "eps" (a trained model) or "x" (a distilled student with an x head)
        abar = alphas_cumprod.to(torch.float64)
        self.register_buffer("alphas_cumprod", abar)
        self.learned_sigma = learned_sigma
        if learned_sigma:
            if betas is None:
                raise ValueError("learned_sigma needs the chain's betas to encode the exact variance")
            betas = betas.to(torch.float64)
            abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
            beta_tilde = betas * (1.0 - abar_prev) / (1.0 - abar)
            log_tilde_clipped = torch.log(torch.cat([beta_tilde[1:2], beta_tilde[1:]]))
            coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
            s2 = self.std ** 2
            var_x0 = s2 * (1.0 - abar) / (abar * s2 + 1.0 - abar)
            log_exact = torch.log(beta_tilde + coef1 ** 2 * var_x0)
            span = torch.log(betas) - log_tilde_clipped
            frac = torch.where(span.abs() > 1e-12, (log_exact - log_tilde_clipped) / span, torch.zeros_like(span))
            # k = 0 adds no noise, so its value is irrelevant; keep it finite.
            frac[0] = 0.0
            self.register_buffer("v", 2.0 * frac - 1.0)

    def posterior_mean_x0(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t].view(-1, *([1] * (x.dim() - 1)))
        s2 = self.std ** 2
        gain = abar.sqrt() * s2 / (abar * s2 + 1.0 - abar)
        return self.mean + gain * (x.to(torch.float64) - abar.sqrt() * self.mean)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        abar = self.alphas_cumprod[t].view(-1, *([1] * (x.dim() - 1)))
        pred_xstart = self.posterior_mean_x0(x, t)
        if self.head == "x":
            return pred_xstart.to(x.dtype)
        eps = ((x.to(torch.float64) - abar.sqrt() * pred_xstart) / (1.0 - abar).sqrt()).to(x.dtype)
        if self.learned_sigma:
            v = self.v[t].view(-1, *([1] * (x.dim() - 1))).to(x.dtype).expand_as(eps)
            eps = torch.cat([eps, v], dim=1)
        return eps


class ExactGenerator(torch.nn.Module):
    """An exact DDGAN generator G(x_t, z, t) for Gaussian data x_0 ~ N(mean, std^2) elementwise, or (``std`` 0) for
    data that is one image x* (per class when ``x_star`` is [K, C, H, W] and y given).

    x_0' = E[x_0 | x_t] + sqrt(Var[x_0 | x_t]) z (z's first C*H*W entries as an image): a draw from the true
    p(x_0 | x_t), so q(x_{t-1} | x_t, x_0') is the true reverse step and a correct DDGAN sampler draws exactly from
    the data distribution.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, *, mean: float = 0.0, std: float = 0.0,
                 x_star: torch.Tensor | None = None, class_cond: bool = False) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))
        self.mean, self.std, self.class_cond = float(mean), float(std), class_cond
        self.x_star = x_star.to(torch.float64) if x_star is not None else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                z: torch.Tensor | None = None) -> torch.Tensor:
        if z is None or z.shape[0] != x.shape[0]:
            raise AssertionError("the generator was called without a latent z [N, dim] for every image")
        if self.x_star is not None:
            if self.class_cond and y is None:
                raise AssertionError("the network was called without the class labels y (model_kwargs)")
            return (self.x_star[y] if self.class_cond else self.x_star.expand_as(x)).to(x.dtype)
        abar = self.alphas_cumprod[t].view(-1, *([1] * (x.dim() - 1)))
        s2 = self.std ** 2
        gain = abar.sqrt() * s2 / (abar * s2 + 1.0 - abar)
        posterior_var = s2 * (1.0 - abar) / (abar * s2 + 1.0 - abar)
        draw = z[:, :x[0].numel()].reshape(x.shape).to(torch.float64)
        x0 = self.mean + gain * (x.to(torch.float64) - abar.sqrt() * self.mean) + posterior_var.sqrt() * draw
        return x0.to(x.dtype)


# The chain check_sampler gives a DDGAN sampler: the official CIFAR-10 length on DDGAN's VP-SDE.
_DDGAN_CHAIN = DiffusionConfig(schedule="vp-sde", timesteps=4, mean_type="x0", var_type="fixed_small", loss_type="mse")


def exact_checkpoint(model: torch.nn.Module, *, channels: int, image_size: int, diffusion: DiffusionConfig,
                     num_classes: int | None = None, kind: str = "model",
                     student_steps: int = 8) -> LoadedCheckpoint:
    """Wrap a closed-form denoiser as a LoadedCheckpoint (no file behind it) so samplers can run on it.

    ``kind="student"`` describes an x-head student on a ``student_steps`` grid (give it a denoiser with head "x");
    ``kind="ddgan"`` a generator with a latent of C*H*W dimensions (give it an :class:`ExactGenerator`);
    ``kind="cld"`` a CLD score network with the default process (give it an :class:`ExactCldGaussianScore`; the
    ``diffusion`` is then the placeholder CLD_DIFFUSION whatever is passed).
    """
    student = None
    if kind == "student":
        student = StudentConfig(param="x", steps=tuple(student_grid(diffusion.timesteps, student_steps)),
                                teacher_steps=2 * student_steps)
    latent = LatentConfig(dim=channels * image_size**2) if kind == "ddgan" else None
    if kind == "cld":
        diffusion = CLD_DIFFUSION
    config = CheckpointConfig(
        model=ModelConfig(image_size=image_size, in_channels=channels, num_classes=num_classes, latent=latent),
        diffusion=diffusion,
        student=student,
        cld=CldConfig() if kind == "cld" else None,
    )
    return LoadedCheckpoint(path=Path("exact-denoiser.safetensors"), config=config, kind=kind, lineage=[],
                            created_with=ddpmctl.__version__, model=model.eval(), diffusion=build_diffusion(diffusion),
                            num_parameters=0, sha256="0" * 64)


def _full_chain(diffusion: DiffusionConfig) -> Any:
    return build_diffusion(diffusion.model_copy(update={"use_timesteps": None}))


def _point_checkpoint(var_type: str, x_star: torch.Tensor, *, kind: str, class_cond: bool = False,
                      timesteps: int = 100) -> LoadedCheckpoint:
    channels, size = x_star.shape[-3], x_star.shape[-1]
    if kind == "ddgan":
        generator = ExactGenerator(_full_chain(_DDGAN_CHAIN).alphas_cumprod, x_star=x_star, class_cond=class_cond)
        return exact_checkpoint(generator, channels=channels, image_size=size, diffusion=_DDGAN_CHAIN, kind=kind,
                                num_classes=x_star.shape[0] if class_cond else None)
    dconf = DiffusionConfig(schedule="cosine", timesteps=timesteps, mean_type="eps", var_type=var_type,
                            loss_type="rescaled_mse" if is_learned_variance(var_type) else "mse")
    model = ExactPointDenoiser(x_star, _full_chain(dconf).alphas_cumprod, learned_sigma=dconf.learned_sigma,
                               class_cond=class_cond, head="x" if kind == "student" else "eps")
    return exact_checkpoint(model, channels=channels, image_size=size, diffusion=dconf, kind=kind,
                            num_classes=x_star.shape[0] if class_cond else None)


def _gaussian_checkpoint(mean: float, std: float, *, kind: str, channels: int, image_size: int,
                         timesteps: int = 100) -> LoadedCheckpoint:
    if kind == "ddgan":
        generator = ExactGenerator(_full_chain(_DDGAN_CHAIN).alphas_cumprod, mean=mean, std=std)
        return exact_checkpoint(generator, channels=channels, image_size=image_size, diffusion=_DDGAN_CHAIN, kind=kind)
    dconf = DiffusionConfig(schedule="cosine", timesteps=timesteps, mean_type="eps", var_type="learned_range")
    full = _full_chain(dconf)
    model = ExactGaussianDenoiser(mean, std, full.alphas_cumprod, betas=full.betas, learned_sigma=True,
                                  head="x" if kind == "student" else "eps")
    return exact_checkpoint(model, channels=channels, image_size=image_size, diffusion=dconf, kind=kind)


# ----------------------------------------------------------------------------------------------- CLD (kind cld)
def cld_gaussian_marginal(process: CldProcess, t: torch.Tensor, mean: float, std: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The law of u_t = (x_t, v_t) per dimension for data x_0 ~ N(mean, std^2), v_0 ~ N(0, gamma M), at SDE times t
    [N] (float64): (mu [N, 2], Sigma [N, 2, 2]).

    Computed from the SDE itself, not from ``ddpmctl.cld``'s closed form: with b = B(t), the drift matrix per unit b
    A = [[0, 1/M], [-1, -Gamma/M]] and noise rate Q = diag(0, 2 Gamma), Van Loan's block exponential
    exp(b [[-A, Q], [0, A^T]]) = [[., F12], [0, F22]] gives Phi = F22^T and the noise's covariance Phi F12; then
    mu = Phi (mean, 0) and Sigma = Phi diag(std^2, gamma M) Phi^T + Phi F12.
    """
    m, gam = process.mass, process.damping
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    a = torch.tensor([[0.0, 1.0 / m], [-1.0, -gam / m]], dtype=torch.float64)
    q = torch.diag(torch.tensor([0.0, 2.0 * gam], dtype=torch.float64))
    block = torch.zeros(4, 4, dtype=torch.float64)
    block[:2, :2], block[:2, 2:], block[2:, 2:] = -a, q, a.T
    b = process.beta_integral(t)
    exp = torch.linalg.matrix_exp(b.view(-1, 1, 1) * block)
    phi = exp[:, 2:, 2:].transpose(1, 2)
    noise_cov = phi @ exp[:, :2, 2:]
    start = torch.diag(torch.tensor([std**2, process.gamma * m], dtype=torch.float64))
    sigma = phi @ start @ phi.transpose(1, 2) + noise_cov
    sigma = 0.5 * (sigma + sigma.transpose(1, 2))
    mu = phi[:, :, 0] * mean
    return mu, sigma


class ExactCldGaussianScore(torch.nn.Module):
    """A CLD "network" for data x_0 ~ N(mean, std^2) elementwise (std 0: the one point ``mean``) whose mixed score
    is the exact v-score of the marginal: takes (cat(x, v) [N, 2C, ...], t * 1000) like the CLD U-Net and returns
    n [N, C, ...] with -v / S_vv + l_t n = grad_v log p_t(x, v) (S_vv, l_t of the process's training kernel).

    The exact score of the Gaussian marginal N(mu, Sigma) (:func:`cld_gaussian_marginal`) is
    -(Sigma^-1 (u - mu))_v = (Sigma_xv (x - mu_x) - Sigma_xx (v - mu_v)) / det Sigma. ``mean`` may also be a
    tensor shaped like one image (a mean per pixel; mu is linear in it, Sigma does not depend on it).
    """

    def __init__(self, process: CldProcess, mean: float | torch.Tensor = 0.0, std: float = 0.0) -> None:
        super().__init__()
        self.process, self.std = process, float(std)
        self.mean = torch.as_tensor(mean, dtype=torch.float64)

    def forward(self, u: torch.Tensor, t_net: torch.Tensor, **_: object) -> torch.Tensor:
        channels = u.shape[1] // 2
        x, v = u[:, :channels].double(), u[:, channels:].double()
        t = t_net.double() / 1000.0
        mu, sigma = cld_gaussian_marginal(self.process, t, 1.0, self.std)  # for a unit mean; scaled below
        shape = (-1, *([1] * (x.dim() - 1)))
        mean = self.mean.to(x.device)
        mu_x, mu_v = mu[:, 0].view(shape) * mean, mu[:, 1].view(shape) * mean
        sxx, sxv, svv = (sigma[:, i, j].view(shape) for i, j in ((0, 0), (0, 1), (1, 1)))
        exact = (sxv * (x - mu_x) - sxx * (v - mu_v)) / (sxx * svv - sxv**2)
        kernel = self.process.hsm_covariance(t)
        inv_vv = (1.0 / kernel.vv).view(shape)
        scale = self.process.score_scale(t).view(shape)
        return ((exact + v * inv_vv) / scale).to(u.dtype)


def _cld_checkpoint(mean: float | torch.Tensor, std: float, *, channels: int, image_size: int) -> LoadedCheckpoint:
    model = ExactCldGaussianScore(CldProcess(), mean, std)
    return exact_checkpoint(model, channels=channels, image_size=image_size, diffusion=CLD_DIFFUSION, kind="cld")


def _check_cld_sampler(cls: type[Sampler], sampler: Sampler, steps: int | None, atol: float) -> None:
    """check_sampler for a sampler of CLD checkpoints: no chain, no labels, no one-step limit (a CLD model needs
    many steps); the data's mean and spread, the callback and the randomness."""
    name = cls.__name__
    torch.manual_seed(12345)
    x_star = torch.linspace(-0.9, 0.9, 3 * 4 * 4, dtype=torch.float64).reshape(3, 4, 4)
    x_star = x_star[:, torch.randperm(4)]
    # 1. Data N(x*, 0.1^2) per pixel: the samples centre on x* (the mean of 32 images within 0.1 of it; a channel or
    #    pixel mix-up is off by up to 1.8) with about the data's spread. (One data point, std 0, makes the score
    #    infinitely stiff at t -> 0, where no fixed-step CLD sampler converges.)
    ckpt = _cld_checkpoint(x_star, 0.1, channels=3, image_size=4)
    out, seen, _, timesteps = _run(sampler, ckpt, seed=1, indices=range(32), steps=steps)
    err = float((out.to(torch.float64).mean(0) - x_star).abs().max())
    assert err <= 50 * atol, f"{name} does not centre its samples on the data mean x* of an exact CLD score: {err:.3g}"
    spread = float((out.to(torch.float64) - x_star).pow(2).mean().sqrt())
    assert 0.05 < spread < 0.2, f"{name}: the samples' spread around x* is {spread:.3g}, the data's 0.1"
    # 2. The callback sees every step, in order.
    n = len(timesteps)
    assert len(seen) == n, f"{name} called the callback {len(seen)} times for {n} steps"
    assert [s.index for s in seen] == list(range(n)), f"{name}: StepInfo.index must run 0..{n - 1} in order"
    assert [s.t for s in seen] == list(timesteps), f"{name}: StepInfo.t must be the timesteps, in order"
    assert all(s.total == n and s.x.shape == out.shape for s in seen), f"{name}: StepInfo.total / x are wrong"
    # 3. Randomness only from the SampleRNG: reproducible, seed-dependent, independent of the batch.
    ckpt = _cld_checkpoint(0.1, 0.3, channels=3, image_size=4)
    torch.manual_seed(1)
    first, _, _, _ = _run(sampler, ckpt, seed=7, indices=range(4), steps=steps)
    torch.manual_seed(2)
    again, _, _, _ = _run(sampler, ckpt, seed=7, indices=range(4), steps=steps)
    assert torch.equal(first, again), f"{name}: the same seed gave different samples (is torch's global RNG used?)"
    other, _, _, _ = _run(sampler, ckpt, seed=8, indices=range(4), steps=steps)
    assert not torch.allclose(first, other), f"{name}: different seeds gave the same samples"
    part, _, _, _ = _run(sampler, ckpt, seed=7, indices=[2, 3], steps=steps)
    assert torch.allclose(part, first[2:], atol=1e-5, rtol=0), (
        f"{name}: image i changed with the batch it was sampled in: draw noise only via noise.randn_like / noise.randn")


def _run(sampler: Sampler, ckpt: LoadedCheckpoint, *, seed: int, indices: Sequence[int], steps: int | None,
         model_kwargs: dict[str, Any] | None = None
         ) -> tuple[torch.Tensor, list[StepInfo], torch.Tensor, tuple[int, ...]]:
    """One batch as generate() runs it: the driver's timesteps and denoiser, the sampler's loop."""
    shape = (ckpt.config.model.in_channels, ckpt.config.model.image_size, ckpt.config.model.image_size)
    timesteps = sampling_timesteps(ckpt, sampler, steps)
    denoiser = build_denoiser(ckpt, timesteps, micro_batch=None)
    if model_kwargs:
        denoiser = denoiser.conditioned(**model_kwargs)
    rng = SampleRNG(seed, indices, "cpu")
    x_T = rng.randn(shape)
    x_T_copy = x_T.clone()
    seen: list[StepInfo] = []
    with torch.no_grad():
        out = sampler.sample(denoiser, x_T, timesteps, noise=rng, callback=seen.append)
    name = type(sampler).__name__
    assert isinstance(out, torch.Tensor), f"{name}.sample returned {type(out).__name__}, not a Tensor"
    assert out.shape == x_T.shape, f"{name}.sample returned shape {tuple(out.shape)} for x_T {tuple(x_T.shape)}"
    assert out.dtype.is_floating_point, f"{name}.sample returned dtype {out.dtype}"
    assert torch.isfinite(out).all(), f"{name}.sample returned non-finite values"
    assert torch.equal(x_T, x_T_copy), f"{name}.sample modified x_T in place"
    return out, seen, x_T, timesteps


def _check_metadata(cls: type[Sampler]) -> None:
    assert isinstance(cls, type) and issubclass(cls, Sampler), f"{cls!r} is not a ddpmctl.Sampler subclass"
    name = cls.__name__
    assert cls.api_version == API_VERSION, (
        f"{name}.api_version is {cls.api_version!r}: set api_version = {API_VERSION} and implement "
        "sample(denoiser, x_T, timesteps, *, noise, callback)")
    assert isinstance(cls.name, str) and re.fullmatch(r"[a-z][a-z0-9_-]*", cls.name or ""), (
        f"{name}.name must be a lowercase CLI name such as 'ddim' (= the entry-point name), not {cls.name!r}")
    assert isinstance(cls.description, str) and cls.description.strip(), f"{name}.description is empty"
    assert "\n" not in cls.description.strip(), f"{name}.description must be one line"
    assert isinstance(cls.Options, type) and issubclass(cls.Options, BaseModel), (
        f"{name}.Options must be a pydantic model (derive it from Sampler.Options)")
    try:
        defaults = cls.Options()
    except ValidationError as err:
        raise AssertionError(f"{name}.Options() must work with defaults only: {err.errors()[0]['msg']}") from None
    try:
        cls.Options(**{"no_such_option_for_check_sampler": 1})
    except ValidationError:
        pass
    else:
        raise AssertionError(f"{name}.Options accepts unknown keys: set extra='forbid' (derive from Sampler.Options)")
    for key in cls.Options.model_fields:
        try:
            setattr(defaults, key, getattr(defaults, key))
        except (ValidationError, TypeError, AttributeError):
            continue
        raise AssertionError(f"{name}.Options must be frozen (option {key!r} could be reassigned)")


def check_sampler(cls: type[Sampler], *, steps: int | None = None, options: BaseModel | None = None,
                  atol: float = 2e-3) -> None:
    """Run the sampler contract on ``cls``; AssertionError names the first broken promise.

    ``steps`` is passed to the driver as the user's ``--steps`` (None: the sampler's default) on chains of
    T = 100 steps; ``options`` overrides the default ``cls.Options()``.
    """
    _check_metadata(cls)
    name = cls.__name__
    sampler = cls(options)
    kinds = cls.checkpoint_kinds
    assert kinds and all(k in ("model", "respaced", "student", "ddgan", "cld") for k in kinds), (
        f"{name}.checkpoint_kinds must list model, respaced, student, ddgan and/or cld, not {kinds!r}")
    kind = kinds[0]
    if kind == "cld":
        _check_cld_sampler(cls, sampler, steps, atol)
        return
    torch.manual_seed(12345)
    x_star = torch.linspace(-0.9, 0.9, 3 * 4 * 4, dtype=torch.float64).reshape(3, 4, 4)
    x_star = x_star[:, torch.randperm(4)]  # not separable per row, so a channel or pixel mix-up shows

    # 1. The point-mass limit: every sampler must return x*, with fixed (C) and learned (2C) variance outputs.
    # (A DDGAN generator predicts x_0 and the posterior gives the variance: it has no learned-variance form.)
    for var_type in ("fixed_small",) if kind == "ddgan" else ("fixed_small", "learned_range"):
        ckpt = _point_checkpoint(var_type, x_star, kind=kind)
        out, seen, _, timesteps = _run(sampler, ckpt, seed=1, indices=range(4), steps=steps)
        err = float((out.to(torch.float64) - x_star).abs().max())
        assert err <= atol, (f"{name} does not recover the single data point x* of an exact denoiser "
                             f"({var_type}): max error {err:.3g} > {atol}")
        # 2. The callback sees every step of the timesteps, in order.
        n = len(timesteps)
        assert len(seen) == n, f"{name} called the callback {len(seen)} times for {n} timesteps"
        assert all(isinstance(s, StepInfo) for s in seen), f"{name} passed something other than StepInfo"
        assert [s.index for s in seen] == list(range(n)), f"{name}: StepInfo.index must run 0..{n - 1} in order"
        assert all(s.total == n for s in seen), f"{name}: StepInfo.total must be {n}"
        assert [s.t for s in seen] == list(timesteps), f"{name}: StepInfo.t must be the timesteps, in order"
        assert all(s.x.shape == out.shape for s in seen), f"{name}: StepInfo.x must have the batch's shape"

    # 3. One step (where --steps is the user's): a single call at the top step, from pure noise, gives the data mean
    #    for Gaussian data N(0.1, 0.3^2); a call at t = 0 would hand back the noise itself.
    if kind != "student" and not cls.whole_chain:
        ckpt = _gaussian_checkpoint(0.1, 0.3, kind=kind, channels=3, image_size=4)
        out, _, _, _ = _run(sampler, ckpt, seed=1, indices=range(2), steps=1)
        err = float((out.to(torch.float64) - 0.1).abs().max())
        assert err <= 10 * atol, (f"{name} with one step does not recover the data mean from pure noise (max error "
                                  f"{err:.3g}): it must call the network at timesteps[0], the top step")

    # 4. Class labels reach the network through the denoiser: a class-conditional point mass per class.
    classes = torch.stack([x_star, -x_star, x_star.flip(-1)])
    ckpt = _point_checkpoint("fixed_small", classes, kind=kind, class_cond=True)
    y = torch.tensor([1, 0, 2, 1])
    out, _, _, _ = _run(sampler, ckpt, seed=2, indices=range(4), steps=steps, model_kwargs={"y": y})
    err = float((out.to(torch.float64) - classes[y]).abs().max())
    assert err <= atol, f"{name} does not sample through the denoiser it is given (class labels y): max error {err:.3g}"

    # 5. Randomness comes only from the SampleRNG: reproducible, seed-dependent, independent of the batch.
    ckpt = _gaussian_checkpoint(0.1, 0.3, kind=kind, channels=3, image_size=4)
    torch.manual_seed(1)
    first, seen_a, _, _ = _run(sampler, ckpt, seed=7, indices=range(4), steps=steps)
    torch.manual_seed(2)  # the global RNG must not matter
    again, seen_b, _, _ = _run(sampler, ckpt, seed=7, indices=range(4), steps=steps)
    assert torch.equal(first, again), f"{name}: the same seed gave different samples (is torch's global RNG used?)"
    assert all(torch.equal(a.x, b.x) for a, b in zip(seen_a, seen_b)), (
        f"{name}: the same seed gave different intermediate states")
    other, _, _, _ = _run(sampler, ckpt, seed=8, indices=range(4), steps=steps)
    assert not torch.allclose(first, other), f"{name}: different seeds gave the same samples"
    part, _, _, _ = _run(sampler, ckpt, seed=7, indices=[2, 3], steps=steps)
    assert torch.allclose(part, first[2:], atol=1e-5, rtol=0), (
        f"{name}: image i changed with the batch it was sampled in: draw noise only via noise.randn_like / noise.randn")
    spread = float(first.std())
    assert math.isfinite(spread) and spread > 0, f"{name}: samples of Gaussian data have no spread"


def gaussian_ode_error(cls: type[Sampler], steps: int, *, options: BaseModel | None = None, mean: float = 0.1,
                       std: float = 0.3, timesteps: int = 4000, schedule: str = "cosine", images: int = 8,
                       image_size: int = 16, seed: int = 0) -> float:
    """RMS distance of a deterministic sampler's images to the exact probability-flow ODE endpoint, Gaussian data.

    For x_0 ~ N(m, s^2) and the exact denoiser, y = x / alpha is N(m, s^2 + k^2) at every step, k = sigma / alpha,
    and the ODE moves it by a pure scaling: y(b) = m + (y(a) - m) sqrt((s^2 + k_b^2) / (s^2 + k_a^2)). The reference
    is that map from the run's top step all the way to k = 0 (sigma = 0, clean data): x_0 = m + (y_top - m) s /
    sqrt(s^2 + k_top^2), a sample of N(m, s^2) exactly. A sampler that stops at a step with k > 0 and returns the
    denoiser's E[x_0 | x] there shrinks every sample towards m by s / sqrt(s^2 + k^2) more than the ODE does; that
    bias of stopping early counts here, together with the discretisation error.
    ``options`` default: the sampler's defaults with ``clip_denoised=False`` (clipping would bias the tails).
    """
    dconf = DiffusionConfig(schedule=schedule, timesteps=timesteps, var_type="fixed_small", loss_type="mse")
    full = build_diffusion(dconf)
    model = ExactGaussianDenoiser(mean, std, full.alphas_cumprod)
    ckpt = exact_checkpoint(model, channels=1, image_size=image_size, diffusion=dconf)
    if options is None:
        unclipped = {"clip_denoised": False} if "clip_denoised" in cls.Options.model_fields else {}
        options = cls.Options(**unclipped)
    out, _, x_T, run = _run(cls(options), ckpt, seed=seed, indices=range(images), steps=steps)
    abar_top = float(full.alphas_cumprod[run[0]])
    k_top2 = (1 - abar_top) / abar_top  # (sigma / alpha)^2 at the top step
    y_top = x_T.to(torch.float64) / math.sqrt(abar_top)
    exact = mean + (y_top - mean) * std / math.sqrt(std**2 + k_top2)
    return float((out.to(torch.float64) - exact).pow(2).mean().sqrt())
