"""The library pieces of `train --preview-every` and `--val-every`: a sample grid from the network being trained
(no training RNG touched) and the held-out loss at fixed draws, checked against closed forms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import perturb_weights
from ddpmctl.build import build_diffusion, build_model
from ddpmctl.config import CheckpointConfig, DiffusionConfig, ModelConfig
from ddpmctl.data import load_dataset
from ddpmctl.images import make_grid
from ddpmctl.preview import preview_grid, write_preview
from ddpmctl.validation import HeldOutSet, heldout_losses

MODEL = ModelConfig(image_size=8, in_channels=1, model_channels=16, num_res_blocks=1, attention_resolutions=(4,),
                    channel_mult=(1, 2), num_heads=1, dropout=0.3)


def config(**diffusion: object) -> CheckpointConfig:
    return CheckpointConfig(model=MODEL, diffusion=DiffusionConfig(timesteps=40, **diffusion))


class Zero(torch.nn.Module):
    """A network that predicts 0 for every pixel (in the output's channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(x.shape[0], self.channels, *x.shape[2:])


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_dataset("builtin:digits", split="test").images[:96]


def test_x0_loss_of_the_zero_network_is_the_images_mean_square(digits: torch.Tensor) -> None:
    # x0-prediction of 0 with a fixed variance: mse = mean(x0^2) per image, whatever t and noise are.
    diffusion = build_diffusion(config(mean_type="x0", var_type="fixed_small", loss_type="mse").diffusion)
    losses = heldout_losses(Zero(1), diffusion, HeldOutSet(digits, None, 40, seed=3), batch_size=7)
    x0 = digits.double() / 127.5 - 1.0
    expected = float((x0**2).mean(dim=(1, 2, 3)).mean())
    assert losses["val_mse"] == pytest.approx(expected, rel=1e-6)
    assert losses["val_loss"] == losses["val_mse"] and losses["val_vb"] == 0.0


def test_eps_loss_of_the_zero_network_is_the_noise_power(digits: torch.Tensor) -> None:
    # eps-prediction of 0: mse = mean(noise^2), whose expectation is 1 (6,144 standard normal draws: s.e. 0.018).
    diffusion = build_diffusion(config(mean_type="eps", var_type="fixed_large", loss_type="mse").diffusion)
    heldout = HeldOutSet(digits, None, 40, seed=0)
    losses = heldout_losses(Zero(1), diffusion, heldout)
    assert losses["val_mse"] == pytest.approx(float((heldout.noise.double() ** 2).mean()), rel=1e-6)
    assert abs(losses["val_mse"] - 1.0) < 0.08


def test_draws_are_fixed_stratified_and_batch_independent(digits: torch.Tensor) -> None:
    a, b = HeldOutSet(digits, None, 40, seed=1), HeldOutSet(digits, None, 40, seed=1)
    assert torch.equal(a.t, b.t) and torch.equal(a.noise, b.noise)
    # Stratified: the k-th smallest t lies in the k-th of 96 equal slices of the chain [0, 40).
    for k, t in enumerate(sorted(a.t.tolist())):
        assert k * 40 // 96 <= t <= (k + 1) * 40 // 96, (k, t)
    assert set(a.t.tolist()) == set(range(40))  # more images than steps: every step is represented
    torch.manual_seed(0)
    network = perturb_weights(build_model(config()), 0.05).train()
    diffusion = build_diffusion(config().diffusion)
    one = heldout_losses(network, diffusion, a, batch_size=96)
    many = heldout_losses(network, diffusion, a, batch_size=5)  # eval mode: no dropout, so batches do not matter
    for key in one:
        assert one[key] == pytest.approx(many[key], rel=1e-5)
    assert network.training  # left as it was
    assert one["val_vb"] > 0  # a learned variance: the bound's term is in the loss


def test_preview_grid_is_reproducible_and_leaves_the_training_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = perturb_weights(build_model(config()), 0.05).eval()
    before = [p.detach().clone() for p in network.parameters()]
    rng = torch.get_rng_state()
    grid = preview_grid(network, config(), num=6, seed=2, steps=4)
    assert torch.equal(torch.get_rng_state(), rng)  # a resumed run with previews stays bit-exact
    assert all(torch.equal(p, q) for p, q in zip(network.parameters(), before))
    assert grid.dtype == torch.uint8 and grid.shape == make_grid(torch.zeros(6, 1, 8, 8, dtype=torch.uint8)).shape
    assert torch.equal(grid, preview_grid(network, config(), num=6, seed=2, steps=4))
    assert not torch.equal(grid, preview_grid(network, config(), num=6, seed=3, steps=4))
    path = write_preview(tmp_path, 120, network, config(), num=4)
    assert path.name == "preview_000120.png"
    with Image.open(path) as image:
        assert image.size == (2 * 10 + 2, 2 * 10 + 2)
