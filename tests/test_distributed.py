"""`torchrun --nproc_per_node 2 -m ddpmctl train` on the CPU (gloo): runs, and both ranks hold identical parameters."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from ddpmctl.checkpoint import load_checkpoint

TINY = ["--model-channels", "16", "--channel-mult", "1,2", "--res-blocks", "1", "--attention-resolutions", "4",
        "--timesteps", "20", "--batch-size", "16", "--save-every", "10", "--max-steps", "20",
        "--timestep-sampler", "loss-second-moment", "--quiet", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run a command in its own process group; on timeout kill the whole group (no hung ranks left behind)."""
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def param_sha256(model: torch.nn.Module) -> str:
    """Parameter digest as each rank reports it: name, then the fp32 bytes, for every parameter in order."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_two_ranks_end_with_identical_parameters(tmp_path: Path) -> None:
    two, one = tmp_path / "two", tmp_path / "one"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "ddpmctl", "train", "builtin:digits", "--out", str(two), *TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((two / "state_000020.json").read_text())
    assert state["world_size"] == 2
    # Each rank hashed its own parameters at the final save; rank 0's file must hash to the same value.
    ranks = state["rank_param_sha256"]
    saved = param_sha256(load_checkpoint(two / "model_000020.safetensors").model)
    assert ranks == [saved, saved]

    # The global batch is drawn the same way whatever the world size, so a single process trains (almost) the
    # same network: only the order of float additions in the gradient average differs.
    proc = run([sys.executable, "-m", "ddpmctl", "train", "builtin:digits", "--out", str(one), *TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(one / "model_000020.safetensors").model.state_dict()
    b = load_checkpoint(two / "model_000020.safetensors").model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3)
