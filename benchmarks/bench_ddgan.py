"""The cost of a DDGAN training step against an IDDPM step on the same U-Net, interleaved in one run.

Both steps are train's own (``ddpmctl train`` and ``ddpmctl train --method ddgan`` with the same network options):
the IDDPM step is one forward and backward of the U-Net (hybrid loss, learned-range variance) and an AdamW update;
the DDGAN step draws a fake with the frozen generator, updates the discriminator on real and fake pairs (with R1 on
every 15th step by default), then runs the generator forward and backward through the discriminator and updates
it. The medians are of steps without R1; a third variant adds R1 to every step, and the amortised DDGAN cost adds
1/15 of that difference. The figure that means something on a shared machine is the ratio, measured interleaved
(median seconds per step after warm-up).

    python benchmarks/bench_ddgan.py                              # the digits recipe's network, batch 64
    python benchmarks/bench_ddgan.py --threads 1 --clock process  # load-proof per-core figures
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
from ddpmctl import distributed as dist_utils  # noqa: E402
from ddpmctl.cld_method import CldMethod  # noqa: E402
from ddpmctl.config import CheckpointConfig, TrainConfig  # noqa: E402
from ddpmctl.data import load_dataset  # noqa: E402
from ddpmctl.ddgan_method import DdganMethod  # noqa: E402
from ddpmctl.ema import EMA  # noqa: E402
from ddpmctl.hardware import cpu_capability, resolve_precision  # noqa: E402
from ddpmctl.inference import AutocastModel  # noqa: E402
from ddpmctl.method import Runtime  # noqa: E402
from ddpmctl.train import IDDPMMethod  # noqa: E402

# The generator of examples/configs/digits_ddgan.toml (= the demo's U-Net), batch 64.
NETWORK = dict(model_channels=32, channel_mult=(1, 2), res_blocks=1, attention_resolutions=(4,), dropout=0.0,
               batch_size=64, flip=False)


def build_trainer(method: str, precision: str, **options: object) -> tuple[Callable[[], object], torch.nn.Module,
                                                                          CheckpointConfig, int]:
    """One full training iteration of ``method`` (forward/backward, update, EMA) as the loop runs it, with the
    method's sampled network, its checkpoint config and the batch size (train's own method classes)."""
    config = TrainConfig(data="builtin:digits", method=method, precision=precision,  # type: ignore[arg-type]
                         **NETWORK, **options)
    dataset = load_dataset("builtin:digits", image_size=None, color="auto", class_cond=False, split="train")
    config = config.with_data_defaults(image_size=dataset.image_size, num_images=len(dataset.images))
    model = config.make_model_config(image_size=dataset.image_size, channels=dataset.channels, num_classes=None)
    ckpt = CheckpointConfig(model=model, diffusion=config.make_diffusion_config(), data=dataset.info(),
                            cld=config.make_cld_config())
    dist = dist_utils.DistInfo()
    method_class = {"ddgan": DdganMethod, "cld": CldMethod}.get(method, IDDPMMethod)
    trainer = method_class(config, dist, config.batch_size or 64, ckpt, dataset)
    dtype = torch.bfloat16 if precision == "bf16" else None
    trainer.prepare(Runtime(device=dist.device, dist=dist, precision=precision,
                            wrap=lambda module: AutocastModel(module, dtype)))
    sampled = next(iter(trainer.networks().values()))
    ema = EMA(sampled, config.ema, config.ema_warmup)
    step = [0]

    def run() -> None:
        # As the loop runs a step: forward/backward (D's update inside for DDGAN), the update, the EMA.
        out = trainer.forward_backward(step[0])
        trainer.apply(out)
        ema.update(sampled)
        step[0] += 1

    return run, sampled, ckpt, config.batch_size or 64


def build_step(method: str, precision: str, **options: object) -> Callable[[], object]:
    """One full training iteration of ``method`` as the loop runs it (:func:`build_trainer`)."""
    return build_trainer(method, precision, **options)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps of each (a multiple of 15 covers R1)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision, _ = resolve_precision(args.precision, torch.device("cpu"))
    clock = time.process_time if args.clock == "process" else time.perf_counter
    # lazy_reg 1000: no R1 after the first (warm-up) step; 1: R1 at every step.
    fns = {"iddpm": build_step("iddpm", precision), "ddgan": build_step("ddgan", precision, lazy_reg=1000),
           "ddgan_r1": build_step("ddgan", precision, lazy_reg=1)}
    seconds = interleaved_medians(fns, warmup=2, repeats=args.repeats, clock=clock)
    seconds["ddgan_amortised"] = seconds["ddgan"] + (seconds["ddgan_r1"] - seconds["ddgan"]) / 15
    batch = NETWORK["batch_size"]
    assert isinstance(batch, int)
    result = {
        "cpu": cpu_capability(), "threads": torch.get_num_threads(), "clock": args.clock, "precision": precision,
        "batch": batch, "repeats": args.repeats,
        "img_per_s": {name: batch / s for name, s in seconds.items()},
        "ddgan_step_over_iddpm_step": seconds["ddgan_amortised"] / seconds["iddpm"],
    }
    print(f"CPU {result['cpu']}, {result['threads']} thread(s), {args.clock} clock, {precision}, batch {batch}")
    for name, s in seconds.items():
        print(f"  {name:15s} {batch / s:8.1f} img/s  ({1000 * s:.1f} ms/step)")
    print(f"  a DDGAN step (R1 every 15) costs {result['ddgan_step_over_iddpm_step']:.2f}x an IDDPM step on the same "
          "U-Net")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if statistics.fmean(seconds.values()) > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
