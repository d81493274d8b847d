"""The per-machine fast paths (ddpmctl.hardware.fast_paths): each changes speed only, never a result beyond float
rounding; the choice follows the CPU class, and across the classes every path and precision runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ddpmctl import cpuclass, hardware
from ddpmctl.checkpoint import load_checkpoint
from ddpmctl.config import ModelConfig, TrainConfig
from ddpmctl.hardware import resolve_precision
from ddpmctl.samplers import generate, get_sampler
from ddpmctl.train import train
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


def test_every_path_and_precision_is_taken_across_the_cpu_classes(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Under each class: one training step and a 2-step sample, --precision auto, with the network's functions
    watched. Across the four classes every path and both precisions must have run (both sides of each choice)."""
    taken: set[str] = set()
    phase = {"now": ""}
    functional = torch.nn.functional
    real = {name: getattr(functional, name) for name in ("conv2d", "linear", "scaled_dot_product_attention",
                                                         "group_norm")}
    real_matmul = torch.matmul

    def conv2d(x: torch.Tensor, weight: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        layout = "channels_last" if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 else "NCHW"
        taken.add(f"{phase['now']} {layout}")
        if weight.shape[-2:] == (1, 1) and x.shape[-1] > 1:
            taken.add("projections as 1x1 convs")
        return real["conv2d"](x, weight, *args, **kwargs)

    def linear(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if x.dim() == 3:  # tokens [N, HW, C]: attention's projections as matmuls
            taken.add("projections as matmuls")
        return real["linear"](x, *args, **kwargs)

    def sdpa(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        taken.add(f"fused attention {q.dtype}")
        return real["scaled_dot_product_attention"](q, *args, **kwargs)

    def group_norm(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if x.dtype == torch.bfloat16:
            taken.add("mixed-type GroupNorm")
        return real["group_norm"](x, *args, **kwargs)

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        taken.add(f"attention GEMMs {a.dtype}")
        return real_matmul(a, b)

    for name, spy in (("conv2d", conv2d), ("linear", linear), ("scaled_dot_product_attention", sdpa),
                      ("group_norm", group_norm)):
        monkeypatch.setattr(functional, name, spy)
    monkeypatch.setattr(torch, "matmul", matmul)
    auto = {}
    for cpu_class in cpuclass.CPU_CLASSES:
        monkeypatch.setenv("DDPMCTL_CPU", cpu_class)
        # --precision auto, then an explicit bf16 (emulated below avx512-bf16: the fused kernel, NCHW bf16 maps).
        for request in ("auto", "bf16"):
            phase["now"] = "training"
            config = TrainConfig(data="builtin:digits", out=str(tmp_path / cpu_class / request), model_channels=16,
                                 channel_mult=(1, 2), res_blocks=1, attention_resolutions=(4,), timesteps=10,
                                 batch_size=4, max_steps=1, save_every=1, precision=request)
            result = train(config, device=torch.device("cpu"))
            phase["now"] = "sampling"
            precision = resolve_precision(request, "cpu")[0]
            generate(load_checkpoint(result.ema_checkpoint), get_sampler("ddim")(), num=2, batch_size=2, seed=0,
                     steps=2, precision=precision)
            if request == "auto":
                auto[cpu_class] = {result.precision, precision}
    assert auto == {"default": {"fp32"}, "avx2": {"fp32"}, "avx512": {"fp32"}, "avx512-bf16": {"bf16"}}
    assert taken >= {"training NCHW", "training channels_last", "sampling channels_last",
                     "projections as 1x1 convs", "projections as matmuls", "fused attention torch.float32",
                     "fused attention torch.bfloat16", "attention GEMMs torch.bfloat16", "mixed-type GroupNorm"}, taken
