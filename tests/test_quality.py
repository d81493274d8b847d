"""ddpmctl.quality and ddpmctl.refstats: the one-call API, the reference cache, statistics files (ours and
pytorch-fid's mu/sigma), hostile statistics files, and the digits FD of a barely trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ddpmctl.data import load_dataset
from ddpmctl.errors import DataError, FeaturesError
from ddpmctl.quality import (evaluate_images, load_feature_extractor, load_reference_file, reference_for_dataset,
                             reference_from_images)
from ddpmctl.refstats import ReferenceStats, save_reference


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DDPMCTL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_feature_extractor("digits")


def _train_images() -> torch.Tensor:
    return load_dataset("builtin:digits", split="train").images


def test_train_split_against_the_held_out_reference(digits) -> None:  # type: ignore[no-untyped-def]
    reference = reference_for_dataset("builtin:digits", digits)
    assert reference.num_images == 360 and reference.image_shape == (1, 8, 8)
    report = evaluate_images(_train_images(), reference, digits)
    assert report.features == "digits" and report.num_samples == 1437 and report.num_reference == 360
    assert 0 < report.fd < 10
    assert report.precision > 0.8 and report.recall > 0.8
    assert abs(report.kid) < 3 * report.kid_std
    assert report.kid_subset_size == 360
    as_dict = report.to_dict()
    assert set(as_dict) >= {"fd", "kid", "kid_std", "precision", "recall", "num_samples", "num_reference", "features"}


def test_the_reference_is_cached_by_content_and_network(digits, _cache: Path,  # type: ignore[no-untyped-def]
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    images = load_dataset("builtin:digits", split="test").images
    first = reference_from_images(images, digits, source="test")
    assert len(list((_cache / "refstats").iterdir())) == 1

    def no_extraction(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the cached statistics should have been used")

    monkeypatch.setattr(type(digits), "extract", no_extraction)
    again = reference_from_images(images.clone(), digits, source="test")
    torch.testing.assert_close(again.sigma, first.sigma, rtol=0, atol=0)
    torch.testing.assert_close(again.features, first.features, rtol=0, atol=0)
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    with pytest.raises(AssertionError, match="cached"):
        reference_from_images(changed, digits)


def test_our_statistics_file_round_trips_and_is_checked_against_the_network(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reference = reference_for_dataset("builtin:digits", digits)
    path = save_reference(tmp_path / "digits-test.safetensors", reference)
    loaded = load_reference_file(path)
    assert loaded.network == digits.identity and loaded.image_shape == (1, 8, 8)
    a = evaluate_images(_train_images(), reference, digits)
    b = evaluate_images(_train_images(), loaded, digits)
    assert b.fd == pytest.approx(a.fd, rel=1e-12) and b.kid == pytest.approx(a.kid, rel=1e-9)
    assert (b.precision, b.recall) == (a.precision, a.recall)
    other = ReferenceStats(network="inception-0123456789abcdef", mu=torch.zeros(2048), sigma=torch.eye(2048),
                           num_images=5)
    with pytest.raises(FeaturesError, match="inception statistics but the features are digits"):
        evaluate_images(_train_images(), other, digits)


def test_pytorch_fid_statistics_give_the_frechet_distance_only(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reference = reference_for_dataset("builtin:digits", digits)
    npz = tmp_path / "stats.npz"
    np.savez(npz, mu=reference.mu.numpy(), sigma=reference.sigma.numpy())
    loaded = load_reference_file(npz)
    assert loaded.features is None and loaded.network == "inception"
    mu_sigma_only = ReferenceStats(network="digits", mu=loaded.mu, sigma=loaded.sigma, num_images=0)
    report = evaluate_images(_train_images(), mu_sigma_only, digits)
    assert report.fd == pytest.approx(evaluate_images(_train_images(), reference, digits).fd, rel=1e-12)
    assert report.kid is None and report.precision is None and report.recall is None
    assert any("only mu and sigma" in note for note in report.notes)


@pytest.mark.parametrize("arrays, message", [
    ({"arr_0": np.zeros((3, 8, 8, 1), np.uint8)}, "needs mu and sigma"),
    ({"mu": np.zeros(4), "sigma": np.zeros((3, 3))}, "mu must be"),
    ({"mu": np.zeros(4), "sigma": np.full((4, 4), np.nan)}, "NaN"),
    ({"mu": np.array([{"a": 1}], dtype=object), "sigma": np.eye(1)}, "plain arrays"),
])
def test_hostile_statistics_files_are_one_line_data_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as err:
        load_reference_file(path)
    assert "\n" not in str(err.value)


def test_a_checkpoint_or_garbage_is_not_a_statistics_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="not a statistics file"):
        load_reference_file(junk)
    with pytest.raises(DataError, match="cannot read"):
        load_reference_file(tmp_path / "absent.npz")


def test_samples_and_reference_of_other_shapes_are_refused(digits) -> None:  # type: ignore[no-untyped-def]
    reference = reference_for_dataset("builtin:digits", digits)
    rgb = torch.zeros((4, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(DataError, match="3-channel 8x8 images but the reference .* is 1-channel 8x8"):
        evaluate_images(rgb, reference, digits)
    with pytest.raises(DataError, match="at least 2 samples"):
        evaluate_images(torch.zeros((1, 1, 8, 8), dtype=torch.uint8), reference, digits)


def test_a_model_trained_for_60_steps_is_far_from_the_digits(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ddpmctl.checkpoint import load_checkpoint
    from ddpmctl.config import TrainConfig
    from ddpmctl.samplers import generate, get_sampler
    from ddpmctl.train import train

    config = TrainConfig(data="builtin:digits", model_channels=16, channel_mult=(1, 2), res_blocks=1,
                         attention_resolutions=(4,), timesteps=20, batch_size=16, lr=2e-3, max_steps=60,
                         log_every=1000, save_every=1000, out=str(tmp_path / "run"))
    result = train(config, device=torch.device("cpu"))
    images, _ = generate(load_checkpoint(result.ema_checkpoint), get_sampler("ddim")(), num=200, batch_size=200,
                         seed=0, steps=10, output="uint8")
    reference = reference_for_dataset("builtin:digits", digits)
    barely_trained = evaluate_images(images, reference, digits)
    real_digits = evaluate_images(_train_images(), reference, digits)
    assert barely_trained.fd > 20 * real_digits.fd  # measured 226 against 3.6
    assert barely_trained.precision < real_digits.precision
