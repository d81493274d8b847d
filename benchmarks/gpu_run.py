"""Run one ``ddpmctl`` command in this process and print its img/s and CUDA peak memory (benchmarks/gpu_check.sh).

    python benchmarks/gpu_run.py IMAGES -- train builtin:digits --out runs/x --max-time 60s ...

IMAGES says how img/s is counted: a number (images the command processes, over its whole wall time, loading
included), ``train`` (the training img/s of the command's ``--json`` summary) or ``distill:BATCH`` (updates x BATCH
over the stages' own seconds, from its ``--json``). Peak memory is ``torch.cuda.max_memory_allocated`` over the
whole command.
"""

from __future__ import annotations

import io
import json
import sys
import time
from contextlib import redirect_stdout

import torch


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    images_spec, command = argv[0], argv[2:]
    if not torch.cuda.is_available():
        print("gpu_run: CUDA is not available", file=sys.stderr)
        return 1
    from ddpmctl.allocator import tune_malloc
    from ddpmctl.cli.app import app

    tune_malloc()
    torch.cuda.reset_peak_memory_stats()
    captured = io.StringIO()
    start = time.perf_counter()
    with redirect_stdout(captured):
        try:
            app(command, standalone_mode=False)
        except SystemExit as done:
            if done.code:
                print(captured.getvalue(), end="")
                return int(done.code)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_mib = torch.cuda.max_memory_allocated() / 2**20
    output = captured.getvalue()
    rate, what = _images_per_s(images_spec, output, seconds)
    print(f"{command[0]:>8}: {rate:9.1f} img/s ({what}), wall {seconds:.1f} s, "
          f"peak CUDA memory {peak_mib:,.0f} MiB")
    return 0


def _images_per_s(spec: str, output: str, seconds: float) -> tuple[float, str]:
    if spec == "train":
        summary = json.loads(output[output.index("{"):])
        return float(summary["images_per_s"]), f"{summary['step'] - summary['start_step']} steps, training only"
    if spec.startswith("distill:"):
        stages = json.loads(output[output.index("{"):])["stages"]
        updates = sum(int(stage["iters"]) for stage in stages)
        busy = sum(float(stage["seconds"]) for stage in stages)
        return updates * int(spec.split(":", 1)[1]) / max(busy, 1e-9), f"{updates} updates, stages only"
    return float(spec) / seconds, f"{spec} images, loading included"


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
