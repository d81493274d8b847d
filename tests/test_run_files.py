"""Run files are untrusted input (docs/design.md "Run files"): the inputs that once broke the one-line contract
(an edited state JSON, a --config that is a device, a pipe or loosely typed, a checkpoint config asking for a huge
network, an option the chosen mode ignores), each one line with the documented exit code, quickly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from ddpmctl.checkpoint import load_tensors
from ddpmctl.cli.app import app
from ddpmctl.errors import CheckpointError, ConfigError
from ddpmctl.runfiles import MAX_TEXT_BYTES, read_small_text

RESUME = ["--resume", "--max-steps", "8", "--max-time", "1h", "--quiet", "--device", "cpu"]  # (runs: conftest)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def one_line(result: Any, code: int) -> str:
    """Exit ``code``, exactly one 'error: ...' line on stderr, no traceback and no internal error."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def copy_run(runs: dict[str, Path], tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs["run6"], run)
    return run


def edit_state(run: Path, **fields: Any) -> Path:
    path = run / "state_000006.json"
    state = json.loads(path.read_text())
    state.update(fields)
    path.write_text(json.dumps(state))
    return path


# ------------------------------------------------------------------------------------------ edited state JSON
@pytest.mark.parametrize(("fields", "words"), [
    ({"step": 5}, "field step: 5 differs from the step in the file name (6)"),
    ({"step": 1}, "field step"),
    ({"step": "six"}, "field step: Input should be a valid integer"),
    ({"ema_updates": -3}, "field ema_updates must be at least 0, not -3"),
    ({"data_position": -5}, "field data_position must be at least 0, not -5"),
    ({"data_position": 10**6}, "field data_position"),
    ({"epoch": 2}, "field data_position"),
    ({"nan_skips": 7}, "field nan_skips"),
    ({"ema_updates": 5}, "field ema_updates"),
    ({"elapsed": float("nan")}, "field elapsed"),
])
def test_an_edited_state_file_is_one_line_naming_file_and_field(runs: dict[str, Path], tmp_path: Path,
                                                                fields: dict[str, Any], words: str) -> None:
    run = copy_run(runs, tmp_path)
    path = edit_state(run, **fields)
    started = time.monotonic()
    line = one_line(invoke("train", "--out", str(run), *RESUME), 1)
    # Well within a second of work (the bound leaves room for a machine shared by several test runs).
    assert time.monotonic() - started < 5
    assert str(path) in line and words in line, line
    assert not (run / "state_000008.json").exists()


def test_an_unedited_state_resumes_to_the_uninterrupted_weights(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs, tmp_path)
    edit_state(run, elapsed=123.0)  # bookkeeping only: the weights do not depend on it
    result = invoke("train", "--out", str(run), *RESUME)
    assert result.exit_code == 0, result.output
    for name in ("model_000008.safetensors", "ema_0.9999_000008.safetensors", "state_000008.safetensors"):
        mine, reference = load_tensors(run / name)[0], load_tensors(runs["run8"] / name)[0]
        assert mine.keys() == reference.keys()
        assert all(torch.equal(mine[k], reference[k]) for k in mine), name


def test_a_state_whose_data_order_is_not_a_permutation_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs, tmp_path)
    tensors, metadata = load_tensors(run / "state_000006.safetensors")
    tensors["data.perm"] = torch.zeros_like(tensors["data.perm"])
    safetensors.torch.save_file(tensors, str(run / "state_000006.safetensors"), metadata=metadata)
    assert "data.perm is not a permutation" in one_line(invoke("train", "--out", str(run), *RESUME), 1)


# ------------------------------------------------------------------------------------------ --config files
def _fifo(tmp_path: Path) -> Path:
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    return fifo


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="POSIX special files")
@pytest.mark.parametrize(("special", "words"), [
    (lambda tmp: Path("/dev/zero"), "is a character device, not a regular file"),
    (_fifo, "is a named pipe, not a regular file"),
])
def test_config_that_is_not_a_regular_file_is_refused_without_reading(tmp_path: Path, special: Any,
                                                                      words: str) -> None:
    path = special(tmp_path)
    started = time.monotonic()
    line = one_line(invoke("train", "builtin:digits", "--config", str(path), "-o", str(tmp_path / "r")), 2)
    assert time.monotonic() - started < 5 and str(path) in line and words in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("name", "text"), [("deep.toml", "a = " + "[" * 50_000 + "]" * 50_000),
                                          ("deep.json", "{\"a\": " + "[" * 50_000 + "]" * 50_000 + "}")])
def test_a_deeply_nested_config_is_one_line(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    assert "nested too deeply" in one_line(invoke("train", "builtin:digits", "--config", str(tmp_path / name)), 2)


def test_an_oversized_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text("# padding\n" * (MAX_TEXT_BYTES // 10 + 1))
    line = one_line(invoke("train", "builtin:digits", "--config", str(path)), 2)
    assert "more than the 1,048,576 a ddpmctl settings" in line


@pytest.mark.parametrize(("toml", "flag", "words"), [
    ("batch_size = true", ["-b", "true"], "batch_size: Input should be a valid integer"),
    # (The command line reads "-b 64.0" as 64; in a file a float is a float, and batch_size takes an int.)
    ("batch_size = 64.0", None, "batch_size: Input should be a valid integer"),
    ("lr = true", ["--lr", "true"], "lr: Input should be a valid number"),
    ("heads = 65", ["--heads", "65"], "heads must be at most 64, not 65"),
    ("schedule = \"square\"", ["--schedule", "square"], "schedule: Input should be 'cosine' or 'linear'"),
    ("channel_mult = [1, true]", ["--channel-mult", "1,true"], "channel_mult[1]: Input should be a valid integer"),
    ("flip = 1", None, "flip: Input should be a valid boolean"),
    ("seed = -1", ["--seed", "-1"], "seed must be at least 0, not -1"),
])
def test_config_values_are_typed_as_strictly_as_the_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             toml: str, flag: list[str] | None, words: str) -> None:
    import ddpmctl.train

    def accepted(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the value was accepted")

    monkeypatch.setattr(ddpmctl.train, "train", accepted)
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    line = one_line(invoke("train", "builtin:digits", "--config", str(path), "-o", str(tmp_path / "r")), 2)
    assert str(path) in line and words in line, line
    if flag is not None:  # the same value on the command line is refused the same way (exit 2)
        one_line(invoke("train", "builtin:digits", *flag, "-o", str(tmp_path / "r")), 2)
    assert not (tmp_path / "r").exists()


def test_a_run_config_json_with_a_loose_value_is_refused_on_resume(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["train"]["batch_size"] = True
    (run / "config.json").write_text(json.dumps(config))
    line = one_line(invoke("train", "--out", str(run), *RESUME), 1)
    assert str(run / "config.json") in line and "field train.batch_size" in line


@pytest.mark.parametrize(("field", "value"), [("lr", 3e-4), ("flip", True), ("timestep_sampler", "loss-second-moment")])
def test_a_run_config_json_edited_since_the_save_is_refused(runs: dict[str, Path], tmp_path: Path, field: str,
                                                           value: Any) -> None:
    """Each save records the settings it was made with: a resume never trains on with others (which would end at
    weights no uninterrupted run has)."""
    run = copy_run(runs, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["train"][field] = value
    (run / "config.json").write_text(json.dumps(config))
    line = one_line(invoke("train", "--out", str(run), *RESUME), 1)
    assert str(run / "state_000006.json") in line and field in line and "config.json" in line, line


def test_read_small_text_refuses_folders_and_reads_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder, not a regular file"):
        read_small_text(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        read_small_text(tmp_path / "nope.json", error=CheckpointError)
    (tmp_path / "a.json").write_text("{\"ü\": 1}")
    assert read_small_text(tmp_path / "a.json") == "{\"ü\": 1}"
    (tmp_path / "b.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_small_text(tmp_path / "b.json")


# ------------------------------------------------------------------------------------------ checkpoint configs
CHILD = r"""
import resource, sys, time
from typer.testing import CliRunner
import ddpmctl.checkpoint, ddpmctl.samplers  # imported first: the time below is the command's own work
from ddpmctl.cli.app import app
start = time.monotonic()
result = CliRunner().invoke(app, sys.argv[1:])
print(result.exit_code, time.monotonic() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print(result.stderr)
"""


@pytest.mark.parametrize("channels", [10**12, 10**9, 4097])
def test_a_checkpoint_asking_for_a_huge_network_is_refused_before_building_it(runs: dict[str, Path], tmp_path: Path,
                                                                           channels: int) -> None:
    tensors, metadata = load_tensors(runs["run6"] / "ema_0.9999_000006.safetensors")
    config = json.loads(metadata["config"])
    config["model"]["model_channels"] = channels
    path = tmp_path / "huge.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={**metadata, "config": json.dumps(config)})
    # In a child process, so its peak memory is its own: the refusal must not build (or allocate) anything.
    baseline = subprocess.run([sys.executable, "-c", CHILD, "info", str(runs["run6"] / "model_000006.safetensors")],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-c", CHILD, "sample", str(path), "-o", str(tmp_path / "s"), "-n", "1",
                           "--steps", "1", "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    code, seconds, peak_kib = proc.stdout.split("\n")[0].split()
    base_peak_kib = int(baseline.stdout.split()[2])
    lines = [line for line in proc.stdout.split("\n")[1:] if line.strip()]
    assert code == "1" and len(lines) == 1, proc.stdout
    assert str(path) in lines[0] and "config.model.model_channels" in lines[0] and "4096" in lines[0], lines
    assert float(seconds) < 5
    # ru_maxrss is in KiB on Linux: the refusal costs no more than reading a valid checkpoint's header (+64 MiB).
    assert int(peak_kib) < int(base_peak_kib) + 64 * 1024, (peak_kib, base_peak_kib)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------ options that do nothing
def test_pilot_images_with_the_exact_estimator_is_refused(runs: dict[str, Path]) -> None:
    ckpt = str(runs["run6"] / "ema_0.9999_000006.safetensors")
    line = one_line(invoke("eval-nll", ckpt, "--estimator", "exact", "--pilot-images", "3", "-n", "1"), 2)
    assert "--pilot-images is for --estimator mc" in line
    line = one_line(invoke("eval-nll", ckpt, "--terms", "3", "-n", "1"), 2)
    assert "--terms is for --estimator mc" in line


def test_logsnr_range_with_another_spacing_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = str(runs["run6"] / "ema_0.9999_000006.safetensors")
    line = one_line(invoke("sample", ckpt, "-s", "dpmpp-2m", "-O", "spacing=even", "-O", "lambda_min=-3",
                           "-o", str(tmp_path / "s"), "-n", "1", "--device", "cpu"), 2)
    assert "lambda_min" in line and "spacing=even" in line
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------ distillation files
@pytest.fixture(scope="module")
def distilled(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distilled") / "d"
    result = invoke("distill", *DISTILL, "--out", str(out), str(runs["run6"] / "ema_0.9999_000006.safetensors"))
    assert result.exit_code == 0, result.output
    return out


DISTILL = ["--data", "builtin:digits", "--from-steps", "4", "--to-steps", "2", "--iters-per-stage", "2",
           "--batch-size", "4", "--report-samples", "2", "--device", "cpu", "--precision", "fp32", "--quiet"]


@pytest.mark.parametrize(("name", "edit", "words"), [
    ("distill.json", lambda d: d.update(stages=[8]), "field stages"),
    ("distill.json", lambda d: d.update(to_steps=1), "field to_steps"),
    ("distill.json", lambda d: d["config"].update(iters_per_stage=True), "field config.iters_per_stage"),
    ("distill.json", lambda d: d.update(parent_sha256="x"), "field parent_sha256"),
    ("report.json", lambda d: d["stages"][0].update(seconds=-1.0), "field stages.0.seconds"),
    ("report.json", lambda d: d["stages"][0].update(steps=3), "field stages.0"),
    ("report.json", lambda d: d.update(stages="all"), "field stages"),
])
def test_an_edited_distillation_file_is_one_line(runs: dict[str, Path], distilled: Path, tmp_path: Path, name: str,
                                                 edit: Any, words: str) -> None:
    out = tmp_path / "d"
    shutil.copytree(distilled, out)
    document = json.loads((out / name).read_text())
    edit(document)
    (out / name).write_text(json.dumps(document))
    line = one_line(invoke("distill", *DISTILL, "--out", str(out), "--resume",
                           str(runs["run6"] / "ema_0.9999_000006.safetensors")), 1)
    assert str(out / name) in line and words in line, line


@pytest.mark.parametrize(("metadata", "words"), [
    ({"iteration": "3"}, "field iteration: 3 is beyond the stage's 2 iterations"),
    ({"iteration": "one"}, "field iteration"),
    ({"iteration": "1", "seconds": "nan"}, "field seconds"),
    ({"iteration": "1", "values": "[1"}, "not valid JSON"),
    ({"iteration": "1", "values": "{\"epoch\": 1, \"data_position\": 9}"}, "field data_position"),
    ({"iteration": "1", "values": "{\"recent_losses\": [\"x\"]}"}, "field recent_losses.0"),
])
def test_a_stage_state_is_checked(metadata: dict[str, str], words: str) -> None:
    from ddpmctl.runfiles import check_stage_state

    with pytest.raises(CheckpointError) as caught:
        check_stage_state({"format": "ddpmctl-distill/1", **metadata}, Path("state_2.safetensors"), iters=2,
                          batch_size=4, num_images=100, error=CheckpointError)
    assert words in str(caught.value) and "state_2.safetensors" in str(caught.value)
    iteration, values = check_stage_state({"iteration": "1", "values": "{\"epoch\": 1, \"data_position\": 4}"},
                                          Path("s"), iters=2, batch_size=4, num_images=100, error=CheckpointError)
    assert iteration == 1 and values["data_position"] == 4
