"""``train --eval-every``: sample-quality probes of the EMA weights in metrics.jsonl, without changing training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ddpmctl.cli.app import app
from ddpmctl.config import TrainConfig
from ddpmctl.errors import ConfigError
from ddpmctl.train import TrainEvent, train
from conftest import assert_same_files

CPU = torch.device("cpu")
TINY = dict(data="builtin:digits", model_channels=16, channel_mult=(1, 2), res_blocks=1, attention_resolutions=(4,),
            timesteps=20, batch_size=16, log_every=2, save_every=1000, lr=2e-3)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDPMCTL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DDPMCTL_INCEPTION_WEIGHTS", raising=False)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_probes_are_logged_and_training_is_unchanged(tmp_path: Path) -> None:
    events: list[TrainEvent] = []
    probed = TrainConfig(**TINY, out=str(tmp_path / "probed"), max_steps=6, eval_every=3, eval_num=24, eval_steps=3)
    train(probed, device=CPU, callback=events.append)
    train(TrainConfig(**TINY, out=str(tmp_path / "plain"), max_steps=6), device=CPU)
    # The probe samples from its own copy of the network and restores the global random state: same weights.
    assert_same_files(tmp_path / "plain", tmp_path / "probed",
                      ["ema_0.9999_000006.safetensors", "model_000006.safetensors"])
    evals = [r for r in _records(tmp_path / "probed") if "eval_fd" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for record in evals:
        assert record["eval_features"] == "digits" and record["eval_num"] == 24
        assert record["eval_reference"] == "builtin:digits (test split)" and record["eval_sampler"] == "ddim-3"
        assert record["eval_fd"] > 0 and 0 <= record["eval_precision"] <= 1
    losses = [r for r in _records(tmp_path / "probed") if "loss" in r]
    assert [r["step"] for r in losses] == [2, 4, 6]
    assert [e.metrics["step"] for e in events if e.kind == "log" and "eval_fd" in e.metrics] == [3, 6]


def test_the_probe_of_a_folder_uses_its_training_images(tmp_path: Path) -> None:
    from ddpmctl.data import load_dataset
    from ddpmctl.images import save_png

    folder = tmp_path / "imgs"
    for i, image in enumerate(load_dataset("builtin:digits", split="train").images[:40]):
        save_png(folder / f"{i:03d}.png", image)
    config = TrainConfig(**{**TINY, "data": str(folder)}, out=str(tmp_path / "run"), max_steps=2, eval_every=2,
                         eval_num=8, eval_steps=2)
    train(config, device=CPU)
    (record,) = [r for r in _records(tmp_path / "run") if "eval_fd" in r]
    assert record["eval_reference"].endswith("(training images)")


def test_rgb_data_without_inception_weights_stops_before_training(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "rgb"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 10, 200)).save(folder / f"{i}.png")
    config = TrainConfig(**{**TINY, "data": str(folder)}, out=str(tmp_path / "run"), max_steps=2, eval_every=1)
    with pytest.raises(ConfigError, match="--eval-every: .*weights-inception-2015-12-05"):
        train(config, device=CPU)


def test_the_command_line_option(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "builtin:digits", "--out", str(out), "--max-steps", "2", "--model-channels", "16",
            "--channel-mult", "1,2", "--res-blocks", "1", "--timesteps", "20", "--batch-size", "16",
            "--eval-every", "2", "--eval-num", "8", "--eval-steps", "2", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert any("eval_fd" in r for r in _records(out))
    assert json.loads((out / "config.json").read_text())["train"]["eval_every"] == 2
    bad = CliRunner().invoke(app, [*args[:-3], "--eval-every", "0", "--force", "--device", "cpu", "--quiet"])
    assert bad.exit_code == 2, bad.output


def test_a_ddgan_run_is_probed_with_its_own_sampler(tmp_path: Path) -> None:
    # DDIM refuses a ddgan generator; the probe samples it with the ddgan plugin over its whole T-step chain.
    config = TrainConfig(data="builtin:digits", method="ddgan", model_channels=8, channel_mult=(1, 2), res_blocks=1,
                         attention_resolutions=(4,), timesteps=2, batch_size=16, log_every=2, save_every=1000,
                         out=str(tmp_path / "gan"), max_steps=2, eval_every=2, eval_num=16)
    train(config, device=CPU)
    (record,) = [r for r in _records(tmp_path / "gan") if "eval_fd" in r]
    assert record["eval_sampler"] == "ddgan-2" and record["eval_num"] == 16 and record["eval_fd"] > 0
