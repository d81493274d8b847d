"""The Improved-DDPM U-Net (Nichol & Dhariwal 2021, App. A; improved-diffusion's ``UNetModel``).

Residual blocks conditioned on a sinusoidal timestep embedding (plus a class embedding when class-conditional)
through scale-shift norm (AdaGN), multi-head self-attention at chosen resolutions, strided-conv downsampling,
nearest + conv upsampling, skip concatenations, and a zero-initialised output conv (2C channels with a learned
variance). Module and parameter names follow the reference, so its users find their way around the state dict.

Speed notes (issues 7, 13): every op works on channels_last tensors without format round trips; attention runs on
token-major ``[N, HW, C]`` views of channels_last maps with ``scaled_dot_product_attention`` (no transposing
copies; on CPUs with native bf16, bf16 maps up to 2**24 attention weights use two GEMMs instead, measured faster,
see ``_attention``); GroupNorm normalises in fp32 under bf16 autocast (cast back to bf16 afterwards, as the
reference's GroupNorm32 does; forward-only calls on maps of 32x32 pixels or more use the mixed-type kernel,
bit-identical); the frequency table is a non-persistent buffer and nothing in ``forward`` syncs with the device.
Which of these optional paths run is chosen per machine (``ddpmctl.hardware.fast_paths``); every result is the
same up to float rounding whichever runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpmctl.config import ModelConfig
from ddpmctl.errors import OptionError  # shapes the options ask for that no U-Net has: exit 2 in the CLI
from ddpmctl.hardware import fast_paths

__all__ = ["UNetModel", "count_parameters", "timestep_embedding", "GroupNorm32", "ResBlock", "AttentionBlock",
           "LatentEmbedding", "PixelNorm"]


def _frequencies(half: int, max_period: float) -> torch.Tensor:
    """exp(-ln(max_period) k / half), k = 0..half-1 (docs/conventions.md #17), float32."""
    # A real (CPU) tensor also in a network built on the meta device: checkpoint loading assigns the stored
    # weights to such a network, and this table is not stored, so it must already hold its values.
    device = "cpu" if torch.get_default_device().type == "meta" else None
    k = torch.arange(half, dtype=torch.float64, device=device)
    return torch.exp(-math.log(max_period) * k / half).to(torch.float32)


def _embed(t_scaled: torch.Tensor, freqs: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] of t * freqs, zero-padded to ``dim`` when it is odd."""
    args = t_scaled.to(torch.float32)[:, None] * freqs[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps t [N] (docs/conventions.md #17)."""
    return _embed(t, _frequencies(dim // 2, max_period).to(t.device), dim)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _num_groups(channels: int) -> int:
    # The reference always uses 32 groups; gcd keeps 32 wherever it divides and still works for small widths.
    return math.gcd(32, channels)


# Pixels per map from which the CPU mixed-type GroupNorm kernel beats the float round trip (channels_last).
_MIXED_CHANNELS_LAST_MIN_PIXELS = 1024


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics and normalisation are computed in fp32, output in the input's dtype."""

    def __init__(self, channels: int) -> None:
        super().__init__(_num_groups(channels), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if x.device.type == "cpu" and fast_paths(x.device).mixed_groupnorm \
                and (x.is_contiguous() or self._mixed_channels_last_is_faster(x)):
            # The CPU kernel takes bf16 input with fp32 affine parameters and computes in fp32 internally:
            # bit-identical to normalising x.float() and casting back, without the two copies.
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)

    def _mixed_channels_last_is_faster(self, x: torch.Tensor) -> bool:
        # The mixed-type kernel's channels_last forward is 1.6-3.6x faster than the float round trip on maps of
        # at least 32x32 pixels and 4-7x slower on smaller ones; its backward is 2-5x slower everywhere (measured
        # on 2 cores; benchmarks/README.md). So only forward-only calls (sampling, eval-nll) on large maps take it.
        grad_needed = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return not grad_needed and x.shape[-1] * x.shape[-2] >= _MIXED_CHANNELS_LAST_MIN_PIXELS


def _zero(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (residual branches start as identities, the output starts at 0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding: GN-SiLU-conv, AdaGN (or add), SiLU, dropout, zero conv."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 *, use_scale_shift_norm: bool = True, use_conv_skip: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        # Same indices as the reference's Sequentials (in_layers.2 is the conv, out_layers.3 the zero conv);
        # forward() calls the pieces directly so SiLU of the embedding can be hoisted out of every block.
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), _conv3x3(channels, self.out_channels))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            _zero(_conv3x3(self.out_channels, self.out_channels)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv_skip:
            self.skip_connection = _conv3x3(channels, self.out_channels)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)
        self._dropout = dropout

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W]; ``emb_act`` = SiLU(embedding) [N, E], computed once per forward by the caller."""
        h = self.in_layers[2](F.silu(self.in_layers[0](x)))
        emb_out = self.emb_layers[1](emb_act).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            # AdaGN (IDDPM App. A): norm(h) * (1 + scale) + shift, in one fused kernel.
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, self.out_layers[0](h), scale + 1)
        else:
            h = self.out_layers[0](h + emb_out)
        h = F.silu(h)
        if self._dropout > 0:
            h = self.out_layers[2](h)
        h = self.out_layers[3](h)
        return self.skip_connection(x) + h


# bf16 attention on the CPU: where bf16 is native (AVX-512-BF16, AMX), two bf16 GEMMs around the softmax kernel
# beat the fused kernel at every size the IDDPM configs use (its bf16 backward is 2-6x slower; benchmarks/README.md). With
# emulated bf16 (AVX2) the fused kernel is about 2x faster, so hardware.choose_fast_paths turns this off there.
# Beyond this many attention weights per call the fused kernel takes over again, so a large map never
# materialises its [N, heads, L, L] weights.
_CPU_MATH_ATTENTION_MAX_WEIGHTS = 2**24


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [N, heads, L, d], the softmax in fp32 (IDDPM's QKVAttention)."""
    n, heads, length, _ = q.shape
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) \
            and n * heads * length * length <= _CPU_MATH_ATTENTION_MAX_WEIGHTS \
            and fast_paths(q.device).bf16_math_attention:
        # Scaling q first makes it contiguous (the bf16 GEMM is slow on the strided view). The CPU softmax kernel
        # computes max, exp and sum of a bf16 row in fp32 and rounds once on output: the reference's
        # softmax(w.float()).type(w.dtype) without materialising an fp32 copy of the weights (2-4x faster).
        weight = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
        return torch.matmul(torch.softmax(weight, dim=-1), v)
    # The fused kernel (flash on CPU/GPU) also accumulates its softmax in fp32 under bf16.
    return F.scaled_dot_product_attention(q, k, v)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions of a feature map, with a zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise OptionError(f"attention at {channels} channels cannot be split into {num_heads} heads: "
                              "choose --heads dividing every level's channel count")
        self.channels = channels
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        # 1x1 convs over the flattened map, as in the reference (weights [3C, C, 1]). They run as 1x1 conv2d on the
        # channels_last map, whose memory is already token-major [N, HW, C]: no transposing copy, and oneDNN's
        # convolution beats torch.mm's BLAS on the CPU (fp32 1.8-2.1x, bf16 1.2x forward+backward; benchmarks/README.md).
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        heads, ch = self.num_heads, c // self.num_heads
        conv = fast_paths(x.device).conv_projections and x.is_contiguous(memory_format=torch.channels_last)
        if conv:
            qkv = F.conv2d(self.norm(x), self.qkv.weight[..., None], self.qkv.bias)
            # [N, 3C, H, W] -> [N, HW, 3C]: a free view when channels_last.
            qkv = qkv.permute(0, 2, 3, 1).reshape(b, height * width, 3 * c)
        else:
            tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, height * width, c)
            qkv = F.linear(tokens, self.qkv.weight[..., 0], self.qkv.bias)
        # The reference's channel layout: head-major, then (q, k, v), then the head's channels.
        qkv = qkv.reshape(b, height * width, heads, 3, ch)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # [N, heads, HW, ch] strided views
        h = _attention(q, k, v).transpose(1, 2).reshape(b, height * width, c)  # [N, HW, C]
        if conv:
            # [N, HW, C] -> [N, C, H, W] as a channels_last view.
            h = h.reshape(b, height, width, c).permute(0, 3, 1, 2)
            return x + F.conv2d(h, self.proj_out.weight[..., None], self.proj_out.bias)
        h = F.linear(h, self.proj_out.weight[..., 0], self.proj_out.bias)
        return x + h.reshape(b, height, width, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (halves H and W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = _conv3x3(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PixelNorm(nn.Module):
    """z / sqrt(mean(z^2) + 1e-8) over the features (Karras et al. 2018, ProGAN eq. 2): puts z on the sphere."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class LatentEmbedding(nn.Module):
    """A DDGAN generator's latent z [N, dim] -> an embedding [N, emb_dim] added to the timestep's (Xiao et al. 2022
    App. C: PixelNorm and an MLP, the "mapping network" of StyleGAN). Every ResBlock reads the sum through its
    scale-shift norm, so z modulates the features as the paper's AdaGN does; the last layer is linear because its
    output is a summand of the embedding, which each block passes through SiLU itself."""

    def __init__(self, dim: int, emb_dim: int, layers: int) -> None:
        super().__init__()
        self.dim = dim
        mlp: list[nn.Module] = [PixelNorm()]
        for i in range(layers):
            mlp.append(nn.Linear(dim if i == 0 else emb_dim, emb_dim))
            if i < layers - 1:
                mlp.append(nn.SiLU())
        self.mlp = nn.Sequential(*mlp)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z)


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the (activated) embedding to the ResBlocks among its layers."""

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb_act) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(nn.Module):
    """The IDDPM U-Net; ``forward(x, t, y=None)`` with t the ORIGINAL training-chain indices [N] (int64).

    ``config.attention_resolutions`` are feature-map sizes in pixels (16 = attention where the map is 16x16).
    ``out_channels`` (2C with a learned variance) and ``num_timesteps`` (T: t is scaled to t * 1000 / T) belong to
    the diffusion config; :func:`ddpmctl.build.build_model` passes them. With ``config.latent`` it is a DDGAN
    generator: ``forward(x, t, y=None, z=...)`` takes a latent z [N, latent.dim] (:class:`LatentEmbedding`) and
    returns tanh of the output, x_0 in [-1, 1] (Xiao et al. 2022 App. C).
    """

    def __init__(self, config: ModelConfig, *, out_channels: int, num_timesteps: int,
                 in_channels: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.out_channels = out_channels
        levels = len(config.channel_mult)
        if config.image_size % 2 ** (levels - 1):
            raise OptionError(f"image size {config.image_size} cannot be halved {levels - 1} times "
                              f"(channel_mult has {levels} levels): use fewer levels or another image size")
        resolutions = {config.image_size // 2**level for level in range(levels)}
        unreached = sorted(set(config.attention_resolutions) - resolutions)
        if unreached:
            raise OptionError(f"attention resolution(s) {unreached} never occur in this network "
                              f"(its feature maps are {sorted(resolutions, reverse=True)} pixels)")

        mc, heads = config.model_channels, config.num_heads
        emb_dim = 4 * mc
        self.num_classes = config.num_classes
        # Original index -> the reference's 0..1000 time scale (docs/conventions.md #17, "Index spaces").
        self.time_scale = 1000.0 / num_timesteps
        self.register_buffer("freqs", _frequencies(mc // 2, 10000), persistent=False)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.num_classes is not None:
            self.label_emb = nn.Embedding(config.num_classes, emb_dim)
        self.latent_dim = config.latent.dim if config.latent is not None else None
        if config.latent is not None:
            self.latent_embed = LatentEmbedding(config.latent.dim, emb_dim, config.latent.mlp_layers)

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, emb_dim, config.dropout, c_out, use_scale_shift_norm=config.use_scale_shift_norm)

        attention = set(config.attention_resolutions)
        # A CLD score network reads (x, v): twice the image's channels (``in_channels``; build_model passes it).
        self.in_channels = in_channels or config.in_channels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(_conv3x3(self.in_channels, mc))])
        skip_channels = [mc]
        ch, size = mc, config.image_size
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if size in attention:
                    layers.append(AttentionBlock(ch, heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                size //= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), AttentionBlock(ch, heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if size in attention:
                    layers.append(AttentionBlock(ch, heads))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                    size *= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), _zero(_conv3x3(ch, out_channels)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                z: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C, H, W] in [-1, 1], t [N] original indices, y [N] class labels, z [N, latent dim] a generator's
        latent -> [N, out_channels, H, W]."""
        if self.num_classes is None and y is not None:
            raise ValueError("this model is not class-conditional: do not pass class labels y")
        if self.num_classes is not None and y is None:
            raise ValueError(f"this model is class-conditional ({self.num_classes} classes): pass labels y [N]")
        if (z is None) != (self.latent_dim is None):
            raise ValueError(f"this model is a generator: pass its latent z [N, {self.latent_dim}]" if z is None
                             else "this model has no latent input: do not pass z")

        emb = self.time_embed(_embed(t.to(torch.float32) * self.time_scale, self.freqs, self.config.model_channels))
        if y is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels y must have shape [{x.shape[0]}], got {list(y.shape)}")
            emb = emb + self.label_emb(y)
        if z is not None:
            if z.shape != (x.shape[0], self.latent_dim):
                raise ValueError(f"latent z must have shape [{x.shape[0]}, {self.latent_dim}], got {list(z.shape)}")
            emb = emb + self.latent_embed(z)
        # Every ResBlock starts its embedding branch with SiLU: apply it once here instead of in each block.
        emb_act = F.silu(emb)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb_act)
            skips.append(h)
        h = self.middle_block(h, emb_act)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb_act)
        h = self.out[2](F.silu(self.out[0](h)))
        if self.latent_dim is not None:
            h = torch.tanh(h)
        # Hand back the input's dtype (fp32 under bf16 autocast) so the loss arithmetic stays in fp32.
        return h.to(x.dtype)
