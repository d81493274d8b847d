"""Feature networks: the shipped digits classifier (accuracy, FD behaviour) and loading the FID Inception-v3 weights
(random-init files here; real weights cannot be fetched), including hostile weights files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from ddpmctl.fileio import save_tensors
from ddpmctl.data import load_dataset
from ddpmctl.errors import FeaturesError
from ddpmctl.features import (DIGITS_WEIGHTS, DigitsClassifier, digits_extractor, inception_extractor,
                              load_feature_extractor)
from ddpmctl.inception import FIDInceptionV3, resize_bilinear_tf1
from ddpmctl.metrics import frechet_distance, gaussian_stats

ASSETS = Path(__file__).resolve().parent.parent / "ddpmctl" / "assets"


def _fd(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def test_the_shipped_digits_network_is_small_and_accurate_on_held_out_digits() -> None:
    path = ASSETS / DIGITS_WEIGHTS
    assert path.stat().st_size < 1_000_000
    extractor = digits_extractor()
    test = load_dataset("builtin:digits", split="test", class_cond=True)
    classifier = extractor.network.classifier
    with torch.no_grad():
        logits = classifier(test.images.float() / 127.5 - 1)
    accuracy = float((logits.argmax(dim=1) == test.labels).float().mean())
    assert accuracy >= 0.97, accuracy  # measured 0.981 (353 of 360) when it was trained


def test_digits_fd_is_small_between_splits_and_large_for_noise_and_blur() -> None:
    extractor = digits_extractor()
    test = extractor.extract(load_dataset("builtin:digits", split="test").images)
    train_images = load_dataset("builtin:digits", split="train").images
    train = extractor.extract(train_images)
    noise = extractor.extract(torch.randint(0, 256, (400, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                                            dtype=torch.uint8))
    blurred = torch.nn.functional.avg_pool2d(train_images.float(), 3, 1, 1, count_include_pad=False)
    blur = extractor.extract(blurred.round().to(torch.uint8))
    between_splits = _fd(test, train)
    assert between_splits < 10
    assert _fd(test, noise) > 20 * between_splits
    assert _fd(test, blur) > 20 * between_splits


def test_batch_size_changes_features_only_at_float_rounding() -> None:
    extractor = digits_extractor()
    images = load_dataset("builtin:digits", split="test").images
    whole = extractor.extract(images, batch_size=360)
    pieces = extractor.extract(images, batch_size=7)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    reference = extractor.extract(load_dataset("builtin:digits", split="train").images)
    assert _fd(pieces, reference) == pytest.approx(_fd(whole, reference), rel=1e-6)


def test_adapt_converts_channels_and_size_and_says_so() -> None:
    extractor = digits_extractor()
    rgb = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    adapted, notes = extractor.adapt(rgb, "samples")
    assert adapted.shape == (3, 1, 8, 8) and adapted.dtype == torch.uint8
    assert any("grayscale" in n for n in notes) and any("16x16 to 8x8" in n for n in notes)
    gray = torch.full((2, 1, 8, 8), 7, dtype=torch.uint8)
    same, none = extractor.adapt(gray)
    assert none == [] and torch.equal(same, gray)
    with pytest.raises(FeaturesError, match="uint8"):
        extractor.adapt(gray.float())


def test_tf1_bilinear_resize_maps_output_pixel_i_to_source_i_times_in_over_out() -> None:
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    out = resize_bilinear_tf1(x, 4)
    # Source coordinates 0, 0.5, 1, 1.5 (the last clamped to pixel 1): no half-pixel offset, unlike torch's default.
    row = torch.tensor([0.0, 5.0, 10.0, 10.0])
    expected = torch.stack([row, row + 10, row + 20, row + 20])
    torch.testing.assert_close(out[0, 0], expected)
    y = torch.rand(1, 3, 5, 5)
    torch.testing.assert_close(resize_bilinear_tf1(y, 5), y)


# --------------------------------------------------------------------------------------------- Inception weights
@pytest.fixture(scope="module")
def random_inception_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return FIDInceptionV3().state_dict()


def test_inception_loads_a_pth_state_dict_and_a_safetensors_copy(tmp_path: Path,
                                                                  random_inception_state: dict) -> None:
    pth = tmp_path / "inception.pth"
    torch.save(random_inception_state, pth)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    from_pth = inception_extractor(pth)
    features = from_pth.extract(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float64
    copy = save_tensors(tmp_path / "inception.safetensors", random_inception_state)
    from_copy = load_feature_extractor("inception", weights=copy)
    torch.testing.assert_close(from_copy.extract(images), features, rtol=0, atol=0)
    assert from_pth.identity != from_copy.identity  # keyed by the file's bytes


def test_inception_weights_from_the_environment_variable(tmp_path: Path, random_inception_state: dict,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pth = tmp_path / "w.pth"
    torch.save(random_inception_state, pth)
    monkeypatch.setenv("DDPMCTL_INCEPTION_WEIGHTS", str(pth))
    assert inception_extractor().name == "inception"


def test_missing_inception_weights_say_where_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DDPMCTL_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FeaturesError, match="weights-inception-2015-12-05-6726825d.pth") as err:
        inception_extractor()
    assert "\n" not in str(err.value)
    with pytest.raises(FeaturesError, match="does not exist.*pt_inception-2015-12-05-6726825d.pth"):
        inception_extractor(tmp_path / "absent.pth")


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    wrong = tmp_path / "digits.pth"
    torch.save(DigitsClassifier().state_dict(), wrong)
    with pytest.raises(FeaturesError, match="is not the FID Inception-v3 weights: it lacks tensors"):
        inception_extractor(wrong)
    inception = tmp_path / "inception.safetensors"
    save_tensors(inception, FIDInceptionV3().state_dict())
    with pytest.raises(FeaturesError, match="not the digits feature network"):
        digits_extractor(weights=inception)


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))  # type: ignore[attr-defined]


@pytest.mark.parametrize("zipped", [True, False])
def test_a_pickle_with_code_is_refused_and_never_run(tmp_path: Path, zipped: bool) -> None:
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker  # type: ignore[attr-defined]
    path = tmp_path / "evil.pth"
    if zipped:
        torch.save({"Conv2d_1a_3x3.conv.weight": payload}, path)
    else:
        path.write_bytes(pickle.dumps({"x": payload}, protocol=2))
    with pytest.raises(FeaturesError, match="refused"):
        inception_extractor(path)
    assert not marker.exists()


def test_garbage_weights_are_one_line_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not weights at all" * 10)
    with pytest.raises(FeaturesError) as err:
        inception_extractor(junk)
    assert "\n" not in str(err.value)


def test_loading_a_feature_network_leaves_the_global_random_state_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    digits_extractor()
    weights = tmp_path / "w.safetensors"
    save_tensors(weights, FIDInceptionV3().state_dict())
    torch.manual_seed(123)
    digits_extractor()
    inception_extractor(weights)
    assert torch.equal(torch.rand(3), expected)
