"""The likelihood bound of a CLD model (Dockhorn et al. 2022 Sec. 3.3; docs/cld.md "Likelihood").

A CLD model defines a density of u = (x, v) through its probability-flow ODE, the forward drift with the velocity
score's half-weighted noise term removed (Song et al. 2021 eq. 13, with the noise entering v only)::

    dx/dt = M^-1 v beta
    dv/dt = (-x - Gamma M^-1 v) beta - Gamma beta s_v(u, t),     s_v the mixed score (ddpmctl.cld)

and the instantaneous change of variables, log p_tmin(u_0) = log N(u_1; 0, diag(1, M)) + int_tmin^1 div F(u_t) dt.
The marginal over velocities is bounded by Jensen's inequality with v_0 ~ N(0, gamma M I)::

    log p(x) >= E_{v_0}[log p(x, v_0)] + (d / 2)(1 + log 2 pi gamma M)       (the entropy of v_0's law)

Only the score depends on the network, and only its v-Jacobian enters the divergence, so ::

    div F = d beta Gamma (1 / S_vv - 1 / M) + Gamma beta tr(dn/dv) / L_vv     (s_v = -v / S_vv - n / L_vv)

is exact but for tr(dn/dv), estimated with a Hutchinson probe eps over the velocity dimensions only,
eps^T (dn/dv) eps (one backward pass). The official code probes all of u; the x-block of the Jacobian and the linear
terms have a known trace, so probing v alone has the same mean and a smaller variance.

Uniform dequantisation: an 8-bit image k becomes x = (k + U) / 128 - 1 with U ~ U[0, 1)^d, and
-log2 P(k) <= E_U[-log2 p(x)] + d log2 128 (the Jacobian of z = k + U -> x is 128^-d), so bits/dim is
-log p(x) / (d ln 2) + 7.

Every trajectory (image i, probe j) draws U, v_0 and its probe from its own generator keyed (seed, i, j), so an
image's estimate does not depend on the batch it was integrated in; an image's bits/dim is the mean over its
probes, and the standard error across images includes every draw's noise (the trace estimator's too).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ddpmctl.choices import CldSolver, TraceProbe
from ddpmctl.cld import CldProcess
from ddpmctl.errors import CheckpointError, ConfigError, DataError
from ddpmctl.seeds import CLD_NLL, derive_seed

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl.checkpoint import LoadedCheckpoint

__all__ = ["CldNllResult", "DEFAULT_PROBE", "DEFAULT_SOLVER", "DEFAULT_STEPS", "DEFAULT_TOLERANCE", "FlowValue",
           "OdeLogp", "ScoreNetwork", "cld_bound", "evaluate_cld_nll", "flow_times", "ode_logp",
           "probability_flow"]

DEFAULT_SOLVER: CldSolver = "rk4"
DEFAULT_STEPS = 50  # fixed-step solvers, on the grid of flow_times (rk4: 200 network evaluations)
DEFAULT_TOLERANCE = 1e-5  # rk23's relative and absolute tolerance (the official RK45's rtol = atol)
DEFAULT_PROBE: TraceProbe = "gaussian"
# log2 of the Jacobian of the dequantised grid's map to [-1, 1], per dimension: x = (k + U) / 128 - 1.
DEQUANTISATION_BITS = 7.0
_LN2 = math.log(2.0)
# The adaptive solver gives up on a trajectory after this many attempted steps.
_MAX_ATTEMPTS = 100_000

# The network's output n for positions x, velocities v (float32 [N, C, ...]) at SDE times t (float64 [N]).
ScoreNetwork = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlowValue:
    """The probability-flow ODE's right-hand side at one point (float64): dx/dt, dv/dt and the estimate of div F."""

    dx: torch.Tensor
    dv: torch.Tensor
    div: torch.Tensor  # [N]


def _column(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.reshape(value.shape[0], *([1] * (like.dim() - 1)))


def _network_trace(network: ScoreNetwork, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                   probe: torch.Tensor | None, micro_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, the trace estimate of dn/dv) in float64, a forward and a backward pass per ``micro_batch`` rows (None:
    all at once). ``probe`` None: the exact trace, one backward pass per dimension."""
    size = micro_batch or x.shape[0]
    if x.shape[0] > size:
        parts = [_network_trace(network, x[s:s + size], v[s:s + size], t[s:s + size],
                                probe[s:s + size] if probe is not None else None) for s in range(0, x.shape[0], size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    with torch.enable_grad():
        v_in = v.float().detach().requires_grad_(True)
        out = network(x.float(), v_in, t)
        if probe is not None:
            (grad,) = torch.autograd.grad(out, v_in, grad_outputs=probe.to(out.dtype))
            trace = (grad.double() * probe.double()).flatten(1).sum(1)
        else:
            dims = v_in[0].numel()
            trace = torch.zeros(v.shape[0], dtype=torch.float64, device=v.device)
            for j in range(dims):
                unit = torch.zeros_like(out).flatten(1)
                unit[:, j] = 1
                (grad,) = torch.autograd.grad(out, v_in, grad_outputs=unit.view_as(out), retain_graph=j < dims - 1)
                trace += grad.flatten(1)[:, j].double()
    return out.detach().double(), trace


def probability_flow(process: CldProcess, network: ScoreNetwork, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                     probe: torch.Tensor | None, micro_batch: int | None = None) -> FlowValue:
    """The ODE's right-hand side and div F at (x, v) (float64 [N, ...]) and times t (float64 [N]); see the module
    docstring. ``probe`` (shaped like v) is the Hutchinson vector; None: the exact trace."""
    t = t.double()
    beta = _column(process.beta_at(t), x)
    cov = process.hsm_covariance(t)
    svv, lvv = cov.vv, cov.cholesky().vv
    out, trace = _network_trace(network, x, v, t, probe, micro_batch)
    m, gam = process.mass, process.damping
    dx, dv = process.probability_flow(x, v, beta, process.mixed_score(out, v, t))
    dims = v[0].numel()
    beta_n = process.beta_at(t)
    div = dims * beta_n * gam * (1.0 / svv - 1.0 / m) + gam * beta_n * trace / lvv
    return FlowValue(dx, dv, div)


def _widening_time(process: CldProcess) -> float:
    """c = gamma M / (2 Gamma beta): the time the initial velocity variance gamma M takes to double at the rate
    2 Gamma beta the noise adds to it. Near the data the flow widens v at a rate ~ 1 / (2 (t + c))."""
    return process.gamma * process.mass / (2.0 * process.damping * process.beta)


QUARTER_ENDS = (0.25, 0.5, 0.75, 1.0)


def flow_times(process: CldProcess, t_min: float, steps: int) -> list[float]:
    """The fixed-step solvers' grid from t_min to 1: even in sigma(t) = log(t + c) + omega t within each quarter
    of [0, 1], which it has as grid points (so the breakdown by quarter is exact); the steps are shared among the
    quarters in proportion to their length in sigma, at least one each.

    Two time scales set the step: near the data the flow widens the velocities at a rate ~ 1 / (2 (t + c))
    (:func:`_widening_time`), and everywhere x and v rotate into each other at omega = beta / sqrt(M) rad per unit
    time (the Hamiltonian part of the drift), which dominates late. Steps even in sigma are short for both."""
    ends = [t_min] + [end for end in QUARTER_ENDS if end > t_min]
    if steps < len(ends) - 1:
        raise ConfigError(f"the ODE needs at least {len(ends) - 1} steps (one per quarter of [0, 1]), not {steps}")
    c, omega = _widening_time(process), process.beta / math.sqrt(process.mass)

    def sigma(t: float) -> float:
        return math.log(t + c) + omega * t

    lengths = [sigma(hi) - sigma(lo) for lo, hi in zip(ends[:-1], ends[1:])]
    ideal = [steps * length / sum(lengths) for length in lengths]
    counts = [max(1, math.floor(x)) for x in ideal]
    while sum(counts) > steps:  # the minimum of one per quarter took steps from the longest
        counts[counts.index(max(counts))] -= 1
    for index in sorted(range(len(ideal)), key=lambda i: counts[i] - ideal[i])[:steps - sum(counts)]:
        counts[index] += 1  # the largest remainders
    times = [t_min]
    for (lo, hi), count in zip(zip(ends[:-1], ends[1:]), counts):
        s_lo, s_hi = sigma(lo), sigma(hi)
        for i in range(1, count):
            target, below, above = s_lo + (s_hi - s_lo) * i / count, times[-1], hi
            for _ in range(100):  # bisection: sigma is increasing
                middle = 0.5 * (below + above)
                below, above = (middle, above) if sigma(middle) < target else (below, middle)
            times.append(0.5 * (below + above))
        times.append(hi)
    return times


# Butcher tableaus: (c, a, b); rk23 (Bogacki-Shampine) also has its embedded second-order weights.
_TABLEAUS: dict[str, tuple[list[float], list[list[float]], list[float]]] = {
    "heun": ([0.0, 1.0], [[], [1.0]], [0.5, 0.5]),
    "rk4": ([0.0, 0.5, 0.5, 1.0], [[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    "rk23": ([0.0, 0.5, 0.75, 1.0], [[], [0.5], [0.0, 0.75], [2 / 9, 1 / 3, 4 / 9]], [2 / 9, 1 / 3, 4 / 9, 0.0]),
}
_RK23_LOW = [7 / 24, 1 / 4, 1 / 3, 1 / 8]


@dataclass
class OdeLogp:
    """log p(u_0) of each trajectory (float64 [N], nats) and its parts: the prior's log-density at u_1, the
    integral of div F by quarter of [0, 1] the step started in (q1 nearest the data), and where u_1 is."""

    logp: torch.Tensor
    prior: torch.Tensor
    div_quarters: torch.Tensor  # [N, 4]
    x1: torch.Tensor
    v1: torch.Tensor
    nfe: torch.Tensor  # [N] network evaluations (one forward and one backward pass each)


def _quarter(t: torch.Tensor) -> torch.Tensor:
    return torch.clamp((t * 4).long(), 0, 3)


class _Integrator:
    """Explicit Runge-Kutta steps of the augmented state (x, v, int div F) for a subset of trajectories."""

    def __init__(self, process: CldProcess, network: ScoreNetwork, solver: str, probe: torch.Tensor | None,
                 micro_batch: int | None):
        self.process, self.network, self.probe, self.micro_batch = process, network, probe, micro_batch
        self.c, self.a, self.b = _TABLEAUS[solver]

    def rhs(self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> FlowValue:
        probe = self.probe[rows] if self.probe is not None else None
        return probability_flow(self.process, self.network, x, v, t, probe, self.micro_batch)

    def stages(self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, h: torch.Tensor, rows: torch.Tensor,
               first: FlowValue | None = None) -> list[FlowValue]:
        ks: list[FlowValue] = []
        hx = _column(h, x)
        for i, (ci, ai) in enumerate(zip(self.c, self.a)):
            if i == 0 and first is not None:
                ks.append(first)
                continue
            xi, vi = x, v
            for aij, k in zip(ai, ks):
                if aij:
                    xi, vi = xi + hx * aij * k.dx, vi + hx * aij * k.dv
            ks.append(self.rhs(xi, vi, t + ci * h, rows))
        return ks

    @staticmethod
    def combine(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, ks: list[FlowValue],
                weights: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hx = _column(h, x)
        dx = sum(w * k.dx for w, k in zip(weights, ks) if w)
        dv = sum(w * k.dv for w, k in zip(weights, ks) if w)
        ddiv = sum(w * k.div for w, k in zip(weights, ks) if w)
        return x + hx * dx, v + hx * dv, h * ddiv  # type: ignore[operator]


def ode_logp(process: CldProcess, network: ScoreNetwork, x0: torch.Tensor, v0: torch.Tensor, *, t_min: float,
             probe: torch.Tensor | None, solver: CldSolver = DEFAULT_SOLVER, steps: int = DEFAULT_STEPS,
             tolerance: float = DEFAULT_TOLERANCE, micro_batch: int | None = None,
             progress: Callable[[int], None] | None = None) -> OdeLogp:
    """log p_tmin(u_0) of the model at u_0 = (x0, v0) by the probability-flow ODE from t_min to 1.

    ``solver`` heun / rk4: ``steps`` fixed steps on :func:`flow_times`' grid (``progress`` gets 1 per step);
    rk23: adaptive Bogacki-Shampine with relative and absolute ``tolerance``, each trajectory with its own step
    sizes (so its result does not depend on the others in the batch; ``progress`` gets 1 per finished trajectory).
    ``probe`` shaped like v0 (None: the exact trace). ``micro_batch``: trajectories per forward and backward pass.
    """
    if solver not in _TABLEAUS:
        raise ConfigError(f"unknown ODE solver {solver!r}: use heun, rk4 or rk23")
    if not 0.0 < t_min < 1.0:
        raise ConfigError(f"t_min must lie in (0, 1), got {t_min}")
    n, device = x0.shape[0], x0.device
    x, v = x0.double().clone(), v0.double().clone()
    quarters = torch.zeros(n, 4, dtype=torch.float64, device=device)
    nfe = torch.zeros(n, dtype=torch.long)
    integrator = _Integrator(process, network, solver, probe, micro_batch)
    report = progress or (lambda count: None)
    rows_all = torch.arange(n, device=device)
    if solver != "rk23":
        if steps < 1:
            raise ConfigError(f"the ODE needs at least one step, not {steps}")
        times = flow_times(process, t_min, steps)
        for t_from, t_to in zip(times[:-1], times[1:]):
            t = torch.full((n,), t_from, dtype=torch.float64, device=device)
            h = torch.full((n,), t_to - t_from, dtype=torch.float64, device=device)
            ks = integrator.stages(x, v, t, h, rows_all)
            x, v, delta = integrator.combine(x, v, h, ks, integrator.b)
            quarters[:, int(_quarter(t[:1]))] += delta
            nfe += len(ks)
            report(1)
    else:
        x, v = _adaptive(integrator, x, v, quarters, nfe, t_min, tolerance, report)
    prior = process.prior_logp(x, v).to(device)
    return OdeLogp(prior + quarters.sum(1), prior, quarters, x, v, nfe)


def _next_quarter_end(t: torch.Tensor) -> torch.Tensor:
    """The first end of a quarter of [0, 1] after t (1 at and after 1)."""
    ends = torch.tensor(QUARTER_ENDS, dtype=torch.float64, device=t.device)
    index = torch.searchsorted(ends, t + 1e-12, right=True).clamp_max(len(QUARTER_ENDS) - 1)
    return ends[index]


def _adaptive(integrator: _Integrator, x: torch.Tensor, v: torch.Tensor, quarters: torch.Tensor, nfe: torch.Tensor,
              t_min: float, tolerance: float, report: Callable[[int], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bogacki-Shampine 3(2) with a step size per trajectory; the third-order solution is kept (local
    extrapolation) and the last stage of an accepted step is the first of the next (FSAL)."""
    if not tolerance > 0:
        raise ConfigError(f"the ODE tolerance must be positive, got {tolerance}")
    n, device = x.shape[0], x.device
    c = _widening_time(integrator.process)
    # A first step of a tenth of the time the velocities take to widen (flow_times): the controller adapts it.
    t = torch.full((n,), t_min, dtype=torch.float64, device=device)
    h = torch.minimum(torch.full_like(t, 0.1 * (t_min + c)), _next_quarter_end(t) - t)
    logp = torch.zeros(n, dtype=torch.float64, device=device)
    first: dict[str, torch.Tensor] | None = None
    active = torch.ones(n, dtype=torch.bool, device=device)
    attempts = 0
    while bool(active.any()):
        attempts += 1
        if attempts > _MAX_ATTEMPTS:
            raise ConfigError(f"the adaptive ODE solver took over {_MAX_ATTEMPTS} steps: raise --tolerance")
        rows = active.nonzero().squeeze(1)
        xs, vs, ts, hs = x[rows], v[rows], t[rows], h[rows]
        k1 = None
        if first is not None:
            k1 = FlowValue(first["dx"][rows], first["dv"][rows], first["div"][rows])
        ks = integrator.stages(xs, vs, ts, hs, rows, k1)
        nfe[rows.cpu()] += len(ks) - (1 if k1 is not None else 0)
        x_new, v_new, delta = integrator.combine(xs, vs, hs, ks, integrator.b)
        x_low, v_low, delta_low = integrator.combine(xs, vs, hs, ks, _RK23_LOW)

        def scaled(err: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            return err / (tolerance + tolerance * torch.maximum(old.abs(), new.abs()))

        err_u = torch.cat([scaled(x_new - x_low, xs, x_new).flatten(1), scaled(v_new - v_low, vs, v_new).flatten(1)],
                          dim=1).pow(2).mean(1).sqrt()
        lp, lp_new = logp[rows], logp[rows] + delta
        err_l = scaled(delta - delta_low, lp, lp_new).abs()
        err = torch.maximum(err_u, err_l)
        accept = err <= 1.0
        keep = rows[accept]
        x[keep], v[keep] = x_new[accept], v_new[accept]
        logp[keep] = lp_new[accept]
        quarters[keep, _quarter(ts[accept])] += delta[accept]
        # A step that reaches a quarter's end lands on it exactly (not a rounding short of it).
        end = _next_quarter_end(ts)
        t_next = torch.where(accept, torch.where(ts + hs >= end - 1e-12, end, ts + hs), ts)
        # The standard controller for a third-order step: h * 0.9 err^(-1/3), within [0.2, 5] times h; no step
        # crosses the end of a quarter of [0, 1] (the breakdown by quarter is exact).
        factor = torch.clamp(0.9 * err.clamp_min(1e-10).pow(-1.0 / 3.0), 0.2, 5.0)
        h_next = torch.minimum(hs * factor, _next_quarter_end(t_next) - t_next)
        finished = accept & (t_next >= 1.0)
        t[rows], h[rows] = torch.where(finished, torch.ones_like(t_next), t_next), h_next
        last = ks[-1]
        if first is None:
            first = {"dx": torch.zeros_like(x), "dv": torch.zeros_like(v),
                     "div": torch.zeros(n, dtype=torch.float64, device=device)}
        # Rows that rejected their step start again from the stage they already had.
        first["dx"][keep], first["dv"][keep], first["div"][keep] = last.dx[accept], last.dv[accept], last.div[accept]
        reject = rows[~accept]
        first["dx"][reject], first["dv"][reject], first["div"][reject] = (ks[0].dx[~accept], ks[0].dv[~accept],
                                                                           ks[0].div[~accept])
        active[rows[finished]] = False
        done = int(finished.sum())
        if done:
            report(done)
    return x, v


# ----------------------------------------------------------------------------------------------------------------
# The bound of 8-bit images


@dataclass(frozen=True)
class CldNllResult:
    """Per-image bits/dim of the CLD bound and its breakdown (float64 [N] on the CPU; image order as given).

    ``bpd`` = ``prior`` + ``ode_quarters.sum(1)`` + ``entropy`` + ``dequantisation``, each the mean over the image's
    ``probes`` trajectories; ``bpd_stderr`` is each image's own standard error over them (nan with one probe). The
    fields an IDDPM bound has and this one has not (``num_terms``, ``mc_terms``, ``pilot_images``) are None.
    """

    bpd: torch.Tensor
    prior: torch.Tensor  # -log N(u_1; 0, diag(1, M)) / (d ln 2)
    ode_quarters: torch.Tensor  # [N, 4]: -int div F dt / (d ln 2) by quarter of [0, 1]
    entropy: float  # -H(N(0, gamma M I)) / (d ln 2): the same for every image
    bpd_stderr: torch.Tensor
    nfe: torch.Tensor  # [N] network evaluations (a forward and a backward pass each), all probes together
    probes: int
    probe: str
    solver: str
    steps: int | None  # fixed-step solvers
    tolerance: float | None  # rk23
    t_min: float
    dequantisation: float = DEQUANTISATION_BITS
    estimator: str = "ode"
    num_terms: None = None
    mc_terms: None = None
    pilot_images: None = None
    title: str = field(default="CLD likelihood bound, bits/dim")

    @property
    def num_images(self) -> int:
        return int(self.bpd.shape[0])

    @property
    def terms_per_image(self) -> int:
        """Network evaluations per image (its mean over images, rounded up, for the adaptive solver)."""
        return int(math.ceil(float(self.nfe.double().mean())))

    @property
    def mean(self) -> float:
        return float(self.bpd.mean())

    @property
    def stderr(self) -> float:
        """Standard error of the mean over images, std (ddof=1) / sqrt(N): the spread of images' estimates, which
        holds the dequantisation, v_0 and trace-probe noise. One image: its own error over its probes (nan with
        one probe)."""
        if self.num_images == 1:
            return float(self.bpd_stderr[0])
        return _stderr(self.bpd)

    def breakdown(self) -> list[tuple[str, tuple[float, float] | None, float, float]]:
        """(name, time span or None, mean bits/dim, standard error): the prior at t = 1, the ODE's integral by
        quarter of [0, 1] (q1 nearest the data), the velocity entropy, the dequantisation's Jacobian, the total."""
        spans = [(self.t_min, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
        rows: list[tuple[str, tuple[float, float] | None, float, float]] = [
            ("prior", (1.0, 1.0), float(self.prior.mean()), _stderr(self.prior))]
        for q, span in enumerate(spans):
            column = self.ode_quarters[:, q]
            rows.append((f"ODE q{q + 1}", span, float(column.mean()), _stderr(column)))
        rows.append(("v entropy", None, self.entropy, 0.0))
        rows.append(("dequantisation", None, self.dequantisation, 0.0))
        rows.append(("total", (self.t_min, 1.0), self.mean, self.stderr))
        return rows


def _stderr(values: torch.Tensor) -> float:
    n = values.shape[0]
    return float(values.std(correction=1) / math.sqrt(n)) if n > 1 else float("nan")


@dataclass(frozen=True)
class _Draws:
    """One batch of trajectories' draws: the dequantised x_0, v_0 and the trace probes (float64)."""

    x0: torch.Tensor
    v0: torch.Tensor
    probe: torch.Tensor | None


def trajectory_draws(images_uint8: torch.Tensor, image_index: int, probe_index: int, seed: int, gamma_mass: float,
                     probe: TraceProbe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x_0, v_0, probe) of trajectory (image, probe): x_0 = (k + U) / 128 - 1, v_0 ~ N(0, gamma M), the probe
    Gaussian or Rademacher (None for the exact trace); one CPU generator keyed (seed, image, probe), in that order."""
    generator = torch.Generator().manual_seed(derive_seed(seed, CLD_NLL, image_index, probe_index))
    k = images_uint8.double()
    uniform = torch.rand(k.shape, generator=generator, dtype=torch.float64)
    x0 = (k + uniform) / 128.0 - 1.0
    v0 = torch.randn(k.shape, generator=generator, dtype=torch.float64) * math.sqrt(gamma_mass)
    if probe == "exact":
        return x0, v0, None
    if probe == "gaussian":
        return x0, v0, torch.randn(k.shape, generator=generator, dtype=torch.float64)
    return x0, v0, torch.randint(0, 2, k.shape, generator=generator).double() * 2 - 1


def cld_bound(process: CldProcess, network: ScoreNetwork, images_uint8: torch.Tensor, *, t_min: float,
              seed: int = 0, probes: int = 1, probe: TraceProbe = DEFAULT_PROBE, solver: CldSolver = DEFAULT_SOLVER,
              steps: int = DEFAULT_STEPS, tolerance: float = DEFAULT_TOLERANCE, batch_size: int = 256,
              device: torch.device | str = "cpu", micro_batch: int | None = None,
              callback: Callable[[int, int], None] | None = None) -> CldNllResult:
    """Bits/dim of the bound for 8-bit images [N, C, H, W] (module docstring): ``probes`` trajectories per image,
    ``batch_size`` trajectories integrated together (image-major). ``callback(done, total)`` counts fixed steps of
    trajectories (heun, rk4) or finished trajectories (rk23)."""
    if images_uint8.dim() != 4 or images_uint8.dtype != torch.uint8:
        raise DataError(f"bits/dim needs 8-bit images [N, C, H, W] (uint8), got {images_uint8.dtype} "
                        f"{tuple(images_uint8.shape)}")
    n = images_uint8.shape[0]
    if n == 0:
        raise DataError("no images to evaluate")
    if probes < 1 or batch_size < 1:
        raise ConfigError(f"probes and the batch size must be at least 1, got {probes} and {batch_size}")
    if probe not in ("gaussian", "rademacher", "exact"):
        raise ConfigError(f"unknown trace probe {probe!r}: use gaussian, rademacher or exact")
    device = torch.device(device)
    dims = images_uint8[0].numel()
    pairs = [(i, j) for i in range(n) for j in range(probes)]
    per_pair = steps if solver != "rk23" else 1
    total, done = len(pairs) * per_pair, 0
    logp = torch.empty(len(pairs), dtype=torch.float64)
    prior = torch.empty(len(pairs), dtype=torch.float64)
    quarters = torch.empty(len(pairs), 4, dtype=torch.float64)
    nfe = torch.empty(len(pairs), dtype=torch.long)
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        draws = [trajectory_draws(images_uint8[i], i, j, seed, process.gamma * process.mass, probe)
                 for i, j in batch]
        x0 = torch.stack([d[0] for d in draws]).to(device)
        v0 = torch.stack([d[1] for d in draws]).to(device)
        probe_batch = torch.stack([d[2] for d in draws]).to(device) if probe != "exact" else None  # type: ignore[misc]
        width = len(batch)

        def progress(count: int) -> None:
            nonlocal done
            done += count * (width if per_pair > 1 else 1)
            if callback is not None:
                callback(done, total)

        out = ode_logp(process, network, x0, v0, t_min=t_min, probe=probe_batch, solver=solver, steps=steps,
                       tolerance=tolerance, micro_batch=micro_batch, progress=progress)
        rows = slice(start, start + width)
        logp[rows], prior[rows] = out.logp.cpu(), out.prior.cpu()
        quarters[rows], nfe[rows] = out.div_quarters.cpu(), out.nfe
    entropy_nats = process.velocity_entropy(dims)
    scale = 1.0 / (dims * _LN2)
    # Per trajectory, in bits/dim: -log p(u_0) - H + the dequantisation's 7 bits.
    per_traj = (-logp - entropy_nats) * scale + DEQUANTISATION_BITS
    shape = (n, probes)
    bpd_traj = per_traj.view(shape)
    spread = (bpd_traj.std(dim=1, correction=1) / math.sqrt(probes) if probes > 1
              else torch.full((n,), float("nan"), dtype=torch.float64))
    return CldNllResult(bpd=bpd_traj.mean(1), prior=(-prior * scale).view(shape).mean(1),
                        ode_quarters=(-quarters * scale).view(n, probes, 4).mean(1), entropy=-entropy_nats * scale,
                        bpd_stderr=spread, nfe=nfe.view(shape).sum(1), probes=probes, probe=probe, solver=solver,
                        steps=steps if solver != "rk23" else None,
                        tolerance=tolerance if solver == "rk23" else None, t_min=t_min)


def evaluate_cld_nll(checkpoint: LoadedCheckpoint, images_uint8: torch.Tensor, *, seed: int = 0, probes: int = 1,
                     probe: TraceProbe = DEFAULT_PROBE, solver: CldSolver = DEFAULT_SOLVER,
                     steps: int = DEFAULT_STEPS, tolerance: float = DEFAULT_TOLERANCE, batch_size: int = 256,
                     precision: str = "fp32", micro_batch: int | None | str = "auto",
                     callback: Callable[[int, int], None] | None = None) -> CldNllResult:
    """The bound of a CLD checkpoint (kind cld) for uint8 images [N, C, H, W] of its size (see :func:`cld_bound`).

    The network sees cat(x, v) and t * 1000 (ddpmctl.cld_method); it runs in micro-batches of at most
    ``micro_batch`` trajectories, each a forward and a backward pass ("auto": sized for the CPU like sampling's),
    under bf16 autocast with ``precision`` "bf16" (the ODE's arithmetic stays float64).
    """
    from ddpmctl.cld_method import cld_process, network_time
    from ddpmctl.inference import AutocastModel, default_micro_batch

    config = checkpoint.config
    if config.cld is None:
        raise CheckpointError(f"{checkpoint.path.name} is not a CLD network (kind {checkpoint.kind})")
    model_config = config.model
    expected = (model_config.in_channels, model_config.image_size, model_config.image_size)
    if images_uint8.dim() != 4 or tuple(images_uint8.shape[1:]) != expected:
        raise DataError(f"the images are {'x'.join(map(str, images_uint8.shape[1:]))} (C x H x W) but the model "
                        f"takes {'x'.join(map(str, expected))}")
    device = next(iter(checkpoint.model.parameters())).device
    checkpoint.model.eval()
    call = AutocastModel(checkpoint.model, torch.bfloat16 if precision == "bf16" else None)
    size = (default_micro_batch(device, model_config.image_size, model_config.model_channels)
            if micro_batch == "auto" else micro_batch)

    def network(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return call(torch.cat([x, v], dim=1), network_time(t)).float()

    return cld_bound(cld_process(config), network, images_uint8, t_min=config.cld.t_min, seed=seed, probes=probes,
                     probe=probe, solver=solver, steps=steps, tolerance=tolerance, batch_size=batch_size,
                     device=device, micro_batch=size, callback=callback)  # type: ignore[arg-type]
