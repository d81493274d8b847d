"""`ddpmctl convert`: an improved-diffusion ``.pt`` state dict becomes a ddpmctl checkpoint computing the same function.

The yardstick is tests/reference_iddpm_unet.py, a network with improved-diffusion's exact module layout written
independently of ddpmctl's U-Net (in the reference's own arithmetic), given random weights everywhere and saved the
way improved-diffusion saves (``torch.save(model.state_dict(), path)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import reference_iddpm_unet
from reference_iddpm_unet import ReferenceLayoutUNet
from ddpmctl.checkpoint import load_checkpoint, read_checkpoint_info
from ddpmctl.cli.app import app
from ddpmctl.convert import ReferenceFlags, convert_checkpoint, map_state_dict, reference_config
from ddpmctl.errors import CheckpointError, OptionError

# CIFAR-10's released flags, narrowed (32 channels, 1 block) so the test runs in a second:
# --image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3
# --diffusion_steps 4000 --noise_schedule cosine
CIFAR_LIKE = ["--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1", "--learn_sigma", "True",
              "--dropout", "0.3", "--diffusion_steps", "4000", "--noise_schedule", "cosine"]
# Class-conditional (the reference's 1000 classes), additive embedding (no scale-shift), 2 heads, x0-prediction,
# fixed small sigmas, an image size the reference's own script does not build (16, with --channel_mult).
CLASS_LIKE = ["--image_size", "16", "--channel_mult", "1,2", "--num_channels", "32", "--num_res_blocks", "2",
              "--attention_resolutions", "8", "--num_heads", "2", "--class_cond", "True",
              "--use_scale_shift_norm", "False", "--predict_xstart", "True", "--sigma_small", "True",
              "--diffusion_steps", "1000"]


def reference_network(*, image_size: int, channels: int, learn_sigma: bool, channel_mult: tuple[int, ...],
                      attention: tuple[int, ...], **kwargs: Any) -> ReferenceLayoutUNet:
    torch.manual_seed(3)
    net = ReferenceLayoutUNet(image_size=image_size, in_channels=3, model_channels=channels,
                              out_channels=6 if learn_sigma else 3, attention_resolutions=attention,
                              channel_mult=channel_mult, **kwargs)
    with torch.no_grad():  # random weights everywhere (the reference zero-initialises its output convs)
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net.eval()


def cifar_like() -> ReferenceLayoutUNet:
    return reference_network(image_size=32, channels=32, learn_sigma=True, channel_mult=(1, 2, 2, 2),
                             attention=(16, 8), num_res_blocks=1, dropout=0.3)


def class_like() -> ReferenceLayoutUNet:
    return reference_network(image_size=16, channels=32, learn_sigma=False, channel_mult=(1, 2), attention=(8,),
                             num_res_blocks=2, num_classes=1000, num_heads=2,
                             use_scale_shift_norm=False)


def float64_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding (docs/conventions.md #17) with ddpmctl's float32 frequencies, in float64."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * k / half).float().double()
    angles = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def convert(tmp_path: Path, net: torch.nn.Module, flags: list[str], name: str = "ema_0.9999_500000.pt") -> Path:
    source = tmp_path / name
    torch.save(net.state_dict(), source)
    result = invoke("convert", str(source), *flags, "--out", str(tmp_path / "converted.safetensors"), "--quiet")
    assert result.exit_code == 0, result.output
    return tmp_path / "converted.safetensors"


def outputs(net: ReferenceLayoutUNet, ckpt_path: Path, dtype: torch.dtype, *, classes: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both networks on the same inputs: original indices t for ddpmctl, t * 1000 / T for the reference (the
    reference's rescale_timesteps, done by its diffusion before the network)."""
    ckpt = load_checkpoint(ckpt_path)
    size, T = ckpt.config.model.image_size, ckpt.config.diffusion.timesteps
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, size, size, generator=g, dtype=dtype)
    t = torch.tensor([0, 1, T // 2, T - 1])
    y = torch.tensor([0, 7, 999, 123]) if classes else None
    ours, ref = ckpt.model.to(dtype).eval(), net.to(dtype)
    with torch.no_grad():
        return ours(x, t, y), ref(x, t.float() * (1000.0 / T), y)


@pytest.mark.parametrize("case", ["cifar", "class"])
def test_converted_network_computes_the_reference_function(tmp_path: Path, case: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    net, flags = (cifar_like(), CIFAR_LIKE) if case == "cifar" else (class_like(), CLASS_LIKE)
    path = convert(tmp_path, net, flags)
    # float32, as both run: equal up to float rounding (the reference normalises and attends in another order).
    ours, ref = outputs(net, path, torch.float32, classes=case == "class")
    scale = ref.abs().max().item()
    assert scale > 0.1  # a real, input-dependent output
    assert (ours - ref).abs().max().item() < 2e-5 * max(scale, 1.0)
    # float64 throughout, with the reference's float32 roundings taken out (GroupNorm and softmax on float32
    # copies; the embedding's float32 frequencies and angles): equal to ~1e-12, so every weight is where it belongs.
    monkeypatch.setattr(reference_iddpm_unet, "UPCAST", torch.float64)
    monkeypatch.setattr(reference_iddpm_unet, "sinusoidal_embedding", float64_embedding)
    ours, ref = outputs(net, path, torch.float64, classes=case == "class")
    assert (ours - ref).abs().max().item() < 1e-10 * max(ref.abs().max().item(), 1.0)
    # and a different network is visibly different (the comparison can fail)
    assert (ours - ref.roll(1, dims=0)).abs().max().item() > 1e-3


def test_flags_build_the_reference_diffusion(tmp_path: Path) -> None:
    info = read_checkpoint_info(convert(tmp_path, cifar_like(), CIFAR_LIKE))
    d, m = info.config.diffusion, info.config.model
    assert (d.schedule, d.timesteps, d.mean_type, d.var_type, d.loss_type) == \
        ("cosine", 4000, "eps", "learned_range", "rescaled_mse")
    assert (m.image_size, m.in_channels, m.model_channels, m.num_res_blocks, m.channel_mult, m.dropout) == \
        (32, 3, 32, 1, (1, 2, 2, 2), 0.3)
    assert m.attention_resolutions == (16, 8) and m.num_classes is None and info.kind == "model"
    (entry,) = info.lineage
    assert entry["op"] == "convert" and entry["from"] == "ema_0.9999_500000.pt" and len(entry["sha256"]) == 64
    assert entry["flags"]["learn_sigma"] is True and entry["flags"]["diffusion_steps"] == 4000

    (tmp_path / "c").mkdir()
    other = read_checkpoint_info(convert(tmp_path / "c", class_like(), CLASS_LIKE))
    d = other.config.diffusion
    assert (d.mean_type, d.var_type, d.loss_type, d.schedule) == ("x0", "fixed_small", "mse", "linear")
    assert other.config.model.num_classes == 1000 and other.config.model.use_scale_shift_norm is False


@pytest.mark.parametrize(("flags", "expected"), [
    ({}, ("fixed_large", "mse", "eps")),
    ({"learn_sigma": True}, ("learned_range", "rescaled_mse", "eps")),
    ({"learn_sigma": True, "rescale_learned_sigmas": False}, ("learned_range", "mse", "eps")),
    ({"learn_sigma": True, "use_kl": True}, ("learned_range", "rescaled_kl", "eps")),
    ({"sigma_small": True, "predict_xstart": True}, ("fixed_small", "mse", "x0")),
])
def test_create_gaussian_diffusion_choices(flags: dict[str, Any], expected: tuple[str, str, str]) -> None:
    # The state dict only needs the tensors the flag checks read.
    state = {"input_blocks.0.0.weight": torch.zeros(128, 3, 3, 3),
             "out.2.weight": torch.zeros(6 if flags.get("learn_sigma") else 3, 128, 3, 3)}
    d = reference_config(ReferenceFlags(**flags), state).diffusion
    assert (d.var_type, d.loss_type, d.mean_type) == expected
    assert (d.schedule, d.timesteps) == ("linear", 1000)  # the reference's defaults


def test_respacing_flag_writes_a_respaced_checkpoint(tmp_path: Path) -> None:
    info = read_checkpoint_info(convert(tmp_path, cifar_like(), [*CIFAR_LIKE, "--timestep_respacing", "100"]))
    assert info.kind == "respaced" and len(info.config.diffusion.use_timesteps or ()) == 100


def test_ddp_prefix_is_dropped() -> None:
    state = {"module.out.2.weight": torch.zeros(1), "module.out.2.bias": torch.zeros(1)}
    assert sorted(map_state_dict(state)) == ["out.2.bias", "out.2.weight"]


def test_converted_checkpoint_samples(tmp_path: Path) -> None:
    path = convert(tmp_path, cifar_like(), CIFAR_LIKE)
    result = invoke("sample", str(path), "--num", "2", "--steps", "2", "--sampler", "ddim", "--out",
                    str(tmp_path / "s"), "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "grid.png").is_file()


# ------------------------------------------------------------------------------------------- wrong flags
def one_line(result: Any, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize(("change", "code", "words"), [
    (["--num_channels", "64"], 2, "--num_channels 64"),
    (["--learn_sigma", "False"], 2, "--learn_sigma True"),
    (["--class_cond", "True"], 2, "--class_cond False"),
    (["--num_res_blocks", "2"], 1, "does not match the flags"),
    (["--attention_resolutions", "16"], 1, "does not match the flags"),
    (["--image_size", "48"], 2, "--channel_mult"),
    (["--num_heads_upsample", "2"], 2, "--num_heads_upsample"),
    (["--learn_sigma", "maybe"], 2, "--learn_sigma"),
    (["--noise_schedule", "sqrt"], 2, "--noise_schedule"),
    (["--diffusion_steps", "0"], 2, "--diffusion_steps"),
    (["--rescale_timesteps", "False"], 2, "--rescale_timesteps"),
    (["--timestep_respacing", "5000"], 2, "--timestep_respacing"),
])
def test_flags_that_do_not_fit_are_one_line(tmp_path: Path, change: list[str], code: int, words: str) -> None:
    source = tmp_path / "model.pt"
    torch.save(cifar_like().state_dict(), source)
    out = tmp_path / "out.safetensors"
    line = one_line(invoke("convert", str(source), *CIFAR_LIKE, *change, "--out", str(out)), code)
    assert words in line, line
    assert not out.exists()


def test_out_rules(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    torch.save(cifar_like().state_dict(), source)
    assert invoke("convert", str(source), *CIFAR_LIKE, "-q").exit_code == 0
    beside = tmp_path / "model.safetensors"  # no --out: beside the source
    assert beside.is_file()
    assert "--force" in one_line(invoke("convert", str(source), *CIFAR_LIKE), 1)
    folder = tmp_path / "into"
    folder.mkdir()
    result = invoke("convert", str(source), *CIFAR_LIKE, "-o", str(folder), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["out"] == str(folder / "model.safetensors") and summary["kind"] == "model"
    assert summary["num_parameters"] == sum(p.numel() for p in cifar_like().parameters())
    assert "input file" in one_line(invoke("convert", str(source), *CIFAR_LIKE, "-o", str(source), "--force"), 1)


def test_library_errors_are_typed(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    torch.save(cifar_like().state_dict(), source)
    with pytest.raises(OptionError, match="--num_channels"):
        convert_checkpoint(source, tmp_path / "x.safetensors", ReferenceFlags(image_size=32, num_channels=16,
                                                                              learn_sigma=True))
    with pytest.raises(CheckpointError, match="does not match"):
        convert_checkpoint(source, tmp_path / "x.safetensors", ReferenceFlags(image_size=32, num_channels=32,
                                                                              learn_sigma=True))
    assert not (tmp_path / "x.safetensors").exists()
