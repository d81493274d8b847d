"""GaussianDiffusion against closed forms computed here from the betas (docs/conventions.md #3-11 and #15)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpmctl.diffusion import GaussianDiffusion
from ddpmctl.respace import respace
from ddpmctl.schedules import beta_schedule

F64 = torch.float64
LN2 = math.log(2.0)


def _diffusion(
    T: int = 20, schedule: str = "cosine", mean_type: str = "eps", var_type: str = "fixed_small",
    loss_type: str = "mse",
) -> GaussianDiffusion:
    return GaussianDiffusion(beta_schedule(schedule, T), mean_type=mean_type, var_type=var_type, loss_type=loss_type)


def _abar(betas: torch.Tensor) -> list[float]:
    """Cumulative products in plain Python floats (independent of the code under test)."""
    out, acc = [], 1.0
    for b in betas.tolist():
        acc *= 1.0 - b
        out.append(acc)
    return out


def _grid_images(n: int, c: int = 2, hw: int = 3, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, c, hw, hw), generator=g).to(dtype) / 127.5 - 1)


def _col(values: list[float] | torch.Tensor, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.as_tensor(values, dtype=dtype).view(-1, 1, 1, 1)


class ExactEps:
    """The exact denoiser for data that is the single point x_star: eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar)."""

    def __init__(self, x_star: torch.Tensor, abar_by_original_t: list[float], extra_channels: bool = False) -> None:
        self.x_star = x_star
        self.abar = torch.tensor(abar_by_original_t, dtype=F64)
        self.extra = extra_channels
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.clone())
        a = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x_star) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.extra else eps


# ----------------------------------------------------------------------------------------------- tables
def test_tables_match_cumulative_products() -> None:
    d = _diffusion(T=50, schedule="linear")
    abar = _abar(d.betas)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                 "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod"):
        table = getattr(d, name)
        assert table.dtype == F64 and table.shape == (50,), name
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev.numpy(), [1.0, *abar[:-1]], rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_next.numpy(), [*abar[1:], 0.0], rtol=1e-12)
    assert d.posterior_variance[0].item() == 0.0
    b = d.betas.tolist()
    beta_tilde_1 = b[1] * (1 - abar[0]) / (1 - abar[1])
    assert d.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(beta_tilde_1), rel=1e-12)
    assert d.timestep_map.tolist() == list(range(50)) and d.timestep_map.dtype == torch.int64
    assert d.original_num_steps == 50 and d.num_timesteps == 50


def test_invalid_arguments_raise() -> None:
    betas = beta_schedule("linear", 10)
    for kwargs in ({"mean_type": "prev"}, {"var_type": "big"}, {"loss_type": "hybrid"}):
        args = {"mean_type": "eps", "var_type": "fixed_small", "loss_type": "mse", **kwargs}
        with pytest.raises(ValueError):
            GaussianDiffusion(betas, **args)
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.1, 0.0]), mean_type="eps", var_type="fixed_small", loss_type="mse")
    with pytest.raises(ValueError):
        GaussianDiffusion(betas, mean_type="eps", var_type="fixed_small", loss_type="mse", timestep_map=[1, 2])


# ------------------------------------------------------------------------------------ forward / posterior
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(schedule: str) -> None:
    T = 30
    d = _diffusion(T=T, schedule=schedule)
    b = d.betas.tolist()
    abar = _abar(d.betas)
    t = torch.tensor([1, 2, 7, 15, T - 1])
    x0 = torch.randn(5, 2, 3, 3, dtype=F64)
    xt = torch.randn(5, 2, 3, 3, dtype=F64)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    # p(x_{t-1} | x_t, x0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1}).
    prec = []
    for k in t.tolist():
        alpha, beta, a_prev = 1 - b[k], b[k], abar[k - 1]
        prec.append(alpha / beta + 1 / (1 - a_prev))
    prec_t = _col(prec)
    a_k = _col([1 - b[k] for k in t.tolist()])
    beta_k = _col([b[k] for k in t.tolist()])
    a_prev = _col([abar[k - 1] for k in t.tolist()])
    lin = a_k.sqrt() * xt / beta_k + a_prev.sqrt() * x0 / (1 - a_prev)
    torch.testing.assert_close(var, (1 / prec_t).expand_as(xt), rtol=1e-9, atol=0)
    torch.testing.assert_close(mean, lin / prec_t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(logvar, torch.log(1 / prec_t).expand_as(xt), rtol=1e-9, atol=0)
    assert mean.dtype == var.dtype == logvar.dtype == F64


def test_posterior_at_step_zero_is_x0_with_clipped_log_variance() -> None:
    d = _diffusion(T=10)
    x0, xt = torch.randn(2, 1, 2, 2, dtype=F64), torch.randn(2, 1, 2, 2, dtype=F64)
    t = torch.zeros(2, dtype=torch.int64)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)
    assert (var == 0).all()
    b, abar = d.betas.tolist(), _abar(d.betas)
    torch.testing.assert_close(logvar, torch.full_like(x0, math.log(b[1] * (1 - abar[0]) / (1 - abar[1]))))


def test_q_sample_formula_and_moments() -> None:
    d = _diffusion(T=40, schedule="linear")
    abar = _abar(d.betas)
    t = torch.tensor([0, 13, 39])
    x0 = torch.tensor([0.5, -0.25, 1.0], dtype=F64).view(3, 1, 1, 1)
    noise = torch.randn(3, 1, 1, 1, dtype=F64)
    a = _col([abar[k] for k in t.tolist()])
    torch.testing.assert_close(d.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-12,
                               atol=1e-12)
    # Moments of the internal draw: N(sqrt(abar) x0, 1 - abar), 200k samples per step.
    n = 200_000
    xs = x0.view(3, 1).expand(3, n).reshape(3, 1, 1, n).contiguous()
    draws = d.q_sample(xs, t).view(3, n)
    mean, var = draws.mean(1), draws.var(1)
    for i, k in enumerate(t.tolist()):
        sd = math.sqrt(1 - abar[k])
        assert abs(mean[i].item() - math.sqrt(abar[k]) * x0[i].item()) < 5 * sd / math.sqrt(n)
        assert abs(var[i].item() - (1 - abar[k])) < 5 * (1 - abar[k]) * math.sqrt(2 / n)


def test_parameterizations_round_trip() -> None:
    d = _diffusion(T=100)
    abar = _abar(d.betas)
    t = torch.tensor([0, 1, 50, 98, 99])
    x0 = torch.rand(5, 2, 3, 3, dtype=F64) * 2 - 1
    eps = torch.randn(5, 2, 3, 3, dtype=F64)
    a = _col([abar[k] for k in t.tolist()])
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # Salimans & Ho's velocity, from its definition
    torch.testing.assert_close(d.predict_xstart_from_eps(xt, t, eps), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.predict_eps_from_xstart(xt, t, x0), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.predict_xstart_from_v(xt, t, v), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.predict_eps_from_v(xt, t, v), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.v_target(x0, t, eps), v, rtol=1e-12, atol=1e-12)
    x32 = (d.predict_xstart_from_eps(xt.float(), t, eps.float()), d.predict_xstart_from_v(xt.float(), t, v.float()))
    assert all(out.dtype == torch.float32 for out in x32)


# ----------------------------------------------------------------------------------------- p(x_{t-1}|x_t)
def test_fixed_variances() -> None:
    T = 24
    b = beta_schedule("linear", T).tolist()
    abar = _abar(torch.tensor(b, dtype=F64))
    beta_tilde = [b[k] * (1 - (abar[k - 1] if k else 1.0)) / (1 - abar[k]) for k in range(T)]
    x = torch.randn(3, 1, 2, 2, dtype=F64)
    t = torch.tensor([0, 1, 5])
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    large = _diffusion(T, "linear", var_type="fixed_large").p_mean_variance(model, x, t)
    # fixed_large: beta, except beta_tilde_1 at k = 0 (docs/conventions.md #4).
    want = [beta_tilde[1], b[1], b[5]]
    torch.testing.assert_close(large["variance"], _col(want).expand_as(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(large["log_variance"], torch.log(_col(want)).expand_as(x), rtol=1e-12, atol=0)
    small = _diffusion(T, "linear", var_type="fixed_small").p_mean_variance(model, x, t)
    torch.testing.assert_close(small["variance"], _col([0.0, beta_tilde[1], beta_tilde[5]]).expand_as(x))
    torch.testing.assert_close(
        small["log_variance"], torch.log(_col([beta_tilde[1], beta_tilde[1], beta_tilde[5]])).expand_as(x),
        rtol=1e-12, atol=0,
    )


@pytest.mark.parametrize("v_value", [-1.0, -0.3, 0.0, 0.8, 1.0, 1.7, -2.5])
def test_learned_range_interpolates_log_variance(v_value: float) -> None:
    T = 25
    d = _diffusion(T, "cosine", var_type="learned_range", loss_type="rescaled_mse")
    b = d.betas.tolist()
    abar = _abar(d.betas)
    beta_tilde = [b[k] * (1 - (abar[k - 1] if k else 1.0)) / (1 - abar[k]) for k in range(T)]
    t = torch.tensor([0, 3, 24])
    x = torch.randn(3, 2, 2, 2, dtype=F64)
    model = lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, v_value)], 1)  # noqa: E731
    out = d.p_mean_variance(model, x, t)
    frac = (v_value + 1) / 2  # v is not clamped
    want = [frac * math.log(b[k]) + (1 - frac) * math.log(beta_tilde[max(k, 1)]) for k in t.tolist()]
    torch.testing.assert_close(out["log_variance"], _col(want).expand_as(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["variance"], torch.exp(_col(want)).expand_as(x), rtol=1e-12, atol=0)


def test_learned_variance_is_the_output() -> None:
    d = _diffusion(10, var_type="learned", loss_type="kl")
    x = torch.randn(2, 1, 2, 2, dtype=F64)
    logv = torch.randn(2, 1, 2, 2, dtype=F64)
    out = d.p_mean_variance(lambda x, t: torch.cat([torch.zeros_like(x), logv], 1), x, torch.tensor([0, 4]))
    torch.testing.assert_close(out["log_variance"], logv, rtol=0, atol=0)
    torch.testing.assert_close(out["variance"], torch.exp(logv))


def test_wrong_output_channels_raise() -> None:
    d = _diffusion(10, var_type="learned_range", loss_type="rescaled_mse")
    x = torch.randn(2, 1, 2, 2, dtype=F64)
    with pytest.raises(ValueError):
        d.p_mean_variance(lambda x, t: x, x, torch.tensor([0, 4]))


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_p_mean_is_posterior_of_clipped_prediction(mean_type: str) -> None:
    T = 20
    d = _diffusion(T, "cosine", mean_type=mean_type)
    abar = _abar(d.betas)
    b = d.betas.tolist()
    t = torch.tensor([0, 1, 10, 19])
    target_x0 = torch.rand(4, 2, 3, 3, dtype=F64) * 3 - 1.5  # partly outside [-1, 1]
    xt = torch.randn(4, 2, 3, 3, dtype=F64)
    a = _col([abar[k] for k in t.tolist()])
    if mean_type == "eps":
        raw = (xt - a.sqrt() * target_x0) / (1 - a).sqrt()
    elif mean_type == "x0":
        raw = target_x0
    else:
        eps = (xt - a.sqrt() * target_x0) / (1 - a).sqrt()
        raw = a.sqrt() * eps - (1 - a).sqrt() * target_x0
    model = lambda x, t: raw  # noqa: E731
    for clip in (True, False):
        out = d.p_mean_variance(model, xt, t, clip_denoised=clip)
        x0_hat = target_x0.clamp(-1, 1) if clip else target_x0
        torch.testing.assert_close(out["pred_xstart"], x0_hat, rtol=1e-9, atol=1e-9)
        a_prev = _col([abar[k - 1] if k else 1.0 for k in t.tolist()])
        beta = _col([b[k] for k in t.tolist()])
        mean = beta * a_prev.sqrt() / (1 - a) * x0_hat + (1 - a_prev) * (1 - beta).sqrt() / (1 - a) * xt
        torch.testing.assert_close(out["mean"], mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out["eps"], (xt - a.sqrt() * x0_hat) / (1 - a).sqrt(), rtol=1e-9, atol=1e-9)


def test_respaced_diffusion_calls_the_network_with_original_indices() -> None:
    base = _diffusion(T=100, schedule="linear")
    d = respace(base, {0, 10, 50, 99})
    seen: list[list[int]] = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t.tolist())
        return torch.zeros_like(x)

    x = torch.randn(4, 1, 2, 2, dtype=F64)
    t = torch.tensor([0, 1, 2, 3])
    d.p_mean_variance(model, x, t)
    d.training_losses(model, x, t)
    d.ddim_sample(model, x, t)
    d.vb_terms_bpd(model, x, x, t)
    assert seen == [[0, 10, 50, 99]] * 4


# ---------------------------------------------------------------------------------------------- sampling
def test_p_sample_adds_scaled_noise_except_at_step_zero() -> None:
    d = _diffusion(T=15, var_type="fixed_large")
    x = torch.randn(3, 2, 2, 2, dtype=F64)
    t = torch.tensor([0, 1, 14])
    noise = torch.randn_like(x)
    model = lambda x, t: 0.1 * x  # noqa: E731
    mean = d.p_mean_variance(model, x, t)["mean"]
    b = d.betas.tolist()
    out = d.p_sample(model, x, t, noise=noise)
    std = _col([0.0, math.sqrt(b[1]), math.sqrt(b[14])])  # k = 0 is masked (docs/conventions.md #15)
    torch.testing.assert_close(out["sample"], mean + std * noise, rtol=1e-12, atol=1e-12)


def test_ddim_eta0_last_step_returns_pred_xstart() -> None:
    d = _diffusion(T=30)
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    t = torch.zeros(2, dtype=torch.int64)
    out = d.ddim_sample(lambda x, t: 0.3 * x, x, t, eta=0.0)
    assert torch.equal(out["sample"], out["pred_xstart"])
    out = d.ddim_sample(lambda x, t: 0.3 * x, x, t, eta=1.0, noise=torch.randn_like(x))
    torch.testing.assert_close(out["sample"], out["pred_xstart"], rtol=0, atol=1e-12)


def test_ddim_step_formula_and_eta1_noise_scale() -> None:
    base = _diffusion(T=200, schedule="linear")
    d = respace(base, range(0, 200, 20))
    abar_full = _abar(base.betas)
    steps = list(range(0, 200, 20))
    x = torch.randn(3, 2, 3, 3, dtype=F64)
    k = torch.tensor([1, 5, 9])
    model = lambda x, t: 0.2 * x  # noqa: E731  (an eps prediction, |x0_hat| stays inside [-1, 1] or is clipped)
    pm = d.p_mean_variance(model, x, k)
    x0_hat = pm["pred_xstart"]
    a = _col([abar_full[steps[i]] for i in k.tolist()])
    a_prev = _col([abar_full[steps[i - 1]] for i in k.tolist()])
    eps_hat = (x - a.sqrt() * x0_hat) / (1 - a).sqrt()
    out = d.ddim_sample(model, x, k, eta=0.0)
    torch.testing.assert_close(out["sample"], a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps_hat,
                               rtol=1e-9, atol=1e-9)
    eta = 0.7
    sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
    z = torch.randn_like(x)
    out = d.ddim_sample(model, x, k, eta=eta, noise=z)
    want = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma**2).sqrt() * eps_hat + sigma * z
    torch.testing.assert_close(out["sample"], want, rtol=1e-9, atol=1e-9)


def test_ddim_eta1_on_full_chain_has_posterior_noise() -> None:
    d = _diffusion(T=20)
    x = torch.randn(2, 1, 2, 2, dtype=F64)
    t = torch.tensor([3, 17])
    z = torch.randn_like(x)
    model = lambda x, t: 0.5 * x  # noqa: E731
    diff = d.ddim_sample(model, x, t, eta=1.0, noise=z)["sample"] - d.ddim_sample(
        model, x, t, eta=1.0, noise=torch.zeros_like(x))["sample"]
    b, abar = d.betas.tolist(), _abar(d.betas)
    beta_tilde = _col([b[k] * (1 - abar[k - 1]) / (1 - abar[k]) for k in t.tolist()])
    torch.testing.assert_close(diff, beta_tilde.sqrt() * z, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------ VLB / bits
def test_prior_bpd_closed_form() -> None:
    d = _diffusion(T=25, schedule="linear")
    x0 = _grid_images(3)
    a = _abar(d.betas)[-1]
    kl = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x0**2)
    torch.testing.assert_close(d.prior_bpd(x0), kl.mean(dim=(1, 2, 3)) / LN2, rtol=1e-9, atol=1e-12)


def test_vb_terms_are_kl_in_bits_and_decoder_nll_at_zero() -> None:
    T = 30
    d = _diffusion(T, "linear", var_type="fixed_large")
    x0 = _grid_images(2)
    xt = torch.randn_like(x0)
    model = lambda x, t: 0.3 * x  # noqa: E731
    t = torch.tensor([0, 4])
    out = d.vb_terms_bpd(model, x0, xt, t)
    pm = d.p_mean_variance(model, xt, t)
    tm, tv, _ = d.q_posterior_mean_variance(x0, xt, t)
    # t = 4: KL between Gaussians, per dim, averaged, in bits; computed with the textbook formula.
    m_p, v_p = pm["mean"][1], pm["variance"][1]
    m_q = tm[1]
    v_q = tv[1]
    kl = 0.5 * (torch.log(v_p / v_q) + (v_q + (m_q - m_p) ** 2) / v_p - 1)
    assert out["output"][1].item() == pytest.approx(kl.mean().item() / LN2, rel=1e-9)
    # t = 0: -log of the tanh-CDF bin mass, in bits/dim.
    s = math.sqrt(pm["variance"][0].flatten()[0].item())
    h = 1 / 255

    def cdf(z: float) -> float:
        return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))

    nll = []
    for xv, mv in zip(x0[0].flatten().tolist(), pm["mean"][0].flatten().tolist()):
        if xv < -0.999:
            p = cdf((xv - mv + h) / s)
        elif xv > 0.999:
            p = 1 - cdf((xv - mv - h) / s)
        else:
            p = cdf((xv - mv + h) / s) - cdf((xv - mv - h) / s)
        nll.append(-math.log(max(p, 1e-12)))
    assert out["output"][0].item() == pytest.approx(sum(nll) / len(nll) / LN2, rel=1e-9)


def test_exact_denoiser_gives_zero_kl_chain_and_total_is_sum_plus_prior() -> None:
    T = 30
    d = _diffusion(T, "cosine", var_type="fixed_small")
    x_star = _grid_images(1, seed=3)
    x0 = x_star.expand(2, -1, -1, -1).contiguous()
    model = ExactEps(x_star, _abar(d.betas))
    res = d.calc_bpd_loop(model, x0)
    for key in ("vb", "xstart_mse", "mse"):
        assert res[key].shape == (2, T) and res[key].dtype == F64
    assert res["total_bpd"].shape == (2,) and res["prior_bpd"].shape == (2,)
    assert res["timesteps"].tolist() == list(range(T - 1, -1, -1))
    assert [t[0].item() for t in model.seen] == list(range(T - 1, -1, -1))
    kl_cols = res["vb"][:, :-1]  # every step but k = 0
    assert kl_cols.abs().max().item() < 1e-9
    assert res["xstart_mse"].abs().max().item() < 1e-18
    # The eps re-derived from the exact x0 is the true noise.
    assert res["mse"].max().item() < 1e-16
    # Decoder at k = 0: mean x*, variance beta_tilde_1, -log2 of the central bin mass (edge bins: one side).
    b, abar = d.betas.tolist(), _abar(d.betas)
    s = math.sqrt(b[1] * (1 - abar[0]) / (1 - abar[1]))
    cdf = lambda z: 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    h = 1 / 255
    nll = [-math.log(cdf(h / s) if abs(v) > 0.999 else cdf(h / s) - cdf(-h / s)) for v in x_star.flatten().tolist()]
    torch.testing.assert_close(res["vb"][:, -1], torch.full((2,), sum(nll) / len(nll) / LN2, dtype=F64),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res["total_bpd"], res["vb"].sum(1) + res["prior_bpd"], rtol=1e-12, atol=1e-12)
    a = abar[-1]
    prior = (0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x_star**2)).mean().item() / LN2
    torch.testing.assert_close(res["prior_bpd"], torch.full((2,), prior, dtype=F64), rtol=1e-9, atol=1e-15)


def test_calc_bpd_loop_with_generator_is_reproducible() -> None:
    d = _diffusion(T=8, var_type="fixed_large")
    x0 = _grid_images(2)
    model = lambda x, t: 0.5 * x  # noqa: E731
    r1 = d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(7))
    r2 = d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(r1["total_bpd"], r2["total_bpd"])


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_mse_target_by_mean_type(mean_type: str) -> None:
    T = 50
    d = _diffusion(T, "linear", mean_type=mean_type)
    abar = _abar(d.betas)
    x0 = _grid_images(3)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 20, 49])
    a = _col([abar[k] for k in t.tolist()])
    target = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[mean_type]
    perfect = d.training_losses(lambda x, t: target, x0, t, noise=noise)
    assert perfect["mse"].abs().max().item() < 1e-24
    assert torch.equal(perfect["loss"], perfect["mse"])
    off = d.training_losses(lambda x, t: target + 0.5, x0, t, noise=noise)
    torch.testing.assert_close(off["loss"], torch.full((3,), 0.25, dtype=F64), rtol=1e-12, atol=1e-12)
    assert (off["vb"] == 0).all()


def _param_model(c: int) -> tuple[torch.nn.Parameter, torch.nn.Parameter, object]:
    w_mean = torch.nn.Parameter(torch.full((1, c, 1, 1), 0.3, dtype=F64))
    w_var = torch.nn.Parameter(torch.full((1, c, 1, 1), 0.2, dtype=F64))

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([w_mean * x, torch.tanh(w_var * x)], 1)

    return w_mean, w_var, model


@pytest.mark.parametrize("loss_type", ["rescaled_mse", "mse"])
def test_hybrid_gradient_on_mean_equals_pure_mse_gradient(loss_type: str) -> None:
    T = 40
    d = _diffusion(T, "cosine", var_type="learned_range", loss_type=loss_type)
    x0 = _grid_images(4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 20, 39])
    w_mean, w_var, model = _param_model(x0.shape[1])
    terms = d.training_losses(model, x0, t, noise=noise)
    terms["loss"].sum().backward()
    g_hybrid_mean, g_hybrid_var = w_mean.grad.clone(), w_var.grad.clone()
    # The pure MSE objective, written out here: mean over dims of (eps - eps_hat)^2.
    w_mean.grad = None
    abar = _abar(d.betas)
    a = _col([abar[k] for k in t.tolist()])
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    ((noise - w_mean * xt) ** 2).mean(dim=(1, 2, 3)).sum().backward()
    assert torch.equal(g_hybrid_mean, w_mean.grad)
    assert g_hybrid_var.abs().sum() > 0  # the bound trains the variance
    # rescaled_mse scales the bound by T/1000 relative to mse.
    other = _diffusion(T, "cosine", var_type="learned_range", loss_type="mse" if loss_type != "mse" else "rescaled_mse")
    vb_other = other.training_losses(model, x0, t, noise=noise)["vb"]
    ratio = T / 1000 if loss_type == "rescaled_mse" else 1000 / T
    torch.testing.assert_close(terms["vb"].detach(), vb_other.detach() * ratio, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_kl_losses_vanish_for_exact_denoiser_and_rescale_by_T() -> None:
    T = 25
    x_star = _grid_images(1, seed=5)
    x0 = x_star.expand(3, -1, -1, -1).contiguous()
    t = torch.tensor([1, 12, 24])
    noise = torch.randn_like(x0)
    for loss_type in ("kl", "rescaled_kl"):
        d = _diffusion(T, "cosine", var_type="learned_range", loss_type=loss_type)
        # v = -1 selects log variance = clipped log beta_tilde: the true posterior variance for k >= 1.
        model = ExactEps(x_star, _abar(d.betas))
        out = d.training_losses(
            lambda x, tt: torch.cat([model(x, tt), -torch.ones_like(x)], 1), x0, t, noise=noise
        )
        assert out["loss"].abs().max().item() < 1e-9
    d_kl = _diffusion(T, var_type="learned_range", loss_type="kl")
    d_rkl = _diffusion(T, var_type="learned_range", loss_type="rescaled_kl")
    model = lambda x, tt: torch.cat([0.2 * x, 0.1 * x], 1)  # noqa: E731
    t0 = torch.tensor([0, 7, 24])
    kl = d_kl.training_losses(model, x0, t0, noise=noise)["loss"]
    torch.testing.assert_close(d_rkl.training_losses(model, x0, t0, noise=noise)["loss"], kl * T, rtol=1e-12, atol=0)
    # "kl" is L_t itself: at k = 0 the decoder NLL, else the KL, both from vb_terms_bpd without clipping.
    xt = d_kl.q_sample(x0, t0, noise)
    torch.testing.assert_close(kl, d_kl.vb_terms_bpd(model, x0, xt, t0, clip_denoised=False)["output"])


# ---------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("var_type,loss_type", [("fixed_small", "mse"), ("fixed_large", "mse"),
                                                ("learned_range", "rescaled_mse"), ("learned", "rescaled_kl")])
def test_dtype_in_is_dtype_out(dtype: torch.dtype, var_type: str, loss_type: str) -> None:
    d = _diffusion(12, var_type=var_type, loss_type=loss_type)
    x0 = _grid_images(2, dtype=dtype)
    t = torch.tensor([0, 11])
    model = (lambda x, t: torch.cat([0.5 * x, 0.1 * x], 1)) if d.learned_sigma else (lambda x, t: 0.5 * x)
    xt = d.q_sample(x0, t)
    outs = [xt, *d.q_posterior_mean_variance(x0, xt, t), d.prior_bpd(x0)]
    outs += list(d.p_mean_variance(model, xt, t).values())
    outs += list(d.p_sample(model, xt, t).values()) + list(d.ddim_sample(model, xt, t, eta=0.5).values())
    outs += list(d.vb_terms_bpd(model, x0, xt, t).values()) + list(d.training_losses(model, x0, t).values())
    outs += [v for k, v in d.calc_bpd_loop(model, x0).items() if k != "timesteps"]
    assert all(o.dtype == dtype for o in outs), [o.dtype for o in outs]


def test_float32_agrees_with_float64() -> None:
    d = _diffusion(40, var_type="learned_range", loss_type="rescaled_mse")
    x0 = _grid_images(3)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 5, 39])
    model = lambda x, t: torch.cat([0.5 * x, torch.tanh(x)], 1)  # noqa: E731
    l64 = d.training_losses(model, x0, t, noise=noise)["loss"]
    l32 = d.training_losses(model, x0.float(), t, noise=noise.float())["loss"]
    torch.testing.assert_close(l32.double(), l64, rtol=1e-4, atol=1e-5)
