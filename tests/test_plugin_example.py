"""The example plugin (examples/ddpmctl-heun) installs with pip, is listed, passes the contract and samples.

pip installs it into a temporary ``--target`` folder (no network: ``--no-deps --no-build-isolation``), which is put
on sys.path for the test: importlib.metadata then finds its dist-info and entry point exactly as it would in a
virtualenv, and the shared environment is never modified.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ddpmctl import samplers
from ddpmctl.build import build_model
from ddpmctl.checkpoint import save_checkpoint
from ddpmctl.cli.app import app
from ddpmctl.config import CheckpointConfig, DiffusionConfig, ModelConfig
from ddpmctl.testing import check_sampler

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddpmctl-heun"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources, never in the checkout.
    source = tmp_path_factory.mktemp("src") / "ddpmctl-heun"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    sys.path.insert(0, str(target))
    samplers.reset_registry()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("ddpmctl_heun", None)
    samplers.reset_registry()


def test_listed_with_its_package(installed: Path) -> None:
    result = CliRunner().invoke(app, ["samplers", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["heun"]["ok"], rows["heun"]
    assert rows["heun"]["package"] == "ddpmctl-heun 0.2.0"
    assert rows["heun"]["entry_point"] == "ddpmctl_heun:HeunSampler"
    assert {o["name"] for o in rows["heun"]["options"]} == {"spacing", "clip_denoised"}
    assert rows["ddim"]["ok"]  # the built-ins are unaffected


def test_passes_contract_and_its_own_tests(installed: Path) -> None:
    check_sampler(samplers.get_sampler("heun"))
    spec = importlib.util.spec_from_file_location("example_heun_tests", EXAMPLE / "tests" / "test_heun.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in dir(module):
        if name.startswith("test_"):
            getattr(module, name)()


def test_samples_through_the_cli(installed: Path, tmp_path: Path) -> None:
    model = ModelConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(4,))
    ckpt = save_checkpoint(tmp_path / "m.safetensors", dict(build_model(CheckpointConfig(model=model, diffusion=DiffusionConfig(timesteps=50))).state_dict()),
                           CheckpointConfig(model=model, diffusion=DiffusionConfig(timesteps=50)),
                           kind="model", lineage=[])
    out = tmp_path / "s"
    result = CliRunner().invoke(app, ["sample", str(ckpt), "--sampler", "heun", "--steps", "6", "--num", "3",
                                      "--out", str(out), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 6
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        assert f["arr_0"].shape == (3, 8, 8, 1)
