"""The closed sets of values ddpmctl's options take, as Literal types: one definition each, shared by the configs
(pydantic), the library and the command line (typer lists them in --help and refuses others with exit 2).

Standard library only: the CLI declares its options without importing pydantic or torch, and the math core may
use it too.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["ChainSchedule", "CldSolver", "CldWeighting", "Striding", "ColorMode", "Estimator", "LEARNED_VARIANCES", "LossName", "LossType", "MeanType", "Method",
           "NanPolicy", "Precision", "PrecisionRequest", "EmaWarmup", "FeatureName", "FeatureRequest", "HutchinsonProbe", "Schedule",
           "Spacing", "Split", "StudentParam", "TraceProbe", "TimestepSamplerName", "VarType", "Weighting",
           "is_learned_variance"]

Schedule = Literal["cosine", "linear"]  # (the default first: --help lists them in this order)
# Every chain a checkpoint may hold: train's --schedule choices, and DDGAN's discretised VP-SDE (few steps only).
ChainSchedule = Literal["cosine", "linear", "vp-sde"]
# What `train --method` trains: an Improved-DDPM model, a denoising diffusion GAN (Xiao et al. 2022), or a
# critically-damped Langevin diffusion (Dockhorn et al. 2022).
Method = Literal["iddpm", "ddgan", "cld"]
MeanType = Literal["eps", "x0", "v"]
VarType = Literal["fixed_small", "fixed_large", "learned", "learned_range"]
LossType = Literal["mse", "rescaled_mse", "kl", "rescaled_kl"]
LossName = Literal["hybrid", "simple", "vlb"]
TimestepSamplerName = Literal["uniform", "loss-second-moment"]
NanPolicy = Literal["stop", "skip"]
Precision = Literal["fp32", "bf16"]
# What --precision accepts: auto = bf16 where the device computes it natively, else fp32 (ddpmctl.hardware).
PrecisionRequest = Literal["auto", "fp32", "bf16"]
EmaWarmup = Literal["power", "none"]  # ddpmctl.ema
ColorMode = Literal["auto", "rgb", "gray"]
Split = Literal["test", "train"]
StudentParam = Literal["v", "x", "both"]
Weighting = Literal["truncated-snr", "snr+1"]
Estimator = Literal["exact", "mc"]
Spacing = Literal["even", "ddim", "logsnr"]
# CLD's loss weightings (ddpmctl.cld.CldProcess.hsm_loss) and the time grids of its fixed-step integrators.
CldWeighting = Literal["reweightedv2", "reweightedv1", "likelihood"]
Striding = Literal["even", "quadratic"]  # how a sampler places its steps on the chain
# The CLD likelihood's ODE solvers (ddpmctl.cld_nll): fixed-step Heun and RK4, adaptive Bogacki-Shampine RK23; and
# its Hutchinson probes (exact: the whole trace, one backward pass per dimension, for small data).
CldSolver = Literal["heun", "rk4", "rk23"]
TraceProbe = Literal["gaussian", "rademacher", "exact"]
HutchinsonProbe = Literal["gaussian", "rademacher"]  # eval-nll --probe
FeatureName = Literal["digits", "inception"]  # ddpmctl.features: the networks sample quality is measured with
FeatureRequest = Literal["auto", "digits", "inception"]  # eval-samples --features: auto picks by the images

LEARNED_VARIANCES: tuple[str, ...] = ("learned", "learned_range")


def is_learned_variance(var_type: str) -> bool:
    """Whether the network predicts its own variance (its output has 2C channels: the mean's C, then the v's C)."""
    return var_type in LEARNED_VARIANCES
