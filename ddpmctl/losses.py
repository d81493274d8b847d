"""Likelihood pieces of the variational bound: Gaussian KL and the discretized decoder (Ho et al. 2020, Sec. 3.3)."""

from __future__ import annotations

import math

import torch

# sqrt(2/pi) of the tanh approximation of the normal CDF (Page 1977), as the reference computes it.
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats; arguments broadcast.

    At least one argument must be a tensor; scalars take its dtype and device.
    """
    tensor = next((obj for obj in (mean1, logvar1, mean2, logvar2) if isinstance(obj, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    # exp() needs tensors: turn scalar log-variances into tensors like the reference does.
    logvar1, logvar2 = (
        x if isinstance(x, torch.Tensor) else torch.tensor(x).to(tensor) for x in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF via 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (docs/conventions.md #9)."""
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(x) of a Gaussian discretized to the 256 bins of 8-bit data in [-1, 1], elementwise, in nats.

    Bins have half-width 1/255; the first and last bins extend to -inf / +inf; every log clamps at 1e-12
    (docs/conventions.md #9, Ho et al. 2020 eq. 13). ``x`` must lie on the 8-bit grid mapped to [-1, 1].
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means and log_scales must have one shape, got {tuple(x.shape)}, {tuple(means.shape)}, "
            f"{tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = approx_standard_normal_cdf(min_in)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    # Edge bins: x = -1 takes all mass below its upper edge, x = +1 all mass above its lower edge.
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )
