"""The time-conditional discriminator D(x_{t-1}, x_t, t) of a denoising diffusion GAN (Xiao et al. 2022 App. C).

A small residual conv net on the channel-concatenation of the pair: a 1x1 stem, residual blocks that add the
timestep embedding after their first conv and halve the map with a [1, 3, 3, 1] blur (so the pair is compared at
every scale), a minibatch standard-deviation feature (Karras et al. 2018, ProGAN Sec. 3) that lets D see a collapsed
batch, one more conv, a sum over positions and a linear layer to one logit per pair. The residual sums are scaled by
1/sqrt(2) so the activations keep their scale with depth (StyleGAN2). Widths: 2, 4, 8, 8, ... times ``channels``,
down to a 4x4 map (official CIFAR-10: ``channels`` 64, 32 -> 4 pixels).

The timestep enters as a sinusoidal embedding of the original index t itself (not rescaled: the chain has 2-8
steps) through a two-layer MLP, as in the official discriminator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpmctl.unet import timestep_embedding

__all__ = ["PairDiscriminator", "minibatch_stddev", "blur_downsample"]

_LEAK = 0.2
# The FIR kernel of the official code's downsampling (outer product of [1, 3, 3, 1], normalised to sum 1).
_BLUR = torch.tensor([1.0, 3.0, 3.0, 1.0])


def blur_downsample(x: torch.Tensor) -> torch.Tensor:
    """Halve H and W: depthwise [1, 3, 3, 1] x [1, 3, 3, 1] / 64 blur with stride 2 (anti-aliased, StyleGAN2)."""
    kernel = torch.outer(_BLUR, _BLUR).to(x.device, x.dtype) / 64.0
    channels = x.shape[1]
    return F.conv2d(x, kernel.expand(channels, 1, 4, 4), stride=2, padding=1, groups=channels)


def minibatch_stddev(h: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """h [N, C, H, W] with one more channel: the standard deviation over a group of samples, averaged over channels
    and positions (ProGAN Sec. 3). Sample i is grouped with i + N/g, i + 2N/g, ... (g = the largest divisor of N
    up to ``group_size``); computed in fp32."""
    n, c, height, width = h.shape
    group = math.gcd(n, group_size)
    stats = h.float().view(group, n // group, c, height, width)
    std = torch.sqrt(stats.var(dim=0, unbiased=False) + 1e-8).mean(dim=(1, 2, 3))  # [N / g]
    feature = std.view(1, n // group, 1, 1, 1).expand(group, -1, 1, height, width).reshape(n, 1, height, width)
    return torch.cat([h, feature.to(h.dtype)], dim=1)


class _DownBlock(nn.Module):
    """LeakyReLU, conv, + Dense(t_emb), LeakyReLU, [blur down], zero-initialised conv; 1x1 skip; sum / sqrt(2)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, *, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(x, _LEAK)) + self.emb(emb).to(x.dtype)[:, :, None, None]
        h = F.leaky_relu(h, _LEAK)
        if self.downsample:
            h, x = blur_downsample(h), blur_downsample(x)
        return (self.conv2(h) + self.skip(x)) / math.sqrt(2.0)


class PairDiscriminator(nn.Module):
    """D(x_prev, x_t, t) -> one logit per pair [N]; x_prev, x_t [N, C, H, W], t [N] original indices."""

    def __init__(self, in_channels: int, image_size: int, channels: int = 64) -> None:
        super().__init__()
        self.channels = channels
        self.emb_dim = emb_dim = 4 * channels
        self.time_embed = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.LeakyReLU(_LEAK), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(2 * in_channels, 2 * channels, 1)
        # Down to a 4x4 map (at least one halving), widening 2 -> 4 -> 8 times `channels`, then staying at 8.
        halvings = max(1, int(math.log2(max(image_size, 1))) - 2)
        widths = [2 * channels] + [min(2 ** (i + 2), 8) * channels for i in range(halvings)]
        self.blocks = nn.ModuleList([_DownBlock(2 * channels, 2 * channels, emb_dim, downsample=False)])
        self.blocks.extend(_DownBlock(widths[i], widths[i + 1], emb_dim, downsample=True) for i in range(halvings))
        self.final_conv = nn.Conv2d(widths[-1] + 1, widths[-1], 3, padding=1)
        self.out = nn.Linear(widths[-1], 1)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = F.leaky_relu(self.time_embed(timestep_embedding(t, self.emb_dim)), _LEAK)
        h = self.stem(torch.cat([x_prev, x_t], dim=1))
        for block in self.blocks:
            h = block(h, emb)
        h = F.leaky_relu(self.final_conv(minibatch_stddev(h)), _LEAK)
        return self.out(h.sum(dim=(2, 3))).squeeze(1).float()
