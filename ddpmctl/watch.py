"""Periodic rank-0 work while training (``train --preview-every N``, ``--val-every N``), on the loop's
:class:`~ddpmctl.loop.Periodic` mechanism: a sample grid of the EMA network in the run folder, and the held-out loss
in metrics.jsonl (``val_loss``, ``val_mse``, ``val_vb``).

Neither touches the training's random streams or weights (``ddpmctl.preview``, ``ddpmctl.validation``), so a run
that watches itself resumes bit for bit and trains exactly the weights of one that does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddpmctl.config import CheckpointConfig, TrainConfig
from ddpmctl.data import load_dataset_for
from ddpmctl.errors import ConfigError
from ddpmctl.loop import Periodic, PeriodicContext
from ddpmctl.preview import write_preview
from ddpmctl.runfolder import read_run_config
from ddpmctl.validation import CldHeldOutSet, HeldOutSet, heldout_cld_losses, heldout_losses

__all__ = ["heldout_source", "training_watchers"]

PREVIEW_IMAGES = 16
# The held-out draws' seed: fixed, so every --val-every evaluation sees the same (t, noise) per image.
HELDOUT_SEED = 0


def heldout_source(config: TrainConfig) -> str:
    """What --val-every evaluates on: --val-data, else the held-out split of a built-in dataset."""
    if config.val_data is not None:
        return config.val_data
    if config.data.startswith("builtin:"):
        return config.data
    raise ConfigError("--val-every needs held-out images: name them with --val-data DIR (a folder the run does not "
                      "train on)")


def _checkpoint_config(run_dir: Path) -> CheckpointConfig:
    """The network and diffusion of the run, as its config.json records them (written before training starts)."""
    saved = read_run_config(run_dir)
    train = saved["train"]
    # A CLD run's process is rebuilt from its train settings (the run config records no cld section).
    cld = TrainConfig.model_validate(train).make_cld_config() if train.get("method") == "cld" else None
    return CheckpointConfig(model=saved["model"], diffusion=saved["diffusion"], cld=cld)


class _Preview:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.config: CheckpointConfig | None = None

    def __call__(self, context: PeriodicContext) -> None:
        self.config = self.config or _checkpoint_config(self.run_dir)
        write_preview(self.run_dir, context.step, context.ema_network(), self.config, num=PREVIEW_IMAGES)


class _HeldOut:
    def __init__(self, run_dir: Path, source: str) -> None:
        self.run_dir, self.source = run_dir, source
        self.heldout: HeldOutSet | CldHeldOutSet | None = None

    def _load(self, context: PeriodicContext) -> HeldOutSet | CldHeldOutSet:
        config = _checkpoint_config(self.run_dir)
        split = "test" if self.source.startswith("builtin:") else "train"  # a folder is held out as a whole
        data = load_dataset_for(config.model, self.source, split=split, on_warning=context.warn)
        if config.cld is not None:
            return CldHeldOutSet(data.images, config.cld.t_min, seed=HELDOUT_SEED)
        return HeldOutSet(data.images, data.labels if config.model.num_classes is not None else None,
                          config.diffusion.timesteps, seed=HELDOUT_SEED)

    def __call__(self, context: PeriodicContext) -> None:
        self.heldout = self.heldout or self._load(context)
        method: Any = context.method  # the raw weights being trained: comparable with the training loss
        device = next(method.model.parameters()).device
        if isinstance(self.heldout, CldHeldOutSet):
            context.log(heldout_cld_losses(method.model, method.process, method.weighting, self.heldout,
                                           device=device))
        else:
            context.log(heldout_losses(method.model, method.diffusion, self.heldout, device=device))


def training_watchers(config: TrainConfig) -> tuple[Periodic, ...]:
    """The periodic work a run's config asks for (none by default)."""
    run_dir = Path(str(config.out))
    work: list[Periodic] = []
    if config.preview_every is not None:
        work.append(Periodic(every=config.preview_every, run=_Preview(run_dir)))
    if config.val_every is not None:
        work.append(Periodic(every=config.val_every, run=_HeldOut(run_dir, heldout_source(config))))
    return tuple(work)
