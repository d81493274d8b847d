"""`ddpmctl distill` through typer's CliRunner: a tiny real run, flags -> DistillConfig, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ddpmctl.distill
from ddpmctl.build import build_model
from ddpmctl.checkpoint import save_checkpoint
from ddpmctl.cli.app import app
from ddpmctl.config import CheckpointConfig, DiffusionConfig, ModelConfig
from conftest import assert_same, perturb_weights, tensors

T = 8


def _model_config() -> ModelConfig:
    return ModelConfig(image_size=8, in_channels=1, model_channels=16, num_res_blocks=1,
                       attention_resolutions=(4,), channel_mult=(1, 2), num_heads=1)


def _checkpoint(path: Path, *, learned: bool) -> Path:
    torch.manual_seed(0)
    model_config = _model_config()
    diffusion = DiffusionConfig(timesteps=T) if learned else DiffusionConfig(timesteps=T, var_type="fixed_small",
                                                                            loss_type="mse")
    model = perturb_weights(build_model(CheckpointConfig(model=model_config, diffusion=diffusion)), 0.05)
    return save_checkpoint(path, model.state_dict(), CheckpointConfig(model=model_config, diffusion=diffusion),
                           kind="model", lineage=[])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill_cli")
    return {"learned": _checkpoint(root / "ema.safetensors", learned=True),
            "fixed": _checkpoint(root / "fixed.safetensors", learned=False)}


def _run(*args: str) -> object:
    return CliRunner().invoke(app, ["distill", *args])


def _base(ckpt: Path, out: Path) -> list[str]:
    return [str(ckpt), "--data", "builtin:digits", "--out", str(out), "--from-steps", "4", "--to-steps", "2",
            "--iters-per-stage", "3", "--batch-size", "4", "--report-samples", "2", "--device", "cpu", "--quiet"]


def test_tiny_run_writes_students_and_report(ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _run(*_base(ckpts["learned"], out), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["param"] == "both" and [s["steps"] for s in payload["stages"]] == [2]
    assert payload["stages"][0]["student"] == "student_2.safetensors"
    assert (out / "student_2.safetensors").exists() and not list(out.glob("state_*"))
    report = json.loads((out / "report.json").read_text())
    assert report["reference"] == {"steps": 4, "samples": 2, "seed": 0}
    stage = report["stages"][0]
    # Both distances are measured (finite, and not 0: neither sampler reproduces the 4-step reference exactly),
    # the report holds what --json printed, and 3 training iterations moved the student away from plain DDIM.
    assert 0 < stage["student_distance"] < math.inf and 0 < stage["ddim_distance"] < math.inf, stage
    assert stage["student_distance"] == payload["stages"][0]["student_distance"]
    assert stage["student_distance"] != stage["ddim_distance"]

    again = _run(*_base(ckpts["learned"], out))
    assert again.exit_code == 1 and "already holds a distillation run" in again.stderr
    table = _run(*_base(ckpts["learned"], out), "--resume")  # nothing left to do: the table of the finished run
    assert table.exit_code == 0 and "4->2" in table.stdout, table.output


def test_flags_reach_the_library(ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake(config: ddpmctl.distill.DistillConfig, **kwargs: object) -> ddpmctl.distill.DistillResult:
        seen.update(config=config, **kwargs)
        return ddpmctl.distill.DistillResult(out=Path(config.out), from_steps=8, to_steps=1, param="x")

    monkeypatch.setattr(ddpmctl.distill, "distill", fake)
    result = _run(str(ckpts["learned"]), "--data", "some/dir", "--out", str(tmp_path), "--from-steps", "8",
                  "--to-steps", "1", "--iters-per-stage", "7", "--lr", "1e-4", "--param", "x", "--weighting", "snr+1",
                  "--precision", "bf16", "--seed", "3", "--no-flip", "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.from_steps, config.to_steps, config.iters_per_stage, config.lr, config.param) == (8, 1, 7, 1e-4, "x")
    assert (config.weighting, config.precision, config.seed, config.flip) == ("snr+1", "bf16", 3, False)
    assert seen["resume"] is False and seen["force"] is False and str(seen["device"]) == "cpu"
    assert callable(seen["callback"])  # Ctrl-C is handled inside distill(), as in train()


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--to-steps", "3"], 2, "--to-steps 3 is not a power of two"),
    (["--from-steps", "6"], 2, "--from-steps 6 is not a power of two"),
    (["--from-steps", "16"], 2, "exceeds the 8 steps"),
    (["--to-steps", "4"], 2, "must be smaller than --from-steps 4"),
    (["--param", "eps"], 2, "--param"),
    (["--weighting", "min-snr"], 2, "--weighting"),
    (["--iters-per-stage", "0"], 2, "--iters-per-stage"),
    (["--resume", "--force"], 2, "contradict"),
])
def test_bad_input_is_one_line(ckpts: dict[str, Path], tmp_path: Path, args: list[str], code: int,
                               message: str) -> None:
    base = _base(ckpts["learned"], tmp_path / "run")
    # later flags win in typer/click, so appending overrides the base values
    result = _run(*base, *args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_both_needs_learned_variance_channels(ckpts: dict[str, Path], tmp_path: Path) -> None:
    result = _run(*_base(ckpts["fixed"], tmp_path / "run"), "--param", "both")
    assert result.exit_code == 2 and "--param both needs 2 output channels" in result.stderr


def test_not_a_checkpoint_and_missing_data(ckpts: dict[str, Path], tmp_path: Path) -> None:
    bogus = tmp_path / "notes.safetensors"
    bogus.write_text("hello")
    result = _run(*_base(bogus, tmp_path / "run"))
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    base = _base(ckpts["learned"], tmp_path / "run")
    base[base.index("builtin:digits")] = str(tmp_path / "no-such-folder")
    result = _run(*base)
    assert result.exit_code == 1 and "no-such-folder" in result.stderr


def test_an_error_before_training_prints_its_line_alone(ckpts: dict[str, Path], tmp_path: Path) -> None:
    base = [a for a in _base(ckpts["learned"], tmp_path / "run") if a != "--quiet"]  # progress bars on
    result = _run(*base, "--from-steps", "100")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --from-steps 100 is not a power of two"), repr(result.stderr)
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1


def _teacher(path: Path, *, source: str | None, lineage: list[dict]) -> Path:
    from ddpmctl.config import DataInfo

    model_config = _model_config()
    diffusion = DiffusionConfig(timesteps=T)
    data = None if source is None else DataInfo(source=source, image_size=8, channels=1, num_images=100)
    config = CheckpointConfig(model=model_config, diffusion=diffusion, data=data)
    return save_checkpoint(path, build_model(config).state_dict(), config, kind="model", lineage=lineage)


@pytest.mark.parametrize(("source", "lineage", "data", "flip"), [
    ("builtin:digits", [{"op": "train", "flip": False}], "builtin:digits", False),  # as recorded
    ("pics/", [{"op": "train", "flip": False}], "pics/", False),  # recorded: wins over the folder's default
    ("pics/", [{"op": "train", "flip": True}], "pics/", True),
    ("builtin:digits", [{"op": "train"}], "builtin:digits", False),  # older file: train's default for its data
    ("pics/", [], "pics/", True),
])
def test_data_and_flip_default_to_the_teachers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                                               lineage: list[dict], data: str, flip: bool) -> None:
    seen = {}

    def fake(config: ddpmctl.distill.DistillConfig, **kwargs: object) -> ddpmctl.distill.DistillResult:
        seen["config"] = config
        return ddpmctl.distill.DistillResult(out=Path(config.out), from_steps=4, to_steps=2, param="v")

    monkeypatch.setattr(ddpmctl.distill, "distill", fake)
    teacher = _teacher(tmp_path / "t.safetensors", source=source, lineage=lineage)
    result = _run(str(teacher), "-o", str(tmp_path / "run"), "--iters-per-stage", "2", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    assert (seen["config"].data, seen["config"].flip) == (data, flip)
    given = _run(str(teacher), "-o", str(tmp_path / "run"), "--iters-per-stage", "2", "--data", "other/",
                 "--flip" if not flip else "--no-flip", "--device", "cpu", "-q")
    assert given.exit_code == 0 and (seen["config"].data, seen["config"].flip) == ("other/", not flip)


def test_data_is_needed_when_the_teacher_does_not_record_it(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.safetensors", source=None, lineage=[])
    result = _run(str(teacher), "-o", str(tmp_path / "run"), "--iters-per-stage", "2")
    assert result.exit_code == 2 and "--data is needed" in result.stderr and len(result.stderr.splitlines()) == 1
    result = _run(str(teacher), "-o", str(tmp_path / "run"), "--data", "builtin:digits")
    assert result.exit_code == 2 and "--iters-per-stage is needed" in result.stderr


def test_resume_with_out_alone_says_where_it_resumes(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """The teacher, data and every setting come from distill.json; the stage trained again is the same."""
    out = tmp_path / "run"
    base = _base(ckpts["learned"], out)
    base[base.index("--to-steps") + 1] = "1"
    first = _run(*base)
    assert first.exit_code == 0, first.output
    finished = tensors(out / "student_1.safetensors")
    (out / "student_1.safetensors").unlink()  # stage 2 is to be trained again, from iteration 0
    resumed = _run("--out", str(out), "--resume", "--device", "cpu", "--precision", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {out} at stage 2 of 2 (2->1 steps), iteration 0" in " ".join(resumed.stderr.split())
    assert "given None" not in resumed.output
    assert_same(tensors(out / "student_1.safetensors"), finished)  # the same settings, seed and precision
    changed = _run("--out", str(out), "--resume", "--device", "cpu", "--lr", "1")
    assert changed.exit_code == 1 and "--lr (saved 5e-05, given 1.0)" in changed.stderr


def test_an_eps_teacher_gets_a_note(ckpts: dict[str, Path], tmp_path: Path) -> None:
    base = [a for a in _base(ckpts["learned"], tmp_path / "run") if a != "--quiet"]
    result = _run(*base, "--report-samples", "0")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert "ema.safetensors predicts eps: its first student learns a new output head" in text
    assert "1 stage," in text and "1 stages" not in text


def test_distill_says_what_it_converted(ckpts: dict[str, Path], tmp_path: Path) -> None:
    from ddpmctl.images import save_png

    folder = tmp_path / "rgb16"
    folder.mkdir()
    for k in range(4):
        save_png(folder / f"{k}.png", torch.full((3, 16, 16), 50 * k, dtype=torch.uint8))
    base = [a for a in _base(ckpts["learned"], tmp_path / "run") if a != "--quiet"]
    base[base.index("builtin:digits")] = str(folder)
    result = _run(*base, "--report-samples", "0")
    assert result.exit_code == 0, result.output
    assert (f"warning: {folder} converted to fit the model: 4 of 4 images (16x16) resized and cropped to 8x8"
            in " ".join(result.stderr.split()))
