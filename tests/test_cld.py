"""The critically-damped Langevin process (ddpmctl.cld): its perturbation kernel against a numerical solution of the
linear SDE's moment equations, its draws, and the hybrid score-matching loss on Gaussian data, where the score and
the loss's minimum are known in closed form.

The reference kernel is Van Loan's block matrix exponential of the SDE du = F u dt + G dW (F = beta A, G G^T = Q):
exp([[-F, Q], [0, F^T]] t) = [[., B12], [0, B22]] gives Phi = B22^T and the covariance integral
int_0^t Phi(s) Q Phi(s)^T ds = Phi B12, so Sigma(t) = Phi Sigma_0 Phi^T + Phi B12. It is evaluated with mpmath at
80 significant digits, so that its small entries (near t = 0, and e^{-2a}-small ones at t = 1) are exact to float64
precision.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from ddpmctl.cld import CldProcess

# Many times, from the official t_min up, on both sides of the kernel's series/closed-form switch (2a = 0.05).
TIMES = (1e-5, 3e-5, 1e-4, 4e-4, 1e-3, 3e-3, 6e-3, 6.25e-3, 6.3e-3, 1e-2, 0.03, 0.1, 0.25, 0.5, 0.75, 1.0)
PROCESSES = (CldProcess(numerical_eps=0.0), CldProcess(mass=1.0, beta=2.0, gamma=0.1, numerical_eps=0.0),
             CldProcess(mass=0.05, beta=8.0, gamma=0.5, numerical_eps=0.0))


def van_loan(mass: float, beta: float, t: float) -> tuple[mpmath.matrix, mpmath.matrix]:
    """(Phi(t), int_0^t Phi Q Phi^T) of the CLD SDE with constant beta, from the block matrix exponential."""
    with mpmath.workdps(80):
        m, b = mpmath.mpf(mass), mpmath.mpf(beta)
        damping = 2 * mpmath.sqrt(m)
        drift = mpmath.matrix([[0, 1 / m], [-1, -damping / m]]) * b
        q = mpmath.matrix([[0, 0], [0, 2 * damping * b]])
        block = mpmath.zeros(4, 4)
        for i in range(2):
            for j in range(2):
                block[i, j] = -drift[i, j] * t
                block[i, 2 + j] = q[i, j] * t
                block[2 + i, 2 + j] = drift[j, i] * t
        e = mpmath.expm(block)
        phi = e[2:4, 2:4].T
        return phi, phi * e[0:2, 2:4]


def reference_covariance(process: CldProcess, t: float, var0_x: float, var0_v: float) -> torch.Tensor:
    """Sigma(t) [2, 2] (float64) from a start diag(var0_x, var0_v), plus the process's numerical eps on the diagonal."""
    with mpmath.workdps(80):
        phi, noise = van_loan(process.mass, process.beta, t)
        sigma = phi * mpmath.matrix([[var0_x, 0], [0, var0_v]]) * phi.T + noise
        out = torch.tensor([[float(sigma[i, j]) for j in range(2)] for i in range(2)], dtype=torch.float64)
    return out + process.numerical_eps * torch.eye(2, dtype=torch.float64)


def reference_transition(process: CldProcess, t: float) -> torch.Tensor:
    phi, _ = van_loan(process.mass, process.beta, t)
    return torch.tensor([[float(phi[i, j]) for j in range(2)] for i in range(2)], dtype=torch.float64)


def _t(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


def _as_matrix(cov: object) -> torch.Tensor:
    xx, xv, vv = (float(getattr(cov, k)) for k in ("xx", "xv", "vv"))
    return torch.tensor([[xx, xv], [xv, vv]], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("process", PROCESSES, ids=["official", "M1-beta2", "M0.05-beta8"])
def test_transition_matches_the_matrix_exponential(process: CldProcess) -> None:
    for t in TIMES:
        phi = torch.tensor([float(c) for c in process.transition(process.beta_integral(_t(t)))],
                           dtype=torch.float64).reshape(2, 2)
        torch.testing.assert_close(phi, reference_transition(process, t), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("process", PROCESSES, ids=["official", "M1-beta2", "M0.05-beta8"])
@pytest.mark.parametrize("start", ["hsm", "deterministic", "stationary", "other"])
def test_covariance_matches_van_loan_to_float64_precision(process: CldProcess, start: str) -> None:
    """Each entry to a relative 1e-12 at every t, t_min included: no entry loses its digits near t = 0."""
    m = process.mass
    var0 = {"hsm": (0.0, process.gamma * m), "deterministic": (0.0, 0.0), "stationary": (1.0, m),
            "other": (0.3, 0.7 * m)}[start]
    for t in TIMES:
        got = _as_matrix(process.covariance(process.beta_integral(_t(t)), *var0))
        want = reference_covariance(process, t, *var0)
        if start == "stationary":  # the equilibrium N(0, diag(1, M)) stays put: S_xv is 0
            torch.testing.assert_close(got, torch.tensor([[1.0, 0.0], [0.0, m]], dtype=torch.float64), rtol=1e-14,
                                       atol=1e-15)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15 if start == "stationary" else 0.0,
                                   msg=f"{start} start at t={t}")


@pytest.mark.parametrize("process", [CldProcess(), CldProcess(mass=1.0, beta=2.0, gamma=0.1, numerical_eps=1e-7)],
                         ids=["official", "M1-beta2-eps1e-7"])
def test_training_kernel_and_its_cholesky_factor(process: CldProcess) -> None:
    """The hybrid-score-matching kernel starts at diag(0, gamma M) and carries the numerical eps on its diagonal;
    its Cholesky factor is torch.linalg.cholesky of the reference covariance."""
    t = torch.tensor(TIMES, dtype=torch.float64)
    cov = process.hsm_covariance(t)
    chol = cov.cholesky()
    for i, tt in enumerate(TIMES):
        want = reference_covariance(process, tt, 0.0, process.gamma * process.mass)
        got = torch.tensor([[cov.xx[i], cov.xv[i]], [cov.xv[i], cov.vv[i]]], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
        lower = torch.linalg.cholesky(want)
        got_l = torch.tensor([[chol.xx[i], 0.0], [chol.xv[i], chol.vv[i]]], dtype=torch.float64)
        # L_vv = sqrt(S_vv - L_xv^2) loses up to log10(S_vv / L_vv^2) digits to cancellation (about 3 at t_min).
        torch.testing.assert_close(got_l, lower, rtol=1e-9, atol=0.0, msg=f"t={tt}")
        torch.testing.assert_close(float(process.score_scale(t[i:i + 1])), -1.0 / float(lower[1, 1]), rtol=1e-9,
                                   atol=0.0)


@pytest.mark.parametrize("eps", [1e-9, 0.0])
def test_kernel_is_finite_and_positive_definite_at_t_min(eps: float) -> None:
    """The official code's inf/NaN losses come from the kernel near t = 0. Here, in float64 and even without the
    numerical eps, every entry is finite, det > 0, and the factor is real with L_vv > 0, for the training kernel and
    for a deterministic start (the sampler's steps), down to t = 1e-8."""
    process = CldProcess(numerical_eps=eps)
    t = torch.tensor([1e-8, 1e-7, 1e-6, 1e-5], dtype=torch.float64)
    for cov in (process.hsm_covariance(t), process.covariance(process.beta_integral(t))):
        det = cov.xx * cov.vv - cov.xv**2
        chol = cov.cholesky()
        for tensor in (cov.xx, cov.xv, cov.vv, chol.xx, chol.xv, chol.vv):
            assert torch.isfinite(tensor).all()
        assert (cov.xx > 0).all() and (det > 0).all() and (chol.vv > 0).all() and (chol.xx > 0).all()
    assert torch.isfinite(process.score_scale(t)).all()


def test_mean_is_the_transition_applied_to_the_start() -> None:
    process = CldProcess(mass=0.5, beta=3.0, gamma=0.2)
    g = torch.Generator().manual_seed(1)
    x0, v0 = torch.randn(len(TIMES), 3, generator=g), torch.randn(len(TIMES), 3, generator=g)
    t = torch.tensor(TIMES, dtype=torch.float64)
    mean_x, mean_v = process.mean(x0, v0, t)
    only_x, only_v = process.mean(x0, None, t)
    for i, tt in enumerate(TIMES):
        phi = reference_transition(process, tt)
        want = phi @ torch.stack([x0[i].double(), v0[i].double()])
        torch.testing.assert_close(torch.stack([mean_x[i], mean_v[i]]), want, rtol=1e-12, atol=1e-14)
        want0 = phi @ torch.stack([x0[i].double(), torch.zeros(3, dtype=torch.float64)])
        torch.testing.assert_close(torch.stack([only_x[i], only_v[i]]), want0, rtol=1e-12, atol=1e-14)


def test_perturb_draws_have_the_kernels_mean_and_covariance() -> None:
    """(x_t, v_t) = perturb(x_0, t, eps_x, eps_v) for N standard-normal pairs: the sample mean and covariance are
    Phi (x_0, 0) and the training kernel's Sigma, within 5 standard errors (Var of a sample covariance entry of a
    Gaussian pair: (S_ii S_jj + S_ij^2) / N)."""
    process = CldProcess(mass=0.5, beta=3.0, gamma=0.2, numerical_eps=1e-6)
    n = 200_000
    g = torch.Generator().manual_seed(7)
    for tt in (1e-4, 0.05, 0.4, 1.0):
        x0 = torch.full((n, 1), 0.8)
        t = torch.full((n,), tt, dtype=torch.float64)
        x, v = process.perturb(x0, t, torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g))
        assert x.dtype == torch.float32
        u = torch.cat([x, v], 1).double()
        phi = reference_transition(process, tt)
        sigma = reference_covariance(process, tt, 0.0, process.gamma * process.mass)
        want_mean = phi @ torch.tensor([0.8, 0.0], dtype=torch.float64)
        se_mean = (sigma.diagonal() / n).sqrt()
        assert ((u.mean(0) - want_mean).abs() <= 5 * se_mean + 1e-7).all(), (tt, u.mean(0), want_mean)
        centred = u - want_mean
        sample_cov = centred.T @ centred / n
        se_cov = ((sigma.diagonal()[:, None] * sigma.diagonal()[None, :] + sigma**2) / n).sqrt()
        # (float32 draws: a relative 1e-6 floor on the comparison of each entry.)
        assert ((sample_cov - sigma).abs() <= 5 * se_cov + 1e-6 * sigma.abs()).all(), (tt, sample_cov, sigma)


# ---------------------------------------------------------------------------------- the score-matching loss
def _gaussian_case(process: CldProcess, tt: float, mean: float, std: float) -> dict[str, torch.Tensor]:
    """For x_0 ~ N(mean, std^2): the training kernel Sigma_hsm, its factor, the marginal's mean mu and precision
    P = Sigma_data^-1 with Sigma_data = Sigma_hsm + Phi diag(std^2, 0) Phi^T (all from the reference kernel)."""
    phi = reference_transition(process, tt)
    sigma = reference_covariance(process, tt, 0.0, process.gamma * process.mass)
    data = sigma + phi @ torch.diag(torch.tensor([std**2, 0.0], dtype=torch.float64)) @ phi.T
    return {"phi": phi, "sigma": sigma, "lower": torch.linalg.cholesky(sigma),
            "mu": phi @ torch.tensor([mean, 0.0], dtype=torch.float64), "precision": torch.linalg.inv(data)}


def _exact_network_output(case: dict[str, torch.Tensor], x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output n whose mixed score -v / S_vv - n / L_vv is the marginal's exact v-score -[P (u - mu)]_v."""
    p, mu, sigma, lvv = case["precision"], case["mu"], case["sigma"], case["lower"][1, 1]
    score = -(p[1, 0] * (x.double() - mu[0]) + p[1, 1] * (v.double() - mu[1]))
    return -lvv * (score + v.double() / sigma[1, 1])


@pytest.mark.parametrize("process", [CldProcess(), CldProcess(mass=1.0, beta=2.0, gamma=0.1)],
                         ids=["official", "M1-beta2"])
def test_hsm_loss_at_the_exact_score_is_its_known_minimum(process: CldProcess) -> None:
    """reweightedv2 at the exact score: per dimension E[(L_vv [P (u - mu)]_v - eps_v)^2] = L_vv^2 (P Sigma_data P)_vv
    - 2 L_vv (P L)_vv + 1 = 1 - L_vv^2 P_vv (u - mu = Phi (x_0 - m, 0) + L eps). Monte Carlo within 5 standard
    errors; an output offset by delta adds delta^2 per dimension (the residual has mean 0 at the optimum)."""
    n, dims, delta = 100_000, 3, 0.3
    g = torch.Generator().manual_seed(3)
    for tt in (1e-5, 0.01, 0.2, 1.0):
        case = _gaussian_case(process, tt, mean=0.7, std=0.5)
        x0 = 0.7 + 0.5 * torch.randn(n, dims, generator=g, dtype=torch.float64)
        t = torch.full((n,), tt, dtype=torch.float64)
        noise_x, noise_v = torch.randn(n, dims, generator=g), torch.randn(n, dims, generator=g)
        x, v = process.perturb(x0, t, noise_x, noise_v)
        exact = _exact_network_output(case, x, v)
        loss = process.hsm_loss(exact, v, t, noise_v).double()
        minimum = dims * (1 - float(case["lower"][1, 1]) ** 2 * float(case["precision"][1, 1]))
        se = float(loss.std()) / math.sqrt(n)
        assert abs(float(loss.mean()) - minimum) <= 5 * se, (tt, float(loss.mean()), minimum, se)
        assert 0 <= minimum < dims
        excess = process.hsm_loss(exact + delta, v, t, noise_v).double() - loss
        se_excess = float(excess.std()) / math.sqrt(n)
        assert abs(float(excess.mean()) - dims * delta**2) <= 5 * se_excess + 1e-6, (tt, float(excess.mean()))
        assert float(excess.mean()) > 0


def test_weightings_scale_the_residual_as_documented() -> None:
    """reweightedv1 = reweightedv2 * beta Gamma and likelihood = reweightedv2 * beta Gamma / L_vv^2, sample by
    sample (L_vv from the reference kernel's Cholesky factor)."""
    process = CldProcess(mass=0.5, beta=3.0, gamma=0.2)
    times = (1e-5, 0.01, 0.3, 1.0)
    g = torch.Generator().manual_seed(5)
    out, v, noise_v = (torch.randn(len(times), 2, 2, generator=g) for _ in range(3))
    t = torch.tensor(times, dtype=torch.float64)
    base = process.hsm_loss(out, v, t, noise_v, "reweightedv2").double()
    v1 = process.hsm_loss(out, v, t, noise_v, "reweightedv1").double()
    like = process.hsm_loss(out, v, t, noise_v, "likelihood").double()
    beta_gamma = 3.0 * 2 * math.sqrt(0.5)
    lvv = torch.tensor([float(torch.linalg.cholesky(reference_covariance(process, tt, 0.0, 0.1))[1, 1])
                        for tt in times], dtype=torch.float64)
    torch.testing.assert_close(v1, base * beta_gamma, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(like, base * beta_gamma / lvv**2, rtol=1e-6, atol=0.0)
    # And reweightedv2 is the squared residual n + v L_vv / S_vv - eps_v, summed over dimensions.
    s_vv = torch.tensor([float(reference_covariance(process, tt, 0.0, 0.1)[1, 1]) for tt in times],
                        dtype=torch.float64)
    residual = out.double() + v.double() * (lvv / s_vv)[:, None, None] - noise_v.double()
    torch.testing.assert_close(base, (residual**2).sum((1, 2)), rtol=1e-5, atol=1e-6)


def test_mixed_score_is_the_gaussian_part_plus_the_scaled_output() -> None:
    """s = -v / S_vv + l_t n with l_t = -1 / L_vv of the training kernel (the official mixed score)."""
    process = CldProcess()
    times = (1e-5, 0.1, 1.0)
    g = torch.Generator().manual_seed(2)
    out, v = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    got = process.mixed_score(out, v, torch.tensor(times, dtype=torch.float64)).double()
    for i, tt in enumerate(times):
        sigma = reference_covariance(process, tt, 0.0, process.gamma * process.mass)
        lvv = float(torch.linalg.cholesky(sigma)[1, 1])
        want = -v[i].double() / sigma[1, 1] - out[i].double() / lvv
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
