"""``train --init-from CKPT``: start a new run from a checkpoint's weights (fine-tuning).

Only the weights come from the checkpoint: the optimizer, the EMA's warm-up, the step count (0) and the data order
start afresh. The run's network must be the checkpoint's (dropout aside, which holds no weights); the options that
decide it default to the checkpoint's (:func:`options_from_checkpoint`), so a user names only what changes. Every
checkpoint of the run records the parent's lineage and the ``init`` step (file name and sha256).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddpmctl.checkpoint import CheckpointInfo, load_checkpoint, read_checkpoint_info
from ddpmctl.config import CheckpointConfig, ModelConfig
from ddpmctl.errors import ConfigError, OptionError

__all__ = ["InitWeights", "check_same_network", "options_from_checkpoint", "read_init_weights"]

# A checkpoint's loss type as train's --loss names it (kl has no --loss of its own: the default stays).
_LOSS_NAMES = {"rescaled_mse": "hybrid", "mse": "simple", "rescaled_kl": "vlb"}


@dataclass(frozen=True)
class InitWeights:
    """The weights a run starts from, and where they came from."""

    path: Path
    sha256: str
    config: CheckpointConfig
    lineage: list[dict[str, Any]]
    state: dict[str, torch.Tensor] = field(repr=False)

    def lineage_entries(self) -> list[dict[str, Any]]:
        """What the run's checkpoints put before their own ``train`` entry."""
        return [*self.lineage, {"op": "init", "from": self.path.name, "sha256": self.sha256}]


def _refuse_student(path: Path, kind: str) -> None:
    if kind == "student":
        raise ConfigError(f"--init-from {path}: a distilled student samples on its own fixed grid; fine-tune its "
                          "teacher instead")


def options_from_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """TrainConfig values that rebuild the checkpoint's network and diffusion (read from its header only): the
    defaults of a run started with ``--init-from``; options given explicitly override them."""
    info: CheckpointInfo = read_checkpoint_info(path)
    _refuse_student(Path(path), info.kind)
    model, diffusion = info.config.model, info.config.diffusion
    values: dict[str, Any] = {
        "image_size": model.image_size, "color": "gray" if model.in_channels == 1 else "rgb",
        "class_cond": model.num_classes is not None, "model_channels": model.model_channels,
        "channel_mult": list(model.channel_mult), "res_blocks": model.num_res_blocks,
        "attention_resolutions": list(model.attention_resolutions), "heads": model.num_heads,
        "schedule": diffusion.schedule, "timesteps": diffusion.timesteps, "mean_type": diffusion.mean_type,
        "var_type": diffusion.var_type,
    }
    if diffusion.loss_type in _LOSS_NAMES:
        values["loss"] = _LOSS_NAMES[diffusion.loss_type]
    return values


def read_init_weights(path: str | os.PathLike[str]) -> InitWeights:
    """The checkpoint's weights, validated as every checkpoint is (CheckpointError, one line, otherwise)."""
    path = Path(path)
    loaded = load_checkpoint(path, device="cpu")
    _refuse_student(path, loaded.kind)
    state = {name: tensor.detach().contiguous() for name, tensor in loaded.model.state_dict().items()}
    return InitWeights(path=path, sha256=loaded.sha256, config=loaded.config, lineage=loaded.lineage, state=state)


def check_same_network(init: InitWeights, model: ModelConfig, out_channels: int) -> None:
    """ConfigError (one line) unless the run builds the checkpoint's network: same shapes, same names."""
    theirs = init.config.model.model_dump(exclude={"dropout"})
    ours = model.model_dump(exclude={"dropout"})
    diffs = [f"{key} (checkpoint {theirs[key]}, this run {ours[key]})" for key in ours if theirs[key] != ours[key]]
    if init.config.out_channels != out_channels:
        diffs.append(f"output channels (checkpoint {init.config.out_channels}, this run {out_channels}: a learned "
                     "variance doubles them)")
    if diffs:
        raise OptionError(f"--init-from {init.path.name}: its network differs from this run's in "
                          + "; ".join(diffs[:3]) + " (leave those options out to take the checkpoint's)")
