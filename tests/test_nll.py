"""Bits/dim through the variational bound (ddpmctl.nll) against independent computations and closed forms."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ddpmctl.build import build_diffusion, build_model
from ddpmctl.checkpoint import load_checkpoint, save_checkpoint
from ddpmctl.config import CheckpointConfig, DiffusionConfig, ModelConfig
from ddpmctl.diffusion import GaussianDiffusion
from ddpmctl.errors import ConfigError, DataError
from ddpmctl.images import uint8_to_model
from ddpmctl.nll import NllProgress, evaluate_bound, evaluate_nll, term_noise
from ddpmctl.schedules import beta_schedule
from conftest import perturb_weights



def tiny_config(T: int, *, in_channels: int = 1, num_classes: int | None = None,
                use_timesteps: tuple[int, ...] | None = None, learned: bool = True) -> CheckpointConfig:
    model = ModelConfig(image_size=8, in_channels=in_channels, model_channels=16, channel_mult=(1, 2),
                        num_res_blocks=1, attention_resolutions=(4,), num_classes=num_classes)
    diffusion = (DiffusionConfig(timesteps=T, use_timesteps=use_timesteps) if learned
                 else DiffusionConfig(timesteps=T, use_timesteps=use_timesteps, var_type="fixed_small", loss_type="mse"))
    return CheckpointConfig(model=model, diffusion=diffusion)


def random_model(config: CheckpointConfig, seed: int = 1) -> torch.nn.Module:
    """A freshly built U-Net whose zero-initialised output layers get small random weights (so the output, and
    every term of the bound, depends on the input, t and y: an untrained but not degenerate network)."""
    torch.manual_seed(seed)
    return perturb_weights(build_model(config), 0.05, only_zero=True).eval()


def tiny_checkpoint(path: Path, T: int, *, in_channels: int = 1, num_classes: int | None = None,
                    use_timesteps: tuple[int, ...] | None = None):
    config = tiny_config(T, in_channels=in_channels, num_classes=num_classes, use_timesteps=use_timesteps)
    save_checkpoint(path, random_model(config).state_dict(), config,
                    kind="respaced" if use_timesteps else "model", lineage=[])
    return load_checkpoint(path)


def random_images(n: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, 8, 8), generator=generator, dtype=torch.uint8)


def plain_loop(diffusion: GaussianDiffusion, model, x_start: torch.Tensor, seed: int,
               y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """calc_bpd_loop written out: one network call per t over all images, with nll's keyed noise. (prior, terms)."""
    n, T = x_start.shape[0], diffusion.num_timesteps
    noise = torch.stack([term_noise(seed, i, T, tuple(x_start.shape[1:])) for i in range(n)])
    terms = torch.zeros(n, T, dtype=torch.float64)
    with torch.no_grad():
        for t in range(T - 1, -1, -1):
            t_batch = torch.full((n,), t, dtype=torch.long)
            x_t = diffusion.q_sample(x_start, t_batch, noise=noise[:, t])
            out = diffusion.vb_terms_bpd(model, x_start, x_t, t_batch, clip_denoised=True,
                                         model_kwargs={"y": y} if y is not None else None)
            terms[:, t] = out["output"].double()
        prior = diffusion.prior_bpd(x_start).double()
    return prior, terms


class PointsDenoiser(torch.nn.Module):
    """The exact eps-prediction E[eps | x_t] for data uniform on ``points`` (Bayes' rule over the points).

    ``v`` (optional) is appended as a constant learned-range variance channel block.
    """

    def __init__(self, points: torch.Tensor, alphas_cumprod: torch.Tensor, v: float | None = None) -> None:
        super().__init__()
        self.points = points.double()
        self.alphas_cumprod = alphas_cumprod.double()
        self.v = v

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        abar = self.alphas_cumprod[t].view(-1, 1)
        xf, pts = x.double().flatten(1), self.points.flatten(1)
        dist2 = ((xf[:, None, :] - abar.sqrt()[:, :, None] * pts[None]) ** 2).sum(-1)
        weights = torch.softmax(-dist2 / (2 * (1 - abar)), dim=1)
        eps = (xf - abar.sqrt() * (weights @ pts)) / (1 - abar).sqrt()
        out = eps.view_as(x).to(x.dtype)
        if self.v is not None:
            out = torch.cat([out, torch.full_like(out, self.v)], dim=1)
        return out


def points_dataset(m: int, per_point: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """m distinct 1x8x8 grid images, each repeated per_point times: (points in [-1, 1], images uint8)."""
    points_uint8 = random_images(m, seed=seed)
    return uint8_to_model(points_uint8).double(), points_uint8.repeat_interleave(per_point, dim=0)


# ----------------------------------------------------------------------------------------------- exactness


def test_total_is_prior_plus_every_term_and_batching_matches_a_plain_loop() -> None:
    T = 20
    model = random_model(tiny_config(T))
    diffusion = build_diffusion(DiffusionConfig(timesteps=T))
    x_start = uint8_to_model(random_images(3))
    prior, terms = plain_loop(diffusion, model, x_start, seed=5)
    for batch_size in (1, 7, 20, 64):
        result = evaluate_bound(diffusion, model, x_start, batch_size=batch_size, seed=5, keep_terms=True)
        assert result.num_terms == T and result.terms_per_image == T
        torch.testing.assert_close(result.terms, terms, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.prior, prior, rtol=1e-12, atol=0)
        # total = prior + every term, to float64 rounding of its own terms
        torch.testing.assert_close(result.bpd, result.prior + result.terms.sum(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result.decoder, result.terms[:, 0], rtol=0, atol=0)
        quartiles = torch.stack([result.terms[:, 1:5].sum(1), result.terms[:, 5:10].sum(1),
                                 result.terms[:, 10:15].sum(1), result.terms[:, 15:20].sum(1)], dim=1)
        torch.testing.assert_close(result.kl_quartiles, quartiles, rtol=1e-12, atol=1e-12)
        assert result.quartile_ranges == ((1, 4), (5, 9), (10, 14), (15, 19))
    # one image's numbers depend on its noise only, not on which pairs share its network calls
    assert result.mean == pytest.approx(float(result.bpd.mean()))
    assert result.stderr == pytest.approx(float(result.bpd.std(correction=1)) / math.sqrt(3))


def test_seed_reproducibility_and_progress() -> None:
    T = 10
    model = random_model(tiny_config(T))
    diffusion = build_diffusion(DiffusionConfig(timesteps=T))
    x_start = uint8_to_model(random_images(2))
    events: list[NllProgress] = []
    a = evaluate_bound(diffusion, model, x_start, batch_size=6, seed=3, callback=events.append)
    b = evaluate_bound(diffusion, model, x_start, batch_size=4, seed=3)
    c = evaluate_bound(diffusion, model, x_start, batch_size=6, seed=4)
    torch.testing.assert_close(a.bpd, b.bpd, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a.bpd, c.bpd)
    assert [e.done for e in events] == [6, 12, 18, 20] and all(e.total == 20 for e in events)


# ------------------------------------------------------------------------------------- analytic cases


def test_bound_is_above_the_true_nll_and_an_untrained_network_scores_worse() -> None:
    # Data uniform on m = 4 grid images of D = 64 dims: its NLL is log2(4) / 64 bits/dim exactly. The bound of
    # ANY model is >= that in expectation (cross-entropy >= entropy); the exact denoiser comes close.
    T, m = 50, 4
    points, images = points_dataset(m, per_point=16)
    diffusion = GaussianDiffusion(beta_schedule("cosine", T), mean_type="eps", var_type="fixed_small",
                                  loss_type="mse")
    x_start = uint8_to_model(images)
    exact = evaluate_bound(diffusion, PointsDenoiser(points, diffusion.alphas_cumprod), x_start, batch_size=512)
    true_nll = math.log2(m) / 64
    assert exact.mean - 3 * exact.stderr >= true_nll

    # Where the posterior over the points is sharp (small t), the exact denoiser with fixed_small variance IS the
    # true reverse step: KL = 0. Then L_0 is the closed form of a Gaussian of variance beta_tilde_1 centred on x0,
    # integrated over x0's bin (+-1/255; edge bins open), so the bound is dominated by the decoder's width.
    assert float(exact.kl_quartiles[:, 0].abs().max()) < 1e-4
    betas = beta_schedule("cosine", T)
    abar = torch.cumprod(1 - betas, 0)
    sigma = math.sqrt(betas[1] * (1 - abar[0]) / (1 - abar[1]))
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), sigma)
    x = x_start.double()
    upper = torch.where(x > 0.999, torch.ones_like(x), normal.cdf(x + 1 / 255 - x))
    lower = torch.where(x < -0.999, torch.zeros_like(x), normal.cdf(x - 1 / 255 - x))
    decoder = -torch.log2(upper - lower).flatten(1).mean(1)
    torch.testing.assert_close(exact.decoder, decoder, rtol=2e-3, atol=1e-4)

    untrained = random_model(tiny_config(T, learned=False))
    worse = evaluate_bound(diffusion, untrained, x_start[::4], batch_size=512)
    assert worse.mean - 3 * worse.stderr > exact.mean + 3 * exact.stderr


def test_mc_estimate_is_unbiased_with_the_right_standard_error() -> None:
    # One data point, exact eps and a constant learned-range variance: every term L_t is deterministic, so the
    # exact bound is a number S, and the mc estimate's variance is known in closed form for a given proposal.
    T, M, n = 30, 16, 256
    points, images = points_dataset(1, per_point=n, seed=3)
    diffusion = GaussianDiffusion(beta_schedule("cosine", T), mean_type="eps", var_type="learned_range",
                                  loss_type="rescaled_mse")
    model = PointsDenoiser(points, diffusion.alphas_cumprod, v=0.3)
    x_start = uint8_to_model(images)
    exact = evaluate_bound(diffusion, model, x_start[:2], batch_size=64, keep_terms=True)
    assert exact.bpd[0].item() == pytest.approx(exact.bpd[1].item(), rel=1e-5)  # deterministic indeed
    kl = exact.terms[0, 1:]
    proposal = torch.cat([torch.zeros(1), 1.0 / torch.arange(1, T, dtype=torch.float64)])
    p = proposal[1:] / proposal.sum()
    var_one = float((kl**2 / p).sum() - kl.sum() ** 2)  # variance of L_t / p(t) for one draw t ~ p

    mc = evaluate_bound(diffusion, model, x_start, batch_size=1024, estimator="mc", terms=M, proposal=proposal,
                        seed=0)
    assert mc.estimator == "mc" and mc.terms_per_image == M + 1 and mc.num_terms == T
    torch.testing.assert_close(mc.prior, exact.prior[:1].expand(n), rtol=1e-6, atol=0)
    torch.testing.assert_close(mc.decoder, exact.decoder[:1].expand(n), rtol=1e-4, atol=1e-6)
    se = math.sqrt(var_one / (M * n))
    assert abs(mc.mean - exact.bpd[0].item()) < 3 * se
    assert mc.stderr == pytest.approx(se, rel=0.3)  # the reported error across images matches the closed form
    assert float(mc.bpd_stderr.pow(2).mean()) == pytest.approx(var_one / M, rel=0.3)
    # each quartile's estimate sums to the KL estimate
    torch.testing.assert_close(mc.bpd, mc.prior + mc.decoder + mc.kl_quartiles.sum(1), rtol=1e-12, atol=1e-12)


def test_mc_with_pilot_agrees_with_exact_on_a_good_model() -> None:
    # Data on 4 grid points with the exact denoiser: terms now depend on the noise. The paired difference
    # mc - exact per image has mean 0 (both are unbiased for the same expected bound).
    T, M = 40, 6
    points, images = points_dataset(4, per_point=8, seed=2)
    diffusion = GaussianDiffusion(beta_schedule("linear", T), mean_type="eps", var_type="fixed_large",
                                  loss_type="mse")
    model = PointsDenoiser(points, diffusion.alphas_cumprod)
    x_start = uint8_to_model(images)
    exact = evaluate_bound(diffusion, model, x_start, batch_size=256)
    events: list[NllProgress] = []
    mc = evaluate_bound(diffusion, model, x_start, batch_size=256, estimator="mc", terms=M, pilot_images=3,
                        callback=events.append)
    assert mc.pilot_images == 3
    assert events[0].phase == "pilot" and events[-1] == NllProgress("terms", 32 * (M + 1), 32 * (M + 1))
    diff = mc.bpd - exact.bpd
    se = float(diff.std(correction=1)) / math.sqrt(diff.numel())
    assert se > 0 and abs(float(diff.mean())) < 3 * se
    assert abs(mc.mean - exact.mean) < 3 * math.hypot(mc.stderr, exact.stderr)
    torch.testing.assert_close(mc.decoder, exact.decoder, rtol=0, atol=0)  # L_0 is shared, exact in both


# ------------------------------------------------------------------------------------ checkpoints


def test_respaced_checkpoint_evaluates_its_own_K_terms_at_original_indices(tmp_path: Path) -> None:
    use = (0, 9, 19, 29, 39)
    ckpt = tiny_checkpoint(tmp_path / "r.safetensors", 40, use_timesteps=use)
    seen: list[torch.Tensor] = []
    inner = ckpt.model

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            seen.append(t.clone())
            return self.inner(x, t, y)

    ckpt.model = Recorder()
    images = random_images(2)
    result = evaluate_nll(ckpt, images, batch_size=3, keep_terms=True)
    assert result.num_terms == 5 and result.terms.shape == (2, 5)
    assert set(torch.cat(seen).tolist()) == set(use)
    prior, terms = plain_loop(ckpt.diffusion, inner, uint8_to_model(images), seed=0)
    torch.testing.assert_close(result.terms, terms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.bpd, prior + terms.sum(1), rtol=1e-6, atol=1e-6)


def test_class_conditional_three_channel_checkpoint(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "c.safetensors", 12, in_channels=3, num_classes=3)
    images = random_images(3, channels=3)
    labels = torch.tensor([0, 2, 1])
    result = evaluate_nll(ckpt, images, labels, batch_size=10, keep_terms=True)
    prior, terms = plain_loop(ckpt.diffusion, ckpt.model, uint8_to_model(images), seed=0, y=labels)
    torch.testing.assert_close(result.terms, terms, rtol=1e-5, atol=1e-6)
    other = evaluate_nll(ckpt, images, torch.tensor([1, 0, 2]), batch_size=10)
    assert not torch.allclose(result.bpd, other.bpd)  # the labels reach the network
    with pytest.raises(DataError, match="class-conditional"):
        evaluate_nll(ckpt, images)
    with pytest.raises(DataError, match="labels must lie in 0..2"):
        evaluate_nll(ckpt, images, torch.tensor([0, 1, 3]))
    with pytest.raises(DataError, match="3x8x8"):
        evaluate_nll(ckpt, random_images(2, channels=1))


def test_input_errors(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "e.safetensors", 10)
    images = random_images(2)
    with pytest.raises(DataError, match="uint8"):
        evaluate_nll(ckpt, images.float())
    with pytest.raises(DataError, match="8-bit grid"):
        evaluate_nll(ckpt, torch.rand(2, 1, 8, 8), scale_images=False)
    # floats already on the grid are accepted as such and give the same bound as the uint8 images
    a = evaluate_nll(ckpt, images)
    b = evaluate_nll(ckpt, uint8_to_model(images), scale_images=False)
    torch.testing.assert_close(a.bpd, b.bpd, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="terms"):
        evaluate_nll(ckpt, images, terms=4)
    with pytest.raises(ConfigError, match="terms >= 1"):
        evaluate_nll(ckpt, images, estimator="mc")
    with pytest.raises(ConfigError, match="batch size"):
        evaluate_nll(ckpt, images, batch_size=0)
