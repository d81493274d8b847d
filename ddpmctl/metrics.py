"""Sample-quality statistics on feature vectors: Frechet distance, KID, precision and recall. Pure maths, float64.

Every function takes feature matrices [N, D] (one row per image, from a feature network such as the FID Inception-v3
or ddpmctl's digits classifier: ``ddpmctl.features``) and computes in float64, whatever dtype they come in. No I/O.

- Frechet distance (Heusel et al. 2017, the "FID" when the features are Inception-v3's pool3):
  ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}) between the Gaussians fitted to the two sets.
- KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / D + 1)^3, averaged over random subsets of equal size drawn from both sets.
- Precision and recall (Kynkaanniemi et al. 2019): the share of generated samples that fall inside the real
  manifold (the union of balls around every real feature whose radius is the distance to its k-th nearest real
  neighbour), and the share of real samples inside the generated manifold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KidEstimate", "frechet_distance", "gaussian_stats", "kernel_inception_distance", "polynomial_mmd2",
           "precision_recall", "trace_sqrt_product"]


def _float64(features: torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a matrix [N, D] of features, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return x


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and covariance [D, D] (normalised by N - 1, as numpy.cov) of features [N, D], in float64."""
    x = _float64(features, "features")
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {x.shape[0]}")
    mu = x.mean(dim=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues, from
    rounding, are taken as 0)."""
    eigenvalues, vectors = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T


def trace_sqrt_product(sigma_1: torch.Tensor, sigma_2: torch.Tensor) -> float:
    """Tr((S_1 S_2)^{1/2}) for covariance matrices, in float64.

    S_1 S_2 is not symmetric, but it is similar to the PSD matrix M = S_1^{1/2} S_2 S_1^{1/2}
    (S_1^{-1/2} M S_1^{1/2} = S_1 S_2 where S_1 is invertible, and by continuity otherwise), so both have the same
    eigenvalues, all real and >= 0, and the trace of the square root is the sum of their square roots. Working with
    the symmetric M (eigh) avoids the complex eigenvalues and the iterations of a general sqrtm.
    """
    root_1 = _psd_sqrt(sigma_1.to(torch.float64))
    middle = root_1 @ sigma_2.to(torch.float64) @ root_1
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2)
    return float(eigenvalues.clamp(min=0).sqrt().sum())


def frechet_distance(mu_1: torch.Tensor, sigma_1: torch.Tensor, mu_2: torch.Tensor, sigma_2: torch.Tensor) -> float:
    """Frechet distance between N(mu_1, S_1) and N(mu_2, S_2): ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}).

    Heusel et al. 2017, eq. (6). Float64 throughout; the result is clamped at 0 (rounding can make it -1e-12).
    """
    mu_1, mu_2 = (torch.as_tensor(m).to(torch.float64) for m in (mu_1, mu_2))
    sigma_1, sigma_2 = (torch.as_tensor(s).to(torch.float64) for s in (sigma_1, sigma_2))
    if mu_1.shape != mu_2.shape or mu_1.ndim != 1:
        raise ValueError(f"means of different shapes: {tuple(mu_1.shape)} and {tuple(mu_2.shape)}")
    d = mu_1.shape[0]
    if sigma_1.shape != (d, d) or sigma_2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {tuple(sigma_1.shape)} and {tuple(sigma_2.shape)}")
    diff = mu_1 - mu_2
    value = float(diff @ diff) + float(sigma_1.trace() + sigma_2.trace()) - 2 * trace_sqrt_product(sigma_1, sigma_2)
    return max(value, 0.0)


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 between equal-sized sets x, y [m, D] with the cubic kernel k(a, b) = (a.b / D + 1)^3.

    Binkowski et al. 2018, eq. (3) with the kernel of their Sec. 4: the within-set sums leave out the diagonal
    (k(x_i, x_i)), the cross term keeps all m^2 pairs.
    """
    m, d = x.shape
    if y.shape != x.shape or m < 2:
        raise ValueError(f"the MMD needs two sets of the same shape with m >= 2, got {tuple(x.shape)}, {tuple(y.shape)}")
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


@dataclass(frozen=True)
class KidEstimate:
    """KID as the mean of the subset estimates, and their standard deviation (the standard error of one subset's
    estimate, what KID papers print after the +-)."""

    mean: float
    std: float
    subsets: int
    subset_size: int


def kernel_inception_distance(generated: torch.Tensor, real: torch.Tensor, *, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> KidEstimate:
    """KID between feature sets [N_g, D] and [N_r, D]: polynomial MMD^2 averaged over ``subsets`` random subsets.

    Each subset draws ``min(subset_size, N_g, N_r)`` rows from each set without replacement (torch-fidelity's
    protocol: 100 subsets of 1000). The draws come from a generator seeded with ``seed`` and never depend on how
    the features were batched, so the same features always give the same KID.
    """
    x = _float64(generated, "generated features")
    y = _float64(real, "real features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} and {y.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {x.shape[0]} and {y.shape[0]}")
    rng = torch.Generator().manual_seed(seed)
    values = torch.empty(subsets, dtype=torch.float64)
    for i in range(subsets):
        pick_x = torch.randperm(x.shape[0], generator=rng)[:size]
        pick_y = torch.randperm(y.shape[0], generator=rng)[:size]
        values[i] = polynomial_mmd2(x[pick_x], y[pick_y])
    std = float(values.std(unbiased=False)) if subsets > 1 else 0.0
    return KidEstimate(mean=float(values.mean()), std=std, subsets=subsets, subset_size=size)


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (the row itself, at distance 0, is skipped).

    Row blocks keep the memory at chunk x N distances, whatever N is."""
    radii = torch.empty(x.shape[0], dtype=x.dtype)
    for start in range(0, x.shape[0], chunk):
        radii[start:start + chunk] = torch.cdist(x[start:start + chunk], x).kthvalue(k + 1, dim=1).values
    return radii


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    """Share of ``points`` within distance radii[j] of some centre j (ball boundaries count as inside)."""
    inside = torch.empty(points.shape[0], dtype=torch.bool)
    for start in range(0, points.shape[0], chunk):
        block = torch.cdist(points[start:start + chunk], centres)
        inside[start:start + chunk] = (block <= radii[None, :]).any(dim=1)
    return float(inside.to(torch.float64).mean())


def precision_recall(generated: torch.Tensor, real: torch.Tensor, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Sec. 2) with k-nearest-neighbour balls.

    precision = share of generated features inside the real manifold; recall = share of real features inside the
    generated manifold. A manifold is the union over its set of balls centred at each feature with radius the
    distance to its k-th nearest neighbour in the same set (k = 3, the paper's choice).
    """
    x = _float64(generated, "generated features")
    y = _float64(real, "real features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} and {y.shape[1]}")
    if min(x.shape[0], y.shape[0]) <= k:
        raise ValueError(f"precision and recall with k = {k} need more than {k} images on each side, "
                         f"got {x.shape[0]} and {y.shape[0]}")
    precision = _inside_manifold(x, y, _kth_neighbour_radii(y, k))
    recall = _inside_manifold(y, x, _kth_neighbour_radii(x, k))
    return precision, recall
