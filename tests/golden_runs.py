"""Fingerprints of short training and distillation runs, to show that a refactor of the loops changed no number.

    python tests/golden_runs.py OUT.json            # run them (about 2 minutes on one core), write the fingerprints
    python tests/golden_runs.py NEW.json --compare OLD.json

What it runs (fp32 pinned: ``--precision auto`` is bf16 on an AVX-512-BF16 CPU and fp32 on an AVX2 one):
- ``train``: a tiny U-Net on builtin:digits for 12 steps (flips, loss-second-moment timesteps, dropout, saves every
  4 steps, --keep 2), straight through, and the same run stopped at step 6 and resumed to 12;
- ``distill``: that run's EMA checkpoint from 8 to 2 DDIM steps, straight through, and the same run stopped in its
  second stage and resumed.

- ``train_bf16``: the training run for 4 steps in bf16 autocast (emulated where the CPU lacks it).

The fingerprint of a folder is the sha256 of the tensors and of the metadata of every safetensors file in it, and
of every JSON / JSONL file with its wall-clock fields and its parents' file hashes dropped. The numbers are a
function of the CPU's kernels, so the fingerprints compare runs on one machine (before and after a change), not
across machines; the tests (test_train_resume, test_distill) check the machine-independent half: resumed ==
uninterrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# Fields that differ between two runs of the same numbers: wall-clock times, and the sha256 of a parent checkpoint's
# file (safetensors writes its metadata map in a hash order that changes from process to process).
UNSTABLE = {"elapsed", "img_per_s", "seconds", "parent_sha256"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
TRAIN = ["builtin:digits", "--model-channels", "8", "--channel-mult", "1,2", "--res-blocks", "1",
         "--attention-resolutions", "4", "--timesteps", "32", "--batch-size", "8", "--dropout", "0.1",
         "--timestep-sampler", "loss-second-moment", "--flip", "--save-every", "4", "--keep", "2",
         "--log-every", "3", "--seed", "3", "--precision", "fp32", "--device", "cpu", "--quiet"]

# Distillation through the library, so a stop can fall inside a stage (the CLI stops only on a signal).
DISTILL = r"""
import sys, torch
torch.set_num_threads(1)
from ddpmctl.distill import DistillConfig, distill
ckpt, out, stop_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
config = DistillConfig(checkpoint=ckpt, data="builtin:digits", out=out, from_steps=8, to_steps=2,
                       iters_per_stage=6, batch_size=4, report_samples=4, save_every=2, lr=1e-3, seed=5,
                       precision="fp32")
seen = []
def stop():
    return any(e.kind == "step" and e.stage == 2 and e.step == stop_at for e in seen)
distill(config, device="cpu", resume=resume, callback=seen.append, should_stop=stop)
"""


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")


def _stable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in UNSTABLE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _tensor_digest(path: Path) -> tuple[str, str]:
    """sha256 of the tensors (names, dtypes, shapes, bytes in name order) and of the metadata (keys sorted).
    Not of the file: safetensors writes its metadata map in a hash order that changes from process to process."""
    from ddpmctl.fileio import load_tensors

    tensors, meta = load_tensors(path)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    meta_values = {k: _stable(json.loads(v)) if v[:1] in "[{" else v for k, v in meta.items()}
    return digest.hexdigest(), hashlib.sha256(json.dumps(meta_values, sort_keys=True).encode()).hexdigest()


def fingerprint(folder: Path, root: Path) -> dict[str, str]:
    """A sha256 of each file that holds numbers (wall-clock fields of JSON files dropped, the temporary root
    written as ROOT); a safetensors file has two: ``name`` (its tensors) and ``name:meta`` (its metadata)."""
    prints: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            prints[path.name], prints[path.name + ":meta"] = _tensor_digest(path)
            continue
        if path.suffix == ".jsonl":
            values: object = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            continue
        text = json.dumps(_stable(values), sort_keys=True).replace(str(root), "ROOT")
        prints[path.name] = hashlib.sha256(text.encode()).hexdigest()
    return prints


def run_all(root: Path) -> dict[str, dict[str, str]]:
    cli = [sys.executable, "-m", "ddpmctl", "train"]
    _run(cli + TRAIN + ["--out", str(root / "train"), "--max-steps", "12"])
    _run(cli + TRAIN + ["--out", str(root / "resumed"), "--max-steps", "6"])
    _run(cli + ["--out", str(root / "resumed"), "--resume", "--max-steps", "12", "--quiet", "--device", "cpu"])
    bf16 = [a if a != "fp32" else "bf16" for a in TRAIN]
    _run(cli + bf16 + ["--out", str(root / "train_bf16"), "--max-steps", "4"])
    ckpt = str(root / "train" / "ema_0.9999_000012.safetensors")
    _run([sys.executable, "-c", DISTILL, ckpt, str(root / "distill"), "-1", "0"])
    _run([sys.executable, "-c", DISTILL, ckpt, str(root / "distill_resumed"), "3", "0"])
    _run([sys.executable, "-c", DISTILL, ckpt, str(root / "distill_resumed"), "-1", "1"])
    return {name: fingerprint(root / name, root) for name in ("train", "resumed", "train_bf16", "distill", "distill_resumed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="where to write the fingerprints (JSON)")
    parser.add_argument("--compare", type=Path, help="fingerprints of an earlier version to compare with")
    args = parser.parse_args()
    if os.environ.get("GOLDEN_KEEP"):
        prints = run_all(Path(tempfile.mkdtemp(dir=os.environ["GOLDEN_KEEP"])))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            prints = run_all(Path(tmp))
    args.out.write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")
    problems = []
    for name in ("train", "distill"):
        resumed = prints[f"{name}_resumed" if name == "distill" else "resumed"]
        for file, digest in prints[name].items():
            # The two runs' folders differ in name, which the configs and the lineage metadata record.
            if file in resumed and resumed[file] != digest and file.endswith(".safetensors"):
                problems.append(f"{name}: resumed {file} differs from the uninterrupted run's")
    if args.compare is not None:
        old = json.loads(args.compare.read_text())
        for run, files in old.items():
            for file, digest in files.items():
                if prints.get(run, {}).get(file) != digest:
                    problems.append(f"{run}/{file}: {digest[:12]} before, {prints.get(run, {}).get(file)} now")
    print("\n".join(problems) if problems else "identical")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
