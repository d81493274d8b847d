"""Hardening of training: kill -9 at seeded moments, a disk that fills up, non-finite losses.

The kill trials fork this (already imported) test process instead of starting Python afresh: a fork costs
milliseconds where a new interpreter costs seconds on this machine, so ten and more trials fit the time budget.
Every trial checks what a user relies on: no half-written file under a final name, the newest complete save
loads, ``--resume`` finishes, and the result is bit for bit the uninterrupted run's.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import stat
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

import ddpmctl.fileio as fileio_module
import ddpmctl.train as train_module
from ddpmctl import runfolder
from ddpmctl.checkpoint import load_checkpoint
from ddpmctl.fileio import load_tensors
from ddpmctl.config import TrainConfig
from ddpmctl.errors import CheckpointError, TrainingError
from ddpmctl.train import train
from conftest import LossPoison, assert_same_files, tensors

CPU = torch.device("cpu")
STEPS = 8
# The brief's tiny network; dropout and the loss-aware sampler make every RNG and history state matter on resume.
TINY = dict(data="builtin:digits", model_channels=16, channel_mult=(1, 2), res_blocks=1, attention_resolutions=(4,),
            timesteps=50, batch_size=8, dropout=0.1, timestep_sampler="loss-second-moment", log_every=1,
            save_every=1, keep=2, max_steps=STEPS)
FINAL_FILES = [f"model_{STEPS:06d}.safetensors", f"ema_0.9999_{STEPS:06d}.safetensors",
               f"state_{STEPS:06d}.safetensors"]
pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/fd").is_dir(),
                                reason="the kill trials fork and read /proc")



def tiny(out: Path, **overrides: object) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(out), **overrides})


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ kill -9 trials
def _truncate_at_fsync(call: int, marker: Path) -> None:
    """In the child: at the ``call``-th fsync of a regular file, cut that file to half its size and hang.

    This is the state a kill leaves in the middle of writing that file (the data not yet all written). Where the
    writer puts the file (a temporary name, or the final one if writes were not atomic) decides the damage.
    """
    real_fsync = os.fsync
    count = {"n": 0}

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            count["n"] += 1
            if count["n"] == call:
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                marker.write_text(os.readlink(f"/proc/self/fd/{fd}"))
                time.sleep(120)
        real_fsync(fd)

    os.fsync = fsync  # only in the forked child


def _start(out: Path, *, truncate_call: int | None = None, marker: Path | None = None,
           kill_at: tuple[str, int] | None = None) -> int:
    """Fork a child that trains (resuming when the folder holds a run) and exits 0 when done.

    ``kill_at=(kind, step)``: the child SIGKILLs itself when the loop reports that event (``step``: the update is
    done, nothing written yet; ``log``: its metrics line is appended; ``save``: all four files are complete).
    """
    resume = (out / runfolder.CONFIG_FILE).exists()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            if truncate_call is not None and marker is not None:
                _truncate_at_fsync(truncate_call, marker)

            def callback(event: train_module.TrainEvent) -> None:
                if kill_at is not None and (event.kind, event.step) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            train(tiny(out), device=CPU, resume=resume, callback=callback)
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    return pid


def _wait(pid: int, *, marker: Path | None = None, deadline: float = 120.0) -> str:
    """Wait for the child: 'finished' (exit 0), or 'killed' when it killed itself or, once ``marker`` exists, by
    this process. Fails after ``deadline`` seconds."""
    start = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                return "killed"
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the training child failed ({status})"
            return "finished"
        if marker is not None and marker.exists():
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "killed"
        if time.monotonic() - start > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the training child neither finished nor reached the kill point")
        time.sleep(0.005)


def _check_folder_after_kill(out: Path) -> None:
    """No truncated file under a final name; the newest complete save loads as a checkpoint and as a state."""
    for path in out.glob("*.safetensors"):
        load_tensors(path)  # raises CheckpointError for a half-written file
    saves = runfolder.complete_saves(out)
    if saves:
        step = saves[-1]
        assert load_checkpoint(out / f"ema_0.9999_{step:06d}.safetensors").kind == "model"
        load_checkpoint(out / f"model_{step:06d}.safetensors")
        assert json.loads((out / f"state_{step:06d}.json").read_text())["step"] == step


@pytest.mark.slow
def test_kill_9_at_seeded_moments_then_resume_is_exact(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert _wait(_start(reference)) == "finished"

    rng = random.Random(8)
    outcomes: list[str] = []
    trials = 12
    for trial in range(trials):
        out = tmp_path / f"trial{trial}"
        out.mkdir()
        kills = 1 + (trial % 3 == 2)  # every third trial is killed twice (the resumed run is killed too)
        for _ in range(kills):
            saves = runfolder.complete_saves(out) if (out / runfolder.CONFIG_FILE).exists() else []
            start = saves[-1] if saves else 0  # where this run starts: every kill point below lies ahead of it
            if trial % 2:
                # Inside a write: at the call-th regular-file fsync (config.json, then 4 files per step's save) the
                # child cuts the file being written to half its size and hangs there; then it is killed.
                marker = out / "CUT"
                call = rng.randint(1, 1 + 4 * (STEPS - start))
                outcome = _wait(_start(out, truncate_call=call, marker=marker), marker=marker)
                where = marker.read_text() if marker.exists() else ""
                marker.unlink(missing_ok=True)
                outcomes.append(f"{outcome} in write {call} ({Path(where).name})")
            else:
                # Between writes: after a seeded step's update, its metrics line, or its complete save.
                step = rng.randint(start + 1, STEPS)
                kind = rng.choice(["step", "log", "save"] if step < STEPS else ["step", "log"])
                outcomes.append(f"{_wait(_start(out, kill_at=(kind, step)))} at {kind} {step}")
            _check_folder_after_kill(out)
        # --resume (or a fresh start when the kill came before config.json) runs to the end, in this process.
        result = train(tiny(out), device=CPU, resume=(out / runfolder.CONFIG_FILE).exists())
        assert result.step == STEPS
        assert_same_files(reference, out, FINAL_FILES)
        assert logged_steps(out) == list(range(1, STEPS + 1))
        # Temporary files of the killed writers are gone, and --keep 2 pruned everything else.
        left = sorted(p.name for p in out.iterdir())
        assert left == sorted(p.name for p in reference.iterdir()), (trial, left)
    # Every kill point lies ahead of where its run started, so every one of the 16 runs was killed.
    assert len(outcomes) == trials + trials // 3 and all(o.startswith("killed") for o in outcomes), outcomes
    assert any("killed in write" in o and ".tmp" in o for o in outcomes), outcomes


def test_leftover_temp_files_do_not_break_resume_or_keep(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(run, max_steps=2), device=CPU)
    junk = [".model_000003.safetensors.4242.0badc0de.tmp", ".state_000003.json.4242.00000001.tmp",
            ".config.json.4242.deadbeef.tmp", "metrics.jsonl.tmp", ".tmpAb3xYz"]
    for name in junk:
        (run / name).write_bytes(b"half a file")
    (run / "notes.txt").write_text("mine")  # not ours: never touched
    result = train(tiny(run, max_steps=4), device=CPU, resume=True)
    assert result.start_step == 2 and result.step == 4
    names = sorted(p.name for p in run.iterdir())
    assert not any(name in names for name in junk)
    assert runfolder.complete_saves(run) == [3, 4] and "notes.txt" in names


# ------------------------------------------------------------------------------------------------ a full disk
def _disk_full_on_save(monkeypatch: pytest.MonkeyPatch, failing_call: int) -> None:
    """The ``failing_call``-th safetensors write raises ENOSPC after writing part of its file."""
    real = fileio_module.safetensors.torch.save_file
    calls = {"n": 0}

    def save_file(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        calls["n"] += 1
        if calls["n"] == failing_call:
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(fileio_module.safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("which", [1, 2, 3])  # the EMA checkpoint, the raw model, the training state
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              which: int) -> None:
    run, reference = tmp_path / "run", tmp_path / "reference"
    train(tiny(reference, max_steps=4, save_every=2), device=CPU)
    # Saves at steps 2 and 4, three safetensors writes each: fail one of the step-4 writes.
    with monkeypatch.context() as patch:
        _disk_full_on_save(patch, 3 + which)
        with pytest.raises(CheckpointError) as err:
            train(tiny(run, max_steps=4, save_every=2), device=CPU)
    message = str(err.value)
    assert "\n" not in message and "saving step 4" in message and os.strerror(errno.ENOSPC) in message
    assert f"{run / 'ema_0.9999_000002.safetensors'} is intact" in message and "--resume" in message
    assert runfolder.complete_saves(run) == [2]
    assert not list(run.glob(".*.tmp"))  # the failed write cleaned up after itself
    load_checkpoint(run / "ema_0.9999_000002.safetensors")
    assert_same_files(reference, run, ["model_000002.safetensors", "state_000002.safetensors"])
    # Space again: --resume continues from step 2 and ends where the uninterrupted run ended.
    result = train(tiny(run, max_steps=4, save_every=2), device=CPU, resume=True)
    assert result.start_step == 2 and result.step == 4
    assert_same_files(reference, run, ["model_000004.safetensors", "ema_0.9999_000004.safetensors",
                                       "state_000004.safetensors"])


def test_disk_full_on_the_first_save_says_nothing_was_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _disk_full_on_save(monkeypatch, 1)
    with pytest.raises(CheckpointError, match="saving step 2 .* no earlier checkpoint exists"):
        train(tiny(tmp_path / "run", max_steps=4, save_every=2), device=CPU)


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_loss_stops_naming_the_step(tmp_path: Path, value: float, poison_losses: LossPoison) -> None:
    run = tmp_path / "run"
    poison_losses(value, {3})
    with pytest.raises(TrainingError, match=r"non-finite loss \(-?inf\) at step 3") as err:
        train(tiny(run, max_steps=6, save_every=2), device=CPU)
    assert "ema_0.9999_000002.safetensors" in str(err.value)
    assert runfolder.complete_saves(run) == [2]
    assert all(torch.isfinite(v).all() for v in tensors(run / "model_000002.safetensors").values())
    # The saved state is good: resuming (without the poison) finishes.
    poison_losses.stop()
    assert train(tiny(run, max_steps=4, save_every=2), device=CPU, resume=True).step == 4


def test_skip_policy_survives_resume_and_keeps_counting(tmp_path: Path,
                                                       poison_losses: LossPoison) -> None:
    run = tmp_path / "run"
    poison_losses(float("nan"), {2})
    assert train(tiny(run, max_steps=3, nan_policy="skip"), device=CPU).nan_skips == 1
    poison_losses(float("inf"), {1})  # the first step after resuming
    result = train(tiny(run, max_steps=5, nan_policy="skip"), device=CPU, resume=True)
    assert result.nan_skips == 2 and json.loads((run / "state_000005.json").read_text())["nan_skips"] == 2
