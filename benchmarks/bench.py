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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddpmctl.cpuclass import lower_kernels_to_cpu_class  # noqa: E402

lower_kernels_to_cpu_class()  # DDPMCTL_CPU below this machine: time that class's kernels, as `ddpmctl` would run

from ddpmctl import train as train_loop  # noqa: E402
from ddpmctl.build import build_diffusion, build_model  # noqa: E402
from ddpmctl.config import CheckpointConfig, TrainConfig  # noqa: E402
from ddpmctl.allocator import tune_malloc  # noqa: E402
from ddpmctl.ema import EMA  # noqa: E402
from ddpmctl.hardware import (PLAIN_PATHS, FastPaths, cpu_capability, cpu_class, cpu_native_bf16,  # noqa: E402
                              fast_paths, forced_fast_paths, hardware_cpu_class, kernel_capability,
                              simulated_cpu_class)
from ddpmctl.inference import AutocastModel, inference_network  # noqa: E402
from ddpmctl.optim import clip_gradients  # noqa: E402
from reference_unet import ReferenceUNet, reference_train_step  # noqa: E402

# The two benchmark configs of benchmarks/README.md, as `ddpmctl train` options (hybrid loss, learned-range sigma, cosine, T = 4000).
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
    # T = 4000 and eps as benchmarks/README.md measures; the rest of the data defaults as for a 32 px, CIFAR-sized set.
    return TrainConfig(data="bench", max_steps=1, precision=precision, batch_size=batch,  # type: ignore[arg-type]
                       timesteps=4000, mean_type="eps", **spec).with_data_defaults(image_size=32, num_images=50000)


@dataclass
class Trainer:
    """A model and its training step: train.py's calls in train.py's order (single process, uniform timesteps,
    no grad clip; its NaN checks and metric accumulators, a few tiny tensor ops, are left out)."""

    config: TrainConfig
    model: torch.nn.Module
    step: Callable[[], torch.Tensor]
    paths: FastPaths
    losses: list[torch.Tensor] = field(default_factory=list)


def build_trainer(config: TrainConfig, *, seed: int = 0, paths: FastPaths | None = None) -> Trainer:
    """train.py's pieces for ``config``, the network taking ``paths`` (None: this machine's choice)."""
    device = torch.device("cpu")
    paths = paths or fast_paths(device)
    layout = torch.channels_last if paths.training_channels_last else torch.contiguous_format
    model_config = config.make_model_config(image_size=32, channels=3, num_classes=None)
    diffusion_config = config.make_diffusion_config()
    diffusion = build_diffusion(diffusion_config)
    torch.manual_seed(seed)
    model = build_model(CheckpointConfig(model=model_config, diffusion=diffusion_config))
    model = model.to(device, memory_format=layout)
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
    x_start = (images.float() / 127.5 - 1.0).contiguous(memory_format=layout)
    weights = torch.ones(batch)
    trainer = Trainer(config, model, lambda: torch.zeros(()), paths)

    def step() -> torch.Tensor:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=generator)
        noise = torch.randn(x_start.shape, generator=generator)
        with forced_fast_paths(paths):
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


def build_reference(config: TrainConfig, *, seed: int = 0) -> Callable[[], object]:
    """The reference-style U-Net's training step (benchmarks/reference_unet.py) on the same batch and draws."""
    model_config = config.make_model_config(image_size=32, channels=3, num_classes=None)
    diffusion = build_diffusion(config.make_diffusion_config())
    torch.manual_seed(seed)
    model = ReferenceUNet(in_channels=3, model_channels=model_config.model_channels,
                          out_channels=2 * model_config.in_channels, num_res_blocks=model_config.num_res_blocks,
                          attention_resolutions=model_config.attention_resolutions, image_size=32,
                          dropout=model_config.dropout, channel_mult=model_config.channel_mult,
                          num_heads=model_config.num_heads)
    model.train()
    step = reference_train_step(model, diffusion, diffusion.num_timesteps, lr=config.lr,
                                weight_decay=config.weight_decay, ema_rate=config.ema,
                                compute_losses=train_loop.compute_losses)
    batch = config.batch_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 32, 32), generator=generator, dtype=torch.uint8)
    x_start = images.float() / 127.5 - 1.0

    def run() -> object:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=generator)
        return step(x_start, t, torch.randn(x_start.shape, generator=generator))
    return run


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
# peak), this probe shows what the convolutions can reach; the README's fractions stay those of the matmul probe.
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


def path_variants(chosen: FastPaths) -> dict[str, FastPaths]:
    """The plain network, channels_last (training and sampling), with the 1x1-conv projections on top (a
    channels_last path), and this machine's choice (which may train in NCHW and sample in channels_last)."""
    channels_last = replace(PLAIN_PATHS, channels_last=True, training_channels_last=True)
    variants = {"plain": PLAIN_PATHS, "channels_last": channels_last,
                "cl+conv_projections": replace(channels_last, conv_projections=True)}
    if chosen not in variants.values():
        variants["chosen"] = chosen
    return variants


def variant_name(paths: FastPaths, variants: dict[str, FastPaths]) -> str:
    return next(name for name, p in variants.items() if p == paths)


def bench_config(name: str, *, quick: bool, clock: Clock, mm_size: int, precisions: tuple[str, ...]
                 ) -> dict[str, object]:
    """Config ``name``: training steps and sampling calls of every fast-path variant, the reference-style U-Net
    and (where measured) bf16, all interleaved round robin with the matmul and conv probes, so every ratio
    compares figures taken under the same machine load."""
    chosen = fast_paths("cpu")
    variants = path_variants(chosen)
    chosen_name = variant_name(chosen, variants)
    fp32 = train_config(name, "fp32", quick=quick)
    trainers = {f"fp32 {v}": build_trainer(fp32, paths=p) for v, p in variants.items()}
    if "bf16" in precisions:
        bf16 = train_config(name, "bf16", quick=quick)
        trainers["bf16 plain"] = build_trainer(bf16, paths=PLAIN_PATHS)
        trainers[f"bf16 {chosen_name}"] = build_trainer(bf16, paths=chosen)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    probes = {**{f"mm_{p}": matmul(dtypes[p], mm_size) for p in precisions},
              **{f"conv_{p}": conv_probe(dtypes[p]) for p in precisions}}
    warmup, repeats = (0, 2) if quick else (1, 5)
    # The counted step doubles as the first warm-up step (allocator and oneDNN primitive caches).
    chosen_rows = [f"{p} {chosen_name}" for p in precisions]
    train_flops = {key: count_flops(trainers[key].step) for key in chosen_rows}
    steps: dict[str, Callable[[], object]] = {key: tr.step for key, tr in trainers.items()}
    steps["fp32 reference"] = build_reference(fp32)
    train_s = interleaved_medians({**steps, **probes}, warmup=warmup, repeats=repeats, clock=clock)

    # Sampling = forward passes only, in eval mode (a sampler's network call), at twice the training batch.
    batch = fp32.batch_size
    sample_batch = 2 * batch
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4 * batch, 3, 32, 32, generator=generator)
    t = torch.randint(0, 4000, (4 * batch,), generator=generator)

    def forward(trainer: Trainer, precision: str, images: int, micro_batch: int | None | str = "auto"
                ) -> Callable[[], object]:
        # The network call `ddpmctl sample` makes: generate()'s wrapper (precision, micro-batches).
        network = inference_network(trainer.model, torch.device("cpu"), 32, trainer.config.model_channels,
                                    precision=precision, micro_batch=micro_batch)  # type: ignore[arg-type]
        layout = torch.channels_last if trainer.paths.channels_last else torch.contiguous_format
        xs, ts = x[:images].contiguous(memory_format=layout), t[:images]

        def run() -> object:
            with torch.inference_mode(), forced_fast_paths(trainer.paths):
                return network(xs, ts)
        run.micro_batch = network.micro_batch  # type: ignore[attr-defined]
        return run

    for trainer in trainers.values():
        trainer.model.eval()
    forwards = {key: forward(tr, key.split()[0], sample_batch) for key, tr in trainers.items()}
    if "bf16" in precisions:  # the bf16-only paths, each turned off alone
        for path in ("bf16_math_attention", "mixed_groupnorm"):
            flipped = replace(chosen, **{path: not getattr(chosen, path)})
            trainer = build_trainer(train_config(name, "bf16", quick=quick), paths=flipped)
            trainer.model.eval()
            forwards[f"bf16 {chosen_name}, {path} {'on' if getattr(flipped, path) else 'off'}"] = forward(
                trainer, "bf16", sample_batch)
    # CPU micro-batches: a call of 4x the training batch, split as `ddpmctl sample` splits it, vs one call.
    chosen_fp32 = trainers[f"fp32 {chosen_name}"]
    split = forward(chosen_fp32, "fp32", 4 * batch)
    if (split.micro_batch or 4 * batch) < 4 * batch:  # type: ignore[attr-defined]
        forwards["fp32 micro-batched x4"] = split
        forwards["fp32 one call x4"] = forward(chosen_fp32, "fp32", 4 * batch, None)
    sample_flops = {key: count_flops(forwards[key]) for key in chosen_rows}
    sample_s = interleaved_medians({**forwards, **probes}, warmup=0, repeats=repeats + 1, clock=clock)

    rows = []
    for key in chosen_rows:
        p = key.split()[0]
        rows.append({
            "config": name, "precision": p, "paths": chosen_name,
            "parameters": sum(q.numel() for q in trainers[key].model.parameters()),
            "train_batch": batch,
            "train_step_s": train_s[key],
            "train_img_per_s": batch / train_s[key],
            "train_gflop_per_step": train_flops[key] / 1e9,
            "train_gflop_per_s": train_flops[key] / train_s[key] / 1e9,
            "train_peak_gflop_per_s": 2 * mm_size**3 / train_s[f"mm_{p}"] / 1e9,
            "train_conv_probe_gflop_per_s": conv_probe_flops() / train_s[f"conv_{p}"] / 1e9,
            "sample_batch": sample_batch,
            "sample_img_per_s": sample_batch / sample_s[key],
            "sample_gflop_per_s": sample_flops[key] / sample_s[key] / 1e9,
            "sample_peak_gflop_per_s": 2 * mm_size**3 / sample_s[f"mm_{p}"] / 1e9,
            "sample_conv_probe_gflop_per_s": conv_probe_flops() / sample_s[f"conv_{p}"] / 1e9,
        })
    train_img_s = {key: batch / s for key, s in train_s.items() if not key.startswith(("mm_", "conv_"))}
    sample_img_s = {key: (4 if "x4" in key else 2) * batch / s for key, s in sample_s.items()
                    if not key.startswith(("mm_", "conv_"))}
    return {"config": name, "chosen": chosen_name, "chosen_paths": asdict(chosen),
            "variants": {v: asdict(p) for v, p in variants.items()}, "rows": rows,
            "train_img_per_s": train_img_s, "sample_img_per_s": sample_img_s,
            "micro_batch": split.micro_batch}  # type: ignore[attr-defined]


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


def sampling_probe(quick: bool, threads: int, calls: int = 4) -> float:
    """Median seconds of a sampling call (config (a), fp32, this machine's paths, twice the training batch) after
    the first, in this process as it is (the malloc A/B runs this in fresh processes)."""
    torch.set_num_threads(threads)
    trainer = build_trainer(train_config("a", "fp32", quick=quick))
    trainer.model.eval()
    batch = 2 * trainer.config.batch_size
    network = inference_network(trainer.model, torch.device("cpu"), 32, trainer.config.model_channels)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 4000, (batch,))
    clock = time.process_time if threads == 1 else time.perf_counter  # as --clock process: load-proof at 1 thread
    times = []
    with torch.inference_mode():
        for _ in range(calls):
            start = clock()
            network(x, t)
            times.append(clock() - start)
    return statistics.median(times[1:])


def malloc_ab(quick: bool, threads: int, rounds: int) -> dict[str, object]:
    """glibc malloc tuning on vs off (ddpmctl.allocator), in fresh processes alternated A/B/A/B: the tuning acts
    on a process's heap from its start, so it cannot be toggled inside one process."""
    seconds: dict[str, list[float]] = {"tuned": [], "glibc defaults": []}
    for _ in range(rounds):
        for name, flag in (("tuned", "1"), ("glibc defaults", "0")):
            code = (f"import bench; print(bench.tune_malloc(), bench.sampling_probe({quick}, {threads}))")
            out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True,
                                 text=True, check=True, env={**os.environ, "DDPMCTL_MALLOC_TUNING": flag})
            applied, value = out.stdout.split()[-2:]
            if (applied == "True") != (flag == "1"):
                return {"error": "malloc tuning does not apply here (not glibc)"}
            seconds[name].append(float(value))
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    return {"seconds": medians, "tuned_over_defaults": medians["glibc defaults"] / medians["tuned"],
            "rounds": rounds}


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _ratio_table(title: str, img_s: dict[str, float], base: str) -> None:
    print(title)
    for key, value in img_s.items():
        print(f"  {key:<52} {value:8.2f} img/s  {value / img_s[base]:5.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized: batches / 4, fewer repeats, no RSS run")
    parser.add_argument("--out", default="bench.json", help="where to write the JSON results")
    parser.add_argument("--configs", default="a", help="which configs to run (a, b; b takes minutes more)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="process = CPU time of this process: immune to other jobs' load, for --threads 1")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="measure bf16 too: auto = where the CPU has it natively (emulated bf16 is ~9x slower)")
    parser.add_argument("--no-nll", action="store_true", help="skip the eval-nll measurement")
    parser.add_argument("--no-malloc", action="store_true", help="skip the malloc tuning A/B (fresh processes)")
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
    native = cpu_native_bf16()
    precisions = ("fp32", "bf16") if args.bf16 == "on" or (args.bf16 == "auto" and native) else ("fp32",)
    chosen = fast_paths("cpu")

    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}, clock {args.clock}, load average {load_start}, "
          f"malloc tuning {'on' if malloc_tuned else 'off'}")
    print(f"CPU capability {cpu_capability()}, native bf16 {'yes' if native else 'no (AVX-512-BF16/AMX absent)'}: "
          f"--precision auto picks {'bf16' if native else 'fp32'}; bench precisions {', '.join(precisions)}")
    simulated = simulated_cpu_class() is not None
    print(f"CPU class {cpu_class()}{' (simulated: DDPMCTL_CPU)' if simulated else ''}, this machine "
          f"{hardware_cpu_class()}, torch kernels {kernel_capability()}")
    print(f"fast paths chosen here: {chosen.describe()}")
    size, repeats = (1024, 3) if args.quick else (2048, 5)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: matmul_peak(dtypes[p], size=size, repeats=repeats, clock=clock) for p in precisions}
    conv_probe_s = interleaved_medians({p: conv_probe(dtypes[p]) for p in precisions}, warmup=2, repeats=repeats,
                                       clock=clock)
    conv_probes = {p: conv_probe_flops() / seconds / 1e9 for p, seconds in conv_probe_s.items()}
    print("matmul peak at start: " + ", ".join(f"{p} {v:.1f}" for p, v in peaks.items()) + " GFLOP/s; "
          f"3x3 conv probe {CONV_PROBE}: " + ", ".join(f"{p} {v:.1f}" for p, v in conv_probes.items()) + " GFLOP/s")

    configs: list[dict[str, object]] = []
    rows: list[dict[str, object]] = []
    for name in names:
        result = bench_config(name, quick=args.quick, clock=clock, mm_size=size, precisions=precisions)
        configs.append(result)
        for row in result["rows"]:  # type: ignore[attr-defined]
            for kind in ("train", "sample"):
                achieved = float(row[f"{kind}_gflop_per_s"])
                row[f"{kind}_fraction_of_peak"] = achieved / float(row[f"{kind}_peak_gflop_per_s"])
                row[f"{kind}_fraction_of_conv_probe"] = achieved / float(row[f"{kind}_conv_probe_gflop_per_s"])
            rows.append(row)
        chosen_name = result["chosen"]
        train_img_s: dict[str, float] = result["train_img_per_s"]  # type: ignore[assignment]
        sample_img_s: dict[str, float] = result["sample_img_per_s"]  # type: ignore[assignment]
        batch = CONFIGS[name]["batch_size"] // (4 if args.quick else 1)  # type: ignore[operator]
        _ratio_table(f"config {name}, training batch {batch} (interleaved medians; ratio to fp32 plain = NCHW, "
                     "all fast paths off):", train_img_s, "fp32 plain")
        _ratio_table(f"config {name}, sampling calls of {2 * batch} (ratio to fp32 plain):",
                     {k: v for k, v in sample_img_s.items() if "x4" not in k}, "fp32 plain")
        ours = train_img_s[f"fp32 {chosen_name}"]
        result["fp32_over_reference"] = ours / train_img_s["fp32 reference"]
        print(f"config {name}: fp32 training, ddpmctl as chosen here over the reference-style U-Net: "
              f"{result['fp32_over_reference']:.3f}x")
        if "fp32 one call x4" in sample_img_s:
            result["micro_batch_over_one_call"] = sample_img_s["fp32 micro-batched x4"] / sample_img_s["fp32 one call x4"]
            print(f"config {name}: sampling {4 * batch} images in micro-batches of {result['micro_batch']} "
                  f"{sample_img_s['fp32 micro-batched x4']:.2f} img/s vs one call "
                  f"{sample_img_s['fp32 one call x4']:.2f} img/s ({result['micro_batch_over_one_call']:.3f}x)")

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

    malloc: dict[str, object] = {}
    if not args.no_malloc:
        malloc = malloc_ab(args.quick, args.threads, rounds=1 if args.quick else 2)
        if "error" in malloc:
            print(f"malloc tuning A/B: {malloc['error']}")
        else:
            print(f"malloc tuning A/B (fresh processes, sampling calls of config (a)): tuned "
                  f"{malloc['tuned_over_defaults']:.3f}x glibc's defaults")

    curves: dict[str, object] = {}
    if "bf16" in precisions:
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
              "cpu_capability": cpu_capability(), "cpu_class": cpu_class(), "cpu_class_simulated": simulated,
              "hardware_cpu_class": hardware_cpu_class(), "kernel_capability": kernel_capability(),
              "native_bf16": native, "precisions": list(precisions),
              "fast_paths": asdict(chosen), "malloc_tuned": malloc_tuned,
              "load_average": {"start": load_start, "end": load_end}, "peaks_gflop_per_s": peaks,
              "conv_probe_gflop_per_s": conv_probes, "configs": configs, "rows": rows, "malloc_ab": malloc,
              "loss_curves": curves, "eval_nll": nll, "peak_rss_mib_config_b": rss,
              "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
