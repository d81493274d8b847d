"""The per-machine fast paths (ddpmctl.hardware.fast_paths): each changes speed only, never a result beyond float
rounding, and the machine's choice follows its bf16 capability."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ddpmctl import hardware
from ddpmctl.config import ModelConfig
from ddpmctl.hardware import FAST_PATH_NAMES, PLAIN_PATHS, FastPaths, choose_fast_paths, fast_paths, forced_fast_paths
from ddpmctl.unet import AttentionBlock, UNetModel

ALL_ON = FastPaths(**{name: True for name in FAST_PATH_NAMES})


def _model() -> torch.nn.Module:
    config = ModelConfig(image_size=8, in_channels=3, model_channels=32, num_res_blocks=1,
                         attention_resolutions=(8, 4), channel_mult=(1, 2), num_heads=2)
    torch.manual_seed(0)
    model = UNetModel(config, out_channels=6, num_timesteps=100)
    with torch.no_grad():  # the zero-initialised output convs would hide the attention and last-conv paths
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _forward_backward(model: torch.nn.Module, paths: FastPaths, dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layout = torch.channels_last if paths.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=generator).contiguous(memory_format=layout)
    t = torch.randint(0, 100, (4,), generator=generator)
    with forced_fast_paths(paths), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(x, t).float()
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ("all", *FAST_PATH_NAMES))
def test_each_fast_path_matches_the_plain_network_in_fp32(name: str) -> None:
    model = _model()
    paths = ALL_ON if name == "all" else replace(PLAIN_PATHS, **{name: True})
    if name == "conv_projections":  # a channels_last path: NCHW maps take the matmuls
        paths = replace(paths, channels_last=True)
    out_plain, grads_plain = _forward_backward(model, PLAIN_PATHS)
    out_fast, grads_fast = _forward_backward(model, paths)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-4, atol=1e-5)
    for fast, plain in zip(grads_fast, grads_plain):
        torch.testing.assert_close(fast, plain, rtol=1e-3, atol=1e-5)


def test_bf16_fast_paths_match_the_plain_network_at_bf16_rounding() -> None:
    model = _model()
    out_plain, _ = _forward_backward(model, PLAIN_PATHS, torch.bfloat16)
    out_fast, _ = _forward_backward(model, ALL_ON, torch.bfloat16)
    torch.testing.assert_close(out_fast, out_plain, rtol=0.05, atol=0.02)


def test_the_linear_projections_really_run_when_conv_projections_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_linear, real_conv2d = torch.nn.functional.linear, torch.nn.functional.conv2d

    def linear(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append("linear")
        return real_linear(*args, **kwargs)

    def conv2d(x: torch.Tensor, weight: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if weight.shape[-1] == 1:
            calls.append("conv1x1")
        return real_conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d)
    model = _model()
    channels_last = replace(PLAIN_PATHS, channels_last=True)
    _forward_backward(model, channels_last)
    plain = (calls.count("linear"), calls.count("conv1x1"))
    calls.clear()
    _forward_backward(model, replace(channels_last, conv_projections=True))
    conv = (calls.count("linear"), calls.count("conv1x1"))
    calls.clear()
    _forward_backward(model, replace(PLAIN_PATHS, conv_projections=True))  # on NCHW maps: the matmuls
    assert (calls.count("linear"), calls.count("conv1x1")) == plain
    # every attention block's qkv and proj_out move from F.linear to 1x1 conv2d (embeddings and skips stay)
    projections = 2 * sum(isinstance(m, AttentionBlock) for m in model.modules())
    assert projections > 0 and plain[0] - conv[0] == projections and conv[1] - plain[1] == projections


@pytest.mark.every_cpu
def test_the_choice_follows_the_cpu_class(cpu_class: str) -> None:
    chosen = choose_fast_paths("cpu")
    # The bf16 attention GEMMs only where bf16 is native; training in channels_last only where its backward
    # convolutions win (AVX-512 CPUs, and GPUs); the rest won everywhere.
    assert chosen.bf16_math_attention is (cpu_class == "avx512-bf16")
    assert chosen.training_channels_last is cpu_class.startswith("avx512")
    assert chosen.channels_last and chosen.conv_projections and chosen.mixed_groupnorm
    assert fast_paths("cpu") == chosen
    assert choose_fast_paths("cuda").training_channels_last


def test_forced_paths_apply_inside_the_block_only() -> None:
    before = fast_paths("cpu")
    with forced_fast_paths(PLAIN_PATHS):
        assert fast_paths("cpu") == PLAIN_PATHS
        assert hardware.memory_format("cpu") == torch.contiguous_format
        assert hardware.memory_format("cpu", training=True) == torch.contiguous_format
    with forced_fast_paths(replace(PLAIN_PATHS, channels_last=True)):
        assert hardware.memory_format("cpu") == torch.channels_last
        assert hardware.memory_format("cpu", training=True) == torch.contiguous_format
    assert fast_paths("cpu") == before
    assert "channels_last on" in ALL_ON.describe()
