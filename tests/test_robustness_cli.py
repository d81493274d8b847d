"""Hardening through the command line: every command x bad input gives one line and the right exit code
(2: the command line itself is wrong; 1: a file, folder, checkpoint or the data is), never a traceback, and
``--out`` never overwrites silently. Also: untrusted checkpoints through every command that reads one, hostile data
through ``ddpmctl train``, non-finite losses, out-of-memory, and a torchrun rank that dies.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import ddpmctl.train as train_module
from ddpmctl.build import build_model
from ddpmctl.checkpoint import save_checkpoint
from ddpmctl.cli.app import app
from ddpmctl.config import CheckpointConfig, DataInfo, DiffusionConfig, ModelConfig

T = 8
MODEL = ModelConfig(image_size=8, in_channels=1, model_channels=16, num_res_blocks=1,
                    attention_resolutions=(4,), channel_mult=(1, 2), num_heads=1)
DATA = DataInfo(source="builtin:digits", image_size=8, channels=1, num_images=1437)
TRAIN_TINY = ["--model-channels", "16", "--channel-mult", "1,2", "--res-blocks", "1", "--attention-resolutions", "4",
              "--timesteps", "50", "--batch-size", "8", "--max-steps", "2", "--device", "cpu"]



@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good checkpoint and every kind of bad one, plus a small PNG folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("robust_cli")
    torch.manual_seed(0)
    good = save_checkpoint(root / "good.safetensors", build_model(CheckpointConfig(model=MODEL, diffusion=DiffusionConfig(timesteps=T))).state_dict(),
                           CheckpointConfig(model=MODEL, diffusion=DiffusionConfig(timesteps=T), data=DATA),
                           kind="model", lineage=[])
    raw = good.read_bytes()
    bad = {
        "truncated": raw[: len(raw) // 3],
        "random": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                      dtype=torch.uint8).tolist()),
        "pickle": b"\x80\x04" + pickle.dumps({"state_dict": [1, 2, 3]})[2:],
        "empty": b"",
    }
    out = {"good": good}
    for name, payload in bad.items():
        (root / f"{name}.safetensors").write_bytes(payload)
        out[name] = root / f"{name}.safetensors"
    (root / "model.pt").write_bytes(bad["pickle"])
    out["pt"] = root / "model.pt"
    import safetensors.torch

    out["foreign"] = root / "foreign.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(3)}, str(out["foreign"]), metadata={"framework": "other"})
    out["directory"] = root / "folder.safetensors"
    out["directory"].mkdir()
    out["missing"] = root / "missing.safetensors"
    images = root / "rgb16"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(images / f"{i}.png")
    out["rgb16"] = images
    return out


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def one_line(result: Any, code: int) -> str:
    """Exit ``code``, exactly one 'error: ...' line on stderr, no traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ----------------------------------------------------------------------------------- untrusted checkpoints
READERS = {
    "info": lambda c, tmp: ["info", c],
    "sample": lambda c, tmp: ["sample", c, "--out", str(tmp / "s"), "--num", "1", "--steps", "1", "--device", "cpu"],
    "eval-nll": lambda c, tmp: ["eval-nll", c, "--device", "cpu", "-n", "1"],
    "respace": lambda c, tmp: ["respace", c, "--steps", "2", "--out", str(tmp / "r.safetensors")],
    "distill": lambda c, tmp: ["distill", c, "--data", "builtin:digits", "--out", str(tmp / "d"), "--from-steps",
                               "4", "--to-steps", "2", "--iters-per-stage", "1", "--device", "cpu", "--quiet"],
}


@pytest.mark.parametrize("bad", ["truncated", "random", "foreign", "pickle", "pt", "empty", "directory", "missing"])
@pytest.mark.parametrize("command", sorted(READERS))
def test_untrusted_checkpoint_is_one_line_naming_the_file(files: dict[str, Path], tmp_path: Path, command: str,
                                                          bad: str) -> None:
    path = files[bad]
    line = one_line(invoke(*READERS[command](str(path), tmp_path)), 1)
    assert str(path) in line or path.name in line, line
    assert not (tmp_path / "s").exists() and not (tmp_path / "r.safetensors").exists()
    if bad in ("pickle", "pt"):
        assert "pickle" in line


class _RunsCode:
    """Unpickling this runs os.system (a classic pickle exploit): it must never be unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _hostile_pt(root: Path, kind: str) -> Path:
    """improved-diffusion's checkpoint layout (a torch.save zip of a pickled dict) holding what it must not."""
    path = root / f"{kind}.pt"
    weight = torch.zeros(2, 2)
    payload: Any = {
        "non-tensor": {"input_blocks.0.0.weight": weight, "step": 500000},
        "nested": {"state_dict": {"input_blocks.0.0.weight": weight}},
        "optimizer": {"state": {0: {"exp_avg": weight}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        "object": {"input_blocks.0.0.weight": weight, "args": argparse.Namespace(lr=1e-4)},
        "exploit": {"input_blocks.0.0.weight": weight, "x": _RunsCode(root / "pwned")},
        "int-tensor": {"input_blocks.0.0.weight": torch.zeros(2, dtype=torch.int64)},
        "list": [weight],
        "empty": {},
    }[kind]
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(("kind", "words"), [
    ("non-tensor", "entry 'step' is a int"), ("nested", "entry 'state_dict' is a dict"),
    ("optimizer", "entry 'state' is a dict"), ("object", "Python object"),
    ("exploit", "Python object"), ("int-tensor", "not a dense floating-point"),
    ("list", "holds a list, not a state dict"), ("empty", "empty state dict"),
])
def test_convert_reads_tensors_only(tmp_path: Path, kind: str, words: str) -> None:
    path = _hostile_pt(tmp_path, kind)
    out = tmp_path / "out.safetensors"
    line = one_line(invoke("convert", str(path), "--out", str(out)), 1)
    assert words in line and str(path) in line, line
    assert not out.exists() and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("bad", ["truncated", "random", "good", "foreign", "pickle", "empty", "directory", "missing"])
def test_convert_refuses_what_is_no_state_dict(files: dict[str, Path], tmp_path: Path, bad: str) -> None:
    out = tmp_path / "out.safetensors"
    line = one_line(invoke("convert", str(files[bad]), "--out", str(out)), 1)
    assert str(files[bad]) in line, line
    assert not out.exists()


# ----------------------------------------------------------------------------------- commands x bad inputs
def _good(files: dict[str, Path]) -> str:
    return str(files["good"])


# (command line built from the fixture files and tmp_path, exit code, words the error line must contain)
CASES: list[tuple[str, Any, int, str]] = [
    # train: types, ranges, combinations
    ("train-lr-type", lambda f, t: ["train", "builtin:digits", "--lr", "x"], 2, "--lr"),
    ("train-lr-zero", lambda f, t: ["train", "builtin:digits", "--lr", "0"], 2, "--lr"),
    ("train-batch-0", lambda f, t: ["train", "builtin:digits", "--batch-size", "0"], 2, "--batch-size"),
    ("train-batch-float", lambda f, t: ["train", "builtin:digits", "--batch-size", "1.5"], 2, "--batch-size"),
    ("train-timesteps-1", lambda f, t: ["train", "builtin:digits", "--timesteps", "1"], 2, "--timesteps"),
    ("train-linear-short", lambda f, t: ["train", "builtin:digits", "--schedule", "linear", "--timesteps", "10"], 2,
     "linear"),
    ("train-image-size-3", lambda f, t: ["train", "builtin:digits", "--image-size", "3"], 2, "--image-size"),
    ("train-vlb-fixed", lambda f, t: ["train", "builtin:digits", "--loss", "vlb", "--var-type", "fixed-small"], 2,
     "--loss vlb"),
    ("train-hybrid-fixed", lambda f, t: ["train", "builtin:digits", "--var-type", "fixed-large"], 2, "--loss hybrid"),
    ("train-mean-type", lambda f, t: ["train", "builtin:digits", "--mean-type", "score"], 2, "--mean-type"),
    ("train-sampler", lambda f, t: ["train", "builtin:digits", "--timestep-sampler", "lossy"], 2,
     "--timestep-sampler"),
    ("train-keep-0", lambda f, t: ["train", "builtin:digits", "--keep", "0"], 2, "--keep"),
    ("train-save-every-0", lambda f, t: ["train", "builtin:digits", "--save-every", "0"], 2, "--save-every"),
    ("train-dropout-1", lambda f, t: ["train", "builtin:digits", "--dropout", "1"], 2, "--dropout"),
    ("train-grad-clip-neg", lambda f, t: ["train", "builtin:digits", "--grad-clip", "-1"], 2, "--grad-clip"),
    ("train-seed-neg", lambda f, t: ["train", "builtin:digits", "--seed", "-1"], 2, "--seed"),
    ("train-nan-policy", lambda f, t: ["train", "builtin:digits", "--nan-policy", "ignore"], 2, "--nan-policy"),
    ("train-color", lambda f, t: ["train", "builtin:digits", "--color", "cmyk"], 2, "--color"),
    ("train-max-time-0", lambda f, t: ["train", "builtin:digits", "--max-time", "0s"], 2, "--max-time"),
    ("train-mult-0", lambda f, t: ["train", "builtin:digits", "--channel-mult", "1,0"], 2, "--channel-mult"),
    ("train-device", lambda f, t: ["train", "builtin:digits", "--device", "tpu"], 2, "--device"),
    ("train-resume-force", lambda f, t: ["train", "builtin:digits", "--out", str(t / "r"), "--resume", "--force"],
     2, "--force"),
    ("train-heads", lambda f, t: ["train", "builtin:digits", "--out", str(t / "r"), *TRAIN_TINY, "--heads", "3"], 2,
     "heads"),
    ("train-levels", lambda f, t: ["train", "builtin:digits", "--out", str(t / "r"), *TRAIN_TINY, "--channel-mult",
                                   "1,2,2,2,2"], 2, "cannot be halved"),
    ("train-attention", lambda f, t: ["train", "builtin:digits", "--out", str(t / "r"), *TRAIN_TINY,
                                      "--attention-resolutions", "3"], 2, "never occur"),
    ("train-out-is-file", lambda f, t: ["train", "builtin:digits", "--out", str(f["good"]), *TRAIN_TINY], 1,
     "is a file"),
    ("train-resume-nothing", lambda f, t: ["train", "--out", str(t), "--resume"], 1, "no training run"),
    ("train-class-cond-unlabelled", lambda f, t: ["train", str(f["rgb16"]), "--out", str(t / "r"), *TRAIN_TINY,
                                                  "--class-cond"], 1, "class"),
    ("train-builtin-unknown", lambda f, t: ["train", "builtin:mnist", "--out", str(t / "r"), *TRAIN_TINY], 1,
     "builtin:mnist"),
    # sample
    ("sample-num-0", lambda f, t: ["sample", _good(f), "--out", str(t / "s"), "--num", "0"], 2, "--num"),
    ("sample-num-huge", lambda f, t: ["sample", _good(f), "--out", str(t / "s"), "--num", "10000000"], 2, "--num"),
    ("sample-batch-0", lambda f, t: ["sample", _good(f), "--out", str(t / "s"), "--batch-size", "0"], 2,
     "--batch-size"),
    ("sample-steps-0", lambda f, t: ["sample", _good(f), "--out", str(t / "s"), "--steps", "0"], 2, "--steps"),
    ("sample-steps-type", lambda f, t: ["sample", _good(f), "--out", str(t / "s"), "--steps", "many"], 2, "--steps"),
    ("sample-seed-neg", lambda f, t: ["sample", _good(f), "--out", str(t / "s"), "--seed", "-1"], 2, "--seed"),
    ("sample-steps-over-T", lambda f, t: ["sample", _good(f), "--out", str(t / "s"), "--steps", str(T + 1)], 2,
     f"chain's {T} steps"),
    ("sample-class-uncond", lambda f, t: ["sample", _good(f), "--out", str(t / "s"), "--class", "3"], 2,
     "not class-conditional"),
    ("sample-option", lambda f, t: ["sample", _good(f), "--out", str(t / "s"), "-O", "eta=fast"], 2, "eta=fast"),
    ("sample-sampler", lambda f, t: ["sample", _good(f), "--out", str(t / "s"), "--sampler", "euler"], 2,
     "installed samplers"),
    ("sample-out-is-file", lambda f, t: ["sample", _good(f), "--out", str(f["good"]), "--steps", "1", "--num", "1",
                                         "--device", "cpu"], 1, "is a file"),
    # eval-nll
    ("nll-estimator", lambda f, t: ["eval-nll", _good(f), "--estimator", "guess"], 2, "--estimator"),
    ("nll-terms-exact", lambda f, t: ["eval-nll", _good(f), "--terms", "3"], 2, "--terms"),
    ("nll-batch-0", lambda f, t: ["eval-nll", _good(f), "--batch-size", "0"], 2, "--batch-size"),
    ("nll-pilot-0", lambda f, t: ["eval-nll", _good(f), "--estimator", "mc", "--pilot-images", "0"], 2,
     "--pilot-images"),
    ("nll-split", lambda f, t: ["eval-nll", _good(f), "--split", "val"], 2, "--split"),
    ("nll-split-folder", lambda f, t: ["eval-nll", _good(f), "--data", str(f["rgb16"]), "--split", "test",
                                       "--device", "cpu"], 2, "--split"),
    ("nll-data-missing", lambda f, t: ["eval-nll", _good(f), "--data", str(t / "nope"), "--device", "cpu"], 1,
     "nope"),
    ("nll-data-empty", lambda f, t: ["eval-nll", _good(f), "--data", str(t), "--device", "cpu"], 1, "no image"),
    # respace
    ("respace-steps-0", lambda f, t: ["respace", _good(f), "--steps", "0", "--out", str(t / "r.safetensors")], 2,
     "--steps"),
    ("respace-spacing", lambda f, t: ["respace", _good(f), "--steps", "2", "--spacing", "log", "--out",
                                      str(t / "r.safetensors")], 2, "--spacing"),
    ("respace-steps-over-T", lambda f, t: ["respace", _good(f), "--steps", str(T * 10), "--out",
                                           str(t / "r.safetensors")], 2, f"chain's {T} steps"),
    ("respace-out-exists", lambda f, t: ["respace", _good(f), "--steps", "2", "--out", str(f["foreign"])], 1,
     "--force"),
    ("respace-out-is-input", lambda f, t: ["respace", _good(f), "--steps", "2", "--out", _good(f), "--force"], 1,
     "input file"),
    ("respace-out-folder", lambda f, t: ["respace", _good(f), "--steps", "2", "--out", str(t / "no" / "dir") + "/"],
     1, "does not exist"),
    # distill
    ("distill-to-3", lambda f, t: ["distill", _good(f), "--data", "builtin:digits", "--out", str(t / "d"),
                                   "--iters-per-stage", "1", "--to-steps", "3", "--device", "cpu"], 2,
     "power of two"),
    ("distill-from-over-T", lambda f, t: ["distill", _good(f), "--data", "builtin:digits", "--out", str(t / "d"),
                                          "--iters-per-stage", "1", "--from-steps", "64", "--device", "cpu"], 2,
     "--from-steps"),
    ("distill-iters-0", lambda f, t: ["distill", _good(f), "--data", "builtin:digits", "--out", str(t / "d"),
                                      "--iters-per-stage", "0"], 2, "--iters-per-stage"),
    ("distill-lr-0", lambda f, t: ["distill", _good(f), "--data", "builtin:digits", "--out", str(t / "d"),
                                   "--iters-per-stage", "1", "--lr", "0"], 2, "--lr"),
    ("distill-resume-force", lambda f, t: ["distill", _good(f), "--data", "builtin:digits", "--out", str(t / "d"),
                                           "--iters-per-stage", "1", "--resume", "--force"], 2, "--force"),
    ("distill-data-missing", lambda f, t: ["distill", _good(f), "--data", str(t / "nope"), "--out", str(t / "d"),
                                           "--iters-per-stage", "1", "--from-steps", "4", "--to-steps", "2",
                                           "--device", "cpu", "--quiet"], 1, "nope"),
    ("distill-out-is-file", lambda f, t: ["distill", _good(f), "--data", "builtin:digits", "--out", str(f["good"]),
                                          "--iters-per-stage", "1", "--from-steps", "4", "--to-steps", "2",
                                          "--device", "cpu", "--quiet"], 1, "good.safetensors"),
]


@pytest.mark.parametrize(("command", "code", "words"), [(c[1], c[2], c[3]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_table(files: dict[str, Path], tmp_path: Path, command: Any, code: int, words: str) -> None:
    result = invoke(*command(files, tmp_path))
    assert words in one_line(result, code)  # typer's own usage errors too: one line, like ddpmctl's


# ----------------------------------------------------------------------------------- --out never overwrites
def test_out_is_never_overwritten_silently(files: dict[str, Path], tmp_path: Path) -> None:
    # sample: existing samples need --force
    out = tmp_path / "samples"
    args = ["sample", _good(files), "--out", str(out), "--num", "2", "--steps", "1", "--device", "cpu", "--quiet"]
    assert invoke(*args).exit_code == 0
    before = (out / "000000.png").read_bytes()
    assert "--force" in one_line(invoke(*args[:-1], "--seed", "5", "--quiet"), 1)
    assert (out / "000000.png").read_bytes() == before
    assert invoke(*args, "--seed", "5", "--force").exit_code == 0
    # respace: an existing file needs --force
    target = tmp_path / "r.safetensors"
    target.write_bytes(b"precious")
    assert "--force" in one_line(invoke("respace", _good(files), "--steps", "2", "--out", str(target)), 1)
    assert target.read_bytes() == b"precious"
    assert invoke("respace", _good(files), "--steps", "2", "--out", str(target), "--force", "-q").exit_code == 0
    # distill: a folder holding student checkpoints of another run needs --resume/--force
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "student_2.safetensors").write_bytes(b"someone else's")
    line = one_line(invoke("distill", _good(files), "--data", "builtin:digits", "--out", str(folder),
                           "--iters-per-stage", "1", "--from-steps", "4", "--to-steps", "2", "--device", "cpu",
                           "--quiet"), 1)
    assert "--force" in line and (folder / "student_2.safetensors").read_bytes() == b"someone else's"
    # train: a folder holding another run needs --resume/--force (and a file is refused)
    run = tmp_path / "run"
    assert invoke("train", "builtin:digits", "--out", str(run), *TRAIN_TINY, "--quiet").exit_code == 0
    before = (run / "model_000002.safetensors").read_bytes()
    line = one_line(invoke("train", "builtin:digits", "--out", str(run), *TRAIN_TINY, "--seed", "3"), 1)
    assert "--resume" in line and "--force" in line
    assert (run / "model_000002.safetensors").read_bytes() == before


# ----------------------------------------------------------------------------------- hostile data via the CLI
def _folder(root: Path, kind: str) -> Path:
    from PIL import Image

    folder = root / kind
    folder.mkdir()
    if kind == "only-text":
        (folder / "readme.txt").write_text("no images here")
        (folder / "data.csv").write_text("1,2,3")
    elif kind == "tiny":
        Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "dot.png")
    elif kind == "jpeg-named-png":
        for i in range(3):
            Image.new("RGB", (10, 10), (80 * i, 30, 30)).save(folder / f"{i}.png", format="JPEG")
    elif kind in ("truncated", "zero-byte"):
        for i in range(3):
            Image.new("RGB", (10, 10), (80 * i, 30, 30)).save(folder / f"{i}.png")
        bad = folder / "1.png"
        bad.write_bytes(bad.read_bytes()[:40] if kind == "truncated" else b"")
    return folder


@pytest.mark.parametrize(("kind", "extra", "code", "words"), [
    ("empty", [], 1, "no image files"),
    ("only-text", [], 1, "no image files"),
    ("truncated", [], 1, "1.png"),
    ("zero-byte", [], 1, "1.png"),
    ("truncated", ["--skip-bad-images", "--image-size", "8"], 0, "skipped 1 bad image"),
    ("tiny", [], 1, "--image-size"),
    ("tiny", ["--image-size", "8"], 0, "upscal"),
    ("jpeg-named-png", ["--image-size", "8", "--batch-size", "3"], 0, None),  # (a batch above 3 is warned about)
])
def test_hostile_data_through_train(tmp_path: Path, kind: str, extra: list[str], code: int,
                                    words: str | None) -> None:
    folder = _folder(tmp_path, kind)
    result = invoke("train", str(folder), "--out", str(tmp_path / "run"), *TRAIN_TINY, *extra)
    if code:
        assert words in one_line(result, code)
        assert not (tmp_path / "run" / "config.json").exists()  # nothing half-made
        return
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output, result.output
    if words is None:  # read by content, not by name: all three images train and there is nothing to warn about
        assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["num_images"] == 3
        assert "warning:" not in result.stderr, result.stderr
    else:
        assert words in result.stderr.lower(), result.stderr
    assert (tmp_path / "run" / "model_000002.safetensors").exists()


# ----------------------------------------------------------------------------------- numbers, memory, bugs
def test_non_finite_loss_through_the_cli_names_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = train_module.compute_losses
    calls = {"n": 0}

    def fake(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        losses = real(*args, **kwargs)
        return {**losses, "loss": losses["loss"] * float("nan")} if calls["n"] == 3 else losses

    monkeypatch.setattr(train_module, "compute_losses", fake)
    run = tmp_path / "run"
    line = one_line(invoke("train", "builtin:digits", "--out", str(run), *TRAIN_TINY, "--max-steps", "4",
                           "--save-every", "2", "--quiet"), 1)
    assert "at step 3" in line and "ema_0.9999_000002.safetensors" in line
    calls["n"] = -100
    result = invoke("train", "--out", str(run), "--resume", "--max-steps", "6", "--nan-policy", "skip", "--json")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("error", "words"), [
    (MemoryError(), "out of memory"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 17179869184 bytes"),
     "out of memory"),
    (ZeroDivisionError("division by zero"), "internal error: ZeroDivisionError"),
])
def test_memory_and_unexpected_errors_are_one_line(files: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, error: Exception,
                                                   words: str) -> None:
    import ddpmctl.samplers

    def boom(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(ddpmctl.samplers, "generate", boom)
    monkeypatch.delenv("DDPMCTL_DEBUG", raising=False)
    line = one_line(invoke("sample", _good(files), "--out", str(tmp_path / "s"), "--num", "1", "--steps", "1",
                           "--device", "cpu", "--quiet"), 1)
    assert words in line


def test_giant_image_size_in_a_checkpoint_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    """A hostile config asking for 65536x65536 images (conv weights do not depend on the size, so the tensors fit)
    is refused when the metadata is validated, before anything is allocated."""
    import json

    import safetensors.torch

    from ddpmctl.fileio import load_tensors

    tensors, metadata = load_tensors(files["good"])
    config = json.loads(metadata["config"])
    config["model"].update(image_size=65536, attention_resolutions=[32768])
    path = tmp_path / "giant.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={**metadata, "config": json.dumps(config)})
    for args in (["info", str(path)], ["sample", str(path), "--out", str(tmp_path / "s"), "--num", "1", "--steps",
                                       "1", "--device", "cpu", "--quiet"]):
        line = one_line(invoke(*args), 1)
        assert "image_size" in line and str(path) in line
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------- a rank dies
def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(entry.name))
    return kids


def _rank_of(pid: int) -> str | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank processes through /proc")
def test_a_dying_rank_ends_the_run_without_a_hang(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ddpmctl",
            "train", "builtin:digits", "--out", str(out), "--model-channels", "16", "--channel-mult", "1,2",
            "--res-blocks", "1", "--attention-resolutions", "4", "--timesteps", "20", "--batch-size", "16",
            "--max-steps", "100000", "--log-every", "1", "--save-every", "100000", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPMCTL_DIST_TIMEOUT": "60"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        victims = [pid for pid in _children(proc.pid) if _rank_of(pid) == "1"]
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0 and took < 60
    # Rank 0 says what happened in one line (torchrun then prints its own summary); no ddpmctl traceback.
    assert "ddpmctl/train.py" not in stderr and "ddpmctl/distributed.py" not in stderr, stderr[-3000:]
    ours = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "another rank probably died" in ours[0], stderr[-3000:]
