"""Feature networks that sample quality is measured with: the FID Inception-v3 and ddpmctl's digits classifier.

A :class:`FeatureExtractor` turns uint8 images [N, C, H, W] into float64 feature vectors [N, D] (``extract``), after
converting them to what its network takes (``adapt``: channels and size, each conversion reported as a note).

- ``digits``: a small classifier of 8x8 grayscale digits, trained on builtin:digits' train split by
  ``scripts/train_digits_features.py`` and shipped as ``ddpmctl/assets/digits_features.safetensors``. Its features
  are the 64 global averages of the last convolution (the analogue of Inception's pool_3); the Frechet distance on
  them is the "Frechet digits distance" (FD).
- ``inception``: the FID Inception-v3 (``ddpmctl.inception``) with the ported TF-2015 weights, from a file the user
  has (``--features-weights`` or ``DDPMCTL_INCEPTION_WEIGHTS``); never downloaded. The file is read without
  unpickling anything but tensors (``torch.load(weights_only=True)``), or as safetensors.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddpmctl.choices import FeatureName
from ddpmctl.errors import CheckpointError, FeaturesError
from ddpmctl.inception import FIDInceptionV3

__all__ = ["DIGITS_WEIGHTS", "FEATURE_NAMES", "INCEPTION_WEIGHTS_ENV", "INCEPTION_WEIGHTS_HELP", "DigitsClassifier",
           "FeatureExtractor", "digits_extractor", "inception_extractor", "load_feature_extractor"]

FEATURE_NAMES: tuple[str, ...] = ("digits", "inception")
DIGITS_WEIGHTS = "digits_features.safetensors"  # in ddpmctl/assets
DIGITS_SIZE = 8
INCEPTION_WEIGHTS_ENV = "DDPMCTL_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_HELP = (
    "the FID Inception-v3 weights (TF 2015-12-05, ported to PyTorch): torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth (its v0.2.0 release) or pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth (its fid_weights release); give the file with --features-weights PATH or "
    f"{INCEPTION_WEIGHTS_ENV}=PATH")

Progress = Callable[[int, int], None]  # (images done, total)


class DigitsClassifier(nn.Module):
    """8x8 grayscale digits in [-1, 1] -> 64 features (global average of the last convolution) -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3, padding=1)
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.relu(self.conv3(F.max_pool2d(x, 2)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _DigitsFeatures(nn.Module):
    """uint8 [N, 1, 8, 8] -> the classifier's 64 features (pixels scaled as the diffusion models see them)."""

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images_uint8.to(torch.float32) / 127.5 - 1.0)


def _to_gray(images: torch.Tensor) -> torch.Tensor:
    """RGB uint8 -> luma (ITU-R BT.601 weights, what PIL's convert("L") uses), rounded to uint8."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    return (images.to(torch.float64) * weights).sum(dim=1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 images to size x size, rounded back to uint8."""
    out = F.interpolate(images.to(torch.float32), size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


@dataclass
class FeatureExtractor:
    """A feature network with its input rules: ``extract(images)`` -> float64 features [N, dims].

    ``identity`` (name + the weights' SHA-256) keys cached reference statistics: other weights, other cache entry.
    """

    name: str
    network: nn.Module
    dims: int
    channels: int  # what the network takes: 1 (gray) or 3 (RGB)
    image_size: int | None  # None: any size (the network resizes itself)
    weights_sha256: str
    notes: list[str] = field(default_factory=list)

    @property
    def identity(self) -> str:
        return f"{self.name}-{self.weights_sha256[:16]}"

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def adapt(self, images: torch.Tensor, what: str = "images") -> tuple[torch.Tensor, list[str]]:
        """``images`` converted to the network's channels (and size, where it has one), with a note per change."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise FeaturesError(f"{what}: expected uint8 images [N, 1 or 3, H, W], got {images.dtype} "
                                f"{tuple(images.shape)}")
        notes: list[str] = []
        if images.shape[1] == 3 and self.channels == 1:
            images = _to_gray(images)
            notes.append(f"{what}: RGB converted to grayscale (BT.601 luma) for the {self.name} features")
        elif images.shape[1] == 1 and self.channels == 3:
            images = images.expand(-1, 3, -1, -1)
            notes.append(f"{what}: grayscale repeated to 3 channels for the {self.name} features")
        if self.image_size is not None and images.shape[-2:] != (self.image_size, self.image_size):
            notes.append(f"{what}: resized from {images.shape[-2]}x{images.shape[-1]} to "
                         f"{self.image_size}x{self.image_size} for the {self.name} features")
            images = _resize(images, self.image_size)
        return images, notes

    def extract(self, images: torch.Tensor, *, batch_size: int = 64, callback: Progress | None = None) -> torch.Tensor:
        """Features [N, dims] (float64, CPU) of uint8 images already adapted; fp32 network, no autocast.

        The network sees fixed blocks of ``batch_size`` images in eval mode: a batch size changes a feature only at
        float rounding (per-image convolutions), never the images each feature comes from."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        total = int(images.shape[0])
        out = torch.empty((total, self.dims), dtype=torch.float64)
        self.network.eval()
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            for start in range(0, total, batch_size):
                batch = images[start:start + batch_size].to(self.device)
                out[start:start + batch.shape[0]] = self.network(batch).to("cpu", torch.float64)
                if callback is not None:
                    callback(min(start + batch_size, total), total)
        return out


def _check_state(network: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    """FeaturesError naming the first difference between a weights file and the network it should fill."""
    expected = {k: v.shape for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    got = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != got[k])
    for names, problem in ((missing, "lacks"), (extra, "has unexpected"), (wrong, "has misshapen")):
        if names:
            raise FeaturesError(f"{path} is not {what}: it {problem} tensors ({', '.join(names[:3])}"
                                f"{', ...' if len(names) > 3 else ''}; {len(names)} in all)")


def _fill(network: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    _check_state(network, state, path, what)
    floats = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()
              if not k.endswith("num_batches_tracked")}
    network.load_state_dict(floats, strict=False)
    network.requires_grad_(False)
    network.eval()


def _file_sha256(path: Path) -> str:
    from ddpmctl.fileio import file_sha256

    try:
        return file_sha256(path)
    except CheckpointError as err:
        raise FeaturesError(str(err)) from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a PyTorch file, unpickling nothing but tensors and containers."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:2] == b"PK" or (len(head) >= 2 and head[0] == 0x80):  # torch.save: a zip archive or a bare pickle
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as err:
            reason = " ".join(str(err).split())[:160]
            raise FeaturesError(f"{path} was refused: it is not a plain file of tensors (torch.load with "
                                f"weights_only=True: {reason})") from None
    else:
        from ddpmctl.fileio import load_tensors

        try:
            state, _ = load_tensors(path)
        except CheckpointError as err:
            raise FeaturesError(f"{path} is neither a PyTorch weights file nor a readable safetensors file ({err})") \
                from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise FeaturesError(f"{path} holds no state dict (a mapping of names to tensors)")
    return dict(state)


def inception_extractor(weights: str | os.PathLike[str] | None = None, *,
                        device: str | torch.device = "cpu") -> FeatureExtractor:
    """The FID Inception-v3 from ``weights`` (else ``$DDPMCTL_INCEPTION_WEIGHTS``); FeaturesError when missing."""
    source = weights if weights is not None else os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    if source is None:
        raise FeaturesError(f"--features inception needs {INCEPTION_WEIGHTS_HELP}")
    path = Path(source)
    if not path.is_file():
        raise FeaturesError(f"{path} does not exist or is not a file: --features inception needs "
                            f"{INCEPTION_WEIGHTS_HELP}")
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the caller's RNG alone
        network = FIDInceptionV3()
    _fill(network, _read_weights(path), str(path), "the FID Inception-v3 weights")
    return FeatureExtractor(name="inception", network=network.to(device), dims=2048, channels=3, image_size=None,
                            weights_sha256=_file_sha256(path))


def digits_extractor(*, device: str | torch.device = "cpu",
                     weights: str | os.PathLike[str] | None = None) -> FeatureExtractor:
    """The digits classifier's features; the packaged weights unless ``weights`` names another safetensors file."""
    from ddpmctl.fileio import load_tensors

    path = Path(weights) if weights is not None else Path(str(resources.files("ddpmctl") / "assets" / DIGITS_WEIGHTS))
    try:
        state, _ = load_tensors(path)
    except CheckpointError as err:
        hint = "" if weights is not None else " (the packaged digits feature network: reinstall ddpmctl)"
        raise FeaturesError(f"{err}{hint}") from None
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the caller's RNG alone
        classifier = DigitsClassifier()
    _fill(classifier, state, str(path), "the digits feature network's weights")
    return FeatureExtractor(name="digits", network=_DigitsFeatures(classifier).to(device), dims=64, channels=1,
                            image_size=DIGITS_SIZE, weights_sha256=_file_sha256(path))


def load_feature_extractor(name: FeatureName, *, weights: str | os.PathLike[str] | None = None,
                           device: str | torch.device = "cpu") -> FeatureExtractor:
    """``digits`` or ``inception`` (see the module docstring); ``weights`` overrides the file."""
    if name == "digits":
        return digits_extractor(device=device, weights=weights)
    if name == "inception":
        return inception_extractor(weights, device=device)
    raise FeaturesError(f"unknown feature network {name!r}: choose one of {', '.join(FEATURE_NAMES)}")
