"""The CLD likelihood bound (ddpmctl.cld_nll) and eval-nll / info / respace / distill on CLD checkpoints.

On Gaussian data x_0 ~ N(m, s^2 I) with v_0 ~ N(0, gamma M) every marginal of the linear SDE is Gaussian. The tests
compute it here by Van Loan's block matrix exponential of the 2x2 linear SDE (not with cld.py's closed forms), wrap
its exact velocity score as a network (the output n that makes the mixed score exact), and compare the ODE's
log-density with the exact Gaussian log-density.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import invoke_cli, one_error_line
from ddpmctl import cld_nll
from ddpmctl.cld import CldProcess

PROCESS = CldProcess()
MEAN, STD = 0.3, 0.5
T_MIN = 1e-5
SHAPE = (1, 2, 2)  # d = 4


def _gaussian_marginal(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [N, 2] and covariance [N, 2, 2] of one dimension's (x_t, v_t) by Van Loan: exp([[-A, Q], [0, A^T]] t)
    has Phi^T as its lower-right block and Phi^-1 times the noise integral as its upper-right one."""
    m, gam, beta = PROCESS.mass, PROCESS.damping, PROCESS.beta
    drift = torch.tensor([[0.0, 1.0 / m], [-1.0, -gam / m]], dtype=torch.float64) * beta
    noise = torch.tensor([[0.0, 0.0], [0.0, 2.0 * gam * beta]], dtype=torch.float64)
    t = t.double()[:, None, None]
    block = torch.zeros(t.shape[0], 4, 4, dtype=torch.float64)
    block[:, :2, :2], block[:, :2, 2:], block[:, 2:, 2:] = -drift * t, noise * t, drift.T * t
    expm = torch.linalg.matrix_exp(block)
    phi = expm[:, 2:, 2:].transpose(1, 2)
    start = torch.diag(torch.tensor([STD**2, PROCESS.gamma * m], dtype=torch.float64))
    cov = phi @ start @ phi.transpose(1, 2) + phi @ expm[:, :2, 2:]
    return phi @ torch.tensor([MEAN, 0.0], dtype=torch.float64), cov


def _col(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def exact_network(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """n with -v / S_vv + l_t n = the exact v-score of the Gaussian marginal (S_vv, l_t = -1/L_vv of the HSM kernel)."""
    mean, cov = _gaussian_marginal(t)
    precision = torch.linalg.inv(cov)
    xd, vd = x.double(), v.double()
    score_v = -(_col(precision[:, 1, 0], x) * (xd - _col(mean[:, 0], x))
                + _col(precision[:, 1, 1], x) * (vd - _col(mean[:, 1], x)))
    kernel = PROCESS.hsm_covariance(t)
    return ((score_v + vd / _col(kernel.vv, x)) * -_col(kernel.cholesky().vv, x)).float()


def exact_logp(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log p_t(x, v) of the Gaussian marginal, summed over dimensions (float64 [N])."""
    mean, cov = _gaussian_marginal(t)
    precision = torch.linalg.inv(cov)
    dx = (x.double() - _col(mean[:, 0], x)).flatten(1)
    dv = (v.double() - _col(mean[:, 1], x)).flatten(1)
    quad = (precision[:, 0, 0, None] * dx**2 + 2 * precision[:, 0, 1, None] * dx * dv
            + precision[:, 1, 1, None] * dv**2).sum(1)
    dims = dx.shape[1]
    return -0.5 * quad - 0.5 * dims * torch.log((2 * math.pi) ** 2 * torch.linalg.det(cov))


def _points(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n draws of u at t_min from the exact marginal."""
    mean, cov = _gaussian_marginal(torch.tensor([T_MIN]))
    chol = torch.linalg.cholesky(cov)[0]
    z = torch.randn(n, *SHAPE, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = mean[0, 0] + chol[0, 0] * z[..., 0]
    return x, mean[0, 1] + chol[1, 0] * z[..., 0] + chol[1, 1] * z[..., 1]


def _prior_mismatch(out: cld_nll.OdeLogp) -> torch.Tensor:
    """log N(u_1; 0, diag(1, M)) - log p_1(u_1): the ODE's value minus the exact one when only the prior differs."""
    return PROCESS.prior_logp(out.x1, out.v1) - exact_logp(out.x1, out.v1, torch.ones(out.x1.shape[0]))


@pytest.mark.parametrize(("solver", "steps", "tolerance", "atol"), [
    ("rk4", 50, None, 3e-3),  # measured error 9e-4 (d = 4): the default
    ("rk4", 100, None, 2e-4),  # 4e-5: fourth order
    ("rk23", 1, 1e-5, 6e-3),  # 2e-3
])
def test_exact_trace_ode_matches_the_exact_gaussian_density(solver: str, steps: int, tolerance: float | None,
                                                            atol: float) -> None:
    x0, v0 = _points(4)
    out = cld_nll.ode_logp(PROCESS, exact_network, x0, v0, t_min=T_MIN, probe=None, solver=solver,  # type: ignore
                           steps=steps, tolerance=tolerance or 1e-5)
    expected = exact_logp(x0, v0, torch.full((4,), T_MIN))
    assert (out.logp - _prior_mismatch(out) - expected).abs().max() < atol
    assert torch.allclose(out.div_quarters.sum(1) + out.prior, out.logp)
    assert (out.div_quarters[:, 1:] != 0).all()  # every quarter of [0, 1] was integrated


def test_heun_converges_at_second_order() -> None:
    x0, v0 = _points(2)
    expected = exact_logp(x0, v0, torch.full((2,), T_MIN))
    errors = []
    for steps in (100, 200):
        out = cld_nll.ode_logp(PROCESS, exact_network, x0, v0, t_min=T_MIN, probe=None, solver="heun", steps=steps)
        errors.append(float((out.logp - _prior_mismatch(out) - expected).abs().max()))
    assert 3.0 < errors[0] / errors[1] < 5.5  # 2^2


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_single_probe_estimate_is_unbiased(probe: str) -> None:
    # One point, many probes: the trajectory does not depend on the probe, and each probe's value is an unbiased
    # estimate of the exact-trace value with the same solver; their mean lies within 4 standard errors of it.
    n = 256
    x0, v0 = _points(1, seed=3)
    x0, v0 = x0.expand(n, *SHAPE), v0.expand(n, *SHAPE)
    g = torch.Generator().manual_seed(1)
    probes = (torch.randn((n, *SHAPE), generator=g, dtype=torch.float64) if probe == "gaussian"
              else torch.randint(0, 2, (n, *SHAPE), generator=g).double() * 2 - 1)
    hutchinson = cld_nll.ode_logp(PROCESS, exact_network, x0, v0, t_min=T_MIN, probe=probes, steps=12)
    exact = cld_nll.ode_logp(PROCESS, exact_network, x0[:1], v0[:1], t_min=T_MIN, probe=None, steps=12)
    stderr = float(hutchinson.logp.std() / math.sqrt(n))
    if probe == "rademacher":
        # The dimensions are independent, so dn/dv is diagonal, and a Rademacher probe's eps^T A eps = tr A exactly
        # (its variance is 2 sum_{i != j} A_ij^2).
        assert torch.allclose(hutchinson.logp, exact.logp.expand(n), rtol=0, atol=1e-6)
        return
    assert stderr > 1e-3  # the estimator is noisy, so the check has teeth
    assert abs(float(hutchinson.logp.mean() - exact.logp[0])) < 4 * stderr
    assert torch.allclose(hutchinson.x1, exact.x1.expand(n, *SHAPE))  # the same trajectory


def test_velocity_entropy_is_the_entropy_of_v0s_law() -> None:
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(PROCESS.gamma * PROCESS.mass, dtype=torch.float64).sqrt())
    assert PROCESS.velocity_entropy(12) == pytest.approx(12 * float(normal.entropy()), rel=1e-12)


def test_bits_per_dim_of_dequantised_images_under_the_exact_model() -> None:
    # The whole estimator with the exact trace: per trajectory, bits/dim = -log2 of the density of z = k + U on
    # [0, 256)^d (p_z = p_x (2 / 256)^d), minus the velocity entropy, per dimension.
    images = torch.tensor([[[[3, 250], [128, 77]]], [[[0, 255], [9, 60]]]], dtype=torch.uint8)
    result = cld_nll.cld_bound(PROCESS, exact_network, images, t_min=T_MIN, seed=5, probes=2, probe="exact",
                               batch_size=3)
    dims = 4
    expected = torch.empty(2, 2, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            x0, v0, probe = cld_nll.trajectory_draws(images[i], i, j, 5, PROCESS.gamma * PROCESS.mass, "exact")
            assert probe is None
            offset = x0 * 128 + 128 - images[i].double()  # the uniform dequantisation noise
            assert (offset >= 0).all() and (offset < 1).all()
            log_pz = exact_logp(x0[None], v0[None], torch.tensor([T_MIN]))[0] + dims * math.log(2 / 256)
            expected[i, j] = (-(log_pz + PROCESS.velocity_entropy(dims))) / (dims * math.log(2))
    # The exact model's density is the exact Gaussian's, up to rk4's error and the prior's mismatch at t = 1.
    assert torch.allclose(result.bpd, expected.mean(1), atol=2e-3)
    assert torch.allclose(result.bpd_stderr, expected.std(1) / math.sqrt(2), atol=2e-3)
    parts = result.prior + result.ode_quarters.sum(1) + result.entropy + result.dequantisation
    assert torch.allclose(parts, result.bpd)
    assert result.dequantisation == 7.0 and result.entropy == pytest.approx(
        -0.5 * (1 + math.log(2 * math.pi * 0.01)) / math.log(2))
    assert result.terms_per_image == 2 * 4 * cld_nll.DEFAULT_STEPS  # probes x rk4 stages x steps


def test_draws_depend_only_on_seed_image_and_probe() -> None:
    images = torch.randint(0, 256, (3, *SHAPE), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    one = cld_nll.cld_bound(PROCESS, exact_network, images, t_min=T_MIN, seed=2, probes=2, steps=8, batch_size=1)
    all_ = cld_nll.cld_bound(PROCESS, exact_network, images, t_min=T_MIN, seed=2, probes=2, steps=8, batch_size=6)
    assert torch.allclose(one.bpd, all_.bpd, rtol=0, atol=1e-6)
    other = cld_nll.cld_bound(PROCESS, exact_network, images, t_min=T_MIN, seed=3, probes=2, steps=8)
    assert not torch.allclose(one.bpd, other.bpd, rtol=0, atol=1e-6)


def test_flow_times_hold_the_quarter_ends() -> None:
    times = cld_nll.flow_times(PROCESS, T_MIN, 50)
    assert len(times) == 51 and times[0] == T_MIN and times[-1] == 1.0
    assert all(b > a for a, b in zip(times, times[1:]))
    assert {0.25, 0.5, 0.75} <= set(times)
    steps = [b - a for a, b in zip(times, times[1:])]
    assert steps[0] < 1e-3 < steps[-1]  # short near the data


# ----------------------------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def cld_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ddpmctl.config import TrainConfig
    from ddpmctl.train import train

    out = tmp_path_factory.mktemp("cld_nll") / "run"
    torch.manual_seed(0)
    train(TrainConfig(method="cld", data="builtin:digits", model_channels=16, channel_mult=(1, 2), res_blocks=1,
                      attention_resolutions=(4,), batch_size=8, max_steps=2, save_every=2, precision="fp32",
                      out=str(out)), device=torch.device("cpu"))
    return out


def _save(run: Path) -> Path:
    return next(run.glob("ema_*.safetensors"))


def test_eval_nll_json_and_table_on_a_cld_run(cld_run: Path) -> None:
    from ddpmctl.checkpoint import load_checkpoint
    from ddpmctl.cld_nll import evaluate_cld_nll
    from ddpmctl.data import load_dataset

    args = [str(cld_run), "-n", "3", "--steps", "4", "--probes", "2", "--device", "cpu", "--seed", "1"]
    result = invoke_cli("eval-nll", *args, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["method"] == "cld" and payload["estimator"] == "ode" and payload["num_images"] == 3
    assert payload["num_terms"] is None and payload["mc_terms"] is None and payload["pilot_images"] is None
    assert payload["cld"]["solver"] == "rk4" and payload["cld"]["steps"] == 4 and payload["cld"]["probes"] == 2
    assert payload["terms_per_image"] == 2 * 4 * 4
    rows = {row["term"]: row for row in payload["breakdown"]}
    assert list(rows) == ["prior", "ODE q1", "ODE q2", "ODE q3", "ODE q4", "v entropy", "dequantisation", "total"]
    assert rows["total"]["bits_per_dim"] == pytest.approx(sum(r["bits_per_dim"] for k, r in rows.items()
                                                              if k != "total"), rel=1e-9)
    assert all(image["mc_stderr"] is not None for image in payload["per_image"])
    images = load_dataset("builtin:digits", split="test").images[:3]
    expected = evaluate_cld_nll(load_checkpoint(_save(cld_run)), images, seed=1, probes=2, steps=4)
    assert payload["bits_per_dim"] == pytest.approx(expected.mean, rel=1e-6)
    assert payload["stderr"] == pytest.approx(expected.stderr, rel=1e-5)
    table = invoke_cli("eval-nll", *args)
    assert table.exit_code == 0, table.output
    assert "CLD likelihood bound" in table.stdout and "rk4 4 steps, 2 gaussian probes" in table.stdout
    assert f"{expected.mean:.4f}" in table.stdout


def test_eval_nll_refuses_options_of_the_other_method_in_one_line(cld_run: Path, tmp_path: Path) -> None:
    ckpt = str(_save(cld_run))
    for option in (["--estimator", "mc"], ["--terms", "3"], ["--pilot-images", "2"]):
        line = one_error_line(invoke_cli("eval-nll", ckpt, "-n", "1", *option), 2)
        assert option[0] in line and "CLD network" in line
    line = one_error_line(invoke_cli("eval-nll", ckpt, "--solver", "rk23", "--steps", "5"), 2)
    assert "--steps" in line
    line = one_error_line(invoke_cli("eval-nll", ckpt, "--tolerance", "1e-3"), 2)
    assert "--tolerance" in line and "rk23" in line
    iddpm = _iddpm_checkpoint(tmp_path)
    for option in (["--probes", "2"], ["--solver", "heun"], ["--probe", "rademacher"], ["--steps", "9"]):
        line = one_error_line(invoke_cli("eval-nll", str(iddpm), "-n", "1", *option), 2)
        assert option[0] in line and "CLD checkpoints" in line


def _iddpm_checkpoint(tmp_path: Path) -> Path:
    from ddpmctl.build import build_model
    from ddpmctl.checkpoint import save_checkpoint
    from ddpmctl.config import CheckpointConfig, DiffusionConfig, ModelConfig

    model = ModelConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(4,))
    config = CheckpointConfig(model=model, diffusion=DiffusionConfig(timesteps=10))
    return save_checkpoint(tmp_path / "iddpm.safetensors", build_model(config).state_dict(), config, kind="model",
                           lineage=[])


def test_respace_and_distill_refuse_a_cld_checkpoint_in_one_line(cld_run: Path, tmp_path: Path) -> None:
    ckpt = str(_save(cld_run))
    line = one_error_line(invoke_cli("respace", ckpt, "--steps", "10", "-o", str(tmp_path / "r.safetensors")), 1)
    assert "CLD network" in line and "no discrete chain" in line
    assert not (tmp_path / "r.safetensors").exists()
    line = one_error_line(invoke_cli("distill", ckpt, "--iters-per-stage", "1", "--out", str(tmp_path / "d")), 1)
    assert "CLD network" in line


def test_info_shows_the_method_and_the_cld_constants(cld_run: Path) -> None:
    ckpt = str(_save(cld_run))
    table = invoke_cli("info", ckpt)
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert "cld (critically-damped Langevin diffusion)" in text
    assert "M 0.25, Gamma 1, beta 4, gamma 0.04" in text and "eps 1e-09, t_min 1e-05" in text
    assert "mean type" not in text  # a CLD network has no chain
    payload = json.loads(invoke_cli("info", ckpt, "--json").stdout)
    assert payload["method"] == "cld"
    assert payload["cld"] == {"mass": 0.25, "damping": 1.0, "beta": 4.0, "gamma": 0.04, "numerical_eps": 1e-9,
                              "t_min": 1e-5}
    run_text = " ".join(invoke_cli("info", str(cld_run)).stdout.split())
    assert "M 0.25, Gamma 1, beta 4" in run_text and "schedule" not in run_text
    assert json.loads(invoke_cli("info", str(cld_run), "--json").stdout)["cld"]["damping"] == 1.0


def test_the_cli_defaults_are_the_librarys() -> None:
    from ddpmctl.cli import eval_nll

    assert (eval_nll.CLD_DEFAULT_SOLVER, eval_nll.CLD_DEFAULT_STEPS, eval_nll.CLD_DEFAULT_TOLERANCE,
            eval_nll.CLD_DEFAULT_PROBE) == (cld_nll.DEFAULT_SOLVER, cld_nll.DEFAULT_STEPS, cld_nll.DEFAULT_TOLERANCE,
                                            cld_nll.DEFAULT_PROBE)
