"""`ddpmctl train` through typer's CliRunner: flags/TOML -> TrainConfig, one-line usage errors, a real tiny run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import ddpmctl.train as train_module
from ddpmctl.cli.app import app
from ddpmctl.config import TrainConfig

TINY = ["--model-channels", "16", "--channel-mult", "1,2", "--res-blocks", "1", "--attention-resolutions", "4",
        "--timesteps", "20", "--batch-size", "16", "--device", "cpu"]



@pytest.fixture()
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the library call: record what the CLI would train, train nothing."""
    seen: dict[str, Any] = {}

    def fake_train(config: TrainConfig, **kwargs: Any) -> None:
        seen["config"], seen["kwargs"] = config, kwargs
        raise train_module.TrainingError("stub: not training")

    monkeypatch.setattr(train_module, "train", fake_train)
    return seen


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["train", *args])


def one_error_line(result: Any, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_flags_become_the_config(captured: dict[str, Any], tmp_path: Path) -> None:
    result = invoke("builtin:digits", "-o", str(tmp_path / "r"), "--var-type", "learned", "--loss", "vlb",
                    "--channel-mult", "1,2,2", "--attention-resolutions", "", "--max-time", "10m", "--no-flip",
                    "--class-cond", "--precision", "bf16", "--lr", "3e-4", "--grad-clip", "1", "--keep", "2")
    one_error_line(result, 1)
    config: TrainConfig = captured["config"]
    assert config.var_type == "learned" and config.loss == "vlb" and config.channel_mult == (1, 2, 2)
    assert config.attention_resolutions == () and config.max_time == 600.0 and config.flip is False
    assert config.class_cond is True and config.precision == "bf16" and config.lr == 3e-4
    assert config.grad_clip == 1.0 and config.keep == 2 and config.max_steps is None
    assert config.out == str(tmp_path / "r") and captured["kwargs"]["resume"] is False


def test_default_out_names_the_data(captured: dict[str, Any]) -> None:
    one_error_line(invoke("builtin:digits", "--max-steps", "5"), 1)
    out = Path(captured["config"].out)
    assert out.parent == Path("runs") and out.name.startswith("digits-")


def test_config_file_and_flag_override(captured: dict[str, Any], tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('data = "builtin:digits"\nlr = 2e-4\nbatch_size = 32\nvar_type = "fixed_small"\n'
                    'loss = "simple"\nchannel_mult = [1, 2]\nmax_steps = 50\nmax_time = "2m"\n')
    one_error_line(invoke("--config", str(toml), "--lr", "5e-4", "-o", str(tmp_path / "r")), 1)
    config: TrainConfig = captured["config"]
    assert config.data == "builtin:digits" and config.batch_size == 32 and config.lr == 5e-4
    assert config.var_type == "fixed_small" and config.channel_mult == (1, 2) and config.max_steps == 50
    assert config.max_time == 120.0


def test_unknown_config_key_is_a_usage_error(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("max_steps = 5\nlearning_rate = 0.1\n")
    line = one_error_line(invoke("builtin:digits", "--config", str(toml)), 2)
    assert "learning_rate" in line
    toml.write_text("max_steps = [")
    assert "not valid TOML" in one_error_line(invoke("builtin:digits", "--config", str(toml)), 2)
    assert "no such file" in one_error_line(invoke("builtin:digits", "--config", str(tmp_path / "nope.toml")), 2)


@pytest.mark.parametrize(("args", "named"), [
    (["--lr", "-1", "--max-steps", "5"], "--lr"),
    (["--lr", "fast", "--max-steps", "5"], "--lr"),
    (["--max-steps", "0"], "--max-steps"),
    (["--max-steps", "5", "--schedule", "quadratic"], "--schedule"),
    (["--max-steps", "5", "--var-type", "fixed-small"], "--loss hybrid"),
    (["--max-steps", "5", "--loss", "vlb", "--var-type", "fixed-large"], "--loss vlb"),
    (["--max-time", "ten minutes"], "--max-time"),
    (["--max-steps", "5", "--channel-mult", "1,x"], "--channel-mult"),
    (["--max-steps", "5", "--precision", "fp16"], "--precision"),
    (["--max-steps", "5", "--ema", "1.5"], "--ema"),
])
def test_invalid_values_are_one_line_exit_2(args: list[str], named: str) -> None:
    line = one_error_line(invoke("builtin:digits", *args), 2)
    assert named in line


def test_missing_data_and_resume_without_out() -> None:
    assert "DATA" in one_error_line(invoke("--max-steps", "5"), 2)
    assert "--out" in one_error_line(invoke("--resume"), 2)
    assert "--force" in one_error_line(invoke("builtin:digits", "--max-steps", "1", "--resume", "--force",
                                              "-o", "x"), 2)


def test_resume_takes_saved_values(captured: dict[str, Any], tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    saved = TrainConfig(data="builtin:digits", out=str(run), lr=3e-4, timesteps=50, max_steps=100, seed=7)
    (run / "config.json").write_text(json.dumps({"train": saved.model_dump(mode="json")}))
    one_error_line(invoke("-o", str(run), "--resume", "--max-steps", "200"), 1)
    config: TrainConfig = captured["config"]
    assert config.lr == 3e-4 and config.timesteps == 50 and config.seed == 7 and config.max_steps == 200
    assert captured["kwargs"]["resume"] is True


def test_real_tiny_run_then_refuse_then_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = invoke("builtin:digits", "-o", str(run), *TINY, "--max-steps", "3", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and result.stdout == ""  # --quiet: nothing but errors
    assert (run / "ema_0.9999_000003.safetensors").exists()

    line = one_error_line(invoke("builtin:digits", "-o", str(run), *TINY, "--max-steps", "3"), 1)
    assert "--resume" in line and "--force" in line

    line = one_error_line(invoke("-o", str(run), "--resume", "--max-steps", "5", "--lr", "0.01"), 1)
    assert "--lr (saved 0.0002, given 0.01)" in line

    result = invoke("-o", str(run), "--resume", "--max-steps", "5", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["start_step"] == 3 and summary["step"] == 5
    assert summary["ema_checkpoint"] == str(run / "ema_0.9999_000005.safetensors")

    result = invoke("builtin:digits", "-o", str(run), *TINY, "--max-steps", "2", "--force")
    assert result.exit_code == 0, result.output
    assert f"EMA checkpoint: {run / 'ema_0.9999_000002.safetensors'}" in result.stdout
    assert not (run / "state_000005.json").exists()


@pytest.mark.parametrize("form", ["config.json", "folder"])
def test_config_reuses_a_runs_own_config(captured: dict[str, Any], tmp_path: Path, form: str) -> None:
    run = tmp_path / "old-run"
    run.mkdir()
    saved = TrainConfig(data="builtin:digits", out=str(run), lr=3e-4, timesteps=50, max_steps=100, seed=7,
                        channel_mult=(1, 2), var_type="learned", loss="vlb", flip=False)
    (run / "config.json").write_text(json.dumps({"train": saved.model_dump(mode="json"), "format": "x"}))
    source = run / "config.json" if form == "config.json" else run
    one_error_line(invoke("--config", str(source), "-o", str(tmp_path / "new"), "--seed", "8"), 1)
    config: TrainConfig = captured["config"]
    assert config.model_dump(exclude={"out", "seed"}) == saved.model_dump(exclude={"out", "seed"})
    assert config.out == str(tmp_path / "new") and config.seed == 8
    # without -o the new run gets its own folder, never the old run's
    one_error_line(invoke("--config", str(source)), 1)
    assert Path(captured["config"].out) != run


def test_config_json_errors_are_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    assert "not valid JSON" in one_error_line(invoke("--config", str(bad)), 2)
    bad.write_text('{"learning_rate": 1}')
    assert "learning_rate" in one_error_line(invoke("--config", str(bad)), 2)
    assert "config.json" in one_error_line(invoke("--config", str(tmp_path)), 2)  # a folder that is not a run


def test_both_spellings_of_a_name_are_accepted(captured: dict[str, Any], tmp_path: Path) -> None:
    """learned_range (config.json, the reference, `info` of old) and learned-range (--help) mean the same."""
    invoke("builtin:digits", "--var-type", "learned_range", "--timestep-sampler", "loss_second_moment",
           "-o", str(tmp_path / "a"))
    assert captured["config"].var_type == "learned_range"
    assert captured["config"].timestep_sampler == "loss-second-moment"
    toml = tmp_path / "c.toml"
    toml.write_text('var_type = "learned-range"\ntimestep_sampler = "loss_second_moment"\n')
    invoke("builtin:digits", "--config", str(toml), "-o", str(tmp_path / "b"))
    assert captured["config"].var_type == "learned_range"
    assert captured["config"].timestep_sampler == "loss-second-moment"
    assert "'learned-range'" in one_error_line(invoke("builtin:digits", "--var-type", "learned_rang"), 2)


def test_loss_help_says_what_simple_is_with_a_learned_variance() -> None:
    help_text = " ".join(CliRunner().invoke(app, ["train", "--help"]).stdout.replace("│", " ").split())
    assert "simple = L_simple, the mse of the mean, plus with a learned variance its KL term unscaled" in help_text


def test_halvable_size_is_the_largest_the_network_halves() -> None:
    from ddpmctl.config import halvable_size

    # Below 16 the default network has 2 levels (halves once), 16..31 three (twice), 32..63 four (three times).
    assert [halvable_size(s) for s in (8, 9, 13, 15, 16, 17, 31, 32, 33, 40)] == [8, 8, 12, 14, 16, 16, 28, 32, 32, 40]
    assert halvable_size(13, (1, 2, 2, 2)) == 8 and halvable_size(13, (1,)) == 13


def test_mixed_sizes_pick_a_size_the_network_can_halve(tmp_path: Path) -> None:
    """Neither --image-size nor --channel-mult given: 9 (the smallest short side) becomes 8, and train says so."""
    from PIL import Image

    data = tmp_path / "mixed"
    data.mkdir()
    for i, (w, h) in enumerate([(9, 12), (10, 10), (16, 9), (12, 12)] * 4):
        Image.new("RGB", (w, h), (40 * (i % 6), 90, 200)).save(data / f"{i:02d}.png")
    args = ["--model-channels", "8", "--timesteps", "20", "--batch-size", "4", "--device", "cpu", "--max-steps", "1"]
    result = invoke(str(data), "-o", str(tmp_path / "run"), *args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert "using 8x8 (the largest size at or below the smallest short side, 9, that the network can halve)" in text
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["image_size"] == 8 and saved["model"]["channel_mult"] == [1, 2]
    result = invoke(str(data), "-o", str(tmp_path / "run2"), *args, "--channel-mult", "1,1,1,1", "--quiet")
    assert result.exit_code == 0, result.output  # three halvings: 8 still fits; a given size is never changed
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["model"]["image_size"] == 8


def test_a_batch_larger_than_the_data_is_warned_about(tmp_path: Path) -> None:
    args = ["--model-channels", "8", "--timesteps", "20", "--device", "cpu", "--max-steps", "1"]
    result = invoke("builtin:digits", "-o", str(tmp_path / "run"), *args, "--batch-size", "1500")
    assert result.exit_code == 0, result.output
    # builtin:digits trains on 1,437 images (1,797 less the held-out fifth).
    assert "warning: --batch-size 1500 is more than the 1,437 training images" in " ".join(result.stderr.split())
    fine = invoke("builtin:digits", "-o", str(tmp_path / "run2"), *args, "--batch-size", "16")
    assert fine.exit_code == 0 and "warning" not in fine.stderr


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("10m", 600), ("1.5h", 5400), ("2d", 172800), ("1h30m", 5400), ("1h 30m 10s", 5410),
    ("1H30M", 5400), ("0.5m", 30)])
def test_durations(text: str, seconds: float) -> None:
    from ddpmctl.config import format_duration, parse_duration

    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds  # what ddpmctl prints reads back


@pytest.mark.parametrize("text", ["1h30", "1 30m", "ten", "", "h", "-5m", "0", "1h-30m"])
def test_bad_durations(text: str) -> None:
    from ddpmctl.config import parse_duration

    with pytest.raises(ValueError):
        parse_duration(text)


def test_max_time_stop_and_a_finished_resume_say_why_and_how_to_go_on(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["--model-channels", "8", "--timesteps", "20", "--device", "cpu", "--log-every", "1"]
    result = invoke("builtin:digits", "-o", str(run), *args, "--max-steps", "100000", "--max-time", "0h0m1s")
    assert result.exit_code == 0, result.output
    step = max(int(p.stem.split("_")[1]) for p in run.glob("state_*.json"))
    assert 0 < step < 100000
    assert (f"stopped by --max-time 1s at step {step} of --max-steps 100000: saved "
            f"{run / f'ema_0.9999_{step:06d}.safetensors'}; continue with `ddpmctl train --out {run} --resume`"
            in " ".join(result.stderr.split()))
    done = invoke("-o", str(run), "--resume", "--max-steps", str(step))
    assert done.exit_code == 0, done.output
    assert (f"{run} is already at step {step}, --max-steps {step}: nothing to train; continue with `ddpmctl train "
            f"--out {run} --resume --max-steps {2 * step}`") in " ".join(done.stderr.split())
    quiet = invoke("-o", str(run), "--resume", "--max-steps", str(step), "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""
