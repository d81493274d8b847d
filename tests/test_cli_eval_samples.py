"""`ddpmctl eval-samples` through typer's CliRunner: npz, folders and checkpoints, both feature networks, statistics
files, numbers that do not depend on batching, and hostile inputs (one error line each, the right exit code)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ddpmctl.build import build_model
from ddpmctl.checkpoint import save_checkpoint
from ddpmctl.cli.app import app
from ddpmctl.config import CheckpointConfig, DataInfo, DiffusionConfig, ModelConfig
from ddpmctl.data import load_dataset
from ddpmctl.features import DigitsClassifier
from ddpmctl.images import save_npz, save_png
from ddpmctl.inception import FIDInceptionV3
from conftest import perturb_weights

MODEL = ModelConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,))
DIFFUSION = DiffusionConfig(schedule="cosine", timesteps=40, var_type="learned_range")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDPMCTL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DDPMCTL_INCEPTION_WEIGHTS", raising=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = CheckpointConfig(model=MODEL, diffusion=DIFFUSION,
                              data=DataInfo(source="builtin:digits", image_size=8, channels=1))
    net = perturb_weights(build_model(config), 0.05, generator=torch.Generator().manual_seed(0))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors", dict(net.state_dict()), config,
                           kind="model", lineage=[])


@pytest.fixture(scope="module")
def train_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 300 training digits as a samples.npz (uint8 NHWC, as `ddpmctl sample` writes it)."""
    images = load_dataset("builtin:digits", split="train").images[:300]
    return save_npz(tmp_path_factory.mktemp("npz") / "samples.npz", images)


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def _json(*args: str) -> dict:
    result = _invoke("eval-samples", *args, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _error(code: int, *args: str) -> str:
    result = _invoke("eval-samples", *args, "--device", "cpu")
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_npz_against_the_held_out_digits(train_npz: Path) -> None:
    out = _json(str(train_npz), "--ref", "builtin:digits")
    assert out["features"] == "digits" and out["feature_network"].startswith("digits-")
    assert out["num_samples"] == 300 and out["num_reference"] == 360
    assert out["reference"] == "builtin:digits (test split)"
    assert 0 < out["fd"] < 15 and out["precision"] > 0.8 and out["recall"] > 0.7
    assert out["kid"] is not None and out["kid_std"] > 0 and "fid" not in out


def test_batching_does_not_change_the_numbers_and_a_folder_gives_the_npz_numbers(train_npz: Path,
                                                                                tmp_path: Path) -> None:
    a = _json(str(train_npz), "--ref", "builtin:digits", "-b", "64")
    b = _json(str(train_npz), "--ref", "builtin:digits", "-b", "7", "--no-cache")
    for key in ("fd", "kid", "precision", "recall"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
    folder = tmp_path / "pngs"
    images = load_dataset("builtin:digits", split="train").images[:300]
    for i, image in enumerate(images):
        save_png(folder / f"{i:06d}.png", image)
    c = _json(str(folder), "--ref", "builtin:digits")
    assert c["fd"] == pytest.approx(a["fd"], rel=1e-9) and c["num_samples"] == 300


def test_a_checkpoint_is_sampled_and_evaluated_and_batching_changes_nothing(ckpt: Path) -> None:
    args = (str(ckpt), "--steps", "4", "-n", "40")  # no --ref: the checkpoint's builtin:digits, held-out split
    a = _json(*args, "-b", "40")
    b = _json(*args, "-b", "9")
    assert a["sampling"]["steps"] == 4 and a["sampling"]["num"] == 40 and a["num_samples"] == 40
    assert a["reference"] == "builtin:digits (test split)"
    for key in ("fd", "kid", "precision", "recall"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key
    assert a["fd"] > 20  # an untrained network makes no digits


def test_the_train_split_can_be_the_reference_and_saved_statistics_are_reused(train_npz: Path,
                                                                              tmp_path: Path) -> None:
    stats = tmp_path / "ref.safetensors"
    first = _json(str(train_npz), "--ref", "builtin:digits", "--ref-split", "train", "--save-ref", str(stats))
    assert first["num_reference"] == 1437 and first["saved_reference"] == str(stats)
    again = _json(str(train_npz), "--ref", str(stats))
    assert again["fd"] == pytest.approx(first["fd"], rel=1e-12)
    assert again["kid"] == pytest.approx(first["kid"], rel=1e-9)


def test_the_table_and_quiet(train_npz: Path) -> None:
    result = _invoke("eval-samples", str(train_npz), "--ref", "builtin:digits", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    for label in ("FD", "KID", "precision", "recall", "300", "360"):
        assert label in result.stdout


def test_inception_features_with_pytorch_fid_statistics(tmp_path: Path) -> None:
    weights = tmp_path / "random-inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    rgb = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    samples = save_npz(tmp_path / "rgb.npz", rgb)
    stats = tmp_path / "fid_stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048) * 1e-4)
    out = _json(str(samples), "--ref", str(stats), "--features-weights", str(weights))
    assert out["features"] == "inception" and out["fid"] == out["fd"] > 0
    assert out["kid"] is None and out["precision"] is None
    assert any("only mu and sigma" in note for note in out["notes"])


def test_rgb_samples_against_the_gray_digits_are_converted_and_the_notes_say_so(tmp_path: Path) -> None:
    rgb = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = _json(str(save_npz(tmp_path / "rgb.npz", rgb)), "--ref", "builtin:digits", "--features", "digits")
    assert any("RGB converted to grayscale" in n for n in out["notes"])
    assert any("16x16 to 8x8" in n for n in out["notes"])


# ------------------------------------------------------------------------------------------------ hostile input
def test_a_wrong_shaped_npz_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((4, 8, 8, 5), np.uint8))
    assert "must be uint8 images" in _error(1, str(bad), "--ref", "builtin:digits")
    np.savez(bad, arr_0=np.zeros((4, 8, 8, 1), np.float32))
    assert "must be uint8 images" in _error(1, str(bad), "--ref", "builtin:digits")
    np.savez(bad, images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.zeros(4))
    assert "samples are arr_0" in _error(1, str(bad), "--ref", "builtin:digits")


def test_a_pickled_npz_is_refused_without_running_it(tmp_path: Path) -> None:
    bad = tmp_path / "objects.npz"
    np.savez(bad, arr_0=np.array([{"not": "an image"}], dtype=object))
    assert "plain arrays" in _error(1, str(bad), "--ref", "builtin:digits")
    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps({"arr_0": 1}))
    assert _error(1, str(raw), "--ref", "builtin:digits")


def test_an_empty_folder_is_refused(tmp_path: Path, train_npz: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in _error(1, str(empty), "--ref", "builtin:digits")
    assert _error(1, str(train_npz), "--ref", str(empty))


def test_feature_weights_of_another_network_and_missing_weights(tmp_path: Path, train_npz: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save(DigitsClassifier().state_dict(), wrong)
    line = _error(1, str(train_npz), "--ref", "builtin:digits", "--features", "inception", "--features-weights",
                  str(wrong))
    assert "not the FID Inception-v3 weights" in line
    line = _error(1, str(train_npz), "--ref", "builtin:digits", "--features", "inception")
    assert "weights-inception-2015-12-05-6726825d.pth" in line and "DDPMCTL_INCEPTION_WEIGHTS" in line


def test_a_statistics_file_of_other_images_is_refused(tmp_path: Path, train_npz: Path) -> None:
    stats = tmp_path / "digits.safetensors"
    _json(str(train_npz), "--ref", "builtin:digits", "--save-ref", str(stats))
    rgb = save_npz(tmp_path / "rgb.npz", torch.zeros((5, 3, 16, 16), dtype=torch.uint8))
    assert "same size and colour" in _error(1, str(rgb), "--ref", str(stats))


def test_command_line_mistakes_exit_2(tmp_path: Path, train_npz: Path) -> None:
    assert "for a checkpoint" in _error(2, str(train_npz), "--ref", "builtin:digits", "--steps", "5")
    assert "--ref is needed" in _error(2, str(train_npz))
    assert _error(2, str(train_npz), "--features", "vgg")
    assert "does not exist" in _error(1, str(train_npz), "--ref", str(tmp_path / "absent"))
    assert _error(1, str(tmp_path / "absent.safetensors"), "--ref", "builtin:digits")


def test_a_run_folder_stands_for_its_newest_ema_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    # A (tiny) training run: the folder is evaluated as its newest EMA save, and says which.
    run = tmp_path / "run"
    trained = _invoke("train", "builtin:digits", "--out", str(run), "--model-channels", "8", "--channel-mult", "1,2",
                      "--res-blocks", "1", "--attention-resolutions", "4", "--timesteps", "20", "-b", "8",
                      "--max-steps", "2", "--save-every", "1", "--device", "cpu", "--quiet")
    assert trained.exit_code == 0, trained.output
    by_folder = _json(str(run), "--steps", "3", "-n", "16")
    by_file = _json(str(run / "ema_0.9999_000002.safetensors"), "--steps", "3", "-n", "16")
    assert by_folder["fd"] == pytest.approx(by_file["fd"], rel=1e-12)
    assert by_folder["samples"].endswith("ema_0.9999_000002.safetensors")
    told = _invoke("eval-samples", str(run), "--steps", "3", "-n", "16", "--device", "cpu")
    assert told.exit_code == 0 and "ema_0.9999_000002.safetensors" in told.output, told.output
