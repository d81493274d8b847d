"""A test-only U-Net with improved-diffusion's exact state-dict layout (its ``UNetModel``), written independently.

``ddpmctl convert`` is checked against it: a network of this layout with random weights is saved as a ``.pt`` state
dict the way improved-diffusion saves one, converted, and ddpmctl's U-Net must compute the same function.
(benchmarks/reference_unet.py is a speed yardstick with other module names: ``skip``, a bare downsampling conv.)

Written the way the reference computes, which differs from ddpmctl's U-Net in its arithmetic: plain NCHW; GroupNorm
with 32 groups on a float32 copy; SiLU as x * sigmoid(x) modules inside every Sequential (also the embedding's);
attention from a 1-D 1x1 convolution on [N, 3C, HW] whose channels are split head-major, then (q, k, v), with q and
k each scaled by d^(-1/4) and the softmax in float32; attention placed by downsampling factor (image_size // res);
the timestep rescale (t * 1000 / T) done by the caller, as the reference's diffusion does.

The state-dict names, as the reference's modules give them:
    time_embed.{0,2}, label_emb, input_blocks.0.0 (conv), input_blocks.i.0 (ResBlock: in_layers.{0,2},
    emb_layers.1, out_layers.{0,3}, skip_connection), input_blocks.i.1 (AttentionBlock: norm, qkv, proj_out),
    input_blocks.i.0.op (Downsample), middle_block.{0,1,2}, output_blocks.i.{0,1,2} (.conv for Upsample), out.{0,2}.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


# The reference normalises and takes the softmax in float32 (x.float()); a float64 test raises this to float64.
UPCAST = torch.float32


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Norm32(nn.GroupNorm):
    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(UPCAST)).type(x.dtype)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
    angles = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class Block(nn.Module):
    """Marks modules that take the embedding as a second input."""


class Sequence(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, Block) else layer(x)
        return x


class Res(Block):
    def __init__(self, c_in: int, emb_dim: int, dropout: float, c_out: int, scale_shift: bool) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(Norm32(c_in), Swish(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(Swish(), nn.Linear(emb_dim, 2 * c_out if scale_shift else c_out))
        self.out_layers = nn.Sequential(Norm32(c_out), Swish(), nn.Dropout(p=dropout),
                                        nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip_connection = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = torch.chunk(e, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = Norm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat)).reshape(b * self.heads, -1, height * width)
        d = qkv.shape[1] // 3
        q, k, v = torch.split(qkv, d, dim=1)
        s = 1 / math.sqrt(math.sqrt(d))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s).to(UPCAST), dim=-1).type(q.dtype)
        h = torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, height * width)
        return (flat + self.proj_out(h)).reshape(b, c, height, width)


class Down(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Up(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ReferenceLayoutUNet(nn.Module):
    """improved-diffusion's UNetModel: ``forward(x, t_scaled, y=None)``, t already on the 0..1000 scale."""

    def __init__(self, *, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: tuple[int, ...], channel_mult: tuple[int, ...],
                 dropout: float = 0.0, num_classes: int | None = None, num_heads: int = 4,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = True) -> None:
        super().__init__()
        factors = {image_size // res for res in attention_resolutions}
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        mc, emb_dim = model_channels, 4 * model_channels
        self.model_channels, self.num_classes = mc, num_classes
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), Swish(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(c_in: int, c_out: int) -> Res:
            return Res(c_in, emb_dim, dropout, c_out, use_scale_shift_norm)

        self.input_blocks = nn.ModuleList([Sequence(nn.Conv2d(in_channels, mc, 3, padding=1))])
        widths, ch, ds = [mc], mc, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in factors:
                    layers.append(Attention(ch, num_heads))
                self.input_blocks.append(Sequence(*layers))
                widths.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Sequence(Down(ch)))
                widths.append(ch)
                ds *= 2
        self.middle_block = Sequence(res(ch, ch), Attention(ch, num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + widths.pop(), mc * mult)]
                ch = mc * mult
                if ds in factors:
                    layers.append(Attention(ch, heads_up))
                if level and i == num_res_blocks:
                    layers.append(Up(ch))
                    ds //= 2
                self.output_blocks.append(Sequence(*layers))
        self.out = nn.Sequential(Norm32(ch), Swish(), nn.Conv2d(mc, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t_scaled: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        # Looked up at call time: a float64 test swaps in an embedding without the float32 rounding.
        emb = self.time_embed(sinusoidal_embedding(t_scaled, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        stack, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            stack.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, stack.pop()], dim=1), emb)
        return self.out(h)
