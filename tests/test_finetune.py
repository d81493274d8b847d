"""`train --init-from CKPT`: a new run from a checkpoint's weights (new optimizer, step 0), the checkpoint's network
by default, recorded in the lineage; a checkpoint whose network differs is one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import invoke_cli, one_error_line, tensors
from ddpmctl.checkpoint import read_checkpoint_info

TINY = ["--model-channels", "16", "--channel-mult", "1,2", "--res-blocks", "1", "--attention-resolutions", "4",
        "--timesteps", "50", "--batch-size", "8", "--device", "cpu", "--quiet"]




@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("parent") / "run"
    result = invoke_cli("train", "builtin:digits", "--out", str(run), *TINY, "--max-steps", "3", "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    return run / "model_000003.safetensors"


def test_fine_tuning_starts_from_the_weights(parent: Path, tmp_path: Path) -> None:
    run = tmp_path / "child"
    # No network flags: they come from the checkpoint. A near-1 EMA without warm-up keeps the starting weights.
    result = invoke_cli("train", "builtin:digits", "--init-from", str(parent), "--out", str(run), "--batch-size", "8",
                    "--max-steps", "1", "--ema-warmup", "none", "--ema", "0.999999", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    start, ema = tensors(parent), tensors(run / "ema_0.999999_000001.safetensors")
    trained = tensors(run / "model_000001.safetensors")
    assert start.keys() == ema.keys()
    for name in start:
        assert torch.allclose(ema[name], start[name], atol=1e-5), name  # started from the parent, not at random
    assert any(not torch.equal(trained[n], start[n]) for n in start)  # and trained one step from there
    # step 0 and a new optimizer: the save is at step 1 and Adam has taken one step
    state = json.loads((run / "state_000001.json").read_text())
    assert state["step"] == 1
    steps = [v for k, v in tensors(run / "state_000001.safetensors").items() if k.endswith(".step")]
    assert steps and all(float(s) == 1.0 for s in steps)
    info = read_checkpoint_info(run / "model_000001.safetensors")
    assert info.config.model == read_checkpoint_info(parent).config.model
    ops = [entry["op"] for entry in info.lineage]
    assert ops == ["train", "init", "train"]
    assert info.lineage[1]["from"] == parent.name and len(info.lineage[1]["sha256"]) == 64
    assert info.lineage[0]["run"] == "run" and info.lineage[2]["run"] == "child"


def test_a_fine_tuned_run_resumes_without_its_parent(parent: Path, tmp_path: Path) -> None:
    copy = tmp_path / "parent.safetensors"
    copy.write_bytes(parent.read_bytes())
    run = tmp_path / "child"
    base = ["train", "builtin:digits", "--init-from", str(copy), "--out", str(run), "--batch-size", "8",
            "--device", "cpu", "--quiet"]
    assert invoke_cli(*base, "--max-steps", "1").exit_code == 0
    copy.unlink()  # resuming needs the run folder only
    result = invoke_cli("train", "--out", str(run), "--resume", "--max-steps", "2", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    lineage = read_checkpoint_info(run / "model_000002.safetensors").lineage
    assert [entry["op"] for entry in lineage] == ["train", "init", "train"]


@pytest.mark.parametrize(("change", "words"), [
    (["--model-channels", "32"], "model_channels (checkpoint 16, this run 32)"),
    (["--var-type", "fixed-small", "--loss", "simple"], "output channels"),
    (["--image-size", "16"], "image_size (checkpoint 8, this run 16)"),
])
def test_a_different_network_is_refused_in_one_error_line(parent: Path, tmp_path: Path, change: list[str],
                                                   words: str) -> None:
    run = tmp_path / "child"
    line = one_error_line(invoke_cli("train", "builtin:digits", "--init-from", str(parent), "--out", str(run), *change,
                           "--max-steps", "1", "--device", "cpu", "--quiet"), 2)
    assert words in line and "--init-from" in line, line
    assert not any(run.glob("*.safetensors"))


def test_a_bad_checkpoint_is_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    line = one_error_line(invoke_cli("train", "builtin:digits", "--init-from", str(bad), "--out", str(tmp_path / "r"),
                           "--max-steps", "1", "--device", "cpu"), 1)
    assert str(bad) in line


def test_a_ddgan_run_cannot_start_from_a_diffusion_checkpoint(parent: Path, tmp_path: Path) -> None:
    result = invoke_cli("train", "builtin:digits", "--method", "ddgan", "--init-from", str(parent), "--out",
                        str(tmp_path / "gan"), "--max-steps", "1", "--device", "cpu", "--quiet")
    line = one_error_line(result, 2)
    assert "--init-from" in line and "--method ddgan" in line
    assert not (tmp_path / "gan").exists()
