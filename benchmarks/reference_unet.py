"""An independent re-implementation of improved-diffusion's U-Net and training step, the yardstick `make bench`
holds ddpmctl's fp32 training against (benchmarks/README.md: ddpmctl's goal is to train at >= 1.1x the reference).

Written from the architecture as improved-diffusion runs it, not copied: NCHW fp32 tensors; a SiLU module that
computes x * sigmoid(x); GroupNorm32 normalising a float32 copy and casting back; attention on [N, 3C, HW] from a
1-D 1x1 convolution, split per head, both einsums with q and k each scaled by d^-1/4 and the softmax taken in
float32; scale-shift norm ``norm(h) * (1 + scale) + shift``; zero-initialised output convolutions; attention
resolutions given as downsampling factors. The step is TrainLoop's: losses through the diffusion, ``(loss *
weights).mean()``, backward, the logged gradient norm (one host read per parameter), torch's default AdamW (the
per-parameter loop on CPU), then ``update_ema`` one parameter at a time. The per-timestep loss logging is done
as the reference does it (values read back to the host every step).

Only the bench imports this file; ddpmctl itself never does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Swish(nn.Module):
    """The reference's SiLU (written for PyTorch 1.5): two kernels, x and sigmoid(x) both kept for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class FloatGroupNorm(nn.GroupNorm):
    """32-group GroupNorm over a float32 copy of the input, cast back to the input's dtype."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zeroed(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class RefResBlock(nn.Module):
    def __init__(self, c_in: int, emb_dim: int, dropout: float, c_out: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(FloatGroupNorm(c_in), Swish(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(Swish(), nn.Linear(emb_dim, 2 * c_out))
        self.out_layers = nn.Sequential(FloatGroupNorm(c_out), Swish(), nn.Dropout(dropout),
                                        _zeroed(nn.Conv2d(c_out, c_out, 3, padding=1)))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = torch.chunk(self.emb_layers(emb).type(h.dtype)[:, :, None, None], 2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        for layer in self.out_layers[1:]:
            h = layer(h)
        return self.skip(x) + h


class RefAttention(nn.Module):
    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = FloatGroupNorm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        flat = x.reshape(b, c, height * width)
        qkv = self.qkv(self.norm(flat)).reshape(b * self.heads, -1, height * width)
        d = qkv.shape[1] // 3
        q, k, v = torch.split(qkv, d, dim=1)
        s = d ** -0.25
        w = torch.einsum("nct,ncs->nts", q * s, k * s)
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        h = torch.einsum("nts,ncs->nct", w, v).reshape(b, c, height * width)
        return (flat + self.proj_out(h)).reshape(b, c, height, width)


class _EmbedSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, RefResBlock) else layer(x)
        return x


class _Up(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ReferenceUNet(nn.Module):
    """improved-diffusion's UNetModel with scale-shift norm; ``forward(x, t_scaled)`` takes the 0..1000 timesteps."""

    def __init__(self, *, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_resolutions: tuple[int, ...], image_size: int, dropout: float,
                 channel_mult: tuple[int, ...], num_heads: int) -> None:
        super().__init__()
        factors = {image_size // r for r in attention_resolutions}  # the reference counts downsampling factors
        mc, emb_dim = model_channels, 4 * model_channels
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), Swish(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList([_EmbedSequential(nn.Conv2d(in_channels, mc, 3, padding=1))])
        widths, ch, ds = [mc], mc, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [RefResBlock(ch, emb_dim, dropout, mult * mc)]
                ch = mult * mc
                if ds in factors:
                    layers.append(RefAttention(ch, num_heads))
                self.input_blocks.append(_EmbedSequential(*layers))
                widths.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_EmbedSequential(nn.Conv2d(ch, ch, 3, stride=2, padding=1)))
                widths.append(ch)
                ds *= 2
        self.middle_block = _EmbedSequential(RefResBlock(ch, emb_dim, dropout, ch), RefAttention(ch, num_heads),
                                             RefResBlock(ch, emb_dim, dropout, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [RefResBlock(ch + widths.pop(), emb_dim, dropout, mult * mc)]
                ch = mult * mc
                if ds in factors:
                    layers.append(RefAttention(ch, num_heads))
                if level and i == num_res_blocks:
                    layers.append(_Up(ch))
                    ds //= 2
                self.output_blocks.append(_EmbedSequential(*layers))
        self.out = nn.Sequential(FloatGroupNorm(ch), Swish(), _zeroed(nn.Conv2d(mc, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t_scaled: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(sinusoidal(t_scaled, self.model_channels))
        stack, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            stack.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, stack.pop()], dim=1), emb)
        return self.out(h)


def reference_train_step(model: ReferenceUNet, diffusion: Any, num_timesteps: int, *, lr: float,
                         weight_decay: float, ema_rate: float,
                         compute_losses: Callable[..., dict[str, torch.Tensor]]
                         ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """TrainLoop.run_step for one fp32 batch, as a function of (x_start, t, noise); uniform timestep weights.

    ``compute_losses(diffusion, model_call, x_start, t, noise, kwargs)`` is the shared loss seam (the diffusion
    math is the same in both; ddpmctl's is bit-exact with the reference's).
    """
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)  # torch's default implementation
    ema = [p.detach().clone() for p in params]
    scale = 1000.0 / num_timesteps  # rescale_timesteps=True

    def model_call(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return model(x, t.float() * scale)

    def step(x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        losses = compute_losses(diffusion, model_call, x_start, t, noise, {})
        weights = torch.ones(x_start.shape[0])
        loss = (losses["loss"] * weights).mean()
        # log_loss_dict: each term's mean, and every sample's term into its timestep quartile, read on the host.
        for key, values in losses.items():
            float(values.mean().item())
            quartiles = [0.0] * 4
            for sub_t, sub_loss in zip(t.cpu().numpy(), values.detach().cpu().numpy()):
                quartiles[int(4 * sub_t / num_timesteps)] += float(sub_loss)
        loss.backward()
        sqsum = 0.0
        for p in params:  # _log_grad_norm
            sqsum += (p.grad**2).sum().item()
        optimizer.step()
        with torch.no_grad():
            for target, source in zip(ema, params):  # update_ema
                target.mul_(ema_rate).add_(source, alpha=1 - ema_rate)
        return loss.detach()

    return step
