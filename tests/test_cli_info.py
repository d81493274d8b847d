"""`ddpmctl info CKPT [--json]` through typer's CliRunner: the table, the JSON object, and one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ddpmctl.build import build_model
from ddpmctl.checkpoint import save_checkpoint
from ddpmctl.cli.app import app
from ddpmctl.config import CheckpointConfig, DataInfo, DiffusionConfig, ModelConfig, StudentConfig

MODEL = ModelConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,), num_classes=3)
DIFFUSION = DiffusionConfig(schedule="linear", timesteps=40, use_timesteps=(0, 13, 26, 39))
# A data source with rich markup in it must be printed literally, never interpreted.
CONFIG = CheckpointConfig(model=MODEL, diffusion=DIFFUSION,
                          data=DataInfo(source="data/[bold]cats[/nope]", image_size=8, channels=1, num_images=42,
                                        class_names=("cat", "dog", "owl")))
LINEAGE = [{"op": "train", "step": 300}, {"op": "respace", "from": "ema_0.9999_000300.safetensors", "steps": 4}]


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return dict(build_model(CONFIG).state_dict())


@pytest.fixture(scope="module")
def respaced(state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("info") / "respaced.safetensors", state, CONFIG,
                           kind="respaced", lineage=LINEAGE)


def _run(*args: str) -> object:
    return CliRunner().invoke(app, ["info", *args])


def test_table(respaced: Path, state: dict[str, torch.Tensor]) -> None:
    result = _run(str(respaced))
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())  # the table may wrap long cells
    for expected in ("respaced", "ddpmctl/1", "ddpmctl 0.1.0", f"{sum(v.numel() for v in state.values()):,}",
                     f"tensors │ {len(state)}", "8x8", "1 in, 2 out", "linear", "T │ 40", "eps",
                     "var type │ learned-range", "loss │ hybrid",  # as --var-type and --loss spell them
                     "4 steps (0..39)", "3 (cat, dog, owl)", "data/[bold]cats[/nope]", "42 images",
                     "lineage 1 │ op=train, step=300", "lineage 2 │ op=respace"):
        assert expected in out, (expected, result.stdout)


def test_table_student_and_unconditional(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    config = CheckpointConfig(model=MODEL.model_copy(update={"num_classes": None}),
                              diffusion=DIFFUSION.model_copy(update={"use_timesteps": None}),
                              student=StudentConfig(param="v", steps=(4, 9), teacher_steps=4))
    path = save_checkpoint(tmp_path / "student.safetensors", state, config, kind="student", lineage=[])
    result = _run(str(path))
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    for expected in ("student", "2 steps (4..9), param v, teacher 4 steps", "unconditional", "lineage │ (none)"):
        assert expected in out, (expected, result.stdout)
    assert "respaced steps" not in out


def test_device_check_says_what_it_checked(respaced: Path) -> None:
    plain, checked = _run(str(respaced)), _run(str(respaced), "--device", "cpu")
    assert plain.exit_code == 0 and checked.exit_code == 0, checked.output
    assert "check" not in plain.stdout
    assert "every tensor loaded into the network on cpu" in " ".join(checked.stdout.split())
    assert json.loads(_run(str(respaced), "--json", "--device", "cpu").stdout)["loaded_on"] == "cpu"


def test_json(respaced: Path, state: dict[str, torch.Tensor]) -> None:
    result = _run(str(respaced), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["kind"] == "respaced" and payload["format"] == "ddpmctl/1"
    assert payload["sha256"] == hashlib.sha256(respaced.read_bytes()).hexdigest()
    assert payload["num_parameters"] == sum(v.numel() for v in state.values())
    assert payload["num_tensors"] == len(state)
    assert CheckpointConfig.model_validate(payload["config"]) == CONFIG
    assert payload["lineage"] == LINEAGE
    assert payload["tensors"] == {k: {"shape": list(v.shape), "dtype": "F32"} for k, v in state.items()}
    assert payload["file_size"] == respaced.stat().st_size


@pytest.mark.parametrize("make", ["missing", "directory", "garbage", "pickle-ish", "truncated"])
def test_bad_file_is_one_error_line(respaced: Path, tmp_path: Path, make: str) -> None:
    path = tmp_path / "bad.safetensors"
    if make == "directory":
        path.mkdir()
    elif make == "garbage":
        path.write_bytes(b"\x00\x01garbage" * 10)
    elif make == "pickle-ish":
        path.write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    elif make == "truncated":
        path.write_bytes(respaced.read_bytes()[:500])
    for args in ((str(path),), (str(path), "--json")):
        result = _run(*args)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.stderr
        assert "Traceback" not in result.output and result.stdout == ""


@pytest.mark.every_cpu
def test_info_without_a_checkpoint_shows_the_machine(cpu_class: str) -> None:
    from ddpmctl import hardware

    payload = json.loads(_run("--json").stdout)["machine"]
    assert (payload["cpu_class"], payload["simulated"]) == (cpu_class, True)
    assert payload["hardware_class"] == hardware.hardware_cpu_class()
    assert payload["auto_precision"] == ("bf16" if cpu_class == "avx512-bf16" else "fp32")
    assert payload["fast_paths"]["training_channels_last"] is cpu_class.startswith("avx512")
    table = _run()
    assert table.exit_code == 0, table.output
    assert f"{cpu_class} (simulated: DDPMCTL_CPU)" in table.stdout and "hardware class" in table.stdout
