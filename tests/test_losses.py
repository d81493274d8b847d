"""normal_kl and the discretized Gaussian decoder against closed forms (docs/conventions.md #9)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ddpmctl.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl

GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 8-bit values mapped to [-1, 1]


def _tanh_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def test_normal_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    got = normal_kl(m1, lv1, m2, lv2)
    want = kl_divergence(Normal(m1, torch.exp(0.5 * lv1)), Normal(m2, torch.exp(0.5 * lv2)))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_normal_kl_scalars_broadcast_and_keep_dtype() -> None:
    m = torch.tensor([0.3, -1.2], dtype=torch.float32)
    lv = torch.tensor([-0.5, 0.4], dtype=torch.float32)
    got = normal_kl(m, lv, 0.0, 0.0)
    assert got.dtype == torch.float32
    want = 0.5 * (-1.0 - lv + torch.exp(lv) + m**2)
    torch.testing.assert_close(got, want)
    assert normal_kl(m.double(), lv.double(), 0.0, 0.0).dtype == torch.float64


def test_approx_cdf_is_close_to_erf_and_symmetric() -> None:
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    cdf = approx_standard_normal_cdf(x)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (cdf - exact).abs().max() < 1e-3
    torch.testing.assert_close(cdf + approx_standard_normal_cdf(-x), torch.ones_like(x), rtol=0, atol=1e-15)
    assert approx_standard_normal_cdf(torch.tensor(0.7, dtype=torch.float64)).item() == pytest.approx(
        _tanh_cdf(0.7), rel=1e-14
    )


@pytest.mark.parametrize("mean", [-1.0, -0.31, 0.0, 0.5, 0.93, 1.2])
@pytest.mark.parametrize("log_scale", [-6.0, -3.0, -1.0, 0.0, 1.0])
def test_discretized_likelihood_sums_to_one_over_the_grid(mean: float, log_scale: float) -> None:
    means = torch.full_like(GRID, mean)
    log_scales = torch.full_like(GRID, log_scale)
    logp = discretized_gaussian_log_likelihood(GRID, means=means, log_scales=log_scales)
    assert logp.dtype == torch.float64
    # Bins that underflow are floored at 1e-12 each, so the total can exceed 1 by at most 256e-12.
    assert torch.exp(logp).sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_bins_and_edges_match_the_formula() -> None:
    mean, log_scale = 0.1, -0.7
    s = math.exp(log_scale)
    x = GRID[[0, 40, 140, 255]]
    got = discretized_gaussian_log_likelihood(
        x, means=torch.full_like(x, mean), log_scales=torch.full_like(x, log_scale)
    )
    h = 1.0 / 255.0
    lo = math.log(_tanh_cdf((-1 - mean + h) / s))  # first bin: everything below its upper edge
    hi = math.log(1 - _tanh_cdf((1 - mean - h) / s))  # last bin: everything above its lower edge
    mids = [
        math.log(_tanh_cdf((v - mean + h) / s) - _tanh_cdf((v - mean - h) / s)) for v in x[1:3].tolist()
    ]
    torch.testing.assert_close(got, torch.tensor([lo, *mids, hi], dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_discretized_likelihood_floors_the_log_at_1e_12() -> None:
    x = torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64)
    far = torch.tensor([5.0, 5.0, -5.0], dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(x, means=far, log_scales=torch.full_like(x, -4.0))
    torch.testing.assert_close(got, torch.full_like(x, math.log(1e-12)), rtol=1e-12, atol=0)


def test_discretized_likelihood_keeps_float32() -> None:
    x = GRID.float()
    got = discretized_gaussian_log_likelihood(x, means=torch.zeros_like(x), log_scales=torch.zeros_like(x))
    assert got.dtype == torch.float32


def test_discretized_likelihood_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        discretized_gaussian_log_likelihood(GRID, means=GRID[:3], log_scales=GRID)
