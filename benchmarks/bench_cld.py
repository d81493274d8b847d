"""The cost of a CLD training step, and of one sampling-step network call, against IDDPM's on the same U-Net,
interleaved in one run.

Both training steps are train's own (``ddpmctl train`` and ``ddpmctl train --method cld`` with the same network
options): the IDDPM step is one forward and backward of the U-Net (hybrid loss, learned-range variance: C channels
in, 2C out), the CLD step draws t and two noises, builds (x_t, v_t) from the float64 kernel and runs the U-Net with
2C channels in and C out (hybrid score matching); each then takes an AdamW update and an EMA update. A sampling step
of either is one network call (CLD's sscs adds only elementwise work), timed here as the network's forward pass without
gradients. The figures that mean something on a shared machine are the ratios, measured interleaved (median
seconds per step after warm-up).

    python benchmarks/bench_cld.py                              # the digits recipe's network, batch 64
    python benchmarks/bench_cld.py --threads 1 --clock process  # load-proof per-core figures
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import interleaved_medians  # noqa: E402
from bench_ddgan import NETWORK, build_trainer  # noqa: E402
from ddpmctl.cld_method import network_time  # noqa: E402
from ddpmctl.hardware import cpu_capability, resolve_precision  # noqa: E402
from ddpmctl.inference import AutocastModel  # noqa: E402


def build(method: str, precision: str) -> tuple[Callable[[], object], Callable[[], object]]:
    """(one full training iteration as the loop runs it, one sampling-step network call) for ``method``, on the
    digits recipes' U-Net (bench_ddgan's NETWORK), batch 64."""
    train_step, sampled, ckpt, batch = build_trainer(method, precision)
    dtype = torch.bfloat16 if precision == "bf16" else None
    size, channels = ckpt.model.image_size, ckpt.network_in_channels
    network = AutocastModel(sampled, dtype)  # (the EMA copy has the same shape and cost; dropout is 0)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, channels, size, size, generator=g)
    t = torch.rand(batch, generator=g, dtype=torch.float64)
    times = network_time(t) if method == "cld" else (t * 999).round().float()

    @torch.no_grad()
    def sample_call() -> None:
        network(inputs, times)

    return train_step, sample_call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps of each")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision, _ = resolve_precision(args.precision, torch.device("cpu"))
    clock = time.process_time if args.clock == "process" else time.perf_counter
    iddpm_train, iddpm_call = build("iddpm", precision)
    cld_train, cld_call = build("cld", precision)
    seconds = interleaved_medians({"iddpm_train": iddpm_train, "cld_train": cld_train, "iddpm_call": iddpm_call,
                                   "cld_call": cld_call}, warmup=2, repeats=args.repeats, clock=clock)
    batch = NETWORK["batch_size"]
    assert isinstance(batch, int)
    result = {
        "cpu": cpu_capability(), "threads": torch.get_num_threads(), "clock": args.clock, "precision": precision,
        "batch": batch, "repeats": args.repeats,
        "img_per_s": {name: batch / s for name, s in seconds.items()},
        "cld_train_step_over_iddpm": seconds["cld_train"] / seconds["iddpm_train"],
        "cld_network_call_over_iddpm": seconds["cld_call"] / seconds["iddpm_call"],
    }
    print(f"CPU {result['cpu']}, {result['threads']} thread(s), {args.clock} clock, {precision}, batch {batch}")
    for name, s in seconds.items():
        print(f"  {name:12s} {batch / s:9.1f} img/s  ({1000 * s:.2f} ms/step)")
    print(f"  a CLD training step costs {result['cld_train_step_over_iddpm']:.2f}x an IDDPM step on the same U-Net; "
          f"a sampling-step network call {result['cld_network_call_over_iddpm']:.2f}x")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if statistics.fmean(seconds.values()) > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
