"""A ``--precision auto`` run started on one CPU class and resumed on another (DDPMCTL_CPU simulates both): it
resumes, in the precision auto picks on the new class, and says in one warning line that the result is not
bit-identical to an uninterrupted run. Resumed on the same class it stays silent (and exact: test_train_resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ddpmctl.build import build_model
from ddpmctl.checkpoint import save_checkpoint
from ddpmctl.cli.app import app
from ddpmctl.config import CheckpointConfig, DiffusionConfig, DistillConfig, ModelConfig
from ddpmctl.distill import distill
from ddpmctl.loop import LoopEvent
from conftest import auto_precision, perturb_weights, tensors

DIRECTIONS = [("avx2", "avx512-bf16"), ("avx512-bf16", "avx2")]
TINY = ["--model-channels", "16", "--channel-mult", "1,2", "--res-blocks", "1", "--attention-resolutions", "4",
        "--timesteps", "20", "--batch-size", "16", "--device", "cpu", "--log-every", "1", "--save-every", "2"]


def _train(out: Path, *args: str) -> object:
    return CliRunner().invoke(app, ["train", "builtin:digits", "-o", str(out), *TINY, *args])


@pytest.mark.parametrize(("first", "then"), DIRECTIONS)
def test_an_auto_training_run_resumes_on_another_cpu_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           first: str, then: str) -> None:
    run = tmp_path / "run"
    monkeypatch.setenv("DDPMCTL_CPU", first)
    started = _train(run, "--max-steps", "2", "--quiet")
    assert started.exit_code == 0, started.output
    monkeypatch.setenv("DDPMCTL_CPU", then)
    resumed = _train(run, "--resume", "--max-steps", "4", "--json")  # (--quiet would hide warnings too)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["precision"] == auto_precision(then)
    warnings = [line for line in resumed.stderr.splitlines() if "warning" in line]
    assert warnings == [f"warning: resuming at step 2 in {auto_precision(then)}: the run so far trained in "
                        f"{auto_precision(first)} (--precision auto on this device), so it continues, but not "
                        "bit-identically to an uninterrupted run"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["precision"]) for m in logged] == [(1, auto_precision(first)), (2, auto_precision(first)),
                                                             (3, auto_precision(then)), (4, auto_precision(then))]
    assert json.loads((run / "config.json").read_text())["train"]["precision"] == "auto"  # the request, not bf16
    before, after = tensors(run / "model_000002.safetensors"), tensors(run / "model_000004.safetensors")
    assert all(torch.isfinite(v).all() for v in after.values()) and any(not torch.equal(before[k], after[k])
                                                                         for k in before)
    # Resumed again on the same class: nothing to say.
    again = _train(run, "--resume", "--max-steps", "6")
    assert again.exit_code == 0 and "warning" not in again.stderr, again.output


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = ModelConfig(image_size=8, in_channels=1, model_channels=16, num_res_blocks=1, attention_resolutions=(4,),
                        channel_mult=(1, 2), num_heads=1)
    config = CheckpointConfig(model=model, diffusion=DiffusionConfig(timesteps=16))
    network = perturb_weights(build_model(config), 0.05)
    return save_checkpoint(tmp_path / "ema.safetensors", network.state_dict(), config, kind="model",
                           lineage=[{"op": "train", "step": 1}])


@pytest.mark.parametrize(("first", "then"), DIRECTIONS)
def test_an_auto_distillation_resumes_on_another_cpu_class(teacher: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, first: str,
                                                           then: str) -> None:
    out = tmp_path / "run"
    config = DistillConfig(checkpoint=str(teacher), data="builtin:digits", out=str(out), from_steps=8, to_steps=2,
                           iters_per_stage=4, batch_size=4, report_samples=2, save_every=2, precision="auto")
    events: list[LoopEvent] = []

    def stop() -> bool:  # interrupted in stage 2, after its 3rd update
        return any(e.kind == "step" and e.stage == 2 and e.step == 3 for e in events)

    monkeypatch.setenv("DDPMCTL_CPU", first)
    assert distill(config, callback=events.append, should_stop=stop).interrupted
    saved = json.loads((out / "distill.json").read_text())
    assert (saved["config"]["precision"], saved["precision"]) == ("auto", auto_precision(first))
    assert not [e for e in events if e.kind == "warning"]
    monkeypatch.setenv("DDPMCTL_CPU", then)
    events.clear()
    resumed = distill(config, resume=True, callback=events.append)
    assert not resumed.interrupted and [s.steps for s in resumed.stages] == [4, 2]
    assert [e.message for e in events if e.kind == "warning"] == [
        f"resuming in {auto_precision(then)}: the run so far trained in {auto_precision(first)} (--precision auto "
        "on this device), so it continues, but not bit-identically to an uninterrupted run"]
    assert json.loads((out / "distill.json").read_text())["precision"] == auto_precision(then)
    assert all(torch.isfinite(v).all() for v in tensors(out / "student_2.safetensors").values())


def test_the_distill_cli_stores_the_request_and_prints_the_warning(teacher: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    args = ["distill", str(teacher), "--data", "builtin:digits", "--out", str(out), "--from-steps", "4",
            "--to-steps", "2", "--iters-per-stage", "2", "--batch-size", "4", "--report-samples", "2", "--device",
            "cpu", "--quiet"]
    monkeypatch.setenv("DDPMCTL_CPU", "avx512-bf16")
    first = CliRunner().invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["precision"] == "bf16"
    assert json.loads((out / "distill.json").read_text())["config"]["precision"] == "auto"
    monkeypatch.setenv("DDPMCTL_CPU", "avx2")
    again = CliRunner().invoke(app, [*args, "--resume"])  # the finished run: its table, and the one line
    assert again.exit_code == 0, again.output
    assert [line for line in again.stderr.splitlines() if line.startswith("warning: ")] == [
        "warning: resuming in fp32: the run so far trained in bf16 (--precision auto on this device), so it "
        "continues, but not bit-identically to an uninterrupted run"]
