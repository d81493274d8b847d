"""The mathematics of progressive distillation (Salimans & Ho 2022, arXiv 2202.00512) in discrete time: the step
grids, the student heads, the deterministic DDIM step, the two-teacher-step target, the loss weights, and a
network seen as an x_hat predictor on original indices. No I/O; ``ddpmctl.distill`` runs the stages.

Discrete-time adaptation (docs/conventions.md "Distillation grid"): the teacher's own abar table over its T training
steps; the N-step grid is k_i = round(i T / N) - 1, i = 1..N (the top step T - 1 has SNR ~ 0), its midpoints
k'_i = round((i - 1/2) T / N) - 1, and index -1 stands for clean data (abar = 1). Starting from a power of two every
grid nests in the previous one.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ddpmctl.choices import StudentParam, Weighting
from ddpmctl.config import DistillConfig
from ddpmctl.denoiser import CLEAN, Head, student_predict_xstart
from ddpmctl.diffusion import alpha_sigma, ddim_step
from ddpmctl.errors import ConfigError, OptionError

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl.checkpoint import LoadedCheckpoint

__all__ = ["CLEAN", "Head", "student_predict_xstart"]  # re-exported: distill and tests import them from here too


# ----------------------------------------------------------------------------------------------------------------
# Grids


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def student_grid(num_timesteps: int, steps: int) -> list[int]:
    """Original indices k_i = round(i T / N) - 1, i = 1..N, ascending (docs/conventions.md "Distillation grid").

    Rounding is Python's round of the exact rational i T / N (half to even). The grid for N is the even-numbered
    points of the grid for 2N because i T / N and 2i T / (2N) are the same rational, whatever the rounding rule.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"a grid of {steps} steps needs 1 <= steps <= T = {num_timesteps}")
    return [round(Fraction(i * num_timesteps, steps)) - 1 for i in range(1, steps + 1)]


def midpoint_grid(num_timesteps: int, steps: int) -> list[int]:
    """The teacher's intermediate points k'_i = round((i - 1/2) T / N) - 1, i = 1..N."""
    return [round(Fraction((2 * i - 1) * num_timesteps, 2 * steps)) - 1 for i in range(1, steps + 1)]


def stage_times(num_timesteps: int, steps: int) -> tuple[list[int], list[int], list[int]]:
    """For student steps i = 1..N: (t = k_i, t' = k'_i, t'' = k_{i-1}) with k_0 = -1 (clean data)."""
    grid = student_grid(num_timesteps, steps)
    return grid, midpoint_grid(num_timesteps, steps), [CLEAN] + grid[:-1]


# ----------------------------------------------------------------------------------------------------------------
# Parameterisations and the target (alpha = sqrt(abar), sigma = sqrt(1 - abar), broadcastable to z; the DDIM step
# is ddpmctl.diffusion.ddim_step)


def predict_xstart(model_output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                   head: Head) -> torch.Tensor:
    """x_hat of a trained model (mean_type eps / x0 / v: its first C channels; variance channels ignored) or of a
    student (v / x / both). eps: x_hat = (z - sigma eps) / alpha
    (docs/conventions.md "Parameterisations and variances")."""
    channels = z.shape[1]
    if head == "eps":
        return (z - sigma * model_output[:, :channels]) / alpha
    if head == "x0":
        return model_output[:, :channels]
    return student_predict_xstart(model_output, z, alpha, sigma, head)


def distillation_target(z_t: torch.Tensor, z_tpp: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                        alpha_tpp: torch.Tensor, sigma_tpp: torch.Tensor) -> torch.Tensor:
    """x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t) (Salimans & Ho Alg. 2).

    The unique x_hat for which one DDIM step from t lands on the teacher's z_t''. For t'' = clean data (alpha 1,
    sigma 0) it is z_t'' itself: the teacher's x_hat at its midpoint.
    """
    ratio = sigma_tpp / sigma_t
    return (z_tpp - ratio * z_t) / (alpha_tpp - ratio * alpha_t)


# ----------------------------------------------------------------------------------------------------------------
# A network as an x_hat predictor on original indices


class GridDenoiser:
    """x_hat(z, t) of a network on ORIGINAL training-chain indices t (t = -1: clean data), in fp32 unless z is not.

    ``alphas_cumprod`` is the full training chain's abar table (float64 [T]); ``head`` says what the network's
    first channels mean. Used for both teacher and student so they cannot disagree on a convention.
    """

    def __init__(self, model: torch.nn.Module, head: Head, alphas_cumprod: torch.Tensor) -> None:
        self.model = model
        self.head = head
        # abar with clean data prepended: index t + 1, so t = -1 gives abar = 1.
        self.abar = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod.detach().double().cpu()])

    @property
    def num_timesteps(self) -> int:
        return self.abar.numel() - 1

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t (float64, on the CPU) as [N, 1, ..., 1] to broadcast against ``like``."""
        return self.abar[t.detach().cpu() + 1].reshape(-1, *([1] * (like.dim() - 1)))

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t as [N, 1, ..., 1] in like's dtype/device (computed in float64)."""
        return alpha_sigma(self.abar[t.detach().cpu() + 1], like)

    def predict_xstart(self, z: torch.Tensor, t: torch.Tensor, *, clip: bool,
                       model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        output = self.model(z, t.to(z.device), **(model_kwargs or {}))
        alpha, sigma = self.alpha_sigma(t, z)
        pred_xstart = predict_xstart(output.to(z.dtype), z, alpha, sigma, self.head)
        return pred_xstart.clamp(-1.0, 1.0) if clip else pred_xstart

    def step(self, z: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, *, clip: bool = True,
             model_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step z_t -> z_{t_next} (per-sample t); returns (z_next, pred_xstart)."""
        pred_xstart = self.predict_xstart(z, t, clip=clip, model_kwargs=model_kwargs)
        alpha, sigma = self.alpha_sigma(t, z)
        eps = (z - alpha * pred_xstart) / sigma  # re-derived from the (clipped) prediction, as for the students
        return ddim_step(pred_xstart, eps, self.alpha_bar(t, z), self.alpha_bar(t_next, z)), pred_xstart


def ddim_on_grid(denoiser: GridDenoiser, x_T: torch.Tensor, grid: list[int], *, clip: bool = True,
                 model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Deterministic DDIM from noise at grid[-1] down the ascending original indices ``grid``; returns x_hat."""
    z = x_T
    n = x_T.shape[0]
    for j in range(len(grid) - 1, -1, -1):
        t = torch.full((n,), grid[j], dtype=torch.int64)
        t_next = torch.full((n,), grid[j - 1] if j > 0 else CLEAN, dtype=torch.int64)
        z, _ = denoiser.step(z, t, t_next, clip=clip, model_kwargs=model_kwargs)
    return z


def teacher_target(teacher: GridDenoiser, z_t: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                   t_prev: torch.Tensor, *, clip: bool = True,
                   model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """The student's x_hat target at z_t: two (clipped) teacher DDIM steps t -> t' -> t'', then the inversion."""
    z_mid, _ = teacher.step(z_t, t, t_mid, clip=clip, model_kwargs=model_kwargs)
    z_tpp, _ = teacher.step(z_mid, t_mid, t_prev, clip=clip, model_kwargs=model_kwargs)
    alpha_t, sigma_t = teacher.alpha_sigma(t, z_t)
    alpha_tpp, sigma_tpp = teacher.alpha_sigma(t_prev, z_t)
    return distillation_target(z_t, z_tpp, alpha_t, sigma_t, alpha_tpp, sigma_tpp)


def loss_weight(alpha: torch.Tensor, sigma: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """truncated-snr: max(SNR, 1) (= max of x- and eps-space MSE); snr+1: SNR + 1 (= v-space MSE)."""
    snr = alpha**2 / sigma**2
    if weighting == "truncated-snr":
        return snr.clamp(min=1.0)
    return snr + 1.0


# ----------------------------------------------------------------------------------------------------------------
# The plan of a run: from_steps, the student head, the halvings


def plan_stages(config: DistillConfig, parent: LoadedCheckpoint) -> tuple[int, StudentParam, list[int]]:
    """(from_steps, param, [student steps per stage]) after checking every combination.

    OptionError when the options do not fit the teacher (the CLI exits 2); ConfigError when the teacher itself is
    unusable.
    """
    T = parent.config.diffusion.timesteps
    channels = parent.config.model.in_channels
    out_channels = parent.config.out_channels
    name = Path(config.checkpoint).name
    if parent.kind == "ddgan":
        raise ConfigError(f"{name} is a denoising diffusion GAN: it is already a {T}-step generator and has no "
                          "denoiser to distill (distill a diffusion model trained with --method iddpm)")
    if parent.kind == "cld":
        raise ConfigError(f"{name} is a CLD network: progressive distillation halves a discrete chain's eps/x/v "
                          "denoiser, and a CLD network learns the velocity's score of a continuous-time SDE")
    if parent.kind == "student":
        student = parent.config.student
        own = len(student.steps)
        if student.steps != tuple(student_grid(T, own)):
            raise ConfigError(f"{name}'s step grid is not the k_i = round(i T / N) - 1 grid: cannot distill it further")
        if config.from_steps is not None and config.from_steps != own:
            raise OptionError(f"{name} is a {own}-step student: --from-steps must be {own} (or omitted)")
        from_steps = own
        if config.param is not None and config.param != student.param:
            raise OptionError(f"{name} predicts {student.param!r}: --param must be {student.param} (or omitted)")
        param = student.param
    else:
        from_steps = config.from_steps or min(1024, 1 << (T.bit_length() - 1))
        param = config.param or default_param(parent.config.diffusion.mean_type, out_channels, channels)
    if not is_power_of_two(from_steps):
        raise OptionError(f"--from-steps {from_steps} is not a power of two (e.g. 256, 512, 1024)")
    if from_steps > T:
        raise OptionError(f"--from-steps {from_steps} exceeds the {T} steps of {name}'s training chain")
    if not is_power_of_two(config.to_steps):
        raise OptionError(f"--to-steps {config.to_steps} is not a power of two (e.g. 1, 2, 4, 8)")
    if config.to_steps >= from_steps:
        raise OptionError(f"--to-steps {config.to_steps} must be smaller than --from-steps {from_steps}")
    if param == "both" and out_channels < 2 * channels:
        raise OptionError(f"--param both needs {2 * channels} output channels but {name} has {out_channels} "
                          "(it was trained with a fixed variance): use --param v or x")
    # Powers of two: from_steps / 2, / 4, ... down to to_steps.
    return from_steps, param, [from_steps >> k for k in range(1, (from_steps // config.to_steps).bit_length())]


def default_param(mean_type: str, out_channels: int, channels: int) -> StudentParam:
    """The head that starts closest to the teacher: its own for a v / x0 model (the student starts as an exact
    copy); for eps (which cannot take the SNR ~ 0 step) "both" with the zero-initialised variance channels as the
    x-head when there are 2C outputs, else v."""
    if mean_type == "v":
        return "v"
    if mean_type == "x0":
        return "x"
    return "both" if out_channels >= 2 * channels else "v"


def head_of(checkpoint: LoadedCheckpoint) -> Head:
    if checkpoint.kind == "student" and checkpoint.config.student is not None:
        return checkpoint.config.student.param
    return checkpoint.config.diffusion.mean_type
