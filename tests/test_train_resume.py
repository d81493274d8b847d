"""Exact resume: a run killed with SIGKILL after a checkpoint, resumed, ends with the uninterrupted run's weights.

Every run is a subprocess with the same environment (one thread, the suite's CPU class), so only the kill and the
resume differ. Bit-exact in fp32 and in bf16 alike: a resumed run repeats the same operations in the same precision.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_same_files

pytestmark = pytest.mark.slow  # kill trials: each starts and kills Python processes

# Trains the tiny config; with HANG_AT=k it stops making progress after step k (the parent then kills it).
SCRIPT = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from ddpmctl.config import TrainConfig
from ddpmctl.train import train

out, max_steps, resume, hang_at = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
precision = sys.argv[5]

def callback(event):
    if event.kind == "step" and event.step == hang_at:
        open(os.path.join(out, "HUNG"), "w").close()
        time.sleep(600)

config = TrainConfig(data="builtin:digits", out=out, model_channels=16, channel_mult=(1, 2), res_blocks=1,
                     attention_resolutions=(4,), timesteps=20, batch_size=24, dropout=0.1,
                     timestep_sampler="loss-second-moment", save_every=5, log_every=2, max_steps=max_steps,
                     precision=precision)
result = train(config, device=torch.device("cpu"), resume=resume, callback=callback)
print(json.dumps({"start": result.start_step, "step": result.step}))
"""

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run(out: Path, max_steps: int, precision: str, *, resume: bool = False, hang_at: int = -1) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(max_steps), str(int(resume)), str(hang_at),
                           precision],
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_and_kill(out: Path, max_steps: int, precision: str, hang_at: int) -> None:
    """Start a run, wait until it reaches ``hang_at`` (past its last checkpoint), then SIGKILL it."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), str(max_steps), "0", str(hang_at), precision],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / "HUNG").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    (out / "HUNG").unlink()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path: Path, precision: str) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run(full, 10, precision) == {"start": 0, "step": 10}
    # Killed at step 7: two steps past its step-5 checkpoint (those updates, RNG draws and sampler history are lost).
    run_and_kill(killed, 10, precision, hang_at=7)
    saves = sorted(p.name for p in killed.glob("state_*.json"))
    assert saves == ["state_000005.json"]
    assert run(killed, 10, precision, resume=True) == {"start": 5, "step": 10}
    assert_same_files(full, killed, ["model_000010.safetensors", "ema_0.9999_000010.safetensors",
                                     "state_000010.safetensors"])
    # metrics.jsonl was rewound to the checkpoint: every step logged once, as in the uninterrupted run.
    def logged(run_dir: Path) -> list[tuple[int, str]]:
        return [(m["step"], m["precision"]) for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]

    assert logged(killed) == logged(full) == [(step, precision) for step in (2, 4, 6, 8, 10)]


def test_sigterm_saves_at_the_current_step_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ddpmctl", "train", "builtin:digits", "--out", str(out), "--model-channels", "16",
            "--channel-mult", "1,2", "--res-blocks", "1", "--attention-resolutions", "4", "--timesteps", "20",
            "--batch-size", "8", "--log-every", "1", "--save-every", "1000000", "--device", "cpu"]
    proc = subprocess.Popen([*args, "--max-steps", "1000000"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted at step" in stderr and "Traceback" not in stderr
    step = int(stderr.split("interrupted at step ")[1].split(":")[0])
    assert step >= 3
    assert sorted(p.name for p in out.glob("state_*.json")) == [f"state_{step:06d}.json"]
    resumed = subprocess.run([*args, "--max-steps", str(step + 2), "--resume", "--json"], env=ENV,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout)
    assert (summary["start_step"], summary["step"]) == (step, step + 2)


def test_a_run_that_left_the_network_to_the_defaults_resumes(tmp_path: Path) -> None:
    # Only the width is given: the levels, blocks and attention are chosen from the data. The save records them as
    # the built network has them, which is how --resume reads config.json back, so the resume is accepted and ends
    # at the uninterrupted run's weights.
    import torch

    from ddpmctl.config import TrainConfig
    from ddpmctl.train import train

    cpu = torch.device("cpu")
    base = dict(data="builtin:digits", model_channels=8, timesteps=20, batch_size=8, save_every=2,
                precision="fp32", seed=3)
    train(TrainConfig(**base, out=str(tmp_path / "straight"), max_steps=4), device=cpu)
    train(TrainConfig(**base, out=str(tmp_path / "resumed"), max_steps=2), device=cpu)
    train(TrainConfig(**base, out=str(tmp_path / "resumed"), max_steps=4), device=cpu, resume=True)
    assert_same_files(tmp_path / "straight", tmp_path / "resumed",
                      ["ema_0.9999_000004.safetensors", "model_000004.safetensors"])
