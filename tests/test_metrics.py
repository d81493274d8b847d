"""ddpmctl.metrics against closed forms and independent computations (numpy's general eigenvalues, explicit loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpmctl.metrics import (frechet_distance, gaussian_stats, kernel_inception_distance, polynomial_mmd2,
                             precision_recall, trace_sqrt_product)


def _random_cov(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / (rank or d)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form() -> None:
    # Commuting covariances: Tr (S1 S2)^(1/2) = sum sqrt(a_i b_i), so FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    a = torch.tensor([0.5, 2.0, 3.0, 1e-3], dtype=torch.float64)
    b = torch.tensor([1.5, 0.25, 3.0, 4.0], dtype=torch.float64)
    mu1 = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)
    # The same Gaussians in a rotated basis: the distance is invariant.
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    rotated = frechet_distance(q @ mu1, q @ torch.diag(a) @ q.T, q @ mu2, q @ torch.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("rank", [None, 3])
def test_trace_sqrt_product_matches_the_eigenvalues_of_the_product(rank: int | None) -> None:
    # Independent route (TTUR's): the eigenvalues of the non-symmetric S1 S2 from numpy's general eigensolver.
    s1, s2 = _random_cov(8, 1, rank), _random_cov(8, 2)
    eig = np.linalg.eigvals(s1.numpy() @ s2.numpy()).astype(np.complex128)
    expected = float(np.sqrt(eig).real.sum())
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_frechet_distance_is_zero_for_equal_gaussians_and_symmetric() -> None:
    mu, s = torch.randn(6, dtype=torch.float64), _random_cov(6, 3)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-10)
    mu2, s2 = torch.randn(6, dtype=torch.float64), _random_cov(6, 4)
    assert frechet_distance(mu, s, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu, s), rel=1e-10)


def test_gaussian_stats_are_numpy_mean_and_cov() -> None:
    x = torch.randn(50, 5, dtype=torch.float64) * 3 + 1
    mu, sigma = gaussian_stats(x.to(torch.float32))
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), x.to(torch.float32).double().numpy().mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.to(torch.float32).double().numpy(), rowvar=False), rtol=1e-10)


def test_polynomial_mmd2_is_the_unbiased_estimator_written_out() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5
    m, d = x.shape

    def k(a: torch.Tensor, b: torch.Tensor) -> float:
        return (float(a @ b) / d + 1) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert polynomial_mmd2(x, y) == pytest.approx(within - 2 * cross, rel=1e-12)


def test_kid_with_whole_sets_as_subsets_is_the_full_mmd_and_has_no_spread() -> None:
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64) * 2
    estimate = kernel_inception_distance(x, y, subsets=5, subset_size=1000)
    assert estimate.subset_size == 20
    assert estimate.mean == pytest.approx(polynomial_mmd2(x, y), rel=1e-10)
    assert estimate.std == pytest.approx(0.0, abs=1e-9)


def test_kid_is_reproducible_and_near_zero_for_one_distribution() -> None:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    first = kernel_inception_distance(x, y, subsets=50, subset_size=100)
    assert first == kernel_inception_distance(x.clone(), y.clone(), subsets=50, subset_size=100)
    assert abs(first.mean) < 3 * first.std
    shifted = kernel_inception_distance(x + 1.0, y, subsets=50, subset_size=100)
    assert shifted.mean > 10 * shifted.std


def _brute_precision_recall(fake: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    def radii(points: np.ndarray) -> list[float]:
        return [sorted(np.linalg.norm(points - p, axis=1))[k] for p in points]  # index k skips the point itself

    def share_inside(points: np.ndarray, centres: np.ndarray, rad: list[float]) -> float:
        inside = [any(np.linalg.norm(p - c) <= r for c, r in zip(centres, rad)) for p in points]
        return sum(inside) / len(points)

    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


def test_precision_recall_match_the_definition_written_out() -> None:
    g = torch.Generator().manual_seed(2)
    real = torch.randn(40, 2, generator=g, dtype=torch.float64)
    fake = torch.randn(30, 2, generator=g, dtype=torch.float64) * 0.5 + 0.8  # narrower and shifted: P > R
    got = precision_recall(fake, real, k=3)
    expected = _brute_precision_recall(fake.numpy(), real.numpy(), 3)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[0] > got[1]


def test_precision_recall_extremes() -> None:
    x = torch.randn(25, 3, dtype=torch.float64)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    assert precision_recall(x + 1e3, x) == (0.0, 0.0)


@pytest.mark.parametrize("call", [
    lambda: gaussian_stats(torch.randn(1, 3)),
    lambda: gaussian_stats(torch.randn(3)),
    lambda: gaussian_stats(torch.tensor([[math.nan, 1.0], [0.0, 1.0]])),
    lambda: precision_recall(torch.randn(3, 2), torch.randn(10, 2)),
    lambda: kernel_inception_distance(torch.randn(5, 2), torch.randn(5, 3)),
    lambda: frechet_distance(torch.zeros(2), torch.eye(3), torch.zeros(2), torch.eye(2)),
])
def test_bad_inputs_are_value_errors(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        call()
