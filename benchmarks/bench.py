"""`make bench`: training/sampling throughput of the IDDPM U-Net against this machine's measured matmul peaks.

Everything is measured in one run, so the figures are ratios that mean something on any machine: achieved
GFLOP/s (FLOPs counted by torch.utils.flop_counter) over the measured fp32 / bf16 matmul peak, bf16 over fp32,
batched eval-nll over a naive loop. Median of several timed steps after warm-up; fp32 and bf16 steps are
interleaved so a change in machine load hits both alike. The training step is train.py's own (its optimizer,
autocast wrapper, loss seam, gradient norm and EMA), so the bench measures the code users run.

    python benchmarks/bench.py                    # full run (< 10 minutes on 2 CPU cores)
    python benchmarks/bench.py --quick            # CI-sized
    python benchmarks/bench.py --threads 1 --clock process   # load-proof per-core figures on a shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddpmctl import train as train_loop  # noqa: E402
from ddpmctl.build import build_diffusion, build_model  # noqa: E402
from ddpmctl.config import CheckpointConfig, TrainConfig  # noqa: E402
from ddpmctl.allocator import tune_malloc  # noqa: E402
from ddpmctl.ema import EMA  # noqa: E402
from ddpmctl.inference import AutocastModel, inference_network  # noqa: E402
from ddpmctl.loop import clip_gradients  # noqa: E402

# issue 7's two configs, as `ddpmctl train` options (hybrid loss, learned-range sigma, cosine, T = 4000).
CONFIGS: dict[str, dict[str, object]] = {
    # (a) 32px, 64 channels, mult 1,2,2,2, 2 res blocks, attention 16 and 8, learned sigma, batch 32
    "a": dict(model_channels=64, channel_mult=(1, 2, 2, 2), res_blocks=2, attention_resolutions=(16, 8), heads=4,
              dropout=0.0, batch_size=32),
    # (b) the paper's CIFAR-10 config (128 channels, 3 res blocks, dropout 0.3), batch 16
    "b": dict(model_channels=128, channel_mult=(1, 2, 2, 2), res_blocks=3, attention_resolutions=(16, 8), heads=4,
              dropout=0.3, batch_size=16),
}
PRECISIONS = ("fp32", "bf16")

Clock = Callable[[], float]


def train_config(name: str, precision: str, *, quick: bool) -> TrainConfig:
    spec = dict(CONFIGS[name])
    batch = int(spec.pop("batch_size")) // (4 if quick else 1)  # type: ignore[call-overload]
    return TrainConfig(data="bench", max_steps=1, precision=precision, batch_size=batch,  # type: ignore[arg-type]
                       **spec)


@dataclass
class Trainer:
    """A model and its training step: train.py's calls in train.py's order (single process, uniform timesteps,
    no grad clip; its NaN checks and metric accumulators, a few tiny tensor ops, are left out)."""

    config: TrainConfig
    model: torch.nn.Module
    step: Callable[[], torch.Tensor]
    losses: list[torch.Tensor] = field(default_factory=list)


def build_trainer(config: TrainConfig, *, seed: int = 0) -> Trainer:
    """train.py's pieces for ``config``; the network in channels_last (the layout the U-Net is tuned for)."""
    device = torch.device("cpu")
    model_config = config.make_model_config(image_size=32, channels=3, num_classes=None)
    diffusion_config = config.make_diffusion_config()
    diffusion = build_diffusion(diffusion_config)
    torch.manual_seed(seed)
    model = build_model(CheckpointConfig(model=model_config, diffusion=diffusion_config))
    model = model.to(device, memory_format=torch.channels_last)
    model.train()
    params = list(model.parameters())
    optimizer = train_loop.make_optimizer(params, config, device)
    ema = EMA(model, config.ema)
    autocast = torch.bfloat16 if config.precision == "bf16" else None
    model_call = AutocastModel(model, autocast)
    batch = config.batch_size
    generator = torch.Generator().manual_seed(seed)
    # A fixed batch of "images" on the 8-bit grid; fresh timesteps and noise every step, as in training.
    images = torch.randint(0, 256, (batch, 3, 32, 32), generator=generator, dtype=torch.uint8)
    x_start = images.float() / 127.5 - 1.0
    weights = torch.ones(batch)
    trainer = Trainer(config, model, lambda: torch.zeros(()))

    def step() -> torch.Tensor:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=generator)
        noise = torch.randn(x_start.shape, generator=generator)
        losses = train_loop.compute_losses(diffusion, model_call, x_start, t, noise, {})
        loss = (losses["loss"] * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(params, None)  # the norm train.py logs (no clipping)
        optimizer.step()
        ema.update(model)
        trainer.losses.append(loss.detach())  # read after timing: no host sync inside the step
        return loss

    trainer.step = step
    return trainer


def interleaved_medians(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                        clock: Clock) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul(dtype: torch.dtype, size: int) -> Callable[[], object]:
    """A square matmul of ``size`` (2 size^3 FLOPs) in ``dtype``: the probe of the machine's practical peak."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    return lambda: torch.mm(a, b)


# A 3x3 convolution the size of config (a)'s middle levels (channels_last, forward): the oneDNN kernels the U-Net's
# convolutions run on. On CPUs where torch.mm's BLAS takes a slow path (MKL on AMD runs at about a third of the FMA
# peak), this probe shows what the convolutions can reach; the issue's fractions stay those of the matmul probe.
CONV_PROBE = (32, 128, 128, 16)  # batch, in channels, out channels, pixels per side


def conv_probe(dtype: torch.dtype) -> Callable[[], object]:
    batch, c_in, c_out, side = CONV_PROBE
    x = torch.randn(batch, c_in, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return lambda: torch.nn.functional.conv2d(x, w, padding=1)


def conv_probe_flops() -> int:
    batch, c_in, c_out, side = CONV_PROBE
    return 2 * batch * c_in * c_out * 9 * side * side


def matmul_peak(dtype: torch.dtype, *, size: int, repeats: int, clock: Clock) -> float:
    """Measured GFLOP/s of a square matmul in ``dtype``."""
    seconds = interleaved_medians({"mm": matmul(dtype, size)}, warmup=2, repeats=repeats, clock=clock)["mm"]
    return 2 * size**3 / seconds / 1e9


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_config(name: str, *, quick: bool, clock: Clock, mm_size: int, precisions: tuple[str, ...] = PRECISIONS
                 ) -> list[dict[str, object]]:
    """Training and sampling rows for config ``name``, one per precision, timed interleaved.

    The matmul peaks are re-measured in the same round robin as the steps, so each fraction of peak compares
    numbers taken under the same machine load (a shared machine's load drifts over a run).
    """
    trainers = {p: build_trainer(train_config(name, p, quick=quick)) for p in precisions}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    probes = {**{f"mm_{p}": matmul(dtypes[p], mm_size) for p in precisions},
              **{f"conv_{p}": conv_probe(dtypes[p]) for p in precisions}}
    warmup, repeats = (0, 2) if quick else (1, 4)
    # The counted step doubles as the first warm-up step (allocator and oneDNN primitive caches).
    train_flops = {p: count_flops(tr.step) for p, tr in trainers.items()}
    train_s = interleaved_medians({**{p: tr.step for p, tr in trainers.items()}, **probes}, warmup=warmup,
                                  repeats=repeats, clock=clock)

    # Sampling = forward passes only, in eval mode (a sampler's network call), at twice the training batch.
    sample_batch = 2 * trainers[precisions[0]].config.batch_size
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(sample_batch, 3, 32, 32, generator=generator)
    t = torch.randint(0, 4000, (sample_batch,), generator=generator)

    def forward(trainer: Trainer, precision: str, micro_batch: int | None | str = "auto") -> Callable[[], object]:
        # The network call `ddpmctl sample` makes: generate()'s wrapper (precision, micro-batches).
        network = inference_network(trainer.model, torch.device("cpu"), 32, trainer.config.model_channels,
                                    precision=precision, micro_batch=micro_batch)  # type: ignore[arg-type]
        if micro_batch == "auto":
            micro_batches[precision] = network.micro_batch

        def run() -> object:
            with torch.inference_mode():
                return network(x, t)
        return run

    for trainer in trainers.values():
        trainer.model.eval()
    micro_batches: dict[str, int | None] = {}
    forwards = {p: forward(tr, p) for p, tr in trainers.items()}
    # The same call without micro-batches (the whole batch at once), timed alongside: the before/after of that
    # optimisation in one run.
    one_call = {f"{p}_one_call": forward(tr, p, None) for p, tr in trainers.items()
                if (micro_batches[p] or sample_batch) < sample_batch}
    sample_flops = {p: count_flops(fn) for p, fn in forwards.items()}
    sample_s = interleaved_medians({**forwards, **one_call, **probes}, warmup=0, repeats=repeats + 1, clock=clock)

    rows = []
    for p, trainer in trainers.items():
        batch = trainer.config.batch_size
        rows.append({
            "config": name, "precision": p,
            "parameters": sum(q.numel() for q in trainer.model.parameters()),
            "train_batch": batch,
            "train_step_s": train_s[p],
            "train_img_per_s": batch / train_s[p],
            "train_gflop_per_step": train_flops[p] / 1e9,
            "train_gflop_per_s": train_flops[p] / train_s[p] / 1e9,
            "train_peak_gflop_per_s": 2 * mm_size**3 / train_s[f"mm_{p}"] / 1e9,
            "train_conv_probe_gflop_per_s": conv_probe_flops() / train_s[f"conv_{p}"] / 1e9,
            "sample_batch": sample_batch,
            "sample_micro_batch": micro_batches[p],
            "sample_img_per_s": sample_batch / sample_s[p],
            "sample_one_call_img_per_s": (sample_batch / sample_s[f"{p}_one_call"] if f"{p}_one_call" in sample_s
                                          else None),  # None: the call is not split
            "sample_gflop_per_s": sample_flops[p] / sample_s[p] / 1e9,
            "sample_peak_gflop_per_s": 2 * mm_size**3 / sample_s[f"mm_{p}"] / 1e9,
            "sample_conv_probe_gflop_per_s": conv_probe_flops() / sample_s[f"conv_{p}"] / 1e9,
        })
    return rows


def loss_curves(*, quick: bool) -> dict[str, object]:
    """Config (a) trained from the same weights on the same draws in fp32 and bf16: both loss curves, step by step.

    A raised learning rate (1e-3) makes a few steps move the curve; the zero-initialised output layer would
    otherwise hide any precision effect behind a loss that starts identical in both.
    """
    steps, batch = (4, 4) if quick else (12, 8)
    curves: dict[str, list[float]] = {}
    for precision in PRECISIONS:
        config = train_config("a", precision, quick=False).model_copy(update={"lr": 1e-3, "batch_size": batch})
        trainer = build_trainer(config)
        for _ in range(steps):
            trainer.step()
        curves[precision] = [float(v) for v in trainer.losses]
    rel = [abs(a - b) / abs(a) for a, b in zip(curves["fp32"], curves["bf16"])]
    return {"config": "a", "batch": batch, "lr": 1e-3, "steps": steps, **curves, "max_rel_diff": max(rel),
            "mean_rel_diff": sum(rel) / len(rel)}


def peak_rss_training_b(quick: bool, threads: int) -> float:
    """Peak RSS (MiB) of training config (b) in fp32, in a fresh process so earlier runs don't count."""
    code = (
        "import resource, torch, bench; bench.tune_malloc(); "
        f"torch.set_num_threads({threads}); "
        f"tr = bench.build_trainer(bench.train_config('b', 'fp32', quick={quick})); "
        "[tr.step() for _ in range(2)]; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized: batches / 4, fewer repeats, no RSS run")
    parser.add_argument("--out", default="bench.json", help="where to write the JSON results")
    parser.add_argument("--configs", default="a,b", help="which configs to run (a, b)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="process = CPU time of this process: immune to other jobs' load, for --threads 1")
    parser.add_argument("--no-nll", action="store_true", help="skip the eval-nll measurement")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress shows under `make`/tee
    if args.clock == "process" and args.threads != 1:
        parser.error("--clock process only measures honestly with --threads 1 (waiting threads burn CPU time)")
    torch.set_num_threads(args.threads)
    malloc_tuned = tune_malloc()  # as the `ddpmctl` command does (ddpmctl.allocator)
    clock: Clock = time.process_time if args.clock == "process" else time.perf_counter
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown config(s) {unknown}: choose from {sorted(CONFIGS)}")
    load_start = loadavg()

    size, repeats = (1024, 3) if args.quick else (2048, 5)
    peaks = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16, size=size, repeats=repeats,
                            clock=clock) for p in PRECISIONS}
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}, clock {args.clock}, load average {load_start}, "
          f"malloc tuning {'on' if malloc_tuned else 'off'}")
    print(f"matmul peak at start: fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s")
    conv_probe_s = interleaved_medians({p: conv_probe(torch.float32 if p == "fp32" else torch.bfloat16)
                                        for p in PRECISIONS}, warmup=2, repeats=repeats, clock=clock)
    conv_probes = {p: conv_probe_flops() / seconds / 1e9 for p, seconds in conv_probe_s.items()}
    print(f"3x3 conv probe {CONV_PROBE} at start: fp32 {conv_probes['fp32']:.1f} GFLOP/s, "
          f"bf16 {conv_probes['bf16']:.1f} GFLOP/s")

    rows: list[dict[str, object]] = []
    for name in names:
        for row in bench_config(name, quick=args.quick, clock=clock, mm_size=size):
            for kind in ("train", "sample"):
                achieved = float(row[f"{kind}_gflop_per_s"])  # type: ignore[arg-type]
                row[f"{kind}_fraction_of_peak"] = achieved / float(row[f"{kind}_peak_gflop_per_s"])  # type: ignore[arg-type]
                row[f"{kind}_fraction_of_conv_probe"] = (
                    achieved / float(row[f"{kind}_conv_probe_gflop_per_s"]))  # type: ignore[arg-type]
            rows.append(row)
            print(f"  measured config {name} {row['precision']}", flush=True)
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        fp32 = next(r for r in rows if r["config"] == name and r["precision"] == "fp32")
        bf16 = next(r for r in rows if r["config"] == name and r["precision"] == "bf16")
        summary[name] = {
            key: float(bf16[f"{kind}_img_per_s"]) / float(fp32[f"{kind}_img_per_s"])  # type: ignore[arg-type]
            for key, kind in (("train_bf16_over_fp32", "train"), ("sample_bf16_over_fp32", "sample"))
        }

    print("fractions are of the matmul peak re-measured alongside each config's steps (the 'peak' columns); "
          "'of conv' divides by the conv probe re-measured the same way")
    header = (f"{'cfg':>3} {'prec':>5} {'batch':>5} {'train img/s':>11} {'GFLOP/s':>8} {'peak':>6} {'of peak':>7} "
              f"{'of conv':>7} {'sample img/s':>12} {'GFLOP/s':>8} {'peak':>6} {'of peak':>7} {'of conv':>7}")
    print(header)
    for r in rows:
        print(f"{r['config']:>3} {r['precision']:>5} {r['train_batch']:>5} {r['train_img_per_s']:>11.2f} "
              f"{r['train_gflop_per_s']:>8.1f} {r['train_peak_gflop_per_s']:>6.0f} "
              f"{r['train_fraction_of_peak']:>7.2f} {r['train_fraction_of_conv_probe']:>7.2f} "
              f"{r['sample_img_per_s']:>12.2f} {r['sample_gflop_per_s']:>8.1f} {r['sample_peak_gflop_per_s']:>6.0f} "
              f"{r['sample_fraction_of_peak']:>7.2f} {r['sample_fraction_of_conv_probe']:>7.2f}")
    for name, s in summary.items():
        print(f"config {name}: bf16/fp32 training {s['train_bf16_over_fp32']:.2f}x, "
              f"sampling {s['sample_bf16_over_fp32']:.2f}x")
    for r in rows:
        if r["sample_one_call_img_per_s"] is None:
            continue
        print(f"config {r['config']} {r['precision']} sampling: micro-batches of {r['sample_micro_batch']} "
              f"{r['sample_img_per_s']:.1f} img/s vs one call of {r['sample_batch']} "
              f"{r['sample_one_call_img_per_s']:.1f} img/s "
              f"({float(r['sample_img_per_s']) / float(r['sample_one_call_img_per_s']):.2f}x)")  # type: ignore[arg-type]

    curves = loss_curves(quick=args.quick)
    print(f"loss curves, config (a) batch {curves['batch']} lr {curves['lr']}, the same {curves['steps']} steps:")
    for p in PRECISIONS:
        print(f"  {p}: " + " ".join(f"{v:.4f}" for v in curves[p]))  # type: ignore[attr-defined]
    print(f"  relative difference: max {curves['max_rel_diff']:.4f}, mean {curves['mean_rel_diff']:.4f}")

    nll: dict[str, object] = {}
    if not args.no_nll:
        try:
            from bench_nll import bench_nll

            nll = bench_nll(quick=args.quick)
            print(f"eval-nll: {nll['batched_images_per_s']:.2f} img/s batched vs {nll['naive_images_per_s']:.2f} "
                  f"naive ({nll['speedup']:.1f}x; {nll['timesteps']} terms/image, "
                  f"{float(nll['batched_images_per_s']) * int(nll['timesteps']):.0f} terms/s)")  # type: ignore[arg-type]
        except ImportError as err:  # pragma: no cover - reported, not fatal
            nll = {"error": str(err)}

    rss = None
    if "b" in names and not args.quick:
        rss = peak_rss_training_b(args.quick, args.threads)
        print(f"peak RSS, training config (b) fp32 batch {CONFIGS['b']['batch_size']}: {rss:.0f} MiB")

    load_end = loadavg()
    print(f"load average: {load_start} at start, {load_end} at end")
    result = {"quick": args.quick, "threads": args.threads, "clock": args.clock, "torch": torch.__version__,
              "malloc_tuned": malloc_tuned,
              "load_average": {"start": load_start, "end": load_end}, "peaks_gflop_per_s": peaks,
              "conv_probe_gflop_per_s": conv_probes, "rows": rows,
              "summary": summary, "loss_curves": curves, "eval_nll": nll, "peak_rss_mib_config_b": rss,
              "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
