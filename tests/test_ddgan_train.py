"""`train --method ddgan`: exact resume, the NaN policy, the checkpoint it writes, and the commands that refuse it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_same_files
from ddpmctl.checkpoint import load_checkpoint, load_tensors
from ddpmctl.cli.app import app
from ddpmctl.config import TrainConfig
from ddpmctl.errors import TrainingError
from ddpmctl.train import train

runner = CliRunner()

TINY = dict(data="builtin:digits", method="ddgan", model_channels=8, channel_mult=(1, 2), res_blocks=1,
            attention_resolutions=(4,), batch_size=12, disc_channels=8, nz=16, lazy_reg=3, save_every=4,
            log_every=2, precision="fp32", seed=5)


def _config(out: Path, **changes: object) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(out), **changes})


def test_stopped_and_resumed_run_ends_bit_identical(tmp_path: Path) -> None:
    """Stopped at step 5 (between saves, mid cosine and between R1 steps) and resumed: the same G, EMA, D, both
    optimizers' moments and metrics as the run that went straight to step 10."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(_config(full, max_steps=10), device=torch.device("cpu"))
    steps: list[int] = []

    def callback(event: object) -> None:
        if getattr(event, "kind") == "step":
            steps.append(getattr(event, "step"))

    first = train(_config(stopped, max_steps=10), device=torch.device("cpu"), callback=callback,
                  should_stop=lambda: bool(steps) and steps[-1] >= 5)
    assert first.step == 5 and first.stop_reason == "stopped"
    resumed = train(_config(stopped, max_steps=10), device=torch.device("cpu"), resume=True)
    assert resumed.start_step == 5 and resumed.step == 10
    assert_same_files(full, stopped, ["ema_0.9999_000010.safetensors", "model_000010.safetensors",
                                      "state_000010.safetensors"])
    state = load_tensors(full / "state_000010.safetensors")[0]
    # D's weights (saved by the loop) and both optimizers' moments are in the training state.
    assert any(k.startswith("net.discriminator.") for k in state)
    assert any(k.startswith("optim.discriminator.") for k in state) and any(k.startswith("optim.generator.")
                                                                             for k in state)

    def numbers(path: Path) -> list[dict[str, object]]:
        return [{k: v for k, v in json.loads(line).items() if k not in ("img_per_s", "elapsed")}
                for line in path.read_text().splitlines()]

    # The stop logged step 5 on its own; the intervals after step 6 hold the same steps in both runs.
    assert numbers(full / "metrics.jsonl")[-2:] == numbers(stopped / "metrics.jsonl")[-2:]
    last = numbers(full / "metrics.jsonl")[-1]
    # The last update (0-based step 9 of 10) ran on the cosine at 9/10 of the way to 1e-5.
    for key, base in (("lr", 1.6e-4), ("lr_d", 1.25e-4)):
        assert last[key] == pytest.approx(1e-5 + 0.5 * (base - 1e-5) * (1 + math.cos(math.pi * 0.9)), rel=1e-12)
    assert {"loss_d", "r1", "d_real", "d_fake", "grad_norm_d"} <= set(last) and "mse" not in last


def test_checkpoint_is_a_generator_that_samples(tmp_path: Path) -> None:
    result = train(_config(tmp_path / "run", max_steps=2), device=torch.device("cpu"))
    ckpt = load_checkpoint(result.ema_checkpoint)
    assert ckpt.kind == "ddgan"
    assert ckpt.config.model.latent is not None and ckpt.config.model.latent.dim == 16
    assert ckpt.config.diffusion.schedule == "vp-sde" and ckpt.config.diffusion.timesteps == 4
    # The discriminator lives only in the training state.
    assert not any(name.startswith("disc") for name in ckpt.model.state_dict())
    out = tmp_path / "samples"
    res = runner.invoke(app, ["sample", str(result.ema_checkpoint), "--sampler", "ddgan", "-n", "3", "-o", str(out),
                              "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    # Without --sampler a ddgan checkpoint samples with its own plugin: the same images.
    res = runner.invoke(app, ["sample", str(result.ema_checkpoint), "-n", "3", "-o", str(tmp_path / "default"),
                              "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    with np.load(out / "samples.npz") as named, np.load(tmp_path / "default" / "samples.npz") as default:
        assert np.array_equal(named["images"] if "images" in named else named[named.files[0]],
                              default["images"] if "images" in default else default[default.files[0]])
    # Another sampler, another step count, and the commands that need a likelihood or a chain refuse in one line.
    for args, words in [
        (["sample", str(result.ema_checkpoint), "--sampler", "ddim", "-o", str(tmp_path / "x"), "--device", "cpu"],
         "--sampler ddgan"),
        (["sample", str(result.ema_checkpoint), "--sampler", "ddgan", "--steps", "2", "-o", str(tmp_path / "y"),
          "--device", "cpu"], "4-step denoising diffusion GAN"),
        (["eval-nll", str(result.ema_checkpoint), "--device", "cpu"], "no likelihood"),
        (["respace", str(result.ema_checkpoint), "--steps", "2", "-o", str(tmp_path / "r.safetensors")],
         "no longer chain"),
        (["distill", str(result.ema_checkpoint), "--data", "builtin:digits", "--to-steps", "2",
          "--iters-per-stage", "1", "-o", str(tmp_path / "d"), "--device", "cpu"], "no denoiser to distill"),
    ]:
        res = runner.invoke(app, args)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.exit_code in (1, 2) and len(lines) == 1 and lines[0].startswith("error: "), (args, res.output)
        assert words in lines[0], lines[0]
    info = runner.invoke(app, ["info", str(result.ema_checkpoint), "--json"])
    payload = json.loads(info.stdout)
    assert payload["method"] == "ddgan" and payload["config"]["diffusion"]["timesteps"] == 4
    assert payload["config"]["model"]["latent"]["dim"] == 16


def test_non_finite_discriminator_step_follows_the_nan_policy(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN in D's loss at one step: --nan-policy stop ends the run naming the step; skip leaves D and G untouched
    that step and goes on."""
    from ddpmctl import ddgan_method

    calls = {"n": 0}
    real_loss = ddgan_method.discriminator_loss

    def poisoned(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real_loss(real, fake)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(ddgan_method, "discriminator_loss", poisoned)
    with pytest.raises(TrainingError, match="step 3"):
        train(_config(tmp_path / "stop", max_steps=4), device=torch.device("cpu"))
    calls["n"] = 0
    result = train(_config(tmp_path / "skip", max_steps=4, nan_policy="skip"), device=torch.device("cpu"))
    assert result.nan_skips == 1 and result.step == 4
    state = json.loads((tmp_path / "skip" / "state_000004.json").read_text())
    assert state["ema_updates"] == 3


def test_ddgan_options_and_refusals() -> None:
    config = TrainConfig(data="builtin:digits", method="ddgan").with_data_defaults(image_size=8, num_images=1437)
    assert (config.timesteps, config.lr, config.lr_d, config.lr_min, config.r1_gamma, config.lazy_reg, config.nz,
            config.dropout, config.mean_type) == (4, 1.6e-4, 1.25e-4, 1e-5, 0.02, 15, 100, 0.0, "x0")
    # An IDDPM run's config is unchanged by the DDGAN fields (left out of its JSON).
    assert "method" not in TrainConfig(data="x").model_dump_json() and "lr_d" not in TrainConfig(data="x").model_dump()
    for args, words in [
        (["--method", "ddgan", "--loss", "simple"], "--loss"),
        (["--method", "ddgan", "--schedule", "linear"], "--schedule"),
        (["--method", "ddgan", "--timesteps", "500"], "at most"),
        (["--method", "ddgan", "--mean-type", "eps"], "predicts x0"),
        (["--r1-gamma", "0.1"], "add --method ddgan"),
    ]:
        res = runner.invoke(app, ["train", "builtin:digits", "--out", "/nonexistent/never", *args])
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and words in lines[0], (args, res.output)


def test_cifar10_recipe_is_the_official_one() -> None:
    """examples/configs/cifar10_ddgan.toml names every choice of the official CIFAR-10 command (only the
    generator's x0 prediction is implied)."""
    try:  # Python >= 3.11
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    path = Path(__file__).resolve().parents[1] / "examples" / "configs" / "cifar10_ddgan.toml"
    config = TrainConfig(data="x", **tomllib.loads(path.read_text()))
    resolved = config.with_data_defaults(image_size=32, num_images=50_000)
    assert resolved == config.model_copy(update={"mean_type": "x0"})
    assert (config.timesteps, config.nz, config.batch_size, config.lr, config.lr_d, config.lr_min, config.r1_gamma,
            config.lazy_reg, config.ema, config.disc_channels) == (4, 100, 256, 1.6e-4, 1.25e-4, 1e-5, 0.02, 15,
                                                                   0.9999, 64)
    model = resolved.make_model_config(image_size=32, channels=3, num_classes=None)
    assert (model.model_channels, model.channel_mult, model.num_res_blocks, model.attention_resolutions,
            model.latent.dim if model.latent else None) == (128, (1, 2, 2, 2), 2, (16,), 100)


@pytest.mark.slow
def test_torchrun_two_ranks_stay_identical(tmp_path: Path) -> None:
    """2 torchrun ranks (gloo): G under DDP and D with its explicitly averaged gradients end every save with the
    same parameters on both ranks (the state JSON records each rank's digest), and --quiet leaves stderr empty.
    (Not compared with one process: the minibatch-stddev groups are formed within each rank's share, as in the
    official code.)"""
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ddpmctl",
            "train", "builtin:digits", "--method", "ddgan", "--model-channels", "16", "--channel-mult", "1,2",
            "--res-blocks", "1", "--attention-resolutions", "4", "--batch-size", "16", "--disc-channels", "8",
            "--lazy-reg", "2", "--max-steps", "4", "--save-every", "2", "--out", str(tmp_path / "run"), "--quiet",
            "--device", "cpu"]
    proc = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240, start_new_session=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    for step in (2, 4):
        state = json.loads((tmp_path / "run" / f"state_{step:06d}.json").read_text())
        digests = state["rank_param_sha256"]
        assert len(digests) == 2 and digests[0] == digests[1]
    assert load_checkpoint(tmp_path / "run" / "ema_0.9999_000004.safetensors").kind == "ddgan"
