"""Run folders where a checkpoint is expected (`sample RUN`, `eval-nll RUN`), `info RUN`, and the resolver they share
(runfolder.resolve_run_checkpoint), on one tiny real training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ddpmctl.checkpoint import read_checkpoint_info
from ddpmctl.cli.app import app
from ddpmctl.errors import CheckpointError
from ddpmctl.runfolder import resolve_run_checkpoint

TINY = ["--model-channels", "8", "--channel-mult", "1,2", "--res-blocks", "1", "--attention-resolutions", "4",
        "--timesteps", "20", "--batch-size", "16", "--device", "cpu"]


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three complete saves (steps 1, 2, 3); T, flip, dropout and lr left for the data to choose."""
    run = tmp_path_factory.mktemp("runs") / "run"
    args = ["train", "builtin:digits", "-o", str(run), *TINY, "--max-steps", "3", "--save-every", "1", "--quiet"]
    args.remove("--timesteps"), args.remove("20")
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    return run


def test_resolver_picks_the_newest_complete_ema(run: Path, tmp_path: Path) -> None:
    assert resolve_run_checkpoint(run).path == run / "ema_0.9999_000003.safetensors"
    # A save cut short by a kill has no state JSON yet: the newest *complete* save is used.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "state_000003.json").unlink()
    chosen = resolve_run_checkpoint(copy)
    assert chosen.path == copy / "ema_0.9999_000002.safetensors" and "step 2" in chosen.what
    assert read_checkpoint_info(chosen.path).lineage[0]["step"] == 2


def test_resolver_refuses_other_folders(run: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a ddpmctl run"):
        resolve_run_checkpoint(tmp_path)
    empty = tmp_path / "fresh"
    empty.mkdir()
    shutil.copy(run / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="without a complete save"):
        resolve_run_checkpoint(empty)
    result = _invoke("sample", str(empty), "-o", str(tmp_path / "s"))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "without a complete save" in result.stderr


def test_resolver_takes_a_distillation_runs_final_student(tmp_path: Path) -> None:
    (tmp_path / "distill.json").write_text("{}")
    for steps in (16, 8, 4):
        (tmp_path / f"student_{steps}.safetensors").write_bytes(b"")
    chosen = resolve_run_checkpoint(tmp_path)
    assert chosen.path.name == "student_4.safetensors" and chosen.what == "final student, 4 steps"


def test_sample_and_eval_nll_take_a_run_folder_and_say_which_file(run: Path, tmp_path: Path) -> None:
    newest = run / "ema_0.9999_000003.safetensors"
    by_run = _invoke("sample", str(run), "-o", str(tmp_path / "a"), "-n", "3", "--steps", "2", "--device", "cpu")
    assert by_run.exit_code == 0, by_run.output
    assert f"using {newest} (newest EMA save, step 3)" in " ".join(by_run.stderr.split())
    by_file = _invoke("sample", str(newest), "-o", str(tmp_path / "b"), "-n", "3", "--steps", "2", "--device",
                      "cpu", "--quiet")
    assert by_file.exit_code == 0 and by_file.stderr == ""
    with np.load(tmp_path / "a" / "samples.npz") as a, np.load(tmp_path / "b" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])

    result = _invoke("eval-nll", str(run), "-n", "2", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"] == str(newest)


def test_info_run_lists_saves_and_what_the_data_chose(run: Path) -> None:
    result = _invoke("info", str(run), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["kind"] == "training run"
    assert [s["step"] for s in payload["saves"]] == [1, 2, 3]
    assert payload["saves"][-1]["ema"] == "ema_0.9999_000003.safetensors" and payload["saves"][-1]["ema_updates"] == 3
    # Given on the command line: not chosen; left out: chosen from the data (8x8 digits: T 1000, no flips, ...).
    assert set(payload["chosen_from_data"]) == {"timesteps", "mean_type", "lr", "dropout", "flip"}
    assert payload["train"]["timesteps"] == 1000 and payload["train"]["flip"] is False

    table = _invoke("info", str(run))
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    for expected in ("timesteps │ 1000 (chosen from the data)", "batch-size │ 16 │", "lr │ 0.0002 (chosen from the data)",
                     "var-type │ learned-range", "ema_0.9999_000003.safetensors", "power warm-up,"):
        assert expected in text, (expected, table.stdout)

    line = _invoke("info", str(run), "--device", "cpu")
    assert line.exit_code == 2 and "give one of" in line.stderr


def test_respace_and_distill_take_a_run_folder(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ddpmctl.distill

    newest = run / "ema_0.9999_000003.safetensors"
    result = _invoke("respace", str(run), "--steps", "5", "-o", str(tmp_path) + "/", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["from"] == str(newest)
    seen = {}

    def fake(config: ddpmctl.distill.DistillConfig, **kwargs: object) -> ddpmctl.distill.DistillResult:
        seen["config"] = config
        return ddpmctl.distill.DistillResult(out=Path(config.out), from_steps=4, to_steps=2, param="v")

    monkeypatch.setattr(ddpmctl.distill, "distill", fake)
    result = _invoke("distill", str(run), "-o", str(tmp_path / "d"), "--iters-per-stage", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    # The teacher is the run's newest EMA save; its data and flips (digits: none) are the run's.
    assert (seen["config"].checkpoint, seen["config"].data, seen["config"].flip) == (str(newest), "builtin:digits",
                                                                                     False)
