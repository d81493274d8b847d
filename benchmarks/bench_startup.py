"""How long `ddpmctl --version`, `ddpmctl --help` and `ddpmctl train --help` take, in fresh processes.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 7] [--json startup.json]

Each command runs ``--repeats`` times through ``python -m ddpmctl`` (what the console script runs); the table
shows the median and the fastest wall time and the median CPU time (user + system, which a loaded machine
inflates far less than wall time), the bare interpreter (``python -c pass``) and ``import torch`` for
scale, and the load average, since on a shared machine the load dominates these small numbers. The goal is under
0.5 s for ``--version`` and ``--help`` on an idle machine of the project's size (2 cores). Nothing here is a test:
tests/test_packaging.py checks the cause instead (no torch, numpy, pydantic, safetensors or PIL imported by the
CLI module).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    "ddpmctl --version": ["-m", "ddpmctl", "--version"],
    "ddpmctl --help": ["-m", "ddpmctl", "--help"],
    "ddpmctl train --help": ["-m", "ddpmctl", "train", "--help"],
    "ddpmctl sample --help": ["-m", "ddpmctl", "sample", "--help"],
    "python -c 'import torch'": ["-c", "import torch"],
}


def time_command(args: list[str], repeats: int) -> tuple[list[float], list[float]]:
    """(wall times, CPU times) of ``repeats`` fresh runs; CPU time (user + system) is what load does not inflate."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL, env=env)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", dest="json_path", default=None, help="Also write the results to this file.")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    results = {}
    for name, command in CASES.items():
        walls, cpus = time_command(command, args.repeats)
        results[name] = {"median_s": statistics.median(walls), "min_s": min(walls),
                         "median_cpu_s": statistics.median(cpus), "runs": len(walls)}
        print(f"{name:28s} wall: median {statistics.median(walls):.3f} s, fastest {min(walls):.3f} s   "
              f"CPU: median {statistics.median(cpus):.3f} s")
    load_end = os.getloadavg()[0]
    print(f"load average (1 min): {load_start:.2f} at start, {load_end:.2f} at end, on {os.cpu_count()} cores")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump({"results": results, "load_average": [load_start, load_end], "cpus": os.cpu_count()},
                      handle, indent=2)


if __name__ == "__main__":
    main()
