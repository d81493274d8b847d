"""IDDPM training (improved-diffusion's ``TrainLoop`` objective): AdamW, importance-sampled timesteps, the hybrid
loss, on the shared training loop (:mod:`ddpmctl.loop`: run folder, EMA, resume, stops, NaN policy, precision, DDP).

Three pieces, one job each: ``RunFolderSaves`` (the run folder, ``--out``: --resume / --force, config.json, the
files of each save, metrics.jsonl), ``IDDPMMethod`` (the objective: network, diffusion, optimizer, timestep sampler,
data stream; batches, losses, updates) and :func:`train` (fits the settings to the data and runs the loop).
``--method ddgan`` runs :class:`ddpmctl.ddgan_method.DdganMethod`, ``--method cld``
:class:`ddpmctl.cld_method.CldMethod`, on the same folder and loop instead.

Determinism: one CPU ``torch.Generator`` seeded with ``--seed`` draws everything data-side for the GLOBAL batch
(epoch permutations, flips, timesteps, noise); each rank takes its slice, so every rank's generator stays identical
and the run does not depend on how the batch is split. Dropout uses the global torch RNG (seeded per rank). All of
these states are saved, so a resumed run continues bit for bit. Reports through ``callback``; never prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpmctl import __version__
from ddpmctl import distributed as dist_utils
from ddpmctl import runfiles, runfolder
from ddpmctl.batches import ImageBatches
from ddpmctl.build import build_diffusion, build_model
from ddpmctl.checkpoint import save_checkpoint
from ddpmctl.config import (DATA_DEFAULT_FIELDS, NETWORK_SHAPE_FIELDS, CheckpointConfig, ModelConfig, TrainConfig,
                            halvable_size)
from ddpmctl.data import ImageDataset, load_dataset
from ddpmctl.cld_method import CldMethod
from ddpmctl.ddgan_method import DdganMethod
from ddpmctl.ema import decay_summary
from ddpmctl.errors import CheckpointError, ConfigError, DataError
from ddpmctl.fileio import load_tensors, save_tensors, write_json_atomic
from ddpmctl.finetune import InitWeights, check_same_network, read_init_weights
from ddpmctl.hardware import memory_format, resolve_precision
from ddpmctl.loop import LoopEvent, LoopSettings, Periodic, Save, StopReason, TrainingLoop
from ddpmctl.method import Method, Runtime, StepOutput
from ddpmctl.optim import adamw, clip_gradients, load_optimizer_state, optimizer_state_tensors
from ddpmctl.resample import create_named_schedule_sampler
from ddpmctl.seeds import TRAIN_DROPOUT, derive_seed
from ddpmctl.watch import training_watchers

__all__ = ["IDDPMMethod", "RunFolderSaves", "TrainEvent", "TrainResult", "compute_losses", "make_optimizer",
           "train"]

# The loop's progress event: training's callbacks receive these.
TrainEvent = LoopEvent
STATE_FORMAT = runfiles.TRAIN_STATE_FORMAT
# ModelConfig.image_size's lower bound (the U-Net needs a few pixels to halve).
MIN_IMAGE_SIZE = 4


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


def make_optimizer(params: list[nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the run's --lr and --weight-decay (:func:`ddpmctl.optim.adamw`)."""
    return adamw(params, lr=config.lr or 0.0, weight_decay=config.weight_decay)


# ----------------------------------------------------------------------------------------------------------------
# The run folder


class RunFolderSaves:
    """The run folder of one training run (``--out``): whether it may be used (--resume / --force), its
    config.json, the files of each save and reading them back, metrics.jsonl. Only rank 0 writes.

    A save at step N is ``ema_{rate}_{N}.safetensors`` (the EMA of the sampled network, a checkpoint of
    ``kind``), ``model_{N}.safetensors`` (its raw weights), ``state_{N}.safetensors`` (the method's state, the
    ranks' RNGs, and any other network's weights and EMA as ``net.{name}.*`` / ``ema.{name}.*``) and
    ``state_{N}.json`` (written last: it marks the save complete)."""

    def __init__(self, config: TrainConfig, dist: dist_utils.DistInfo, kind: str = "model",
                 sampled: str = "model") -> None:
        if config.out is None:
            raise ConfigError("no run folder: give --out DIR")
        self.path, self.config, self.dist, self.kind = Path(config.out), config, dist, kind
        self.ckpt_config: CheckpointConfig | None = None  # set once the network is known
        # The training images, once the data is loaded: a saved state's data stream is checked against them.
        self.num_images: int | None = None
        self.sampled = sampled  # the name of the sampled network (the method's first in networks())
        self.init_lineage: list[dict[str, Any]] = []  # --init-from: the parent's lineage and the init step

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

    def latest(self) -> int | None:
        saves = runfolder.complete_saves(self.path)
        return saves[-1] if saves else None

    def paths(self, step: int) -> tuple[Path, Path, Path, Path]:
        d = self.path
        return (d / runfolder.ema_name(self.config.ema, step), d / runfolder.model_name(step),
                d / runfolder.state_name(step), d / runfolder.state_json_name(step))

    def checkpoint_path(self, step: int) -> Path:
        return self.paths(step)[0]

    def state_path(self, step: int) -> Path:
        return self.paths(step)[2]

    def log(self, record: dict[str, Any]) -> None:
        runfolder.append_metrics(self.path, record)

    def _lineage(self, step: int, ema: float | None, averaged: dict[str, Any]) -> list[dict[str, Any]]:
        entry = {"op": "train", "run": self.path.name, "step": step, "ema": ema, "data": self.config.data,
                 "flip": self.config.flip}
        if ema is not None:
            # Which average the weights are (`ddpmctl info` shows it): the warm-up and how many updates it holds.
            entry.update(averaged)
        return [*self.init_lineage, entry]

    def write(self, save: Save) -> Path:
        """Rank 0: the EMA and raw checkpoints and the state tensors, then the state JSON that marks the save
        complete, then pruning (--keep). Returns the EMA checkpoint."""
        assert self.ckpt_config is not None
        step, meta = save.step, save.meta
        ema_path, model_path, state_path, json_path = self.paths(step)
        averaged = {"ema_warmup": meta["ema_warmup"], "ema_updates": meta["ema_updates"]}
        save_checkpoint(ema_path, save.ema[self.sampled], self.ckpt_config, kind=self.kind,
                        lineage=self._lineage(step, self.config.ema, averaged))
        save_checkpoint(model_path, save.weights[self.sampled], self.ckpt_config, kind=self.kind,
                        lineage=self._lineage(step, None, averaged))
        tensors = dict(save.tensors)
        for prefix, networks in (("net", save.weights), ("ema", save.ema)):
            for name, weights in networks.items():
                if name != self.sampled:
                    tensors.update({f"{prefix}.{name}.{k}": v for k, v in weights.items()})
        save_tensors(state_path, tensors, {"format": STATE_FORMAT, "step": str(step)})
        write_json_atomic(json_path, {"format": STATE_FORMAT, "step": step, **meta,
                                      "files": {"ema": ema_path.name, "model": model_path.name,
                                                "state": state_path.name},
                                      "settings": self._settings()})
        runfolder.prune(self.path, self.config.keep)
        return ema_path

    def _settings(self) -> dict[str, Any]:
        """The run's settings as a save records them, with the network options that were left to the defaults
        filled in from the built network, exactly as --resume reads config.json back."""
        assert self.ckpt_config is not None
        settings = runfiles.run_settings(self.config, runfolder.TRAINING.resumable)
        return runfolder.with_network_fields(settings, self.ckpt_config.model.model_dump(mode="json"))

    def read(self, step: int) -> Save:
        """What write wrote at ``step``."""
        ema_path, model_path, state_path, json_path = self.paths(step)
        meta = runfolder.read_json(json_path)
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{json_path} is not a ddpmctl training state")
        files = {"ema": ema_path.name, "model": model_path.name, "state": state_path.name}
        meta = runfiles.check_train_state(meta, json_path, step=step, config=self.config,
                                          num_images=self.num_images, files=files,
                                          resumable=runfolder.TRAINING.resumable, error=CheckpointError,
                                          settings=self._settings())
        tensors = load_tensors(state_path)[0]
        weights = {self.sampled: load_tensors(model_path)[0]}
        ema = {self.sampled: load_tensors(ema_path)[0]}
        for prefix, networks in (("net.", weights), ("ema.", ema)):
            for key in [k for k in tensors if k.startswith(prefix)]:
                name, param = key[len(prefix):].split(".", 1)
                networks.setdefault(name, {})[param] = tensors.pop(key)
        return Save(step=int(meta["step"]), weights=weights, ema=ema, tensors=tensors, meta=meta)


# ----------------------------------------------------------------------------------------------------------------
# The objective


class IDDPMMethod(Method):
    """Improved-DDPM training: the network, diffusion, optimizer, timestep sampler and the data stream; draws this
    rank's slice of each global batch, computes the losses and updates the weights."""

    ema_networks = ("model",)

    def __init__(self, config: TrainConfig, dist: dist_utils.DistInfo, local_batch: int,
                 ckpt_config: CheckpointConfig, dataset: ImageDataset, init: InitWeights | None = None) -> None:
        self.config, self.dist, self.device, self.local_batch = config, dist, dist.device, local_batch
        # The same initial weights on every rank (DDP also broadcasts rank 0's); then a per-rank dropout stream.
        torch.manual_seed(config.seed)
        # channels_last where it wins (hardware.fast_paths): oneDNN's convolutions run without layout round trips.
        self.layout = memory_format(self.device, training=True)
        self.model = build_model(ckpt_config)
        if init is not None:  # --init-from: the checkpoint's weights (the loop's EMA starts from them too)
            self.model.load_state_dict(init.state, strict=True)
        self.model = self.model.to(self.device, memory_format=self.layout)
        torch.manual_seed(derive_seed(config.seed, TRAIN_DROPOUT, dist.rank))
        self.diffusion = build_diffusion(ckpt_config.diffusion)
        self.params = list(self.model.parameters())
        self.optimizer = make_optimizer(self.params, config, self.device)
        self.sampler = create_named_schedule_sampler(config.timestep_sampler, self.diffusion)
        # Only a loss-aware sampler needs the per-sample losses (feeding it costs a host sync per step).
        self.syncs_every_step = config.timestep_sampler != "uniform"
        self.generator = torch.Generator().manual_seed(config.seed)
        lo = dist.rank * local_batch
        self.data = ImageBatches(dataset, self.generator, batch_size=config.batch_size, flip=config.flip,
                                 labels=config.class_cond, device=self.device, rank_slice=slice(lo, lo + local_batch),
                                 layout=self.layout)
        # On-device metric sums: [loss, mse, vb, steps, loss by t-quartile (4), counts (4), grad norm].
        self.acc = torch.zeros(13, device=self.device)
        self.ones = torch.ones(local_batch, device=self.device)

    def networks(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def prepare(self, runtime: Runtime) -> None:
        self.model_call = runtime.wrap(self.model)
        self.grads_set_to_none = runtime.grads_set_to_none

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's slice of the next global batch: x_start, t, importance weights, noise, model kwargs."""
        g, batch, part = self.generator, self.config.batch_size, self.data.slice
        x_start, kwargs = self.data.next()
        t, weights = self.sampler.sample(batch, torch.device("cpu"), generator=g)
        noise = torch.randn((batch, *x_start.shape[1:]), generator=g)
        dev, nb = self.device, self.device.type == "cuda"
        return (x_start, torch.as_tensor(t[part]).to(dev, torch.int64),
                torch.as_tensor(weights[part]).to(dev, torch.float32), noise[part].to(dev, non_blocking=nb), kwargs)

    def forward_backward(self, step: int) -> StepOutput:
        """Forward and backward on the next batch; ``extra`` holds (per-sample losses, t)."""
        x_start, t, weights, noise, kwargs = self.batch()
        losses = compute_losses(self.diffusion, self.model_call, x_start, t, noise, kwargs)
        loss = (losses["loss"] * weights).mean()
        self.optimizer.zero_grad(set_to_none=self.grads_set_to_none)
        loss.backward()
        return StepOutput(loss=loss, grad_norm=clip_gradients(self.params, self.config.grad_clip),
                          extra=(losses, t))

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=self.grads_set_to_none)

    def apply(self, out: StepOutput) -> None:
        """The optimizer, and a loss-aware sampler's history."""
        self.optimizer.step()
        if self.syncs_every_step:
            losses, t = out.extra
            self.sampler.update_with_local_losses(t, losses["loss"].detach())

    @torch.no_grad()
    def accumulate(self, out: StepOutput) -> None:
        """Add one step to the on-device metric sums (read back only at log steps: no per-step sync)."""
        losses, t = out.extra
        acc = self.acc
        per_sample = losses["loss"].detach().float()
        quartile = torch.clamp(t * 4 // self.diffusion.num_timesteps, max=3)
        acc[0] += out.loss.detach()
        acc[1] += losses["mse"].detach().mean() if "mse" in losses else 0.0
        acc[2] += losses["vb"].detach().mean() if "vb" in losses else 0.0
        acc[3] += 1
        acc[4:8].index_add_(0, quartile, per_sample)
        acc[8:12].index_add_(0, quartile, self.ones)
        acc[12] += out.grad_norm.detach()

    def log_record(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        # acc[3] counts steps on every rank, so after the sum it is steps x world size: dividing by it alone gives
        # the mean of the ranks' per-step means, which is the global batch's mean (every rank holds an equal share).
        acc = reduce_sum(self.acc).cpu().double()
        self.acc.zero_()
        n = max(float(acc[3]), 1.0)
        record: dict[str, Any] = {"loss": float(acc[0]) / n, "mse": float(acc[1]) / n, "vb": float(acc[2]) / n}
        for q in range(4):  # quartiles of t numbered q1..q4, as eval-nll's breakdown numbers them
            count = float(acc[8 + q])
            record[f"q{q + 1}"] = float(acc[4 + q]) / count if count else None
        record["grad_norm"] = float(acc[12]) / n
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        return record

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Optimizer moments, sampler history, the data order and the run generator (the loop adds the RNGs)."""
        tensors = optimizer_state_tensors(self.optimizer)
        for key, value in self.sampler.state_dict().items():
            tensors[f"sampler.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors.update(self.data.stream.state()[0])
        tensors["rng.generator"] = self.generator.get_state()
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return {**self.data.stream.state()[1], "timestep_sampler": self.config.timestep_sampler}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        sampler_state = {key[len("sampler."):]: value for key, value in tensors.items() if key.startswith("sampler.")}
        load_optimizer_state(self.optimizer, tensors)
        self.sampler.load_state_dict(sampler_state)
        self.generator.set_state(tensors["rng.generator"])
        self.data.stream.load(tensors, meta)


# ----------------------------------------------------------------------------------------------------------------
# Set-up: settings fitted to the data, then the loop


class _Setup:
    """One training run's set-up: the folder, the data, the settings fitted to it, the method and the loop."""

    def __init__(self, config: TrainConfig, dist: dist_utils.DistInfo, resume: bool, force: bool,
                 callback: Callable[[LoopEvent], None] | None) -> None:
        self.folder = RunFolderSaves(config, dist)
        if resume and force:
            raise ConfigError("--resume continues the run in --out, --force deletes it: give one of them")
        self.config, self.dist, self.device = config, dist, dist.device
        self.callback = callback if dist.is_main else None
        saved = self.folder.claim(resume=resume, force=force)
        # --init-from: read before the data (a bad checkpoint fails fast); a resumed run has its weights already.
        init = read_init_weights(config.init_from) if config.init_from is not None and saved is None else None
        dataset = self.dataset = self._load_dataset()
        self.folder.num_images = len(dataset.images)
        config = self._fit_to_data(config, saved, dataset)
        model_config = config.make_model_config(image_size=dataset.image_size, channels=dataset.channels,
                                                num_classes=dataset.num_classes if config.class_cond else None)
        self.ckpt_config = self.folder.ckpt_config = CheckpointConfig(
            model=model_config, diffusion=config.make_diffusion_config(), data=dataset.info(),
            cld=config.make_cld_config())
        if saved is not None:
            self.folder.check_network(saved, model_config)
        if init is not None:
            check_same_network(init, model_config, self.ckpt_config.out_channels)
        self.folder.init_lineage = (init.lineage_entries() if init is not None
                                    else list((saved or {}).get("init_lineage") or []))
        self.method: Method
        if config.method == "ddgan":
            if init is not None:
                raise ConfigError("--init-from fine-tunes a diffusion model: it does not apply to --method ddgan")
            self.method = DdganMethod(config, dist, self.local_batch, self.ckpt_config, dataset)
        elif config.method == "cld":
            if init is not None:
                raise ConfigError("--init-from fine-tunes a diffusion model: it does not apply to --method cld")
            self.method = CldMethod(config, dist, self.local_batch, self.ckpt_config, dataset)
        else:
            self.method = IDDPMMethod(config, dist, self.local_batch, self.ckpt_config, dataset, init)
        # The sampled network (the method's first) makes the run's checkpoints: a DDGAN's generator is kind ddgan,
        # a CLD score network kind cld.
        self.folder.kind = config.method if config.method in ("ddgan", "cld") else "model"
        self.folder.sampled, sampled = next(iter(self.method.networks().items()))
        self.num_parameters = sum(p.numel() for p in sampled.parameters())
        self.folder.open(self._run_config_payload())

    def quality_probe(self) -> tuple[Periodic, ...]:
        """``--eval-every``: the sample-quality probe as periodic work of rank 0 (ddpmctl.train_eval)."""
        c = self.config
        if c.eval_every is None or not self.dist.is_main:
            return ()
        from ddpmctl.train_eval import QualityProbe

        probe = QualityProbe(self.ckpt_config, self.dataset, c.data, every=c.eval_every, num=c.eval_num,
                             steps=c.eval_steps, device=self.device, kind=self.folder.kind)
        return (probe.periodic(),)

    def _warn(self, message: str) -> None:
        if self.callback is not None:
            self.callback(LoopEvent(kind="warning", step=0, max_steps=self.config.max_steps, elapsed=0.0,
                                    max_time=self.config.max_time, message=message))

    def _fit_to_data(self, config: TrainConfig, saved: dict[str, Any] | None, dataset: ImageDataset) -> TrainConfig:
        """Options left to their default choice: a resumed run keeps its saved values, a new one fits the data.
        Then each rank's share of the batch and the precision this device runs (one warning where bf16 is
        emulated)."""
        # Which options the data decided (`ddpmctl info RUN` marks them); a resumed run keeps its first record.
        left = (*DATA_DEFAULT_FIELDS, *NETWORK_SHAPE_FIELDS)
        self.chosen_from_data = (list(saved.get("chosen_from_data", [])) if saved is not None else
                                 [f for f in left if getattr(config, f) is None])
        if saved is not None:
            # (JSON lists back to the tuples the fields hold: model_copy does not validate.)
            config = config.model_copy(update={f: tuple(v) if isinstance(v, list) else v
                                               for f, v in saved["train"].items()
                                               if f in TrainConfig.model_fields and getattr(config, f) is None
                                               and v is not None})
        self.config = self.folder.config = config = config.with_data_defaults(image_size=dataset.image_size,
                                                                              num_images=len(dataset.images))
        self.local_batch = dist_utils.split_batch(config.batch_size, self.dist.world_size)
        if config.batch_size > len(dataset.images):
            self._warn(f"--batch-size {config.batch_size} is more than the {len(dataset.images):,} training images: "
                       "every batch holds some images twice or more (a batch below the dataset's size, with more "
                       "steps, trains better)")
        self.precision, warning = resolve_precision(config.precision, self.device)
        if warning is not None:
            self._warn(warning)
        return config

    def _load_dataset(self) -> ImageDataset:
        config = self.config
        dataset = load_dataset(config.data, image_size=config.image_size, color=config.color,
                               class_cond=config.class_cond, split="train",
                               skip_bad_images=config.skip_bad_images, on_warning=self._warn,
                               fit_size=lambda size: halvable_size(size, config.channel_mult))
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
            "chosen_from_data": self.chosen_from_data,
            "num_parameters": self.num_parameters,
            "world_size": self.dist.world_size,
            "created_with": __version__,
            "init_lineage": self.folder.init_lineage,
        }

    def loop(self, should_stop: Callable[[], bool] | None, periodic: tuple[Periodic, ...]) -> TrainingLoop:
        c = self.config
        settings = LoopSettings(max_steps=c.max_steps, max_time=c.max_time, save_every=c.save_every,
                                log_every=c.log_every, nan_policy=c.nan_policy, ema_rate=c.ema,
                                ema_warmup=c.ema_warmup, batch_size=c.batch_size)
        loop = TrainingLoop(self.method, self.folder, settings, dist=self.dist, precision=self.precision,
                            callback=self.callback, should_stop=should_stop, periodic=periodic)
        loop.resume()
        if loop.resumed_precision is not None and loop.resumed_precision != self.precision:
            # --precision auto resolves on each machine (docs/design.md, "CPU classes"): resuming elsewhere works,
            # but only a resume in the same precision repeats the uninterrupted run bit for bit.
            self._warn(f"resuming at step {loop.step} in {self.precision}: the run so far trained in "
                       f"{loop.resumed_precision} (--precision {c.precision} on this device), so it continues, "
                       "but not bit-identically to an uninterrupted run")
        if self.dist.is_main:
            runfolder.rewrite_metrics(self.folder.path, loop.step)
        return loop


def _start_message(num_parameters: int, precision: str, loop: TrainingLoop, max_steps: int | None) -> str:
    """The progress header's parentheses: parameters, precision, and the EMA decay the run has reached and will
    reach by its last step (the cap alone overstates a warm-up's average on a short run)."""
    message = f"{num_parameters:,} parameters, {precision}"
    ema = next(iter(loop.emas.values()), None)
    if ema is None:
        return message
    final = None if max_steps is None else ema.updates + max(0, max_steps - loop.step)
    return f"{message}, {decay_summary(ema.rate, ema.warmup, ema.updates, final)}"


def train(config: TrainConfig, *, device: torch.device, resume: bool = False, force: bool = False,
          callback: Callable[[TrainEvent], None] | None = None,
          should_stop: Callable[[], bool] | None = None, periodic: tuple[Periodic, ...] = ()) -> TrainResult:
    """Train (or, with ``resume``, continue) the run in ``config.out`` until max_steps / max_time / a stop request.

    Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 alone writes files and receives callbacks.
    ``periodic`` work runs on rank 0 every N steps (see :class:`ddpmctl.loop.Periodic`).
    Raises ConfigError for an unusable run folder or option, TrainingError for a non-finite loss.
    """
    dist = dist_utils.setup(device)
    try:
        setup = _Setup(config, dist, resume, force, callback)
        loop = setup.loop(should_stop, (*periodic, *setup.quality_probe(), *training_watchers(setup.config)))
        done = loop.run(start_message=_start_message(setup.num_parameters, setup.precision, loop, config.max_steps))
        # Every rank finishes before any tears the group down: a rank that exits while another still talks to the
        # store (hosted by rank 0) could abort in gloo's teardown ("terminate called without an active
        # exception", seen in about 1 run in 20 of the 2-rank test).
        dist_utils.barrier(dist)
    except RuntimeError as err:
        lost = dist_utils.lost_rank_error(dist, err)
        if lost is None:
            raise
        raise lost from None
    finally:
        dist_utils.teardown(dist)
    ema_path, model_path, state_path, _ = setup.folder.paths(done.step)
    return TrainResult(run_dir=setup.folder.path, step=done.step, start_step=done.start_step,
                       ema_checkpoint=ema_path, model_checkpoint=model_path, state_file=state_path,
                       stop_reason=done.stop_reason, elapsed=done.elapsed, images_per_s=done.images_per_s,
                       nan_skips=done.nan_skips, num_parameters=setup.num_parameters,
                       last_metrics=done.last_metrics, precision=setup.precision)
