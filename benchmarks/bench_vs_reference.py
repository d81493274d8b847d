"""fp32 training speed of config (a) against the reference-style U-Net, each in its own fresh process, as shipped.

`make bench` times everything interleaved in one process, where both networks share one heap and one glibc
malloc state. A user compares two programs instead: ddpmctl's training step as the `ddpmctl` command runs it
(glibc's mmap/trim thresholds raised by ``ddpmctl.allocator``) and the reference's step with glibc's defaults. This
script runs them alternately in fresh processes (rounds of: ours, reference, reference with ddpmctl's malloc
tuning), each timing the median of 5 training steps after 2 warm-up steps, 1 thread, process CPU time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vs_reference.py [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("ours", "reference", "reference+malloc")


def one(kind: str, threads: int, steps: int) -> float:
    """Seconds per training step (median) of ``kind``, in this process."""
    import torch

    torch.set_num_threads(threads)
    if kind in ("ours", "reference+malloc"):
        from ddpmctl.allocator import tune_malloc

        tune_malloc()
    sys.path.insert(0, str(HERE))
    import bench

    config = bench.train_config("a", "fp32", quick=False)
    step = bench.build_trainer(config).step if kind == "ours" else bench.build_reference(config)
    clock = time.process_time if threads == 1 else time.perf_counter
    return bench.interleaved_medians({kind: step}, warmup=2, repeats=steps, clock=clock)[kind]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.threads, args.steps)))
        return
    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for round_ in range(args.rounds):
        for kind in KINDS:
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--threads", str(args.threads),
                                  "--steps", str(args.steps)], check=True, capture_output=True, text=True).stdout
            seconds[kind].append(float(out.strip().splitlines()[-1]))
        ours = seconds["ours"][-1]
        print(f"round {round_ + 1}: ours {ours:.3f} s/step, reference {seconds['reference'][-1]:.3f} "
              f"({seconds['reference'][-1] / ours:.3f}x), reference with ddpmctl's malloc tuning "
              f"{seconds['reference+malloc'][-1]:.3f} ({seconds['reference+malloc'][-1] / ours:.3f}x)", flush=True)
    med = {kind: statistics.median(values) for kind, values in seconds.items()}
    print(f"median over {args.rounds} rounds: ddpmctl over the reference {med['reference'] / med['ours']:.3f}x, "
          f"over the reference with ddpmctl's malloc tuning {med['reference+malloc'] / med['ours']:.3f}x")


if __name__ == "__main__":
    main()
