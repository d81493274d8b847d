"""Few-step quality of the deterministic samplers, as numbers (the tables in benchmarks/README.md).

1. Gaussian data, exact denoiser, T = 4000 cosine: the RMS distance of each sampler's images to the exact
   probability-flow ODE solution (``ddpmctl.testing.gaussian_ode_error``) at 5/10/20/50 steps, and the observed
   order of convergence log(e_a / e_b) / log(b / a) between neighbouring step counts.
2. A model trained on builtin:digits (a short ``ddpmctl train`` run with examples/configs/digits.toml, fp32): the
   mean squared distance of each sampler's images (in [-1, 1]) to DDIM over the full chain, from the same noise.

    OMP_NUM_THREADS=1 nice python benchmarks/bench_samplers.py [--quick] [--out DIR] [--max-steps N] [--images N]
                                                               [--checkpoint CKPT]   # measure CKPT instead

The example plugin (examples/ddpmctl-heun) is measured from its source folder; it need not be installed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from ddpmctl.checkpoint import load_checkpoint
from ddpmctl.samplers import Sampler, generate, get_sampler
from ddpmctl.testing import gaussian_ode_error

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "ddpmctl-heun"))
from ddpmctl_heun import HeunSampler  # noqa: E402

STEPS = (5, 10, 20, 50)


def samplers() -> dict[str, tuple[type[Sampler], dict[str, object]]]:
    """label -> (class, options): the built-in deterministic samplers at their defaults, and a few spacings."""
    ddim, dpmpp = get_sampler("ddim"), get_sampler("dpmpp-2m")
    return {
        "ddim (even)": (ddim, {}),
        "ddim (logsnr)": (ddim, {"spacing": "logsnr"}),
        "dpmpp-2m (logsnr)": (dpmpp, {}),
        "dpmpp-2m (even)": (dpmpp, {"spacing": "even"}),
        "heun example (even)": (HeunSampler, {}),
    }


def gaussian_table(steps: tuple[int, ...]) -> dict[str, dict[str, list[float]]]:
    table = {}
    for label, (cls, options) in samplers().items():
        errors = [gaussian_ode_error(cls, n, options=cls.Options(clip_denoised=False, **options)) for n in steps]
        orders = [math.log(errors[i] / errors[i + 1]) / math.log(steps[i + 1] / steps[i])
                  for i in range(len(steps) - 1)]
        table[label] = {"error": errors, "order": orders}
    return table


def train_digits(out: Path, max_steps: int) -> Path:
    """A short run of the digits config (fp32: bf16 is emulated on CPUs without AVX-512 BF16); its EMA checkpoint."""
    if not any(out.glob("ema_*.safetensors")):
        subprocess.run([sys.executable, "-m", "ddpmctl", "train", "--config", str(ROOT / "examples/configs/digits.toml"),
                        "--out", str(out), "--max-steps", str(max_steps), "--max-time", "20m", "--precision", "fp32",
                        "--save-every", str(max_steps), "--quiet"], check=True)
    return sorted(out.glob("ema_*.safetensors"))[-1]


def trained_table(checkpoint: Path, steps: tuple[int, ...], images: int) -> dict[str, object]:
    ckpt = load_checkpoint(checkpoint)
    total = ckpt.diffusion.num_timesteps
    ddim = get_sampler("ddim")
    started = time.perf_counter()
    reference, _ = generate(ckpt, ddim(), num=images, batch_size=images, seed=0, steps=None,
                            timesteps=range(total))  # DDIM over every step of the chain: the ODE endpoint
    seconds = time.perf_counter() - started
    rows: dict[str, list[float]] = {}
    for label, (cls, options) in samplers().items():
        rows[label] = []
        for n in steps:
            x, _ = generate(ckpt, cls(cls.Options(**options)), num=images, batch_size=images, seed=0, steps=n)
            rows[label].append(float((x.double() - reference.double()).pow(2).mean()))
    diffusion = ckpt.config.diffusion
    model = f"{diffusion.mean_type}-prediction, {diffusion.var_type}, T = {diffusion.timesteps}"
    return {"checkpoint": str(checkpoint), "model": model, "chain": total, "images": images,
            "reference_seconds": round(seconds, 1),
            "mse_to_full_ddim": rows}


def markdown(steps: tuple[int, ...], gaussian: dict, trained: dict | None) -> str:
    head = "| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |"
    rule = "|---|" + "---:|" * len(steps)
    lines = ["Gaussian data, exact denoiser: RMS error against the exact ODE solution (order between neighbours)",
             "", head, rule]
    for label, row in gaussian.items():
        cells = [f"{row['error'][0]:.2e}"] + [f"{e:.2e} ({o:.2f})" for e, o in zip(row["error"][1:], row["order"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if trained is not None:
        lines += ["", f"Trained model ({trained['model']}): mean squared distance to DDIM over "
                      f"all {trained['chain']} steps ({trained['images']} images, same noise)", "", head, rule]
        for label, values in trained["mse_to_full_ddim"].items():
            lines.append(f"| {label} | " + " | ".join(f"{v:.2e}" for v in values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the Gaussian table only")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-samplers",
                        help="run folder of the digits model (reused when it holds a checkpoint)")
    parser.add_argument("--max-steps", type=int, default=1200, help="training steps of the digits model")
    parser.add_argument("--images", type=int, default=256, help="images per sampler on the digits model")
    parser.add_argument("--checkpoint", type=Path, help="measure this checkpoint instead of training the digits model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gaussian = gaussian_table(STEPS)
    checkpoint = args.checkpoint or (None if args.quick else train_digits(args.out, args.max_steps))
    trained = None if checkpoint is None else trained_table(checkpoint, STEPS, args.images)
    print(markdown(STEPS, gaussian, trained))
    print(json.dumps({"gaussian": gaussian, "trained": trained}))


if __name__ == "__main__":
    main()
