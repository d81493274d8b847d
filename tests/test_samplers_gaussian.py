"""Samplers on an exact denoiser for Gaussian data N(m, s^2), against closed forms of what each must produce.

For x_0 ~ N(m, s^2) elementwise, x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps is Gaussian and E[x_0 | x_t] is linear:
m + sqrt(abar) s^2 / (abar s^2 + 1 - abar) (x_t - sqrt(abar) m) (``ddpmctl.testing.ExactGaussianDenoiser``). With
that denoiser every sampler here is a linear-Gaussian recursion, so the mean and std of its output follow in closed
form from the abar table alone; the tests compare the sampled statistics of 131,072 values (standard error of the
std about 0.2%) with those closed forms, and with m and s themselves within the tolerance each sampler deserves.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddpmctl.build import build_diffusion
from ddpmctl.errors import SamplerError
from ddpmctl.config import DiffusionConfig
from ddpmctl.respace import space_timesteps
from ddpmctl.samplers import SampleRNG, build_denoiser, generate, get_sampler, sampling_timesteps
from ddpmctl.testing import ExactGaussianDenoiser, exact_checkpoint, gaussian_ode_error

M, S, T = 0.1, 0.3, 200
SIZE = 64  # 32 images of 1x64x64: many values (131,072), few per-image generators


def _checkpoint(var_type: str) -> object:
    dconf = DiffusionConfig(schedule="cosine", timesteps=T, var_type=var_type,
                            loss_type="rescaled_mse" if var_type.startswith("learned") else "mse")
    full = build_diffusion(dconf)
    # learned_range: the v channel encodes the exact reverse variance of the T-step chain (see the denoiser).
    model = ExactGaussianDenoiser(M, S, full.alphas_cumprod, betas=full.betas, learned_sigma=dconf.learned_sigma)
    return exact_checkpoint(model, channels=1, image_size=SIZE, diffusion=dconf)


@pytest.fixture(scope="module")
def learned() -> object:
    return _checkpoint("learned_range")


def _sample(ckpt: object, name: str, steps: int | None, **options: object) -> torch.Tensor:
    cls = get_sampler(name)
    sampler = cls(cls.Options(clip_denoised=False, **options))  # clipping would bias a Gaussian's tails
    rng = SampleRNG(0, range(32))
    timesteps = sampling_timesteps(ckpt, sampler, steps)
    denoiser = build_denoiser(ckpt, timesteps)
    return sampler.sample(denoiser, rng.randn((1, SIZE, SIZE)), timesteps, noise=rng).double()


def _x0_shrink(abar0: float) -> float:
    """Every sampler here ends with x_hat = E[x_0 | x at the least noisy step], whose std is s * this factor."""
    return math.sqrt(abar0 * S**2 / (abar0 * S**2 + 1 - abar0))


def _ddim_closed_form(abar: torch.Tensor, steps: int) -> tuple[float, float]:
    """Mean and std of DDIM (eta 0) with the exact denoiser: x' = c x + d per step, from x_T ~ N(0, 1)."""
    ks = sorted(space_timesteps(T, str(steps)), reverse=True)
    mean, var = 0.0, 1.0
    for i, k in enumerate(ks):
        a = float(abar[k])
        a_prev = float(abar[ks[i + 1]]) if i + 1 < len(ks) else 1.0
        gain = math.sqrt(a) * S**2 / (a * S**2 + 1 - a)  # x0_hat = m + gain (x - sqrt(a) m)
        # x' = sqrt(a') x0_hat + sqrt(1 - a') eps_hat, eps_hat = (x - sqrt(a) x0_hat) / sqrt(1 - a)
        c = math.sqrt(a_prev) * gain + math.sqrt(1 - a_prev) * (1 - math.sqrt(a) * gain) / math.sqrt(1 - a)
        d = M * (1 - gain * math.sqrt(a)) * (math.sqrt(a_prev) - math.sqrt(1 - a_prev) * math.sqrt(a / (1 - a)))
        mean, var = c * mean + d, c * c * var
    return mean, math.sqrt(var)


def test_ancestral_full_chain_is_exact(learned: object) -> None:
    # With E[x_0 | x_t] and the exact reverse variance each step preserves the true marginal, so the output is
    # exactly distributed as x_hat at k = 0: mean m, std s * shrink (0.14% below s here).
    x = _sample(learned, "ancestral", None)
    abar0 = float(learned.diffusion.alphas_cumprod[0])
    assert abs(float(x.mean()) - M) < 0.005
    assert float(x.std()) == pytest.approx(S * _x0_shrink(abar0), rel=0.01)
    assert float(x.std()) == pytest.approx(S, rel=0.02)


def test_strided_50_learned_variance_rescales(learned: object) -> None:
    # The network's v was made exact for the 200-step chain; on 50 strided steps the respaced chain reinterprets it
    # between its own beta and beta_tilde (IDDPM Sec. 4). Not exact, but within a few percent (measured: -0.5%),
    # while a fixed beta_tilde variance on the same 50 steps is far off (-9%): the point of learned variances.
    x = _sample(learned, "strided", 50)
    assert abs(float(x.mean()) - M) < 0.005
    assert float(x.std()) == pytest.approx(S, rel=0.02)
    fixed = _sample(_checkpoint("fixed_small"), "strided", 50)
    assert abs(float(fixed.std()) / S - 1) > 5 * abs(float(x.std()) / S - 1)


def test_ddim_50_matches_closed_form(learned: object) -> None:
    # DDIM at eta 0 shrinks the variance a little at every step (Cauchy-Schwarz on the two coefficients), a
    # first-order discretisation error: about -4% at 50 steps here, -2% at 100. The closed form pins it exactly.
    x = _sample(learned, "ddim", 50)
    mean, std = _ddim_closed_form(learned.diffusion.alphas_cumprod, 50)
    assert float(x.mean()) == pytest.approx(mean, abs=0.005)
    assert float(x.std()) == pytest.approx(std, rel=0.01)
    assert abs(float(x.mean()) - M) < 0.005
    assert float(x.std()) == pytest.approx(S, rel=0.06)
    x100 = _sample(learned, "ddim", 100)
    assert float(x100.std()) == pytest.approx(_ddim_closed_form(learned.diffusion.alphas_cumprod, 100)[1], rel=0.01)


def test_ddim_eta_one_is_strided_with_beta_tilde() -> None:
    # sigma_eta at eta = 1 is the respaced posterior std, and the DDIM mean equals the posterior mean: the same
    # chain as strided ancestral sampling with the fixed_small variance, drawing the same noise.
    ckpt = _checkpoint("fixed_small")
    a = _sample(ckpt, "ddim", 20, eta=1.0)
    b = _sample(ckpt, "strided", 20)
    assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_strided_equals_ancestral_on_respaced_chain_bit_for_bit(learned: object) -> None:
    use = tuple(sorted(space_timesteps(T, "25")))
    respaced_config = learned.config.diffusion.model_copy(update={"use_timesteps": use})
    respaced = exact_checkpoint(learned.model, channels=1, image_size=SIZE, diffusion=respaced_config,
                                kind="respaced")
    a = _sample(learned, "strided", 25)
    b = _sample(respaced, "ancestral", None)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,steps", [("ddim", 10), ("strided", 10)])
def test_generate_batch_size_invariance_and_reproducibility(name: str, steps: int) -> None:
    ckpt = exact_checkpoint(ExactGaussianDenoiser(M, S, build_diffusion(DiffusionConfig(schedule="cosine", timesteps=T))
                                                  .alphas_cumprod, learned_sigma=False),
                            channels=1, image_size=4, diffusion=DiffusionConfig(schedule="cosine", timesteps=T,
                                                                                var_type="fixed_small",
                                                                                loss_type="mse"))
    sampler = get_sampler(name)()
    seen: list[int] = []
    a, _ = generate(ckpt, sampler, num=7, batch_size=7, seed=5, steps=steps, callback=lambda p: seen.append(p.step))
    b, _ = generate(ckpt, sampler, num=7, batch_size=3, seed=5, steps=steps)
    c, _ = generate(ckpt, sampler, num=7, batch_size=1, seed=5, steps=steps, output="uint8")
    d, _ = generate(ckpt, sampler, num=7, batch_size=7, seed=6, steps=steps)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert c.dtype == torch.uint8 and torch.equal(c, ((a + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    assert not torch.allclose(a, d)
    assert seen == [*range(1, steps + 1), 0]  # every step, then the finished batch


# ---------------------------------------------------------------------------------------------------------------
# Few-step quality: distance to the exact probability-flow ODE solution (T = 4000 cosine, the default chain)


@pytest.fixture(scope="module")
def ode_errors() -> dict[tuple[str, int], float]:
    return {(name, n): gaussian_ode_error(get_sampler(name), n) for name in ("ddim", "dpmpp-2m")
            for n in (5, 10, 20, 50)}


def test_dpmpp_2m_at_10_steps_beats_ddim_at_10_and_20(ode_errors: dict[tuple[str, int], float]) -> None:
    # Measured against the exact sigma = 0 endpoint: dpmpp-2m 0.0029 at 10 steps; DDIM 0.067 at 10 and 0.034 at 20.
    assert ode_errors["dpmpp-2m", 10] < ode_errors["ddim", 20] < ode_errors["ddim", 10]
    assert ode_errors["dpmpp-2m", 5] < ode_errors["ddim", 5]


def test_observed_orders_of_convergence(ode_errors: dict[tuple[str, int], float]) -> None:
    def order(name: str, a: int, b: int) -> float:
        return math.log(ode_errors[name, a] / ode_errors[name, b]) / math.log(b / a)

    # DDIM is Euler's method in (sigma/alpha): first order (measured 1.00 between 10 and 50 steps).
    assert order("ddim", 10, 50) == pytest.approx(1.0, abs=0.1)
    # DPM-Solver++(2M) is second order. Its default grid changes with the steps (plugins' dpmpp.py), so the order is
    # taken on one fixed lambda range, from -3 to the chain's bottom step (a range that stops short of it leaves the
    # constant bias of E[x_0 | x] there, and no order): measured 2.12 between 20 and 50 steps (2.32 from 50 to 100;
    # over the whole chain 2.08).
    fixed = get_sampler("dpmpp-2m").Options(clip_denoised=False, lambda_min=-3.0, lambda_max=30.0)
    err20, err50 = (gaussian_ode_error(get_sampler("dpmpp-2m"), n, options=fixed) for n in (20, 50))
    assert math.log(err20 / err50) / math.log(50 / 20) > 1.8
    # Measured with the default grid: 0.0014 at 50 steps against DDIM's 0.013.
    assert ode_errors["dpmpp-2m", 50] < ode_errors["ddim", 50] / 5


def test_dpmpp_2m_default_10_steps_land_near_the_true_endpoint() -> None:
    """Gaussian data N(m, s^2), exact denoiser, T = 4000 cosine: the probability-flow ODE maps x_T to
    x_0 = m + (x_T / alpha_top - m) s / sqrt(s^2 + k_top^2), k = sigma / alpha (a pure scaling per value), whose
    spread is exactly the data's. With this denoiser every step is linear too, so a sampler's output is that endpoint
    scaled about m: stopping early and returning E[x_0 | x] at k shrinks it by s / sqrt(s^2 + k^2), wide 2M steps
    overshoot it. Measured at 10 steps: 0.958 ending at lambda = 2.5 (the former default), 1.010 at 3.5, 1.037 at the
    chain's bottom step."""
    dconf = DiffusionConfig(schedule="cosine", timesteps=4000, var_type="fixed_small", loss_type="mse")
    abar = build_diffusion(dconf).alphas_cumprod
    ckpt = exact_checkpoint(ExactGaussianDenoiser(M, S, abar), channels=1, image_size=32, diffusion=dconf)
    x_T = SampleRNG(3, range(16)).randn((1, 32, 32)).to(torch.float64)
    abar_top = float(abar[-1])
    exact = M + (x_T / math.sqrt(abar_top) - M) * S / math.sqrt(S**2 + (1 - abar_top) / abar_top)
    dpmpp = get_sampler("dpmpp-2m")

    def spread_and_error(**options: float) -> tuple[float, float]:
        sampler = dpmpp(dpmpp.Options(clip_denoised=False, **options))
        out = generate(ckpt, sampler, num=16, batch_size=16, seed=3, steps=10)[0].to(torch.float64)
        return float((out - M).std() / (exact - M).std()), float((out - exact).pow(2).mean().sqrt())

    ratio, rms = spread_and_error()
    assert abs(ratio - 1) < 0.015 and rms < 4e-3, (ratio, rms)
    # The same check tells the early stop apart: ending at 2.5 the samples are 4% too narrow.
    ratio, rms = spread_and_error(lambda_max=2.5)
    assert ratio < 0.97 and rms > 1e-2, (ratio, rms)


def test_one_step_starts_from_the_top() -> None:
    # A single network call must be made where the network expects pure noise (the chain's top step), never at t = 0.
    ckpt = _checkpoint("fixed_small")
    for name in ("ddim", "strided", "dpmpp-2m"):
        sampler = get_sampler(name)()
        assert sampling_timesteps(ckpt, sampler, 1) == (T - 1,), name
    ddim_stride = get_sampler("ddim")(get_sampler("ddim").Options(spacing="ddim"))
    assert sampling_timesteps(ckpt, ddim_stride, 1) == (T - 1,)
    # And it returns the denoiser's x_0 there: the data mean for Gaussian data seen from pure noise.
    x = _sample(ckpt, "ddim", 1)
    assert abs(float(x.mean()) - M) < 1e-3 and float(x.std()) < 1e-3


def test_logsnr_spacing_is_uniform_in_log_snr() -> None:
    dconf = DiffusionConfig(schedule="cosine", timesteps=4000, var_type="fixed_small", loss_type="mse")
    ckpt = exact_checkpoint(ExactGaussianDenoiser(M, S, build_diffusion(dconf).alphas_cumprod), channels=1, image_size=4,
                            diffusion=dconf)
    chain_lam = [0.5 * math.log(float(a) / (1 - float(a))) for a in ckpt.diffusion.alphas_cumprod]
    dpmpp = get_sampler("dpmpp-2m")

    def nearest(target: float) -> int:
        return min(range(4000), key=lambda p: abs(chain_lam[p] - target))

    def check(steps: tuple[int, ...], low: float, high: float) -> None:
        # The top step, then 9 steps uniform in lambda from low to high, each the chain step nearest to its target.
        assert len(steps) == 10 and steps[0] == 3999 and list(steps) == sorted(steps, reverse=True)
        targets = [low + (high - low) * j / 8 for j in range(9)]
        assert list(steps[1:]) == [nearest(target) for target in targets], (steps, targets)

    # The default 10-step grid of an eps network: lambda -3 to 3.5 (the plugin's docstring says why).
    check(sampling_timesteps(ckpt, dpmpp(), 10), -3.0, 3.5)
    # A range wider than the chain: from the step below the top (3.5 units of lambda above it: the clipped beta of
    # the cosine schedule) to the bottom step.
    whole = dpmpp(dpmpp.Options(lambda_min=-30.0, lambda_max=30.0))
    steps = sampling_timesteps(ckpt, whole, 10)
    check(steps, chain_lam[-2], chain_lam[0])
    assert steps[-1] == 0
    # v and x0 networks start at -1.5; with more steps the default grid widens, by 50 steps to the whole chain.
    assert dpmpp().log_snr_span("v", 10, chain_lam[0]) == (-1.5, 3.5)
    assert dpmpp().log_snr_span("x0", 10, chain_lam[0]) == (-1.5, 3.5)
    low, high = dpmpp().log_snr_span("eps", 20, chain_lam[0])
    assert low < -3.0 and 3.5 < high < chain_lam[0]
    low, high = dpmpp().log_snr_span("eps", 50, chain_lam[0])
    assert low < chain_lam[-2] and high == chain_lam[0]
    with pytest.raises(ValueError, match="lambda_min must be below lambda_max"):
        dpmpp.Options(lambda_min=1.0, lambda_max=0.0)
    # One end given on the wrong side of the other, default, end: the message says that end is a default.
    with pytest.raises(SamplerError, match=r"lambda_min=5 is not below the default high end .*give lambda_max"):
        sampling_timesteps(ckpt, dpmpp(dpmpp.Options(lambda_min=5.0)), 10)
    with pytest.raises(SamplerError, match=r"lambda_max=-4 is not above the default low end .*give lambda_min"):
        sampling_timesteps(ckpt, dpmpp(dpmpp.Options(lambda_max=-4.0)), 10)
    # Even in t, the same chain's first and last gaps are several times the middle ones (why dpmpp-2m avoids it).
    even = sampling_timesteps(ckpt, get_sampler("ddim")(), 10)
    lam_even = [chain_lam[t] for t in even]
    gaps_even = [b - a for a, b in zip(lam_even, lam_even[1:])]
    assert gaps_even[0] > 3 * gaps_even[4] and gaps_even[-1] > 3 * gaps_even[4], gaps_even


def test_logsnr_range_options_need_logsnr_spacing() -> None:
    # With even or ddim spacing a lambda range would be silently ignored: refuse it instead.
    dpmpp = get_sampler("dpmpp-2m")
    for spacing in ("even", "ddim"):
        with pytest.raises(ValueError, match=f"lambda_min=-2 applies only to spacing=logsnr, not spacing={spacing}"):
            dpmpp.Options(spacing=spacing, lambda_min=-2.0)
        with pytest.raises(ValueError, match="lambda_min=-2 and lambda_max=3 apply only to spacing=logsnr"):
            dpmpp.Options(spacing=spacing, lambda_min=-2.0, lambda_max=3.0)
    assert dpmpp.Options(spacing="even").lambda_min is None


def test_logsnr_grid_spends_no_call_next_to_the_top_step() -> None:
    # A linear chain's top two steps differ by about 0.01 in lambda; a grid over the whole chain that started at the
    # step below the top would call the network there twice in effect (and extrapolate the 2M step by 1/(2r) ~ 17).
    dconf = DiffusionConfig(schedule="linear", timesteps=1000, var_type="fixed_small", loss_type="mse")
    abar = build_diffusion(dconf).alphas_cumprod
    ckpt = exact_checkpoint(ExactGaussianDenoiser(M, S, abar), channels=1, image_size=4, diffusion=dconf)
    lam = [0.5 * math.log(float(a) / (1 - float(a))) for a in abar]
    assert lam[-2] - lam[-1] < 0.02
    whole = get_sampler("ddim")(get_sampler("ddim").Options(spacing="logsnr"))
    for steps in (5, 10, 50):
        grid = [lam[t] for t in sampling_timesteps(ckpt, whole, steps)]
        gaps = [b - a for a, b in zip(grid, grid[1:])]
        even = (lam[0] - lam[-1]) / (steps - 1)  # uniform from the top step itself to the bottom step
        # Every gap is the uniform one up to the chain's own rounding to integer steps (at most one step's lambda).
        widest_step = max(abs(a - b) for a, b in zip(lam, lam[1:]))
        assert all(abs(g - even) <= widest_step for g in gaps), (steps, gaps)
    # The cosine chain's top step sits 3.5 below its neighbour: there the grid still starts at the neighbour.
    cos = DiffusionConfig(schedule="cosine", timesteps=1000, var_type="fixed_small", loss_type="mse")
    abar = build_diffusion(cos).alphas_cumprod
    ckpt = exact_checkpoint(ExactGaussianDenoiser(M, S, abar), channels=1, image_size=4, diffusion=cos)
    assert sampling_timesteps(ckpt, whole, 10)[:2] == (999, 998)


def test_explicit_timesteps() -> None:
    ckpt = _checkpoint("learned_range")
    sampler = get_sampler("strided")()
    chosen = sampling_timesteps(ckpt, sampler, 7)
    a, _ = generate(ckpt, sampler, num=3, batch_size=3, seed=1, steps=7)
    b, _ = generate(ckpt, sampler, num=3, batch_size=3, seed=1, steps=None, timesteps=list(reversed(chosen)))
    assert torch.equal(a, b)  # the same steps in any order: the same chain, the same images
    c, _ = generate(ckpt, sampler, num=3, batch_size=3, seed=1, steps=None, timesteps=[0, 50, 120, 199])
    assert not torch.allclose(a, c)
    from ddpmctl.errors import SamplerError

    with pytest.raises(SamplerError, match="explicit timesteps must be steps of"):
        sampling_timesteps(ckpt, sampler, None, [0, T])
    with pytest.raises(SamplerError, match="whole chain"):
        sampling_timesteps(ckpt, get_sampler("ancestral")(), None, [0, 5])
