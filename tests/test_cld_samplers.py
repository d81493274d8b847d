"""The CLD samplers (sscs, em, cld-ode) on the exact score of Gaussian data, the driver's kind-cld rules, and the
commands on a tiny trained CLD run.

Every expected value comes from the SDE itself: for x_0 ~ N(m, s^2) the law of u_t = (x_t, v_t) is Gaussian with
moments from Van Loan's matrix exponential (``ddpmctl.testing.cld_gaussian_marginal``, independent of ddpmctl.cld's
closed form), and the test network's mixed score is that law's exact v-score. A correct sampler then returns
N(m, s^2) up to its discretisation error, which must shrink as the steps grow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import invoke_cli, one_error_line
from ddpmctl.cld import CldProcess
from ddpmctl.config import CLD_DIFFUSION
from ddpmctl.errors import SamplerError
from ddpmctl.samplers import SampleRNG, build_denoiser, generate, get_sampler, sampling_timesteps
from ddpmctl.testing import (ExactCldGaussianScore, _cld_checkpoint, _gaussian_checkpoint, _run, check_sampler,
                             cld_gaussian_marginal, exact_checkpoint)

MEAN, STD = 0.1, 0.5


def _moment_error(name: str, steps: int, std: float = STD, **options: object) -> float:
    """W2 distance between N(m, s^2) and the moments of 16 x 1024 samples of sampler ``name``, exact score."""
    ckpt = _cld_checkpoint(MEAN, std, channels=1, image_size=32)
    cls = get_sampler(name)
    out, _, _, _ = _run(cls(cls.Options(**options)), ckpt, seed=1, indices=range(16), steps=steps)
    x = out.double()
    return math.hypot(float(x.mean()) - MEAN, float(x.std()) - std)


def test_the_marginal_solves_the_moment_equations() -> None:
    # d mu/dt = beta A mu and d Sigma/dt = beta (A Sigma + Sigma A^T + Q), checked by central differences; at t = 0
    # the start law diag(s^2, gamma M).
    process = CldProcess()
    m, gam, beta = process.mass, process.damping, process.beta
    a = beta * torch.tensor([[0.0, 1 / m], [-1.0, -gam / m]], dtype=torch.float64)
    q = beta * torch.diag(torch.tensor([0.0, 2 * gam], dtype=torch.float64))
    t, h = torch.tensor([0.003, 0.1, 0.4, 0.9], dtype=torch.float64), 1e-5
    mu, sigma = cld_gaussian_marginal(process, t, MEAN, STD)
    mu_p, sigma_p = cld_gaussian_marginal(process, t + h, MEAN, STD)
    mu_m, sigma_m = cld_gaussian_marginal(process, t - h, MEAN, STD)
    assert torch.allclose((mu_p - mu_m) / (2 * h), mu @ a.T, atol=1e-6)
    assert torch.allclose((sigma_p - sigma_m) / (2 * h), a @ sigma + sigma @ a.T + q, atol=1e-6)
    mu0, sigma0 = cld_gaussian_marginal(process, torch.zeros(1), MEAN, STD)
    assert torch.allclose(mu0, torch.tensor([[MEAN, 0.0]], dtype=torch.float64))
    assert torch.allclose(sigma0, torch.diag(torch.tensor([STD**2, process.gamma * m], dtype=torch.float64)))


def test_the_exact_network_gives_the_exact_score() -> None:
    # The mixed score of ExactCldGaussianScore is -Sigma^-1 (u - mu), v part, of the marginal (solved directly).
    process = CldProcess()
    net = ExactCldGaussianScore(process, MEAN, STD)
    t = torch.tensor([0.01, 0.3, 1.0], dtype=torch.float64)
    x, v = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    out = net(torch.cat([x, v], 1), t * 1000)
    mixed = process.mixed_score(out, v, t)
    mu, sigma = cld_gaussian_marginal(process, t, MEAN, STD)
    u = torch.stack([x.flatten(1), v.flatten(1)], -1) - mu[:, None, :]  # [N, d, 2]
    exact = -torch.linalg.solve(sigma[:, None], u.unsqueeze(-1)).squeeze(-1)[..., 1]
    assert torch.allclose(mixed.flatten(1), exact, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["sscs", "em", "cld-ode"])
def test_each_sampler_passes_the_sampler_checks(name: str) -> None:
    check_sampler(get_sampler(name))


@pytest.mark.parametrize("name", ["sscs", "em"])
def test_sde_samplers_reach_the_data_moments_as_the_steps_grow(name: str) -> None:
    errors = [_moment_error(name, k) for k in (10, 30, 100)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.02, errors  # 16k samples: the moments' own noise is about 0.005


@pytest.mark.parametrize("striding", ["even", "quadratic"])
@pytest.mark.parametrize("steps", [10, 20])
def test_sscs_is_more_accurate_than_em_at_equal_steps(steps: int, striding: str) -> None:
    sscs, em = _moment_error("sscs", steps, striding=striding), _moment_error("em", steps, striding=striding)
    assert sscs < 0.6 * em, (sscs, em)


def test_the_default_score_time_is_the_more_accurate() -> None:
    # The official placement (the score at the step's start time) beats the midpoint on Gaussian data, quadratic
    # striding: the default; the midpoint stays an option.
    assert get_sampler("sscs").Options().score_time == "start"
    for steps in (10, 20):
        start = _moment_error("sscs", steps, std=0.3, score_time="start")
        mid = _moment_error("sscs", steps, std=0.3, score_time="mid")
        assert start < mid, (steps, start, mid)


class _ScoreTermZero(torch.nn.Module):
    """A CLD network whose mixed score is -v / M: the score step v += 2 Gamma beta (s + M^-1 v) h does nothing."""

    def __init__(self, process: CldProcess) -> None:
        super().__init__()
        self.process = process

    def forward(self, u: torch.Tensor, t_net: torch.Tensor, **_: object) -> torch.Tensor:
        t = t_net.double() / 1000
        v = u[:, u.shape[1] // 2:].double()
        shape = (-1, 1, 1, 1)
        inv_vv = (1 / self.process.hsm_covariance(t).vv).view(shape)
        return ((-v / self.process.mass + v * inv_vv) / self.process.score_scale(t).view(shape)).to(u.dtype)


@pytest.mark.parametrize("steps", [1, 6])
def test_sscs_half_steps_compose_to_the_exact_linear_flow(steps: int) -> None:
    # Without the score term, sscs is the exact reverse linear flow from t = 1 to eps: from x_T = c and the prior's
    # v ~ N(0, M), x(eps) is the forward law from (c, v ~ N(0, M)) over B(1 - eps) (the reverse linear part is the
    # forward dynamics with v's sign flipped): mean Phi_xx c, variance from Van Loan with gamma = 1.
    process, c, eps = CldProcess(), 2.0, 1e-3
    ckpt = exact_checkpoint(_ScoreTermZero(process), channels=1, image_size=64, diffusion=CLD_DIFFUSION, kind="cld")
    sampler = get_sampler("sscs")
    timesteps = sampling_timesteps(ckpt, sampler(), steps)
    score = build_denoiser(ckpt, timesteps, micro_batch=None)
    rng = SampleRNG(3, range(8))
    x_T = torch.full((8, 1, 64, 64), c)
    with torch.no_grad():
        out = sampler(sampler.Options(denoise=False, striding="even")).sample(score, x_T, timesteps, noise=rng)
    mu, sigma = cld_gaussian_marginal(CldProcess(gamma=1.0), torch.tensor([1 - eps]), c, 0.0)
    x, n = out.double(), out.numel()
    expected_mean, expected_var = float(mu[0, 0]), float(sigma[0, 0, 0])
    assert abs(float(x.mean()) - expected_mean) < 4 * math.sqrt(expected_var / n)
    assert abs(float(x.var()) / expected_var - 1) < 4 * math.sqrt(2 / n)


def test_cld_ode_maps_the_prior_to_the_data_and_is_second_order() -> None:
    assert _moment_error("cld-ode", 50) < 0.01
    # Deterministic: the same seed gives the same images, and Heun's error falls about 4x per doubling.
    ckpt = _cld_checkpoint(MEAN, STD, channels=1, image_size=8)
    cls = get_sampler("cld-ode")
    runs = {k: _run(cls(), ckpt, seed=2, indices=range(4), steps=k)[0].double() for k in (10, 20, 40, 320)}
    e10, e20, e40 = ((runs[k] - runs[320]).pow(2).mean().sqrt() for k in (10, 20, 40))
    assert 2.5 < e20 / e40 < 6 and 2.5 < e10 / e20 < 8, (e10, e20, e40)


def test_images_do_not_depend_on_the_batch_size() -> None:
    ckpt = _cld_checkpoint(MEAN, STD, channels=1, image_size=8)
    sampler = get_sampler("sscs")()
    whole, _ = generate(ckpt, sampler, num=5, batch_size=5, seed=4, steps=6)
    split, _ = generate(ckpt, sampler, num=5, batch_size=2, seed=4, steps=6)
    assert torch.allclose(whole, split, atol=1e-5, rtol=0)
    assert not torch.allclose(whole[0], whole[1])


def test_the_driver_rules_for_kind_cld() -> None:
    cld = _cld_checkpoint(MEAN, STD, channels=1, image_size=8)
    model = _gaussian_checkpoint(MEAN, STD, kind="model", channels=1, image_size=8)
    assert sampling_timesteps(cld, get_sampler("sscs")(), 7) == (6, 5, 4, 3, 2, 1, 0)
    assert len(sampling_timesteps(cld, get_sampler("sscs")())) == get_sampler("sscs").default_steps
    with pytest.raises(SamplerError, match="critically-damped Langevin diffusion: sample it with --sampler sscs"):
        sampling_timesteps(cld, get_sampler("ddim")(), 10)
    with pytest.raises(SamplerError, match="not a critically-damped Langevin diffusion"):
        sampling_timesteps(model, get_sampler("sscs")(), 10)
    with pytest.raises(SamplerError, match="continuous in time"):
        sampling_timesteps(cld, get_sampler("em")(), None, [900, 500, 100])


# ------------------------------------------------------------------------------------- the commands, end to end
@pytest.fixture(scope="module")
def cld_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cld") / "run"
    trained = invoke_cli("train", "builtin:digits", "--method", "cld", "--out", str(run), "--model-channels", "8",
                         "--channel-mult", "1,2", "--res-blocks", "1", "--attention-resolutions", "4", "-b", "8",
                         "--max-steps", "2", "--save-every", "2", "--preview-every", "2", "--device", "cpu", "--quiet")
    assert trained.exit_code == 0, trained.output
    return run


def test_sample_a_cld_run(cld_run: Path, tmp_path: Path) -> None:
    assert (cld_run / "preview_000002.png").is_file()
    result = invoke_cli("sample", str(cld_run), "--out", str(tmp_path / "a"), "--steps", "4", "-n", "3", "--json",
                        "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sampler"] == "sscs" and summary["steps"] == 4
    assert (tmp_path / "a" / "grid.png").is_file() and (tmp_path / "a" / "samples.npz").is_file()
    for name in ("em", "cld-ode"):
        other = invoke_cli("sample", str(cld_run), "--out", str(tmp_path / name), "--sampler", name, "--steps", "2",
                           "-n", "2", "-O", "striding=quadratic", "--device", "cpu", "--quiet")
        assert other.exit_code == 0, other.output
    refused = invoke_cli("sample", str(cld_run), "--out", str(tmp_path / "b"), "--sampler", "ddim", "--device", "cpu",
                         "--quiet")
    assert "sample it with --sampler sscs, em or cld-ode" in one_error_line(refused, 2)


def test_eval_samples_on_a_cld_run(cld_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDPMCTL_CACHE_DIR", str(tmp_path / "cache"))
    result = invoke_cli("eval-samples", str(cld_run), "--steps", "3", "-n", "16", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["sampling"]["sampler"] == "sscs" and math.isfinite(payload["fd"])
