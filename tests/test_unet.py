"""The IDDPM U-Net: shapes, conditioning, embedding formula, zero init, parameter count, layouts, precision."""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import pytest
import torch

from ddpmctl import hardware
from ddpmctl.config import ModelConfig
from ddpmctl.errors import ConfigError
import ddpmctl.unet as unet
from ddpmctl.unet import AttentionBlock, GroupNorm32, UNetModel, count_parameters, timestep_embedding
from conftest import assert_same, perturb_weights

CIFAR10 = ModelConfig(image_size=32, in_channels=3, model_channels=128, num_res_blocks=3,
                      attention_resolutions=(16, 8), dropout=0.3, channel_mult=(1, 2, 2, 2), num_heads=4,
                      use_scale_shift_norm=True)
T = 100  # the chain length the tests' networks scale timesteps by


def tiny(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(image_size=8, in_channels=3, model_channels=16, num_res_blocks=1,
                                   attention_resolutions=(4,), channel_mult=(1, 2), num_heads=2)
    base.update(overrides)
    return ModelConfig(**base)


def net(config: ModelConfig, *, out_channels: int | None = None, num_timesteps: int = T) -> UNetModel:
    """The network (C outputs, a fixed variance, unless told otherwise) on a chain of ``num_timesteps`` steps."""
    return UNetModel(config, out_channels=out_channels or config.in_channels, num_timesteps=num_timesteps)


def randomized(config: ModelConfig, seed: int = 0, **kwargs: int) -> UNetModel:
    """A model whose zero-initialised layers are filled too, so the output depends on every path."""
    torch.manual_seed(seed)
    return perturb_weights(net(config, **kwargs), 0.1, only_zero=True)


def inputs(config: ModelConfig, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, config.in_channels, config.image_size, config.image_size, generator=g)
    t = torch.randint(0, T, (n,), generator=g)
    return x, t


@pytest.mark.parametrize("out_channels", [3, 6])
def test_output_shape_c_and_2c(out_channels: int) -> None:
    config = tiny()
    x, t = inputs(config)
    assert net(config, out_channels=out_channels)(x, t).shape == (3, out_channels, 8, 8)


def test_fresh_model_outputs_zeros() -> None:
    # The output conv is zero-initialised (as in the reference): a new network predicts exactly 0.
    config = tiny()
    x, t = inputs(config)
    assert torch.equal(net(config)(x, t), torch.zeros(3, 3, 8, 8))


def test_class_conditional_uses_labels_and_requires_them() -> None:
    config = tiny(num_classes=5)
    model = randomized(config).eval()
    x, t = inputs(config)
    out_a = model(x, t, torch.tensor([0, 1, 2]))
    out_b = model(x, t, torch.tensor([3, 4, 0]))
    assert (out_a - out_b).abs().max() > 1e-3
    assert torch.equal(out_a, model(x, t, torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="shape"):
        model(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not class-conditional"):
        net(tiny())(x, t, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("dim", [1, 2, 7, 16, 33])
def test_timestep_embedding_matches_formula(dim: int) -> None:
    t = torch.tensor([0.0, 1.0, 2.5, 250.0, 999.0])
    emb = timestep_embedding(t, dim)
    half = dim // 2
    assert emb.shape == (5, dim) and emb.dtype == torch.float32
    for i, ti in enumerate(t.tolist()):
        for k in range(half):
            freq = math.exp(-math.log(10000) * k / half)
            assert emb[i, k].item() == pytest.approx(math.cos(ti * freq), abs=2e-4)
            assert emb[i, half + k].item() == pytest.approx(math.sin(ti * freq), abs=2e-4)
        if dim % 2:
            assert emb[i, -1].item() == 0.0


def test_model_scales_original_timesteps_to_1000() -> None:
    # Original index t of a T-step chain is embedded as t * 1000 / T: t = 1000 of T = 4000 looks like 250 of 1000.
    model = randomized(tiny(), num_timesteps=4000).eval()
    same = randomized(tiny(), num_timesteps=1000).eval()
    x, _ = inputs(model.config)
    torch.testing.assert_close(model(x, torch.tensor([1000, 2000, 3996])), same(x, torch.tensor([250, 500, 999])))
    # And the embedding the network actually feeds its MLP is [cos | sin] of (t * 1000 / T) * freq.
    seen: list[torch.Tensor] = []
    model.time_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    model(x, torch.tensor([1000, 2000, 3996]))
    dim = model.config.model_channels
    for i, t in enumerate([1000, 2000, 3996]):
        args = [t * 1000 / 4000 * math.exp(-math.log(10000) * k / (dim // 2)) for k in range(dim // 2)]
        expected = torch.tensor([math.cos(a) for a in args] + [math.sin(a) for a in args])
        torch.testing.assert_close(seen[0][i], expected, rtol=0, atol=5e-4)


def _reference_count(*, image_size: int, in_channels: int, mc: int, out_channels: int, blocks: int,
                     attention: set[int], mult: tuple[int, ...]) -> int:
    """Parameters of improved-diffusion's UNetModel (scale-shift norm, conv resampling), by closed-form layer sums."""
    def conv(ci: int, co: int, k: int) -> int:
        return ci * co * k * k + co

    def norm(c: int) -> int:
        return 2 * c

    emb = 4 * mc

    def res(ci: int, co: int) -> int:  # in norm+conv, emb linear to 2*co (scale, shift), out norm+conv, 1x1 skip
        return (norm(ci) + conv(ci, co, 3) + emb * 2 * co + 2 * co + norm(co) + conv(co, co, 3)
                + (0 if ci == co else conv(ci, co, 1)))

    def attn(c: int) -> int:  # norm, qkv 1x1, proj_out 1x1
        return norm(c) + conv(c, 3 * c, 1) + conv(c, c, 1)

    total = (mc * emb + emb) + (emb * emb + emb) + conv(in_channels, mc, 3)
    widths = [mc * m for m in mult]
    # Down path: per level `blocks` ResBlocks (+attention), then a Downsample conv except at the last level.
    skips, ch = [mc], mc
    for level, w in enumerate(widths):
        for _ in range(blocks):
            total += res(ch, w) + (attn(w) if image_size >> level in attention else 0)
            ch = w
            skips.append(ch)
        if level < len(widths) - 1:
            total += conv(ch, ch, 3)
            skips.append(ch)
    total += 2 * res(ch, ch) + attn(ch)
    # Up path: per level `blocks + 1` ResBlocks on concatenated skips (+attention), then an Upsample conv.
    for level in reversed(range(len(widths))):
        w = widths[level]
        for i in range(blocks + 1):
            total += res(ch + skips.pop(), w) + (attn(w) if image_size >> level in attention else 0)
            ch = w
        if level:
            total += conv(ch, ch, 3)
    return total + norm(ch) + conv(ch, out_channels, 3)


def test_cifar10_parameter_count() -> None:
    # The paper's CIFAR-10 model: "about 52.5M parameters"; the reference's architecture gives exactly 52,546,438.
    expected = _reference_count(image_size=32, in_channels=3, mc=128, out_channels=6, blocks=3,
                                attention={16, 8}, mult=(1, 2, 2, 2))
    assert expected == 52_546_438
    model = net(CIFAR10, out_channels=6, num_timesteps=4000)
    assert count_parameters(model) == expected
    # Spot checks against the reference's shapes (attention qkv is a 1x1 Conv1d there).
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["input_blocks.0.0.weight"] == (128, 3, 3, 3)
    assert shapes["middle_block.1.qkv.weight"] == (768, 256, 1)
    assert shapes["out.2.weight"] == (6, 128, 3, 3)


@pytest.mark.parametrize("config", [tiny(), tiny(channel_mult=(1, 2, 2), image_size=16, attention_resolutions=(8, 4),
                                                 num_res_blocks=2, model_channels=32, num_classes=3)])
def test_small_parameter_counts_match_reference_formula(config: ModelConfig) -> None:
    expected = _reference_count(image_size=config.image_size, in_channels=config.in_channels,
                                mc=config.model_channels, out_channels=config.in_channels,
                                blocks=config.num_res_blocks, attention=set(config.attention_resolutions),
                                mult=config.channel_mult)
    expected += (config.num_classes or 0) * 4 * config.model_channels
    assert count_parameters(net(config)) == expected


def test_channels_last_matches_contiguous() -> None:
    config = tiny(image_size=16, channel_mult=(1, 2, 2), attention_resolutions=(8, 4), num_res_blocks=2)
    model = randomized(config).eval()
    x, t = inputs(config)
    with torch.no_grad():
        ref = model(x, t)
        cl_model = randomized(config).eval().to(memory_format=torch.channels_last)
        out = cl_model(x.to(memory_format=torch.channels_last), t)
        mixed = model(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed, ref, rtol=1e-4, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_close_to_fp32() -> None:
    config = tiny(model_channels=32)
    model = randomized(config).eval()
    x, t = inputs(config)
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.dtype == torch.float32  # the input's dtype: loss arithmetic stays fp32
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05


def test_groupnorm_normalises_in_fp32() -> None:
    # bf16 input: the result must equal normalising in fp32 and rounding once (the reference's GroupNorm32).
    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 64, 4, 4) * 50 + 300).bfloat16()
    expected = torch.nn.functional.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=8e-3, atol=8e-3)
    assert GroupNorm32(16).num_groups == 16 and GroupNorm32(96).num_groups == 32 and GroupNorm32(24).num_groups == 8


def test_state_dict_has_no_nonpersistent_buffers() -> None:
    model = net(tiny())
    keys = set(model.state_dict())
    assert keys == {name for name, _ in model.named_parameters()}
    assert "freqs" in dict(model.named_buffers())


def test_deterministic_given_seed() -> None:
    config = tiny(dropout=0.3)
    x, t = inputs(config)
    outs = []
    for _ in range(2):
        model = randomized(config, seed=5).train()
        torch.manual_seed(7)
        outs.append(model(x, t))
    assert torch.equal(outs[0], outs[1])
    a, b = net(config).state_dict(), net(config).state_dict()
    torch.manual_seed(3)
    c = net(config).state_dict()
    torch.manual_seed(3)
    d = net(config).state_dict()
    assert_same(c, d)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_one_channel_8px_and_odd_configs_run_and_backprop() -> None:
    for config in [tiny(in_channels=1, attention_resolutions=(4,)),
                   tiny(channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), use_scale_shift_norm=False,
                        model_channels=24, num_heads=3),
                   tiny(channel_mult=(1,), image_size=5, attention_resolutions=(5,), model_channels=17, num_heads=1)]:
        model = randomized(config)
        x, t = inputs(config, n=2)
        out = model(x, t)
        assert out.shape == (2, config.in_channels, config.image_size, config.image_size)
        out.square().mean().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_bad_shapes_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="halved"):
        net(tiny(image_size=6, channel_mult=(1, 2, 2)))
    with pytest.raises(ConfigError, match="never occur"):
        net(tiny(attention_resolutions=(16,)))
    with pytest.raises(ConfigError, match="heads"):
        net(tiny(num_heads=3))


def _reference_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """improved-diffusion's AttentionBlock in float64: qkv [N, 3C, T] split per head as (q, k, v) channel blocks."""
    b, c, hh, ww = x.shape
    x = x.double().reshape(b, c, -1)
    h = torch.nn.functional.group_norm(x, block.norm.num_groups, block.norm.weight.double(),
                                       block.norm.bias.double(), block.norm.eps)
    qkv = torch.nn.functional.conv1d(h, block.qkv.weight.double(), block.qkv.bias.double())
    qkv = qkv.reshape(b * block.num_heads, -1, qkv.shape[2])
    ch = qkv.shape[1] // 3
    q, k, v = torch.split(qkv, ch, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, weight.shape[-1])
    out = torch.nn.functional.conv1d(a, block.proj_out.weight.double(), block.proj_out.bias.double())
    return (x + out).reshape(b, c, hh, ww)


@pytest.mark.every_cpu
@pytest.mark.parametrize("side,batch", [(8, 2), (16, 12)])
def test_attention_matches_reference_layout_and_both_cpu_paths(side: int, batch: int, cpu_class: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    block = AttentionBlock(64, 4)
    with torch.no_grad():
        block.proj_out.weight.normal_(0, 0.2)
        block.proj_out.bias.normal_(0, 0.2)
    x = torch.randn(batch, 64, side, side)
    ref = _reference_attention(block, x)
    fused: list[torch.dtype] = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        fused.append(q.dtype)
        return real_sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    with torch.no_grad():
        torch.testing.assert_close(block(x).double(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(block(x.to(memory_format=torch.channels_last)).double(), ref,
                                   rtol=1e-4, atol=1e-4)
        assert fused == [torch.float32, torch.float32]  # fp32 always takes the fused kernel
        # bf16 on the CPU: the class's own choice (the bf16 GEMMs only where bf16 is native), then each path forced:
        # the materialised weights for small maps, the fused kernel for large ones or with the GEMMs off.
        math_on, math_off = (replace(hardware.fast_paths("cpu"), bf16_math_attention=on) for on in (True, False))
        cases = [(None, 2**24, cpu_class != "avx512-bf16"), (math_on, 2**24, False), (math_on, 0, True),
                 (math_off, 2**24, True)]
        for paths, limit, expect_fused in cases:
            fused.clear()
            monkeypatch.setattr(unet, "_CPU_MATH_ATTENTION_MAX_WEIGHTS", limit)
            with torch.autocast("cpu", dtype=torch.bfloat16), \
                    (hardware.forced_fast_paths(paths) if paths else contextlib.nullcontext()):
                out = block(x.to(memory_format=torch.channels_last))
            assert fused == ([torch.bfloat16] if expect_fused else []), (paths, limit)
            assert (out.double() - ref).norm() / ref.norm() < 0.02


def test_channels_last_bf16_groupnorm_gradients_match_fp32() -> None:
    # The CPU channels_last bf16 training path (float round trip) against float64 autograd of the same input.
    torch.manual_seed(0)
    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 64, 8, 8) * 3 + 1).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 64, 8, 8).bfloat16()  # NCHW on purpose: the backward must not assume x's layout
    out = norm(x)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    w64, b64 = norm.weight.detach().double().requires_grad_(), norm.bias.detach().double().requires_grad_()
    ref = torch.nn.functional.group_norm(x64, 32, w64, b64, norm.eps)
    ref.backward(grad.double())
    assert out.dtype == torch.bfloat16 and x.grad is not None and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=8e-3, atol=8e-3)
    for got, want in ((x.grad, x64.grad), (norm.weight.grad, w64.grad), (norm.bias.grad, b64.grad)):
        assert got is not None and want is not None
        assert (got.double() - want).norm() / want.norm() < 1e-2


def test_channels_last_bf16_groupnorm_inference_takes_mixed_kernel_on_large_maps(monkeypatch) -> None:
    # Forward-only calls on maps of >= 32x32 pixels hand bf16 straight to the mixed-type kernel (faster there);
    # calls that need a gradient keep the float round trip. Either way the result is the exact normalisation
    # rounded once to bf16: within half a bf16 ulp (2^-8 relative) plus fp32 arithmetic error (1e-5 absolute on
    # these O(1) outputs) of float64, whichever kernel this PyTorch build happens to pick.
    torch.manual_seed(0)
    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    seen: list[torch.dtype] = []
    group_norm = torch.nn.functional.group_norm

    def spy(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(x.dtype)
        return group_norm(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(unet.F, "group_norm", spy)
    large = (torch.randn(2, 64, 32, 32) * 3 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    small = large[:, :, :16, :16].contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out_large, out_small = norm(large), norm(small)
    assert seen == [torch.bfloat16, torch.float32]
    for x, out in ((large, out_large), (small, out_small)):
        exact = group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-5)
    seen.clear()
    norm(large.clone().requires_grad_()).sum().backward()
    assert seen == [torch.float32]
