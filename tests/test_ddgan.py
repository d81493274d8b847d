"""DDGAN's maths against closed forms: the VP-SDE chain, true pairs, the posterior step, losses, R1, the schedule of
the learning rates, the discriminator's pieces and the generator's latent input."""

from __future__ import annotations

import math

import pytest
import torch

from ddpmctl.config import CheckpointConfig, DiffusionConfig, LatentConfig, ModelConfig
from ddpmctl.ddgan import (
    cosine_lr,
    ddgan_diffusion,
    discriminator_loss,
    generator_loss,
    posterior_sample,
    q_sample_pair,
    r1_due,
    r1_penalty,
)
from ddpmctl.discriminator import PairDiscriminator, blur_downsample, minibatch_stddev
from ddpmctl.schedules import beta_schedule
from ddpmctl.unet import UNetModel


def _vp_abar(tau: float) -> float:
    """The VP-SDE's signal scale squared, exp(-int_0^tau beta(s) ds) with beta(s) = 0.1 + (20 - 0.1) s."""
    return math.exp(-(0.1 * tau + 0.5 * (20.0 - 0.1) * tau * tau))


@pytest.mark.parametrize("T", [1, 2, 4, 8])
def test_vp_sde_betas_match_the_formula(T: int) -> None:
    betas = beta_schedule("vp-sde", T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    taus = [1e-3 + (1 - 1e-3) * i / T for i in range(T + 1)]
    expected = [1.0 - _vp_abar(taus[k + 1]) / _vp_abar(taus[k]) for k in range(T)]
    torch.testing.assert_close(betas, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    # The chain's alphas-bar telescopes to abar(tau_{k+1}) / abar(tau_0): x_0 sits at tau_0 = 1e-3.
    abar = ddgan_diffusion(T).alphas_cumprod
    torch.testing.assert_close(abar, torch.tensor([_vp_abar(taus[k + 1]) / _vp_abar(taus[0]) for k in range(T)],
                                                  dtype=torch.float64), rtol=1e-12, atol=0)


def test_vp_sde_first_beta_is_exact_at_large_T() -> None:
    # beta_0 = 1 - exp(-(0.1 d + 9.95 (tau_1^2 - tau_0^2))): about 1e-4 at T = 1000, where 1 - ratio loses digits.
    T = 1000
    tau0, tau1 = 1e-3, 1e-3 + (1 - 1e-3) / T
    exact = -math.expm1(-(0.1 * (tau1 - tau0) + 0.5 * 19.9 * (tau1 * tau1 - tau0 * tau0)))
    assert beta_schedule("vp-sde", T)[0].item() == pytest.approx(exact, rel=1e-13)


def _bayes_posterior(T: int, k: int) -> tuple[float, float, float]:
    """q(x_{k-1} | x_k, x_0) by Bayes' rule from q(x_k | x_{k-1}) q(x_{k-1} | x_0): (coef on x_0, coef on x_k, var)."""
    taus = [1e-3 + (1 - 1e-3) * i / T for i in range(T + 1)]
    abar = [_vp_abar(taus[j + 1]) / _vp_abar(taus[0]) for j in range(T)]
    abar_prev = 1.0 if k == 0 else abar[k - 1]
    alpha = abar[k] / abar_prev
    if k == 0:
        return 1.0, 0.0, 0.0  # x_{-1} is x_0 itself
    precision = alpha / (1 - alpha) + 1.0 / (1 - abar_prev)
    var = 1.0 / precision
    return var * math.sqrt(abar_prev) / (1 - abar_prev), var * math.sqrt(alpha) / (1 - alpha), var


@pytest.mark.parametrize("T", [2, 4, 8])
def test_posterior_step_is_bayes_rule(T: int) -> None:
    diffusion = ddgan_diffusion(T)
    x0 = torch.tensor([[0.3, -0.7]], dtype=torch.float64).view(1, 1, 1, 2)
    x_t = torch.tensor([[1.1, 0.4]], dtype=torch.float64).view(1, 1, 1, 2)
    noise = torch.tensor([[0.5, -2.0]], dtype=torch.float64).view(1, 1, 1, 2)
    for k in range(T):
        c0, ct, var = _bayes_posterior(T, k)
        t = torch.tensor([k])
        got = posterior_sample(diffusion, x0, x_t, t, noise)
        expected = c0 * x0 + ct * x_t + math.sqrt(var) * noise
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # At k = 0 the step returns x_0' exactly: no noise, no trace of x_t.
    assert float((posterior_sample(diffusion, x0, x_t, torch.tensor([0]), noise) - x0).abs().max()) < 1e-15


@pytest.mark.parametrize("T", [2, 4])
def test_true_pairs_have_the_forward_marginals(T: int) -> None:
    """x_{k-1} ~ q(x_{k-1} | x_0) and x_k = sqrt(alpha_k) x_{k-1} + sqrt(beta_k) n: linear in the two noises, so the
    coefficients give the exact means and variances."""
    diffusion = ddgan_diffusion(T)
    taus = [1e-3 + (1 - 1e-3) * i / T for i in range(T + 1)]
    abar = [_vp_abar(taus[j + 1]) / _vp_abar(taus[0]) for j in range(T)]
    x0 = torch.full((T, 1, 1, 1), 0.6, dtype=torch.float64)
    t = torch.arange(T)
    zero, one = torch.zeros_like(x0), torch.ones_like(x0)
    prev_mean, xt_mean = q_sample_pair(diffusion, x0, t, zero, zero)
    prev_a, xt_a = q_sample_pair(diffusion, torch.zeros_like(x0), t, one, zero)
    prev_b, xt_b = q_sample_pair(diffusion, torch.zeros_like(x0), t, zero, one)
    for k in range(T):
        abar_prev = 1.0 if k == 0 else abar[k - 1]
        assert prev_mean[k].item() == pytest.approx(0.6 * math.sqrt(abar_prev), rel=1e-12)
        assert xt_mean[k].item() == pytest.approx(0.6 * math.sqrt(abar[k]), rel=1e-12)
        assert prev_a[k].item() ** 2 + prev_b[k].item() ** 2 == pytest.approx(1 - abar_prev, abs=1e-14)
        assert xt_a[k].item() ** 2 + xt_b[k].item() ** 2 == pytest.approx(1 - abar[k], rel=1e-12)


def test_losses_on_fixed_logits() -> None:
    real = torch.tensor([0.0, math.log(3.0)])
    fake = torch.tensor([-math.log(4.0), 0.0])
    # softplus(-l) = log(1 + e^-l); softplus(l) = log(1 + e^l).
    expected_d = (math.log(2.0) + math.log(4.0 / 3.0)) / 2 + (math.log(5.0 / 4.0) + math.log(2.0)) / 2
    expected_g = (math.log(5.0) + math.log(2.0)) / 2
    assert discriminator_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert generator_loss(fake).item() == pytest.approx(expected_g, rel=1e-6)
    # Large logits stay finite (softplus, not log(sigmoid)).
    assert math.isfinite(generator_loss(torch.tensor([-200.0])).item())
    assert generator_loss(torch.tensor([-200.0])).item() == pytest.approx(200.0)


class _QuadraticD(torch.nn.Module):
    """D(x_prev, x_t, t) = sum(a * x_prev^2) / 2 + sum(x_t): its gradient in x_prev is a * x_prev."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(a.clone())

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.a * x_prev**2).flatten(1).sum(1) + x_t.flatten(1).sum(1)


def test_r1_against_a_quadratic_discriminator() -> None:
    torch.manual_seed(0)
    a = torch.rand(1, 2, 3, 3, dtype=torch.float64) + 0.5
    x_prev = torch.randn(5, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    x_t = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    disc = _QuadraticD(a)
    gamma = 0.05
    penalty = r1_penalty(disc(x_prev, x_t, torch.zeros(5, dtype=torch.int64)), x_prev, gamma)
    x = x_prev.detach()
    per_sample = (a**2 * x**2).flatten(1).sum(1)  # ||a * x||^2
    assert penalty.item() == pytest.approx(gamma / 2 * per_sample.mean().item(), rel=1e-12)
    # It trains D: d/da of gamma/2 mean ||a x||^2 = gamma a mean(x^2) (over the batch, per element).
    penalty.backward()
    torch.testing.assert_close(disc.a.grad, gamma * a * (x**2).mean(0, keepdim=True), rtol=1e-12, atol=0)


def test_lazy_r1_steps_and_cosine_lr() -> None:
    assert [s for s in range(40) if r1_due(s, 15)] == [0, 15, 30]
    assert [s for s in range(3) if r1_due(s, 1)] == [0, 1, 2]
    assert cosine_lr(1.6e-4, 1e-5, 0, 100) == pytest.approx(1.6e-4)
    assert cosine_lr(1.6e-4, 1e-5, 50, 100) == pytest.approx((1.6e-4 + 1e-5) / 2)
    assert cosine_lr(1.6e-4, 1e-5, 100, 100) == pytest.approx(1e-5)
    assert cosine_lr(1.6e-4, 1e-5, 250, 100) == pytest.approx(1e-5)
    assert cosine_lr(1.6e-4, 1e-5, 25, None) == 1.6e-4
    assert cosine_lr(1.0, 0.0, 25, 100) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_minibatch_stddev_feature() -> None:
    torch.manual_seed(0)
    h = torch.randn(8, 3, 2, 2)
    out = minibatch_stddev(h)
    assert out.shape == (8, 4, 2, 2) and torch.equal(out[:, :3], h)
    # Groups of 4: sample i with i + 2, i + 4, i + 6 (the official layout); population std, mean over C, H, W.
    for i in range(8):
        group = h[i % 2::2]
        expected = torch.sqrt(group.var(0, unbiased=False) + 1e-8).mean()
        torch.testing.assert_close(out[i, 3], expected.expand(2, 2))
    # A batch that 4 does not divide groups by the largest divisor (6 -> 2); a single sample has no spread.
    assert minibatch_stddev(torch.randn(6, 3, 2, 2)).shape == (6, 4, 2, 2)
    single = minibatch_stddev(torch.randn(1, 3, 2, 2))
    torch.testing.assert_close(single[0, 3], torch.full((2, 2), 1e-4))


def test_blur_downsample_keeps_constants_and_halves() -> None:
    x = torch.full((2, 3, 8, 8), 0.7)
    out = blur_downsample(x)
    assert out.shape == (2, 3, 4, 4)
    # The kernel sums to 1: interior outputs of a constant image are that constant.
    torch.testing.assert_close(out[:, :, 1:-1, 1:-1], torch.full((2, 3, 2, 2), 0.7))


@pytest.mark.parametrize("size", [4, 8, 32])
def test_discriminator_shapes_and_time_dependence(size: int) -> None:
    torch.manual_seed(0)
    disc = PairDiscriminator(in_channels=3, image_size=size, channels=8)
    for block in disc.blocks:  # the residual branches start at zero (as in the official D): make them respond
        torch.nn.init.normal_(block.conv2.weight, std=0.1)
    x_prev, x_t = torch.randn(4, 3, size, size), torch.randn(4, 3, size, size)
    logits = disc(x_prev, x_t, torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4,) and logits.dtype == torch.float32
    other = disc(x_prev, x_t, torch.tensor([3, 3, 3, 3]))
    assert not torch.allclose(logits[:3], other[:3])
    # The pair's order matters (D judges x_{t-1} given x_t).
    assert not torch.allclose(logits, disc(x_t, x_prev, torch.tensor([0, 1, 2, 3])))


def _generator_config(latent: LatentConfig | None) -> ModelConfig:
    return ModelConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(4,), latent=latent)


def test_generator_latent_is_an_optional_extension() -> None:
    plain = _generator_config(None)
    # Configs without a latent serialise exactly as before it existed (checkpoints and run folders unchanged).
    assert "latent" not in plain.model_dump_json() and "latent" not in plain.model_dump()
    checkpoint = CheckpointConfig(model=plain, diffusion=DiffusionConfig())
    assert "latent" not in checkpoint.model_dump_json()
    assert CheckpointConfig.model_validate_json(checkpoint.model_dump_json()) == checkpoint
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in UNetModel(plain, out_channels=1, num_timesteps=4).state_dict().items()}
    torch.manual_seed(0)
    generator = UNetModel(_generator_config(LatentConfig(dim=10, mlp_layers=4)), out_channels=1, num_timesteps=4)
    extra = sorted({k.split(".")[0] for k in generator.state_dict()} - {k.split(".")[0] for k in before})
    assert extra == ["latent_embed"]
    linears = [m for m in generator.latent_embed.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 and linears[0].in_features == 10


def test_generator_output_depends_on_z_and_is_in_range() -> None:
    torch.manual_seed(0)
    generator = UNetModel(_generator_config(LatentConfig(dim=10)), out_channels=1, num_timesteps=4)
    for param in generator.parameters():  # the zero-initialised convs (residual branches, output), made to respond
        if param.dim() > 1 and not param.any():
            torch.nn.init.normal_(param, std=0.3)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 3])
    a = generator(x, t, z=torch.randn(3, 10))
    b = generator(x, t, z=torch.randn(3, 10))
    assert not torch.allclose(a, b) and a.abs().max() <= 1.0
    # PixelNorm: the direction of z matters, not its scale.
    z = torch.randn(3, 10)
    torch.testing.assert_close(generator(x, t, z=z), generator(x, t, z=4 * z), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="latent z"):
        generator(x, t)
    with pytest.raises(ValueError, match="latent z must have shape"):
        generator(x, t, z=torch.randn(3, 11))


def test_ddgan_sampler_draws_the_data_distribution_with_an_exact_generator() -> None:
    """With the exact generator for Gaussian data (x_0' a draw from p(x_0 | x_t)) every posterior step is the true
    reverse step, so the T steps end in N(mean, std^2); image i depends only on (seed, i)."""
    from ddpmctl.samplers import generate, get_sampler
    from ddpmctl.testing import ExactGenerator, exact_checkpoint

    chain = DiffusionConfig(schedule="vp-sde", timesteps=4, mean_type="x0", var_type="fixed_small", loss_type="mse")
    generator = ExactGenerator(ddgan_diffusion(4).alphas_cumprod, mean=0.2, std=0.5)
    checkpoint = exact_checkpoint(generator, channels=1, image_size=32, diffusion=chain, kind="ddgan")
    sampler = get_sampler("ddgan")()
    images, _ = generate(checkpoint, sampler, num=4, batch_size=4, seed=3, steps=None)
    values = images.double().flatten()  # 4096 draws
    assert abs(values.mean().item() - 0.2) < 4 * 0.5 / math.sqrt(values.numel())
    assert abs(values.std().item() - 0.5) < 0.03
    again, _ = generate(checkpoint, sampler, num=3, batch_size=1, seed=3, steps=4)
    torch.testing.assert_close(again, images[:3], rtol=0, atol=1e-5)
