"""Beta schedules against docs/conventions.md #1-2, recomputed here independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpmctl.schedules import beta_schedule


@pytest.mark.parametrize("T", [1, 2, 10, 1000, 4000])
def test_linear_endpoints_and_length(T: int) -> None:
    betas = beta_schedule("linear", T)
    assert betas.dtype == torch.float64
    assert betas.shape == (T,)
    assert betas[0].item() == pytest.approx(1e-4 * 1000 / T, rel=1e-14)
    if T > 1:
        assert betas[-1].item() == pytest.approx(0.02 * 1000 / T, rel=1e-14)
        steps = np.diff(betas.numpy())
        np.testing.assert_allclose(steps, (0.02 - 1e-4) * 1000 / T / (T - 1), rtol=1e-9)


def _cosine_reference(T: int) -> list[float]:
    def f(u: float) -> float:
        return math.cos((u + 0.008) / (1 + 0.008) * math.pi / 2) ** 2

    return [min(1.0 - f((k + 1) / T) / f(k / T), 0.999) for k in range(T)]


@pytest.mark.parametrize("T", [1, 7, 100, 1000, 4000])
def test_cosine_matches_formula_with_clip(T: int) -> None:
    betas = beta_schedule("cosine", T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas.numpy(), _cosine_reference(T), rtol=1e-12, atol=0)
    assert betas.max().item() <= 0.999


def test_cosine_final_step_is_clipped_and_abar_not_zero() -> None:
    T = 4000
    betas = beta_schedule("cosine", T)
    assert betas[-1].item() == 0.999  # 1 - f(1)/f(1 - 1/T) ~ 1 is clipped
    abar = torch.cumprod(1 - betas, dim=0)
    # abar[T-1] = f((T-1)/T)/f(0) * (1 - 0.999) ~ 1.5e-10: recompute it from the unclipped closed form.
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    n_clipped = int((betas == 0.999).sum())
    assert n_clipped == 1
    expected = f((T - 1) / T) / f(0) * 0.001
    assert abar[-1].item() == pytest.approx(expected, rel=1e-8)
    assert 1.4e-10 < abar[-1].item() < 1.6e-10
    # Unclipped steps: abar_k = f((k+1)/T) / f(0).
    ks = np.arange(T - 1)
    np.testing.assert_allclose(
        abar[:-1].numpy(), [f((k + 1) / T) / f(0) for k in ks], rtol=1e-9
    )


@pytest.mark.parametrize("name,T", [("quadratic", 10), ("", 10), ("linear", 0), ("cosine", -3), ("linear", 2.5)])
def test_bad_arguments_raise_value_error(name: str, T: object) -> None:
    with pytest.raises(ValueError):
        beta_schedule(name, T)  # type: ignore[arg-type]
