"""Critically-damped Langevin diffusion (Dockhorn, Vahdat and Kreis 2022): the process, its perturbation kernel, the
hybrid score-matching target, and the pieces its samplers and likelihood are built from. Maths only: no I/O, no
networks (docs/cld.md).

The data x are coupled to velocities v, u = (x, v), and noise enters only v (paper eq. 5)::

    dx = M^-1 v beta(t) dt
    dv = (-x - Gamma M^-1 v) beta(t) dt + sqrt(2 Gamma beta(t)) dW,        Gamma^2 = 4 M (critical damping)

Every dimension evolves independently with the same 2x2 linear dynamics. With g = 1 / Gamma and b = B(t) the
integrated beta, the transition matrix is (App. B.1)::

    Phi(b) = exp(-2 g b) [[1 + 2 g b, 4 g^2 b], [-b, 1 - 2 g b]]

and the stationary law is N(0, diag(1, M)), so a start with covariance Sigma_0 has
Sigma(b) = diag(1, M) + Phi (Sigma_0 - diag(1, M)) Phi^T. The covariance is written below so that no difference of
nearly equal numbers is taken near t = 0 (the official code's open reports of infinite and NaN losses come from
there), and all kernel arithmetic is float64.

Times are the SDE's own: t in [0, 1], t = 0 the data. The network sees t * 1000 (its sinusoidal time embedding's
scale, as for the discrete chains).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch

from ddpmctl.choices import CldWeighting as Weighting
from ddpmctl.choices import Striding

__all__ = ["CldProcess", "Cholesky2", "Covariance2", "Striding", "Weighting", "reverse_times"]

# Below this 2 g b, e^y - 1 - y - y^2/2 is summed as its series (expm1 would cancel almost every digit).
_SERIES_BELOW = 0.05


def _exp_tail3(y: torch.Tensor) -> torch.Tensor:
    """e^y - 1 - y - y^2 / 2 without cancellation (float64)."""
    series = y**3 / 6 * (1 + y / 4 * (1 + y / 5 * (1 + y / 6 * (1 + y / 7 * (1 + y / 8)))))
    direct = torch.expm1(y) - y - y * y / 2
    return torch.where(y.abs() < _SERIES_BELOW, series, direct)


@dataclass(frozen=True)
class Covariance2:
    """A 2x2 covariance per dimension: Sigma_xx, Sigma_xv, Sigma_vv (float64, broadcastable)."""

    xx: torch.Tensor
    xv: torch.Tensor
    vv: torch.Tensor

    def cholesky(self) -> Cholesky2:
        """L with L L^T = Sigma: L_xx = sqrt(S_xx), L_xv = S_xv / L_xx, L_vv = sqrt(det / S_xx). Where S_xx is 0
        (a step of length 0) L_xv is 0 too."""
        lxx = self.xx.clamp_min(0).sqrt()
        safe = torch.where(lxx > 0, lxx, torch.ones_like(lxx))
        lxv = torch.where(lxx > 0, self.xv / safe, torch.zeros_like(lxx))
        det = self.xx * self.vv - self.xv**2
        conditional = torch.where(lxx > 0, det / torch.where(lxx > 0, self.xx, torch.ones_like(lxx)), self.vv)
        return Cholesky2(lxx, lxv, conditional.clamp_min(0).sqrt())


@dataclass(frozen=True)
class Cholesky2:
    """The lower-triangular factor [[L_xx, 0], [L_xv, L_vv]] per dimension (float64)."""

    xx: torch.Tensor
    xv: torch.Tensor
    vv: torch.Tensor


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, 1, ...] to broadcast against ``like`` [N, ...]."""
    return value.reshape(value.shape[0], *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class CldProcess:
    """The CLD SDE with its constants (the official defaults): mass M, a constant beta, v_0 ~ N(0, gamma M), and
    ``numerical_eps`` added to Sigma_xx and Sigma_vv of the training kernel. Gamma = 2 sqrt(M)."""

    mass: float = 0.25
    beta: float = 4.0
    gamma: float = 0.04
    numerical_eps: float = 1e-9

    @property
    def damping(self) -> float:
        """Gamma, fixed by critical damping Gamma^2 = 4 M."""
        return 2.0 * math.sqrt(self.mass)

    # -------------------------------------------------------------------------------------------- the SDE
    def beta_at(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t): constant (the official ``beta_type linear`` with beta1 = 0)."""
        return torch.full_like(torch.as_tensor(t, dtype=torch.float64), self.beta)

    def beta_integral(self, t: torch.Tensor) -> torch.Tensor:
        """B(t) = int_0^t beta(s) ds."""
        return self.beta * torch.as_tensor(t, dtype=torch.float64)

    def drift(self, x: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward SDE's drift (dx/dt, dv/dt) at rate ``beta`` (broadcastable to x)."""
        m_inv = 1.0 / self.mass
        return m_inv * beta * v, (-x - self.damping * m_inv * v) * beta

    def diffusion_squared(self, beta: torch.Tensor) -> torch.Tensor:
        """The velocity's noise variance rate 2 Gamma beta (the position has none)."""
        return 2.0 * self.damping * beta

    def probability_flow(self, x: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | float,
                         score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dx/dt, dv/dt) of the probability-flow ODE: the drift less (0, Gamma beta s_v), half the velocity's
        noise rate times its score (Song et al. 2021 eq. 13 for this SDE)."""
        drift_x, drift_v = self.drift(x, v, beta)
        return drift_x, drift_v - 0.5 * self.diffusion_squared(beta) * score

    # ----------------------------------------------------------------------------------- the kernel
    def transition(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Phi(b) = exp(b A) for integrated beta ``b`` (float64): (Phi_xx, Phi_xv, Phi_vx, Phi_vv)."""
        b = torch.as_tensor(b, dtype=torch.float64)
        g = 1.0 / self.damping
        a = 2.0 * g * b
        decay = torch.exp(-a)
        return decay * (1 + a), decay * 4 * g * g * b, -decay * b, decay * (1 - a)

    def covariance(self, b: torch.Tensor, var0_x: float | torch.Tensor = 0.0,
                   var0_v: float | torch.Tensor = 0.0) -> Covariance2:
        """Sigma(b) from a start with independent variances ``var0_x``, ``var0_v`` (float64, no numerical eps).

        With a = 2 g b and M = Gamma^2 / 4 the three entries of diag(1, M) + Phi (Sigma_0 - diag(1, M)) Phi^T are
            S_xx = e^{-2a} [(e^{2a} - 1 - 2a - 2a^2) + (1 + a)^2 var0_x + a^2 var0_v / M]
            S_xv = e^{-2a} (Gamma a / 2) [(var0_v / M - var0_x) + a (2 - var0_x - var0_v / M)]
            S_vv = M [1 - e^{-2a} (1 - 2a + 2a^2)] + e^{-2a} [a^2 M var0_x + (1 - a)^2 var0_v]
        (the first bracket of S_xx is O(a^3) and is summed as a series for small a; S_xv's bracket is grouped so
        that a start with var0_v / M = var0_x, such as a deterministic one, takes no difference of 1 + a and 1 - a).
        """
        b = torch.as_tensor(b, dtype=torch.float64)
        m, gam = self.mass, self.damping
        a = 2.0 * b / gam
        decay = torch.exp(-2 * a)
        xx = decay * (_exp_tail3(2 * a) + (1 + a) ** 2 * var0_x + a * a * var0_v / m)
        xv = decay * (gam * a / 2) * ((var0_v / m - var0_x) + a * (2 - var0_x - var0_v / m))
        vv = m * (-torch.expm1(-2 * a) + decay * 2 * a * (1 - a)) + decay * (a * a * m * var0_x + (1 - a) ** 2 * var0_v)
        return Covariance2(xx, xv, vv)

    def hsm_covariance(self, t: torch.Tensor) -> Covariance2:
        """The training kernel's covariance at time t: x_0 given, v_0 ~ N(0, gamma M) marginalised (hybrid score
        matching, Sec. 3.2), plus ``numerical_eps`` on the diagonal (float64)."""
        c = self.covariance(self.beta_integral(torch.as_tensor(t, dtype=torch.float64)), 0.0, self.gamma * self.mass)
        return Covariance2(c.xx + self.numerical_eps, c.xv, c.vv + self.numerical_eps)

    def mean(self, x0: torch.Tensor, v0: torch.Tensor | None, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's mean Phi(B(t)) (x0, v0) (v0 None: 0), in float64, t [N]."""
        pxx, pxv, pvx, pvv = (_per_sample(c, x0) for c in self.transition(
            self.beta_integral(torch.as_tensor(t, dtype=torch.float64))))
        x0 = x0.double()
        if v0 is None:
            return pxx * x0, pvx * x0
        v0 = v0.double()
        return pxx * x0 + pxv * v0, pvx * x0 + pvv * v0

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, noise_x: torch.Tensor,
                noise_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u_t = mean + L (noise_x, noise_v) of the hybrid-score-matching kernel, in x0's dtype (arithmetic float64)."""
        mean_x, mean_v = self.mean(x0, None, t)
        chol = self.hsm_covariance(t).cholesky()
        lxx, lxv, lvv = (_per_sample(c, x0) for c in (chol.xx, chol.xv, chol.vv))
        x = mean_x + lxx * noise_x.double()
        v = mean_v + lxv * noise_x.double() + lvv * noise_v.double()
        return x.to(x0.dtype), v.to(x0.dtype)

    # ------------------------------------------------------------------------------------- the score
    def score_scale(self, t: torch.Tensor) -> torch.Tensor:
        """l_t = -1 / L_vv of the training kernel (float64 [N]): the target grad_v log p(u_t | x_0) is
        l_t * noise_v, so the network's output is scaled by it."""
        return -1.0 / self.hsm_covariance(t).cholesky().vv

    def mixed_score(self, network_output: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The "mixed score" (Sec. 3.2, the official ``mixed_score``): -v / Sigma_vv of the training kernel (the
        score of v's marginal N(0, Sigma_vv) when the data sit at 0; not the joint v-score given x, which also
        depends on x), plus l_t times the network's output. In v's dtype."""
        cov = self.hsm_covariance(t)
        inv_vv = _per_sample(1.0 / cov.vv, v)
        scale = _per_sample(-1.0 / cov.cholesky().vv, v)
        return (-v.double() * inv_vv + scale * network_output.double()).to(v.dtype)

    def hsm_loss(self, network_output: torch.Tensor, v: torch.Tensor, t: torch.Tensor, noise_v: torch.Tensor,
                 weighting: Weighting = "reweightedv2") -> torch.Tensor:
        """Per-sample hybrid score-matching loss, summed over dimensions (the official ``losses.py``).

        With s the mixed score and l_t = -1 / L_vv, the residual r = s / l_t - noise_v = out + v L_vv / S_vv -
        noise_v is 0 at the exact conditional score. ``reweightedv2``: r^2 (the official default);
        ``reweightedv1``: r^2 beta Gamma; ``likelihood``: (s - l_t noise_v)^2 beta Gamma = r^2 l_t^2 beta Gamma, the
        weighting under which the loss bounds the likelihood (App. B.4).
        """
        cov = self.hsm_covariance(t)
        lvv = cov.cholesky().vv
        # The coefficient in float64, the residual in the output's dtype (fp32 under autocast: the loss is fp32).
        mix = _per_sample(lvv / cov.vv, v).to(torch.float32)
        residual = network_output.float() + v.float() * mix - noise_v.float()
        per_dim = residual**2
        if weighting != "reweightedv2":
            t64 = torch.as_tensor(t, dtype=torch.float64)
            weight = self.beta_at(t64) * self.damping
            if weighting == "likelihood":
                weight = weight / lvv**2
            per_dim = per_dim * _per_sample(weight, v).to(torch.float32)
        return per_dim.reshape(per_dim.shape[0], -1).sum(dim=1)

    # --------------------------------------------------------------------------------- sampling pieces
    def prior_logp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, I) + log N(v; 0, M I) per sample (float64 [N])."""
        d = x[0].numel()
        xs, vs = x.double().reshape(len(x), -1), v.double().reshape(len(v), -1)
        return (-0.5 * d * math.log(2 * math.pi) - 0.5 * (xs**2).sum(1)
                - 0.5 * d * math.log(2 * math.pi * self.mass) - 0.5 * (vs**2).sum(1) / self.mass)

    def velocity_entropy(self, dims: int) -> float:
        """The entropy of v_0 ~ N(0, gamma M I_d), (d / 2)(1 + log 2 pi gamma M): the term the likelihood bound
        log p(x) >= E_v[log p(x, v)] + H adds (Sec. 3.3)."""
        return 0.5 * dims * (1.0 + math.log(2 * math.pi * self.gamma * self.mass))

    def linear_reverse_step(self, x: torch.Tensor, v: torch.Tensor, t_from: float, t_to: float,
                            noise_x: torch.Tensor | None, noise_v: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
        """The exact solution, from time ``t_from`` down to ``t_to``, of the reverse SDE's linear part (the
        Ornstein-Uhlenbeck and Hamiltonian components of SSCS, App. D): the reverse drift with the score replaced
        by -M^-1 v is the forward dynamics with the velocity's sign flipped, so the step is the forward kernel
        of b = B(t_from) - B(t_to) with v -> -v. Noises None: the mean only."""
        b = self.beta_integral(torch.tensor(t_from, dtype=torch.float64)) - self.beta_integral(
            torch.tensor(t_to, dtype=torch.float64))
        pxx, pxv, pvx, pvv = self.transition(b)
        xd, vd = x.double(), v.double()
        new_x = pxx * xd - pxv * vd
        new_v = -pvx * xd + pvv * vd
        if noise_x is not None and noise_v is not None:
            chol = self.covariance(b).cholesky()
            new_x = new_x + chol.xx * noise_x.double()
            new_v = new_v - chol.xv * noise_x.double() + chol.vv * noise_v.double()
        return new_x.to(x.dtype), new_v.to(v.dtype)


def reverse_times(steps: int, t_min: float, striding: Striding = "even") -> list[float]:
    """The ``steps + 1`` times a fixed-step reverse integrator visits, from 1 down to ``t_min`` (the official
    ``striding``): even, or quadratic, whose steps shrink towards the data as (1 - (1 - i/n)^2)."""
    if steps < 1:
        raise ValueError(f"a reverse integration needs at least one step, not {steps}")
    span = 1.0 - t_min
    out = []
    for i in range(steps + 1):
        s = i / steps
        r = span * s if striding == "even" else span * (1.0 - (1.0 - s) ** 2)
        out.append(1.0 - r)
    out[-1] = t_min
    return out
