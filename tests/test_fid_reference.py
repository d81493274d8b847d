"""Our FID pipeline (network, TF 1.x resize, Frechet distance, KID) equals torch-fidelity's on the same weights and
images. Real Inception weights cannot be fetched here, so both load the same random-init weights file.

torch-fidelity is a test dependency that ``make install`` adds without its dependencies (``pip install --no-deps``):
its package imports torchvision, whose PyPI build needs the CUDA torch, not the CPU one the project runs on. None of
the torch-fidelity code used here (the Inception-v3 extractor and the FID / KID functions) calls torchvision, so
where torchvision cannot be imported the test gives the import an empty stand-in module. Without torch-fidelity the
test is skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from ddpmctl.features import inception_extractor
from ddpmctl.inception import FIDInceptionV3
from ddpmctl.metrics import kernel_inception_distance
from ddpmctl.quality import evaluate_features
from ddpmctl.refstats import ReferenceStats
from ddpmctl.metrics import gaussian_stats


def _stand_in_torchvision() -> None:
    """An empty ``torchvision`` (with the names torch-fidelity imports at module level) when the real one fails."""
    try:
        importlib.import_module("torchvision")
        return
    except Exception:  # noqa: BLE001 - a CUDA torchvision on CPU torch raises RuntimeError, absent: ImportError
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    root = types.ModuleType("torchvision")
    for sub in ("datasets", "transforms", "transforms.functional", "models"):
        sys.modules[f"torchvision.{sub}"] = types.ModuleType(f"torchvision.{sub}")
    sys.modules["torchvision"] = root
    root.datasets = sys.modules["torchvision.datasets"]  # type: ignore[attr-defined]
    root.transforms = sys.modules["torchvision.transforms"]  # type: ignore[attr-defined]
    root.models = sys.modules["torchvision.models"]  # type: ignore[attr-defined]
    root.transforms.functional = sys.modules["torchvision.transforms.functional"]  # type: ignore[attr-defined]
    for name in ("CIFAR10", "CIFAR100", "STL10"):
        setattr(root.datasets, name, object)  # type: ignore[attr-defined]


def _torch_fidelity() -> types.ModuleType:
    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("torch-fidelity is not installed (make install adds it)")
    _stand_in_torchvision()
    return importlib.import_module("torch_fidelity")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights scaled so that activations neither vanish nor explode through 94 layers (He init, random
    batch-norm statistics), saved as a PyTorch state dict like the real weights file."""
    g = torch.Generator().manual_seed(0)
    state = FIDInceptionV3().state_dict()
    for name, tensor in state.items():
        if name.endswith("conv.weight") or name == "fc.weight":
            fan_in = tensor[0].numel()
            state[name] = torch.randn(tensor.shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(tensor.shape, generator=g)
        elif name.endswith(("running_mean", "bn.bias", "fc.bias")):
            state[name] = 0.1 * torch.randn(tensor.shape, generator=g)
        elif name.endswith("bn.weight"):
            state[name] = 1 + 0.1 * torch.randn(tensor.shape, generator=g)
    path = tmp_path_factory.mktemp("inception") / "weights-random.pth"
    torch.save(state, path)
    return path


def _images(seed: int, n: int, size: int, shift: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 200, (n, 3, size, size), generator=g)
    return (base + shift).clamp(0, 255).to(torch.uint8)


def test_fid_and_kid_equal_torch_fidelity_on_the_same_weights(weights: Path) -> None:
    tf = _torch_fidelity()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    n = 8
    fake, real = _images(1, n, 21, 40), _images(2, n, 21, 0)  # 21 px: the resize to 299 is not a whole factor
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        their_fake, their_real = theirs(fake)[0], theirs(real)[0]
    ours = inception_extractor(weights)
    our_fake, our_real = ours.extract(fake, batch_size=4), ours.extract(real, batch_size=3)
    torch.testing.assert_close(our_fake, their_fake.double(), rtol=1e-4, atol=1e-5)
    assert float(our_fake.std()) > 1e-2  # features that carry signal, not a collapsed network

    their_fid = fid_statistics_to_metric(fid_features_to_statistics(their_fake), fid_features_to_statistics(their_real),
                                         verbose=False)[tf.KEY_METRIC_FID]
    mu, sigma = gaussian_stats(our_real)
    report = evaluate_features(our_fake, ReferenceStats(network="inception", mu=mu, sigma=sigma, num_images=n,
                                                        features=our_real), network="inception")
    assert report.fd == pytest.approx(their_fid, rel=1e-4)
    assert their_fid > 1e-3

    # KID with subsets as large as the sets: every subset is the whole set in some order, so both libraries'
    # random subset draws give the same value and the comparison does not depend on their generators.
    their_kid = kid_features_to_metric(their_fake, their_real, kid_subsets=3, kid_subset_size=n, verbose=False,
                                       kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                       kid_kernel_poly_coef0=1)[tf.KEY_METRIC_KID_MEAN]
    our_kid = kernel_inception_distance(our_fake, our_real, subsets=3, subset_size=n).mean
    assert our_kid == pytest.approx(their_kid, rel=1e-4)
    assert report.kid == pytest.approx(their_kid, rel=1e-4)
