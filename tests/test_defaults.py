"""Defaults on the user's machine: --precision auto (and the one warning for emulated bf16), the precision shown in
progress / --json / metrics.jsonl, training defaults chosen from the data, and the shipped configs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ddpmctl.cli.app import app
from ddpmctl.config import TrainConfig, default_training

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the parser ddpmctl itself falls back to (a dependency there)
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model-channels", "16", "--channel-mult", "1,2", "--res-blocks", "1", "--attention-resolutions", "4",
        "--timesteps", "20", "--batch-size", "16", "--device", "cpu", "--max-steps", "2", "--log-every", "1"]


def _train(tmp_path: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["train", "builtin:digits", "-o", str(tmp_path / "run"), *TINY, *args])


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.every_cpu
def test_auto_follows_the_cpu_class(tmp_path: Path, cpu_class: str) -> None:
    expected = "bf16" if cpu_class == "avx512-bf16" else "fp32"  # bf16 only where the CPU computes it natively
    result = _train(tmp_path)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    assert f"parameters, {expected}, EMA decay" in result.stderr  # the progress header names the precision
    assert {m["precision"] for m in _metrics(tmp_path / "run")} == {expected}
    json_result = CliRunner().invoke(app, ["train", "-o", str(tmp_path / "run"), "--resume", "--max-steps", "3",
                                           "--json", "--quiet"])
    assert json_result.exit_code == 0, json_result.output
    assert json.loads(json_result.stdout)["precision"] == expected
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["precision"] == "auto"


@pytest.mark.every_cpu
def test_explicit_bf16_runs_everywhere_and_warns_once_where_emulated(tmp_path: Path, cpu_class: str) -> None:
    native = cpu_class == "avx512-bf16"
    result = _train(tmp_path, "--precision", "bf16", "--json")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == (0 if native else 1)
    assert all("emulated" in line and "slower than fp32" in line for line in warnings)
    assert json.loads(result.stdout)["precision"] == "bf16"
    assert {m["precision"] for m in _metrics(tmp_path / "run")} == {"bf16"}

    ckpt = tmp_path / "run" / "ema_0.9999_000002.safetensors"
    sample = CliRunner().invoke(app, ["sample", str(ckpt), "--out", str(tmp_path / "s"), "--num", "2", "--steps", "2",
                                      "--sampler", "ddim", "--precision", "bf16", "--json", "--quiet"])
    assert sample.exit_code == 0, sample.output
    assert json.loads(sample.stdout)["precision"] == "bf16"
    assert [line for line in sample.stderr.splitlines() if line.strip()] == warnings
    sample = CliRunner().invoke(app, ["sample", str(ckpt), "--out", str(tmp_path / "t"), "--num", "2", "--steps", "2",
                                      "--sampler", "ddim", "--json", "--quiet"])
    assert json.loads(sample.stdout)["precision"] == ("bf16" if native else "fp32") and sample.stderr == ""


def test_bad_precision_is_one_usage_line(tmp_path: Path) -> None:
    result = _train(tmp_path, "--precision", "fp16")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["eval-nll", str(tmp_path / "missing.safetensors"), "--precision", "fp16"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "'auto', 'fp32', 'bf16'" in result.stderr


def test_no_shipped_config_forces_bf16() -> None:
    configs = sorted((REPO / "examples" / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        values = tomllib.loads(path.read_text())
        assert values.get("precision", "auto") != "bf16", path.name


def test_defaults_fit_the_data() -> None:
    digits = TrainConfig(data="builtin:digits").with_data_defaults(image_size=8, num_images=1497)
    assert (digits.timesteps, digits.mean_type, digits.batch_size, digits.lr, digits.dropout, digits.flip) == (
        1000, "eps", 128, 2e-4, 0.1, False)
    model = digits.make_model_config(image_size=8, channels=1, num_classes=None)
    assert (model.model_channels, model.channel_mult, model.num_res_blocks, model.attention_resolutions) == (
        32, (1, 2), 2, (4,))
    # Below 32x32 a dataset of 20,000 images or more gets no dropout; from 32x32 up, ImageNet-sized data neither.
    assert default_training(16, 5_000)["dropout"] == 0.1 and default_training(16, 30_000)["dropout"] == 0.0
    assert default_training(32, 5_000)["dropout"] == 0.3 and default_training(64, 1_281_167)["dropout"] == 0.0
    # 64x64 gets the reference's attention resolutions (its default 16,8), not guided-diffusion's 32,16,8.
    big = TrainConfig(data="x").with_data_defaults(image_size=64, num_images=100_000)
    assert big.make_model_config(image_size=64, channels=3, num_classes=None).attention_resolutions == (16, 8)
    assert big.batch_size == 128
    # Explicit values always win.
    given = TrainConfig(data="x", timesteps=50, mean_type="v", batch_size=8, lr=1e-3, dropout=0.0, flip=False)
    assert given.with_data_defaults(image_size=8, num_images=10) == given


def test_cifar_sized_data_gets_the_reference_cifar10_hybrid_recipe() -> None:
    """50,000 images of 32x32 and no flags: the model, diffusion, dropout, batch and lr of the reference's CIFAR-10
    L_hybrid run, as examples/configs/cifar10_hybrid.toml writes them out (from improved-diffusion's README)."""
    recipe = tomllib.loads((REPO / "examples" / "configs" / "cifar10_hybrid.toml").read_text())
    config = TrainConfig(data="x").with_data_defaults(image_size=32, num_images=50_000)
    model = config.make_model_config(image_size=32, channels=3, num_classes=None)
    diffusion = config.make_diffusion_config()
    got = {"model_channels": model.model_channels, "channel_mult": list(model.channel_mult),
           "res_blocks": model.num_res_blocks, "attention_resolutions": list(model.attention_resolutions),
           "heads": model.num_heads, "dropout": model.dropout, "timesteps": diffusion.timesteps,
           "schedule": diffusion.schedule, "mean_type": diffusion.mean_type, "var_type": diffusion.var_type,
           "loss": config.loss, "batch_size": config.batch_size, "lr": config.lr, "flip": config.flip}
    assert got == {key: recipe[key] for key in got}


def test_an_explicit_config_builds_what_it_built_before() -> None:
    """examples/configs/cifar10_hybrid.toml names every choice: the data defaults change nothing of its run."""
    values = tomllib.loads((REPO / "examples" / "configs" / "cifar10_hybrid.toml").read_text())
    config = TrainConfig(data="x", **values)
    assert config.with_data_defaults(image_size=32, num_images=100) == config
    model = config.make_model_config(image_size=32, channels=3, num_classes=None)
    assert (model.model_channels, model.channel_mult, model.num_res_blocks, model.attention_resolutions,
            model.dropout, config.make_diffusion_config().timesteps) == (128, (1, 2, 2, 2), 3, (16, 8), 0.3, 4000)
    assert (config.lr, config.batch_size, config.ema, config.precision) == (1e-4, 128, 0.9999, "fp32")
    assert config.ema_warmup == "none"  # the paper's EMA (its init share after 500K steps is 0.9999^500000)
