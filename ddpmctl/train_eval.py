"""Sample quality during training (``train --eval-every N``): FD / FID of the EMA weights every N steps.

Every N steps the run samples ``eval_num`` images from its EMA weights with deterministic DDIM on ``eval_steps``
steps (a CLD model with ``sscs`` on ``eval_steps`` steps; a DDGAN generator with its own chain) (the same seed every time, so the numbers of two steps differ only through the weights) and measures them
against held-out data: the held-out split of a ``builtin:`` dataset, else the training images themselves. The
feature network is chosen like ``eval-samples --features auto``: the digits classifier for grayscale images up to
16 px, else the FID Inception-v3 (``DDPMCTL_INCEPTION_WEIGHTS``).

The probe samples with a copy of the network holding the EMA weights (the loop's ``PeriodicContext.ema_network``) and
never touches the global random state (``fork_rng``), so a run with ``--eval-every`` trains exactly the weights of
one without, and resumes bit-exactly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpmctl import __version__
from ddpmctl.build import build_diffusion
from ddpmctl.checkpoint import LoadedCheckpoint
from ddpmctl.config import CheckpointConfig
from ddpmctl.data import ImageDataset, load_dataset
from ddpmctl.errors import ConfigError, FeaturesError
from ddpmctl.features import load_feature_extractor
from ddpmctl.loop import Periodic
from ddpmctl.quality import evaluate_images, reference_from_images
from ddpmctl.refstats import ReferenceStats

__all__ = ["QualityProbe", "SMALL_GRAY"]

SMALL_GRAY = 16  # grayscale images up to this size are measured with the digits network
EVAL_SEED = 0


class QualityProbe:
    """Samples from the EMA weights and measures them; built once per run (the reference statistics are cached).

    ``periodic()`` is the loop's hook (``ddpmctl.loop.Periodic``): it runs on rank 0 after a step's log and save."""

    def __init__(self, ckpt_config: CheckpointConfig, dataset: ImageDataset, source: str, *, every: int, num: int,
                 steps: int, device: torch.device, kind: str = "model") -> None:
        from ddpmctl.samplers import default_sampler, get_sampler

        model_config = ckpt_config.model
        if model_config.num_classes is not None:
            raise ConfigError("--eval-every measures unconditional models only (this one is class-conditional)")
        small_gray = model_config.in_channels == 1 and model_config.image_size <= SMALL_GRAY
        try:
            self.extractor = load_feature_extractor("digits" if small_gray else "inception", device=device)
        except FeaturesError as err:
            raise ConfigError(f"--eval-every: {err}") from None
        self.ckpt_config, self.diffusion = ckpt_config, build_diffusion(ckpt_config.diffusion)
        # A diffusion model is probed with DDIM on --eval-steps, a CLD model with sscs on --eval-steps (the kind's
        # default sampler); a DDGAN generator with its own chain (all T steps).
        self.kind = kind
        self.sampler = get_sampler(default_sampler(kind))()
        self.steps: int | None = None if kind == "ddgan" else steps
        self.every, self.num, self.device = every, num, device
        self.reference = self._reference(dataset, source)

    def _reference(self, dataset: ImageDataset, source: str) -> ReferenceStats:
        if source.startswith("builtin:"):
            held_out = load_dataset(source, image_size=dataset.image_size, split="test",
                                    color="gray" if dataset.channels == 1 else "rgb", on_warning=lambda _: None)
            return reference_from_images(held_out.images, self.extractor, source=f"{source} (test split)")
        return reference_from_images(dataset.images, self.extractor, source=f"{source} (training images)")

    def measure(self, network: nn.Module) -> dict[str, Any]:
        """The metrics of DDIM samples from ``network`` (EMA weights, eval mode), as metrics.jsonl fields."""
        from ddpmctl.samplers import generate

        started = time.perf_counter()
        checkpoint = LoadedCheckpoint(path=Path("ema-weights-in-training"), config=self.ckpt_config, kind=self.kind,
                                      lineage=[], created_with=__version__, model=network, diffusion=self.diffusion,
                                      num_parameters=sum(p.numel() for p in network.parameters()), sha256="")
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the run's random streams stay untouched
            images, _ = generate(checkpoint, self.sampler, num=self.num, batch_size=min(self.num, 256),
                                 seed=EVAL_SEED, steps=self.steps, output="uint8")
            report = evaluate_images(images, self.reference, self.extractor)
        return {"eval_fd": report.fd, "eval_precision": report.precision, "eval_recall": report.recall,
                "eval_features": report.features, "eval_num": report.num_samples,
                "eval_reference": self.reference.source, "eval_sampler": f"{self.sampler.name}-{self.diffusion.num_timesteps if self.steps is None else self.steps}",
                "eval_seconds": round(time.perf_counter() - started, 3)}

    def periodic(self) -> Periodic:
        return Periodic(every=self.every, run=lambda context: context.log(self.measure(context.ema_network())))
