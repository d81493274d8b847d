"""Where a DDGAN generator collapses: per step, from real data, and how much it uses z (benchmarks/README.md,
"T = 2: the collapse and what was tried").

For each checkpoint (a DDGAN generator, EMA or raw):

- **from real x_k**: noise real training digits to x_k ~ q(x_k | x_0) (after k + 1 forward steps) and run only the
  generator's steps k, k-1, ..., 0 from there; FD, precision and recall against the held-out digits (the shipped
  digits network, as ``eval-samples``). Starting at the top (k = T-1) is ordinary sampling with real noise; a
  collapse that persists from a low k is in the generator's last steps, which see the data through x_k.
- **z vs x_k**: the standard deviation of G's x_0' over 8 latents z for a fixed input x_k, against that over 16
  inputs x_k ~ N(0, I) for a fixed z (mean over pixels and samples): how much the output depends on z at all.
- **saturation**: the fraction of x_0' pixels with |x_0'| > 0.999 (where tanh's slope is below 0.002).

    OMP_NUM_THREADS=1 python benchmarks/ddgan_collapse.py runs/ddgan2/ema_0.9999_000800.safetensors [--num 1000]
"""

from __future__ import annotations

import argparse
import json

import torch

from ddpmctl.checkpoint import load_checkpoint
from ddpmctl.data import load_dataset
from ddpmctl.ddgan import ddgan_diffusion, posterior_sample
from ddpmctl.features import load_feature_extractor
from ddpmctl.quality import evaluate_images, reference_for_dataset


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def diagnose(path: str, num: int, seed: int) -> dict[str, object]:
    ckpt = load_checkpoint(path)
    generator, T = ckpt.model, ckpt.config.diffusion.timesteps
    nz = ckpt.config.model.latent.dim if ckpt.config.model.latent is not None else None
    if nz is None:
        raise SystemExit(f"{path}: not a DDGAN generator")
    diffusion = ddgan_diffusion(T)
    extractor = load_feature_extractor("digits")
    reference = reference_for_dataset("builtin:digits", extractor, split="test")
    images = load_dataset("builtin:digits").images[:num]
    x_start = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
    n = x_start.shape[0]
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    result: dict[str, object] = {"checkpoint": path, "timesteps": T, "num": n, "from_real": {}, "z_vs_x": {},
                                 "saturated": {}}
    for start in range(T):
        x = diffusion.q_sample(x_start.double(), torch.full((n,), start), randn(*x_start.shape).double()).float()
        for k in range(start, -1, -1):
            t = torch.full((n,), k)
            pred = generator(x, t, z=randn(n, nz))
            x = posterior_sample(diffusion, pred, x, t, randn(*x.shape)) if k > 0 else pred
        report = evaluate_images(_uint8(x), reference, extractor)
        result["from_real"][f"x_{start + 1}"] = {"fd": report.fd, "precision": report.precision,  # type: ignore[index]
                                                 "recall": report.recall}
    for k in range(T):
        x = randn(16, *x_start.shape[1:])
        t = torch.full((16,), k)
        out = torch.stack([generator(x, t, z=randn(16, nz)) for _ in range(8)])  # [z, x]
        result["z_vs_x"][f"t={k}"] = {"std_over_z": out.std(0).mean().item(),  # type: ignore[index]
                                      "std_over_x": out.std(1).mean().item()}
        result["saturated"][f"t={k}"] = (out.abs() > 0.999).float().mean().item()  # type: ignore[index]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--num", type=int, default=1000, help="training digits noised (and samples scored)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in args.checkpoints:
        print(json.dumps(diagnose(path, args.num, args.seed)), flush=True)


if __name__ == "__main__":
    main()
