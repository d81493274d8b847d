"""eval-nll throughput: exact-mode bits/dim with (image, t) pairs stacked per network call vs a naive loop.

The naive loop is improved-diffusion's ``calc_bpd_loop``: one network call per timestep over the batch of images.
Both run on the same checkpoint (saved and loaded through the checkpoint format), with the same keyed noise, so
they must produce the same numbers; the result reports the largest difference.

    python benchmarks/bench_nll.py [--quick] [--device cpu|cuda] [--images N] [--timesteps T] [--batch-size B]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ddpmctl.build import build_model
from ddpmctl.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from ddpmctl.config import CheckpointConfig, DataInfo, DiffusionConfig, ModelConfig, default_model_shape
from ddpmctl.data import load_dataset
from ddpmctl.images import uint8_to_model
from ddpmctl.nll import evaluate_nll, term_noise


def make_checkpoint(folder: Path, timesteps: int) -> LoadedCheckpoint:
    """The default digits model (8x8, 1 channel, learned-range sigma), untrained but with non-zero output layers."""
    model_config = ModelConfig(image_size=8, in_channels=1,
                               **default_model_shape(8))  # type: ignore[arg-type]
    config = CheckpointConfig(model=model_config, diffusion=DiffusionConfig(timesteps=timesteps),
                              data=DataInfo(source="builtin:digits", image_size=8, channels=1))
    torch.manual_seed(0)
    network = build_model(config)
    with torch.no_grad():  # the zero-initialised output layers would make every term trivially cheap to compare
        for p in network.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    path = save_checkpoint(folder / "bench.safetensors", network.state_dict(), config, kind="model", lineage=[])
    return load_checkpoint(path)


@torch.inference_mode()
def naive_bpd(checkpoint: LoadedCheckpoint, images_uint8: torch.Tensor, seed: int) -> torch.Tensor:
    """calc_bpd_loop: for t = T-1..0 one network call over all the images (same keyed noise as evaluate_nll)."""
    diffusion, model = checkpoint.diffusion, checkpoint.model
    device = next(model.parameters()).device
    x_start = uint8_to_model(images_uint8).to(device)
    n, T = x_start.shape[0], diffusion.num_timesteps
    noise = torch.stack([term_noise(seed, i, T, tuple(x_start.shape[1:]), device) for i in range(n)])
    total = diffusion.prior_bpd(x_start).double()
    for t in range(T - 1, -1, -1):
        t_batch = torch.full((n,), t, dtype=torch.long, device=device)
        x_t = diffusion.q_sample(x_start, t_batch, noise=noise[:, t])
        total += diffusion.vb_terms_bpd(model, x_start, x_t, t_batch, clip_denoised=True)["output"].double()
    return total.cpu()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_nll(quick: bool, *, device: str | None = None, images: int | None = None, timesteps: int | None = None,
              batch_size: int | None = None, repeats: int | None = None) -> dict[str, object]:
    """Exact-mode images/s, batched (``batch_size`` pairs per call) vs naive (all images per call, one t)."""
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = images or (8 if quick else 16)
    T = timesteps or (50 if quick else 200)
    batch = batch_size or (256 if torch_device.type == "cpu" else 2048)
    repeats = repeats or (1 if quick else 2)
    data = load_dataset("builtin:digits", split="test").images[:n]
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = make_checkpoint(Path(folder), T)
    checkpoint.model.to(torch_device)

    def batched() -> torch.Tensor:
        return evaluate_nll(checkpoint, data, batch_size=batch, seed=0).bpd

    def naive() -> torch.Tensor:
        return naive_bpd(checkpoint, data, seed=0)

    timings: dict[str, float] = {}
    results: dict[str, torch.Tensor] = {}
    for name, fn in (("batched", batched), ("naive", naive)):
        results[name] = fn()  # warm-up (and the numbers compared below)
        _sync(torch_device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _sync(torch_device)
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    return {
        "device": str(torch_device) if torch_device.type == "cpu" else torch.cuda.get_device_name(torch_device),
        "threads": torch.get_num_threads(),
        "parameters": checkpoint.num_parameters,
        "timesteps": T,
        "images": n,
        "batch_pairs": batch,
        "naive_images_per_call": n,
        "batched_images_per_s": n / timings["batched"],
        "naive_images_per_s": n / timings["naive"],
        "speedup": timings["naive"] / timings["batched"],
        "bits_per_dim": float(results["batched"].mean()),
        "max_abs_diff_bpd": float((results["batched"] - results["naive"]).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized: fewer images and timesteps")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--timesteps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="(image, t) pairs per call in batched mode")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    result = bench_nll(args.quick, device=args.device, images=args.images, timesteps=args.timesteps,
                       batch_size=args.batch_size, repeats=args.repeats)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
