"""The training loop (improved-diffusion ``TrainLoop``): AdamW, EMA, importance-sampled timesteps, bf16 autocast,
exact resume from the run folder, DistributedDataParallel under torchrun.

Three pieces, one job each: ``_RunFolder`` (the folder: --resume / --force, config.json, the files of a save),
``_TrainingStep`` (the step: network, optimizer, EMA, timestep sampler, data stream; batches, losses, updates) and
``_Trainer`` (the loop that drives them, with the ranks' collectives: barriers, agreed stop flags, gathered RNGs).

Determinism: one CPU ``torch.Generator`` seeded with ``--seed`` draws everything data-side for the GLOBAL batch
(epoch permutations, flips, timesteps, noise); each rank takes its slice, so every rank's generator stays identical
and the run does not depend on how the batch is split. Dropout uses the global torch RNG (seeded per rank). All of
these states are saved, so a resumed run continues bit for bit. Reports through ``callback``; never prints.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ddpmctl import __version__
from ddpmctl import distributed as dist_utils
from ddpmctl import runfolder
from ddpmctl.build import build_diffusion, build_model
from ddpmctl.checkpoint import load_tensors, save_checkpoint, save_tensors, write_json_atomic
from ddpmctl.config import CheckpointConfig, ModelConfig, TrainConfig
from ddpmctl.data import ImageDataset, load_dataset
from ddpmctl.ddgan_method import DdganDraws, DdganMethod
from ddpmctl.ema import EMA
from ddpmctl.errors import CheckpointError, ConfigError, DataError, TrainingError
from ddpmctl.hardware import resolve_precision
from ddpmctl.hardware import memory_format
from ddpmctl.inference import AutocastModel
from ddpmctl.loop import StopSignals, clip_gradients, derive_seed, load_optimizer_state, optimizer_state_tensors
from ddpmctl.resample import create_named_schedule_sampler

EventKind = Literal["start", "step", "log", "save", "warning", "end"]
StopReason = Literal["max_steps", "max_time", "interrupted", "stopped"]
STATE_FORMAT = "ddpmctl-train-state/1"
# ModelConfig.image_size's lower bound (the U-Net needs a few pixels to halve).
MIN_IMAGE_SIZE = 4


@dataclass(frozen=True)
class TrainEvent:
    """Progress report for the caller (the CLI draws its progress bar from these)."""

    kind: EventKind
    step: int
    max_steps: int | None
    elapsed: float  # seconds since the training loop started (set-up excluded)
    max_time: float | None
    metrics: dict[str, Any] | None = None
    path: Path | None = None
    message: str | None = None


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) run left behind."""

    run_dir: Path
    step: int
    start_step: int
    ema_checkpoint: Path
    model_checkpoint: Path
    state_file: Path
    stop_reason: StopReason
    elapsed: float
    images_per_s: float
    nan_skips: int
    num_parameters: int
    last_metrics: dict[str, Any] | None = None
    precision: str = "fp32"  # what --precision resolved to on this device

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir), "step": self.step, "start_step": self.start_step,
            "ema_checkpoint": str(self.ema_checkpoint), "model_checkpoint": str(self.model_checkpoint),
            "state_file": str(self.state_file), "stop_reason": self.stop_reason, "elapsed": self.elapsed,
            "images_per_s": self.images_per_s, "nan_skips": self.nan_skips,
            "num_parameters": self.num_parameters, "precision": self.precision, "last_metrics": self.last_metrics,
        }


def compute_losses(diffusion: Any, model: Callable[..., torch.Tensor], x_start: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor, model_kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per-sample training losses (one seam, so tests can inject a non-finite loss)."""
    return diffusion.training_losses(model, x_start, t, noise=noise, model_kwargs=model_kwargs)


class _IndexStream:
    """Dataset indices as consecutive random permutations (a fresh one per epoch) from the run generator."""

    def __init__(self, num_items: int, generator: torch.Generator) -> None:
        self.num_items, self.generator = num_items, generator
        self.perm = torch.empty(0, dtype=torch.int64)
        self.pos = 0
        self.epoch = 0

    def take(self, count: int) -> torch.Tensor:
        # A batch may straddle two epochs (or several, when the dataset is smaller than the batch).
        parts = []
        while count > 0:
            if self.pos >= self.perm.numel():
                self.perm = torch.randperm(self.num_items, generator=self.generator)
                self.pos, self.epoch = 0, self.epoch + 1
            n = min(count, self.perm.numel() - self.pos)
            parts.append(self.perm[self.pos:self.pos + n])
            self.pos, count = self.pos + n, count - n
        return torch.cat(parts)


def make_optimizer(params: list[nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where this torch/device supports it, else multi-tensor (foreach)."""
    try:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)


def _param_digest(module: nn.Module) -> torch.Tensor:
    """SHA-256 of every parameter's bytes, in order, as a uint8 tensor [32] (ranks compare these)."""
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8).clone()


class _RunFolder:
    """The run folder of one training run (``--out``): whether it may be used (--resume / --force), its
    config.json, the files of each save and reading them back, metrics.jsonl. Only rank 0 writes."""

    def __init__(self, config: TrainConfig, dist: dist_utils.DistInfo) -> None:
        if config.out is None:
            raise ConfigError("no run folder: give --out DIR")
        self.path, self.config, self.dist = Path(config.out), config, dist

    def claim(self, *, resume: bool, force: bool) -> dict[str, Any] | None:
        """Refuse to mix runs; on --resume return the saved config.json after checking it matches."""
        saved = runfolder.check_run_dir(self.path, runfolder.TRAINING, self.config, resume=resume, force=force)
        if force and runfolder.holds_run(self.path):
            dist_utils.barrier(self.dist)  # every rank has looked before rank 0 deletes
            if self.dist.is_main:
                runfolder.clear_run(self.path)
        # Every rank has looked at the folder before rank 0 writes into it.
        dist_utils.barrier(self.dist)
        return saved

    def check_network(self, saved: dict[str, Any], model_config: ModelConfig) -> None:
        """A resumed run must build the network it saved (the data decides some of its shape)."""
        old, new = saved.get("model"), model_config.model_dump(mode="json")
        if isinstance(old, dict):
            diffs = [f"model.{k} (saved {old.get(k)}, now {new[k]})" for k in new if old.get(k) != new[k]]
            if diffs:
                raise ConfigError(f"cannot resume {self.path}: the network would differ in " + "; ".join(diffs)
                                  + " (has the data changed?)")

    def open(self, payload: dict[str, Any]) -> None:
        """Create the folder and write config.json (rank 0; temporary files of a killed writer go first)."""
        if self.dist.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            runfolder.remove_temp_files(self.path)
            runfolder.write_run_config(self.path, payload)
        dist_utils.barrier(self.dist)

    def latest_save(self) -> int | None:
        saves = runfolder.complete_saves(self.path)
        return saves[-1] if saves else None

    def paths(self, step: int) -> tuple[Path, Path, Path, Path]:
        d = self.path
        return (d / runfolder.ema_name(self.config.ema, step), d / runfolder.model_name(step),
                d / runfolder.state_name(step), d / runfolder.state_json_name(step))

    def _lineage(self, step: int, ema: float | None, averaged: dict[str, Any]) -> list[dict[str, Any]]:
        entry = {"op": "train", "run": self.path.name, "step": step, "ema": ema, "data": self.config.data}
        if ema is not None:
            # Which average the weights are (`ddpmctl info` shows it): the warm-up and how many updates it holds.
            entry.update(averaged)
        return [entry]

    def write_save(self, step: int, ckpt_config: CheckpointConfig, ema: dict[str, torch.Tensor],
                   weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        """Rank 0: the EMA and raw checkpoints and the state tensors, then the state JSON that marks the save
        complete, then pruning (--keep). Returns the EMA checkpoint. ``meta`` carries ema_warmup / ema_updates."""
        ema_path, model_path, state_path, json_path = self.paths(step)
        averaged = {"ema_warmup": meta["ema_warmup"], "ema_updates": meta["ema_updates"]}
        kind = "ddgan" if ckpt_config.model.latent is not None else "model"
        save_checkpoint(ema_path, ema, ckpt_config, kind=kind, lineage=self._lineage(step, self.config.ema, averaged))
        save_checkpoint(model_path, weights, ckpt_config, kind=kind, lineage=self._lineage(step, None, averaged))
        save_tensors(state_path, state, {"format": STATE_FORMAT, "step": str(step)})
        write_json_atomic(json_path, {"format": STATE_FORMAT, "step": step, **meta,
                                      "files": {"ema": ema_path.name, "model": model_path.name,
                                                "state": state_path.name}})
        runfolder.prune(self.path, self.config.keep)
        return ema_path

    def read_save(self, step: int) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor],
                                            dict[str, torch.Tensor]]:
        """What write_save wrote at ``step``: (the state JSON, raw weights, EMA weights, state tensors)."""
        ema_path, model_path, state_path, json_path = self.paths(step)
        meta = runfolder.read_json(json_path)
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{json_path} is not a ddpmctl training state")
        return meta, load_tensors(model_path)[0], load_tensors(ema_path)[0], load_tensors(state_path)[0]


class _TrainingStep:
    """The step: the network (and its DDP wrapper), diffusion, optimizer, EMA, timestep sampler and the data
    stream; draws this rank's slice of each global batch, computes the losses and updates the weights."""

    def __init__(self, config: TrainConfig, dist: dist_utils.DistInfo, local_batch: int,
                 ckpt_config: CheckpointConfig, dataset: ImageDataset) -> None:
        self.config, self.dist, self.device, self.local_batch = config, dist, dist.device, local_batch
        # The same initial weights on every rank (DDP also broadcasts rank 0's); then a per-rank dropout stream.
        torch.manual_seed(config.seed)
        # channels_last where it wins (hardware.fast_paths): oneDNN's convolutions run without layout round trips.
        self.layout = memory_format(self.device, training=True)
        self.model = build_model(ckpt_config).to(self.device, memory_format=self.layout)
        torch.manual_seed(derive_seed(config.seed, dist.rank))
        self.diffusion = build_diffusion(ckpt_config.diffusion)
        self.params = list(self.model.parameters())
        self.optimizer = make_optimizer(self.params, config, self.device)
        self.ema = EMA(self.model, config.ema, config.ema_warmup)
        self.sampler = create_named_schedule_sampler(config.timestep_sampler, self.diffusion)
        # Only a loss-aware sampler needs the per-sample losses (feeding it costs a host sync per step).
        self.loss_aware = config.timestep_sampler != "uniform"
        self._open_data(dataset)

    # Per-step metrics beside the loss (summed on the device, averaged over the steps of a log interval).
    metric_names: tuple[str, ...] = ("mse", "vb")

    def _open_data(self, dataset: ImageDataset) -> None:
        """The run generator (seeded with --seed), the epoch stream of indices and the images."""
        config = self.config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.stream = _IndexStream(len(dataset.images), self.generator)
        # uint8 [N, C, H, W]; on a GPU the whole set moves there once when it is small (no per-step copies).
        self.images = dataset.images
        self.labels = dataset.labels if config.class_cond else None
        if self.device.type == "cuda" and self.images.numel() <= 2**30:
            self.images = self.images.to(self.device)
            self.labels = self.labels.to(self.device) if self.labels is not None else None

    def wrap(self, precision: str) -> None:
        """The network the step calls: DDP under torchrun (its gradients are the all-reduce buckets themselves:
        zeroed, never set to None), in ``precision`` (as resolved for the device)."""
        self.net: nn.Module = (dist_utils.data_parallel(self.model, self.dist) if self.dist.distributed
                               else self.model)
        self.grads_set_to_none = not self.dist.distributed
        self.model_call = AutocastModel(self.net, torch.bfloat16 if precision == "bf16" else None)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's slice of the next global batch: x_start, t, importance weights, noise, model kwargs."""
        g, batch = self.generator, self.config.batch_size
        # Draw for the whole global batch on every rank (same generator, same order), then slice.
        index = self.stream.take(batch)
        flips = torch.rand(batch, generator=g) < 0.5 if self.config.flip else None
        t, weights = self.sampler.sample(batch, torch.device("cpu"), generator=g)
        noise = torch.randn((batch, *self.images.shape[1:]), generator=g)
        lo, hi = self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch
        dev, nb = self.device, self.device.type == "cuda"
        local = index[lo:hi].to(self.images.device, non_blocking=nb)
        x_start = self._local_images(local, flips[lo:hi] if flips is not None else None)
        kwargs = {}
        if self.labels is not None:
            kwargs["y"] = self.labels[local].to(dev, non_blocking=nb)
        return (x_start, torch.as_tensor(t[lo:hi]).to(dev, torch.int64),
                torch.as_tensor(weights[lo:hi]).to(dev, torch.float32), noise[lo:hi].to(dev, non_blocking=nb),
                kwargs)

    def _local_images(self, local: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        """This rank's images (indices ``local``, flipped where ``flips``) in [-1, 1], on the device."""
        nb = self.device.type == "cuda"
        images = self.images[local]
        if flips is not None:
            images = torch.where(flips.to(images.device).view(-1, 1, 1, 1), images.flip(3), images)
        # The 8-bit grid mapped onto [-1, 1] exactly as images.uint8_to_model does.
        return (images.to(self.device, non_blocking=nb).float() / 127.5 - 1.0).contiguous(memory_format=self.layout)

    def losses(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Forward and backward on the next batch: (loss, per-sample losses, t, gradient norm before clipping)."""
        x_start, t, weights, noise, kwargs = self.batch()
        losses = compute_losses(self.diffusion, self.model_call, x_start, t, noise, kwargs)
        loss = (losses["loss"] * weights).mean()
        self.optimizer.zero_grad(set_to_none=self.grads_set_to_none)
        loss.backward()
        return loss, losses, t, clip_gradients(self.params, self.config.grad_clip)

    def extra_log(self) -> dict[str, Any]:
        """Values of the step's own state for metrics.jsonl (none for IDDPM)."""
        return {}

    def discard(self) -> None:
        """Drop this step's gradients (a skipped non-finite step)."""
        self.optimizer.zero_grad(set_to_none=self.grads_set_to_none)

    def update(self, t: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Apply the gradients: the optimizer, the EMA, and a loss-aware sampler's history."""
        self.optimizer.step()
        self.ema.update(self.model)
        if self.loss_aware:
            self.sampler.update_with_local_losses(t, per_sample.detach())

    def _load_method_state(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """The optimizer moments and the timestep sampler's history."""
        load_optimizer_state(self.optimizer, state)
        self.sampler.load_state_dict({key[len("sampler."):]: value for key, value in state.items()
                                      if key.startswith("sampler.")})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Optimizer moments, sampler history, the data order and the run generator (not the per-rank RNGs)."""
        tensors = optimizer_state_tensors(self.optimizer)
        for key, value in self.sampler.state_dict().items():
            tensors[f"sampler.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors["data.perm"] = self.stream.perm.clone()
        tensors["rng.generator"] = self.generator.get_state()
        return tensors

    def load(self, weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
             meta: dict[str, Any], folder: Path, state_path: Path) -> None:
        """Restore what a save holds (exact resume); CheckpointError, one line, when it does not fit."""
        try:
            self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=True)
            self.ema.load_state_dict({k: v.to(self.device) for k, v in ema.items()})
        except (RuntimeError, KeyError) as err:
            raise CheckpointError(f"{folder}: saved weights do not fit the network "
                                  f"({str(err).splitlines()[0]})") from None
        try:
            self._load_method_state(state, meta)
            self.generator.set_state(state["rng.generator"])
            self.stream.perm = state["data.perm"].to(torch.int64)
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{state_path}: the training state does not fit this run "
                                  f"({str(err).splitlines()[0]})") from None
        global_key = f"rng.global.rank{self.dist.rank}"
        if global_key in state:
            torch.set_rng_state(state[global_key])
        cuda_key = f"rng.cuda.rank{self.dist.rank}"
        if self.device.type == "cuda" and cuda_key in state:
            torch.cuda.set_rng_state(state[cuda_key], self.device)
        self.stream.pos, self.stream.epoch = int(meta["data_position"]), int(meta["epoch"])


class _DdganStep(_TrainingStep):
    """The step of ``--method ddgan`` (:class:`~ddpmctl.ddgan_method.DdganMethod`: G, D, their optimisers) on this
    loop's data stream: the D update, then G's loss for the loop to check and apply (G's Adam step and its EMA)."""

    metric_names = ("loss_d", "r1", "d_real", "d_fake", "grad_norm_d")

    def __init__(self, config: TrainConfig, dist: dist_utils.DistInfo, local_batch: int,
                 ckpt_config: CheckpointConfig, dataset: ImageDataset) -> None:
        self.config, self.dist, self.device, self.local_batch = config, dist, dist.device, local_batch
        torch.manual_seed(config.seed)  # the same initial G and D on every rank
        self.layout = memory_format(self.device, training=True)
        self.method = DdganMethod(config, ckpt_config, dist, self.layout)
        torch.manual_seed(derive_seed(config.seed, dist.rank))
        self.model, self.diffusion, self.optimizer = self.method.generator, self.method.diffusion, self.method.optimizer
        self.params = list(self.model.parameters())
        self.ema = EMA(self.model, config.ema, config.ema_warmup)
        self.loss_aware = False
        self.step_index = 0  # 0-based index of the next iteration: the learning rates' cosine and the lazy R1
        self._open_data(dataset)

    def wrap(self, precision: str) -> None:
        """G under DDP with torchrun (D's gradients are averaged by the method itself), autocast in ``precision``."""
        self.grads_set_to_none = not self.dist.distributed
        if self.dist.distributed:
            self.method.generator_call = dist_utils.data_parallel(self.model, self.dist)
        self.method.autocast = torch.bfloat16 if precision == "bf16" else None

    def losses(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """D's update, then G's loss and gradients: (G loss, metrics, G's t, G's gradient norm). A D step that was
        not finite makes the returned loss NaN, so the loop's --nan-policy judges the whole iteration."""
        g, batch, method = self.generator, self.config.batch_size, self.method
        index = self.stream.take(batch)
        flips = torch.rand(batch, generator=g) < 0.5 if self.config.flip else None
        T, nz = self.diffusion.num_timesteps, self.config.nz or 0
        d_draws = DdganDraws.draw(g, batch, method.shape, T, nz)
        g_draws = DdganDraws.draw(g, batch, method.shape, T, nz)
        lo, hi = self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch
        local = index[lo:hi].to(self.images.device, non_blocking=self.device.type == "cuda")
        x_start = self._local_images(local, flips[lo:hi] if flips is not None else None)
        method.set_learning_rates(self.step_index)
        d_metrics = method.discriminator_step(x_start, d_draws.slice(lo, hi, self.device, self.layout),
                                              self.step_index)
        g_local = g_draws.slice(lo, hi, self.device, self.layout)
        loss, per_sample = method.generator_losses(x_start, g_local)
        loss = torch.where(d_metrics["d_ok"], loss, torch.full_like(loss, float("nan")))
        return loss, {"loss": per_sample, **d_metrics}, g_local.t, clip_gradients(self.params, self.config.grad_clip)

    def discard(self) -> None:
        super().discard()
        self.step_index += 1

    def update(self, t: torch.Tensor, per_sample: torch.Tensor) -> None:
        super().update(t, per_sample)
        self.step_index += 1

    def extra_log(self) -> dict[str, Any]:
        return {"lr_d": self.method.disc_optimizer.param_groups[0]["lr"]}

    def _load_method_state(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.method.load_state(state)
        self.step_index = int(meta["step"])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self.method.state_tensors()
        tensors["data.perm"] = self.stream.perm.clone()
        tensors["rng.generator"] = self.generator.get_state()
        return tensors


class _Trainer:
    """One training run: its folder, its step and the loop that drives them until a stop condition, with the
    ranks' collectives (barriers, agreed stop flags, gathered RNG states) in between."""

    def __init__(self, config: TrainConfig, dist: dist_utils.DistInfo, resume: bool, force: bool,
                 callback: Callable[[TrainEvent], None] | None, should_stop: Callable[[], bool] | None) -> None:
        self.folder = _RunFolder(config, dist)
        if resume and force:
            raise ConfigError("--resume continues the run in --out, --force deletes it: give one of them")
        self.config, self.dist, self.device = config, dist, dist.device
        self.callback = callback if dist.is_main else None
        self.should_stop = should_stop
        self.run_dir = self.folder.path
        self.t0 = time.monotonic()
        self.step = 0
        self.elapsed_before, self.nan_skips = 0.0, 0
        self.last_saved: int | None = None
        self.last_metrics: dict[str, Any] | None = None

        saved = self.folder.claim(resume=resume, force=force)
        dataset = self._load_dataset()
        config = self._fit_to_data(config, saved, dataset)
        model_config = config.make_model_config(image_size=dataset.image_size, channels=dataset.channels,
                                                num_classes=dataset.num_classes if config.class_cond else None)
        self.ckpt_config = CheckpointConfig(model=model_config, diffusion=config.make_diffusion_config(),
                                            data=dataset.info())
        if saved is not None:
            self.folder.check_network(saved, model_config)
        step_class = _DdganStep if config.method == "ddgan" else _TrainingStep
        self.training = step_class(config, dist, self.local_batch, self.ckpt_config, dataset)
        self.num_parameters = sum(p.numel() for p in self.training.model.parameters())
        self.folder.open(self._run_config_payload())
        latest = self.folder.latest_save() if saved is not None else None
        if latest is not None:
            self._load_state(latest)
        if dist.is_main:
            runfolder.rewrite_metrics(self.run_dir, self.step)
        self.training.wrap(self.precision)

    # ----------------------------------------------------------------------------------------- set-up helpers
    def _warn(self, message: str) -> None:
        self._emit("warning", message=message)

    def _emit(self, kind: EventKind, **kwargs: Any) -> None:
        if self.callback is not None:
            self.callback(TrainEvent(kind=kind, step=self.step, max_steps=self.config.max_steps,
                                     elapsed=time.monotonic() - self.t0, max_time=self.config.max_time, **kwargs))

    def _fit_to_data(self, config: TrainConfig, saved: dict[str, Any] | None, dataset: ImageDataset) -> TrainConfig:
        """Options left to their default choice: a resumed run keeps its saved values, a new one fits the data.
        Then each rank's share of the batch and the precision this device runs (one warning where bf16 is
        emulated)."""
        if saved is not None:
            config = config.model_copy(update={f: saved["train"][f] for f in TrainConfig.model_fields
                                               if getattr(config, f) is None and saved["train"].get(f) is not None})
        self.config = self.folder.config = config = config.with_data_defaults(image_size=dataset.image_size,
                                                                              num_images=len(dataset.images))
        self.local_batch = dist_utils.split_batch(config.batch_size, self.dist.world_size)
        self.precision, warning = resolve_precision(config.precision, self.device)
        if warning is not None:
            self._warn(warning)
        return config

    def _load_dataset(self) -> ImageDataset:
        config = self.config
        dataset = load_dataset(config.data, image_size=config.image_size, color=config.color,
                               class_cond=config.class_cond, split="train",
                               skip_bad_images=config.skip_bad_images, on_warning=self._warn)
        if dataset.image_size < MIN_IMAGE_SIZE:
            size = dataset.image_size
            raise DataError(f"{config.data}: images of {size}x{size} pixels are below the {MIN_IMAGE_SIZE}x"
                            f"{MIN_IMAGE_SIZE} minimum: pass --image-size 8 (or larger) to upscale them")
        if config.class_cond and not dataset.num_classes:
            raise ConfigError(f"--class-cond: {config.data} has no class labels")
        return dataset

    def _run_config_payload(self) -> dict[str, Any]:
        return {
            "train": self.config.model_dump(mode="json"),
            "model": self.ckpt_config.model.model_dump(mode="json"),
            "diffusion": self.ckpt_config.diffusion.model_dump(mode="json"),
            "data": self.ckpt_config.data.model_dump(mode="json") if self.ckpt_config.data else None,
            "num_parameters": self.num_parameters,
            "world_size": self.dist.world_size,
            "created_with": __version__,
        }

    # ------------------------------------------------------------------------------------------- save / load
    def _save(self) -> None:
        """Write the EMA checkpoint, the raw weights, the training state; the state JSON last; then prune."""
        step, model = self.step, self.training.model
        # Collectives first (every rank takes part); only rank 0 writes.
        rng_global = dist_utils.all_gather_bytes(self.dist, torch.get_rng_state())
        rng_cuda = (dist_utils.all_gather_bytes(self.dist, torch.cuda.get_rng_state(self.device))
                    if self.device.type == "cuda" else [])
        digests = dist_utils.all_gather_bytes(self.dist, _param_digest(model)) if self.dist.distributed else []
        if self.dist.is_main:
            state = self.training.state_tensors()
            for rank, rng in enumerate(rng_global):
                state[f"rng.global.rank{rank}"] = rng
            for rank, rng in enumerate(rng_cuda):
                state[f"rng.cuda.rank{rank}"] = rng
            stream = self.training.stream
            meta: dict[str, Any] = {
                "epoch": stream.epoch, "data_position": stream.pos, "nan_skips": self.nan_skips,
                "elapsed": self.elapsed_before + time.monotonic() - self.t0,
                "images_seen": step * self.config.batch_size, "world_size": self.dist.world_size,
                "timestep_sampler": self.config.timestep_sampler, "ema_rate": self.config.ema,
                "ema_warmup": self.training.ema.warmup, "ema_updates": self.training.ema.updates,
            }
            if digests:
                # Each rank hashed its own parameters: equal digests prove the replicas never diverged.
                meta["rank_param_sha256"] = [bytes(d.tolist()).hex() for d in digests]
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            try:
                ema_path = self.folder.write_save(step, self.ckpt_config, self.training.ema.state_dict(model),
                                                  weights, state, meta)
            except CheckpointError as err:
                # One line that says what failed and what is safe: the save at `step` is incomplete (no state
                # JSON), so resume ignores it and the previous complete save stays the one to continue from.
                reason = str(err).split(": ", 1)[-1].split("; ")[0]
                kept = (f"the last complete checkpoint {self.folder.paths(self.last_saved)[0]} is intact; continue "
                        f"with --resume" if self.last_saved is not None else "no earlier checkpoint exists")
                raise CheckpointError(f"saving step {step} in {self.run_dir} failed ({reason}): {kept}") from None
            self._emit("save", path=ema_path)
        if digests and len({bytes(d.tolist()) for d in digests}) > 1:
            raise TrainingError(f"the ranks' parameters diverged by step {step} (distributed set-up is broken)")
        self.last_saved = step

    def _load_state(self, step: int) -> None:
        """Restore everything _save wrote at ``step`` (exact resume)."""
        meta, weights, ema, state = self.folder.read_save(step)
        self.training.load(weights, ema, state, meta, self.run_dir, self.folder.paths(step)[2])
        self.step = int(meta["step"])
        self.nan_skips = int(meta.get("nan_skips", 0))
        # Every step that was not skipped updated the EMA (states written before "ema_updates" existed).
        self.training.ema.updates = int(meta.get("ema_updates", self.step - self.nan_skips))
        self.elapsed_before = float(meta.get("elapsed", 0.0))
        self.last_saved = self.step

    # ------------------------------------------------------------------------------------------------- loop
    def _is_control_step(self, step: int) -> bool:
        """Steps where the host looks at device values (NaN, stop flags): every step unless it would cost a sync."""
        c = self.config
        if self.device.type == "cpu" or c.nan_policy == "skip" or self.training.loss_aware:
            return True
        return step % c.log_every == 0 or step % c.save_every == 0 or step == c.max_steps

    def _stop_reason(self, signals: StopSignals) -> StopReason | None:
        """Whether to stop now, agreed by every rank (max over ranks of each condition)."""
        c = self.config
        flags = torch.tensor([
            float(signals.signum is not None),
            float(self.should_stop is not None and bool(self.should_stop())),
            float(c.max_time is not None and time.monotonic() - self.t0 >= c.max_time),
        ])
        flags = dist_utils.all_reduce_max(self.dist, flags)
        if flags[0] > 0:
            return "interrupted"
        if flags[1] > 0:
            return "stopped"
        if flags[2] > 0:
            return "max_time"
        return None

    def _non_finite(self, step: int, loss: torch.Tensor) -> TrainingError:
        good = f"the last good checkpoint is {self.folder.paths(self.last_saved)[0]}" if self.last_saved is not None \
            else "no checkpoint was saved yet"
        return TrainingError(f"non-finite loss ({float(loss.detach()):.4g}) at step {step}: stopped, {good} "
                             "(try a lower --lr, --grad-clip 1, or --nan-policy skip)")

    def _log(self, acc: torch.Tensor, since: float, steps_since: int) -> None:
        # acc[3] counts steps on every rank, so after the sum it is steps x world size: dividing by it alone gives
        # the mean of the ranks' per-step means, which is the global batch's mean (every rank holds an equal share).
        acc = dist_utils.all_reduce_sum(self.dist, acc).cpu().double()
        n = max(float(acc[3]), 1.0)
        now = time.monotonic()
        record: dict[str, Any] = {"step": self.step, "loss": float(acc[0]) / n}
        for i, name in enumerate(("mse", "vb")):
            if name in self.training.metric_names:
                record[name] = float(acc[1 + i]) / n
        for i, name in enumerate(self._extra_metrics()):
            record[name] = float(acc[13 + i]) / n
        for q in range(4):
            count = float(acc[8 + q])
            record[f"q{q}"] = float(acc[4 + q]) / count if count else None
        record.update({
            "grad_norm": float(acc[12]) / n,
            "lr": self.training.optimizer.param_groups[0]["lr"],
            **self.training.extra_log(),
            "img_per_s": steps_since * self.config.batch_size / max(now - since, 1e-9),
            "elapsed": self.elapsed_before + now - self.t0,
            "nan_skips": self.nan_skips,
            "precision": self.precision,
        })
        self.last_metrics = record
        if self.dist.is_main:
            runfolder.append_metrics(self.run_dir, record)
        self._emit("log", metrics=record)

    def _check_finite(self, bad: torch.Tensor, first_bad: torch.Tensor, loss: torch.Tensor, step: int) -> bool:
        """At a control step: raise for a non-finite loss (policy stop), or return True to skip this step."""
        flags = dist_utils.all_reduce_max(self.dist, torch.stack([bad.float(), (first_bad >= 0).float()]))
        if flags[1] > 0:
            raise self._non_finite(int(first_bad), torch.tensor(float("nan")))
        if flags[0] > 0:
            if self.config.nan_policy == "stop":
                raise self._non_finite(step, loss)
            return True
        return False

    @torch.no_grad()
    def _accumulate(self, acc: torch.Tensor, loss: torch.Tensor, losses: dict[str, torch.Tensor], t: torch.Tensor,
                    ones: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Add one step to the on-device metric sums: [loss, mse, vb, steps, loss by t-quartile (4), counts (4),
        grad norm, the step's other metrics] (read back only at log steps, so logging costs no per-step sync).
        A DDGAN step has no mse and vb (0 there) and adds its D terms."""
        per_sample = losses["loss"].detach().float()
        quartile = torch.clamp(t * 4 // self.training.diffusion.num_timesteps, max=3)
        acc[0] += loss.detach()
        acc[1] += losses["mse"].detach().mean() if "mse" in losses else 0.0
        acc[2] += losses["vb"].detach().mean() if "vb" in losses else 0.0
        acc[3] += 1
        acc[4:8].index_add_(0, quartile, per_sample)
        acc[8:12].index_add_(0, quartile, ones)
        acc[12] += grad_norm.detach()
        for i, name in enumerate(self._extra_metrics()):
            acc[13 + i] += losses[name].detach().float()

    def _extra_metrics(self) -> tuple[str, ...]:
        return tuple(name for name in self.training.metric_names if name not in ("mse", "vb"))

    def run(self) -> TrainResult:
        c, dev = self.config, self.device
        start_step = self.step
        # --max-time, elapsed and img/s count training only, not loading data and building the network.
        self.t0 = time.monotonic()
        acc = torch.zeros(13 + len(self._extra_metrics()), device=dev)
        ones = torch.ones(self.local_batch, device=dev)
        first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
        step_dev = torch.full((), self.step, dtype=torch.int64, device=dev)
        log_t0, log_steps = time.monotonic(), 0
        reason: StopReason = "max_steps"
        self._emit("start", message=f"{self.num_parameters:,} parameters, {self.precision}")
        self.training.model.train()
        with StopSignals() as signals:
            while c.max_steps is None or self.step < c.max_steps:
                loss, losses, t, total_norm = self.training.losses()
                bad = ~(torch.isfinite(loss) & torch.isfinite(total_norm))
                step_dev += 1
                next_step = self.step + 1
                control = self._is_control_step(next_step)
                skip = False
                if control:
                    skip = self._check_finite(bad, first_bad, loss, next_step)
                else:
                    # No sync here: remember the first bad step on the device; the next control step raises.
                    first_bad = torch.where(bad & (first_bad < 0), step_dev, first_bad)
                if skip:
                    self.nan_skips += 1
                    self.training.discard()
                    self._emit("warning", message=f"step {next_step}: non-finite loss, step skipped "
                                                  f"({self.nan_skips} so far)")
                else:
                    self.training.update(t, losses["loss"])
                    self._accumulate(acc, loss, losses, t, ones, total_norm)
                self.step = next_step
                log_steps += 1
                self._emit("step")
                stop = self._stop_reason(signals) if control else None
                if self.step % c.log_every == 0 or stop is not None:
                    self._log(acc, log_t0, log_steps)
                    acc.zero_()
                    log_t0, log_steps = time.monotonic(), 0
                if self.step % c.save_every == 0 or stop is not None:
                    self._save()
                if stop is not None:
                    reason = stop
                    break
            if log_steps:
                self._log(acc, log_t0, log_steps)
            if self.last_saved != self.step:
                self._save()
        elapsed = time.monotonic() - self.t0
        trained = self.step - start_step
        ema_path, model_path, state_path, _ = self.folder.paths(self.step)
        self._emit("end", path=ema_path, message=reason)
        return TrainResult(run_dir=self.run_dir, step=self.step, start_step=start_step, ema_checkpoint=ema_path,
                           model_checkpoint=model_path, state_file=state_path, stop_reason=reason,
                           elapsed=elapsed, images_per_s=trained * c.batch_size / max(elapsed, 1e-9),
                           nan_skips=self.nan_skips, num_parameters=self.num_parameters,
                           last_metrics=self.last_metrics, precision=self.precision)


def train(config: TrainConfig, *, device: torch.device, resume: bool = False, force: bool = False,
          callback: Callable[[TrainEvent], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train (or, with ``resume``, continue) the run in ``config.out`` until max_steps / max_time / a stop request.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 alone writes files and receives callbacks.
    Raises ConfigError for an unusable run folder or option, TrainingError for a non-finite loss.
    """
    dist = dist_utils.setup(device)
    try:
        result = _Trainer(config, dist, resume, force, callback, should_stop).run()
        # Every rank finishes before any tears the group down: a rank that exits while another still talks to the
        # store (hosted by rank 0) could abort in gloo's teardown ("terminate called without an active
        # exception", seen in about 1 run in 20 of the 2-rank test).
        dist_utils.barrier(dist)
        return result
    except RuntimeError as err:
        lost = dist_utils.lost_rank_error(dist, err)
        if lost is None:
            raise
        raise lost from None
    finally:
        dist_utils.teardown(dist)

