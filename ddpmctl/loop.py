"""The one training loop of ddpmctl: it drives any :class:`ddpmctl.method.Method` (IDDPM training, a distillation
stage, ...) and owns what every method shares.

- **Saves** go through a :class:`Saves` store (where the files go: a training run folder with ``--keep``, or a
  distillation stage's state file). The loop decides when (``save_every``, a stop, the end) and gathers what: the
  networks' weights, their EMAs, the method's state, the ranks' RNG states and its own counters.
- **Exact resume**: everything a save holds is restored before the first step, so a resumed run continues bit for bit.
- **Stops**: ``max_steps``, ``max_time`` (training time of this invocation), a caller's ``should_stop`` and Ctrl-C /
  SIGTERM (:class:`StopSignals`; a second Ctrl-C interrupts at once); every rank agrees on the stop.
- **NaN policy**: a non-finite loss or gradient norm stops the run (``stop``; the last save stays intact) or skips the
  step (``skip``). On a GPU the host looks at device values only at control steps (see ``_is_control_step``); the
  first bad step in between is remembered on the device and reported at the next one.
- **Precision, DDP**: the method's networks are wrapped once (DDP under torchrun, bf16 autocast when asked).
- **EMA** of every network the method names, updated after each applied step.
- **Metrics and progress**: :class:`LoopEvent` callbacks (rank 0 only) and a record per log interval.
- **Periodic work** (:class:`Periodic`): a rank-0 callable run every N steps, after that step's log and save, with a
  :class:`PeriodicContext` (the step, the EMA networks, a way to add metrics).

Determinism: the method's own generator draws its data; dropout uses the global torch RNG, which the loop saves per
rank. Reports through ``callback``; never prints.
"""

from __future__ import annotations

import copy
import hashlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from ddpmctl import distributed as dist_utils
from ddpmctl.ema import EMA
from ddpmctl.errors import CheckpointError, TrainingError
from ddpmctl.inference import AutocastModel
from ddpmctl.method import Method, Runtime, StepOutput

__all__ = ["LoopEvent", "LoopResult", "LoopSettings", "Periodic", "PeriodicContext", "Save", "Saves",
           "StopSignals", "TrainingLoop"]

# "stopping": the first Ctrl-C / SIGTERM arrived, the run saves and returns after this step; "info": a job's own
# milestone (a plan, a report); the others are the loop's.
EventKind = Literal["start", "step", "log", "save", "warning", "info", "stopping", "end"]
StopReason = Literal["max_steps", "max_time", "interrupted", "stopped"]


class StopSignals:
    """SIGINT/SIGTERM set a flag (the loop saves and returns); a second Ctrl-C interrupts at once.

    ``on_first(signum)`` runs when the first signal arrives (e.g. to say the run will stop after this step).
    """

    def __init__(self, on_first: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self._on_first = on_first
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = self.signum is None
        self.signum = signum
        if first and self._on_first is not None:
            self._on_first(signum)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None


@dataclass(frozen=True)
class LoopEvent:
    """Progress report for the caller (the CLI draws its progress bar from these). A job of several loop runs
    (distillation's stages) says which run an event belongs to in ``stage`` / ``stages`` / ``label``, and reports
    its own milestones as "info" events."""

    kind: EventKind
    step: int
    max_steps: int | None
    elapsed: float  # seconds since the training loop started (set-up excluded)
    max_time: float | None
    metrics: dict[str, Any] | None = None
    path: Path | None = None
    message: str | None = None
    stage: int | None = None
    stages: int | None = None
    label: str | None = None

    @classmethod
    def note(cls, kind: EventKind, message: str) -> LoopEvent:
        """An event outside any loop run (set-up, a plan, a report)."""
        return cls(kind=kind, step=0, max_steps=None, elapsed=0.0, max_time=None, message=message)


@dataclass(frozen=True)
class LoopSettings:
    """How long to run, when to save and log, the NaN policy and the EMA (rate None: no EMA)."""

    max_steps: int | None
    max_time: float | None = None
    save_every: int = 1000
    log_every: int = 10
    nan_policy: Literal["stop", "skip"] = "stop"
    ema_rate: float | None = None
    ema_warmup: str = "power"
    batch_size: int = 1  # images per step (global), for img/s
    save_at_end: bool = True  # False: the caller keeps the finished result itself (a distillation stage)


@dataclass
class Save:
    """One save: the networks' raw weights and EMA weights by network name, the state tensors (method state and
    ranks' RNGs) and the JSON-able values (the method's and the loop's: step, nan_skips, elapsed, ema_updates...)."""

    step: int
    weights: dict[str, dict[str, torch.Tensor]]
    ema: dict[str, dict[str, torch.Tensor]]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


class Saves(Protocol):
    """Where a run's saves go. ``write`` runs on rank 0 only; ``read`` on every rank."""

    def latest(self) -> int | None:
        """The step of the newest complete save (None: start from scratch)."""

    def write(self, save: Save) -> Path:
        """Write a save atomically; returns the path the progress names (CheckpointError when it fails)."""

    def read(self, step: int) -> Save:
        """What ``write`` wrote at ``step`` (CheckpointError when unreadable)."""

    def checkpoint_path(self, step: int) -> Path:
        """The file messages name for the save at ``step`` (the last good checkpoint)."""

    def state_path(self, step: int) -> Path:
        """The state file of the save at ``step`` (named when its contents do not fit)."""

    def log(self, record: dict[str, Any]) -> None:
        """Keep one metrics record (rank 0)."""


@dataclass
class PeriodicContext:
    """What periodic work sees (rank 0): the step just done, the method, the EMA networks and a metrics sink."""

    step: int
    method: Method
    _loop: TrainingLoop = field(repr=False)

    def ema_network(self, name: str | None = None) -> nn.Module:
        """A copy of network ``name`` (default: the sampled one) holding its EMA weights, in eval mode, on the
        training device (the raw weights when the network has no EMA)."""
        return self._loop.ema_network(name)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``{"step": step, **record}`` to the metrics and send it to the caller as a log event."""
        self._loop.log_extra({"step": self.step, **record})

    def warn(self, message: str) -> None:
        self._loop.emit("warning", message=message)


@dataclass(frozen=True)
class Periodic:
    """Rank-0 work every ``every`` steps (FD evaluation, preview grids, held-out loss): ``run(context)`` after the
    step's log and save. Its time is left out of img/s; --max-time counts it (it is wall-clock)."""

    every: int
    run: Callable[[PeriodicContext], None]


@dataclass(frozen=True)
class LoopResult:
    """How a run of the loop ended."""

    step: int
    start_step: int
    stop_reason: StopReason
    elapsed: float
    images_per_s: float
    nan_skips: int
    last_metrics: dict[str, Any] | None
    last_saved: int | None


def param_digest(networks: dict[str, nn.Module]) -> torch.Tensor:
    """SHA-256 of every parameter's bytes, in order, as a uint8 tensor [32] (ranks compare these)."""
    digest = hashlib.sha256()
    for prefix, module in networks.items():
        for name, param in module.named_parameters():
            digest.update((name if len(networks) == 1 else f"{prefix}.{name}").encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8).clone()


class TrainingLoop:
    """Drives one method until a stop condition; see the module docstring for what it owns."""

    def __init__(self, method: Method, saves: Saves, settings: LoopSettings, *, dist: dist_utils.DistInfo,
                 precision: str, callback: Callable[[LoopEvent], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, periodic: tuple[Periodic, ...] = (),
                 on_first_signal: Callable[[int], None] | None = None) -> None:
        self.method, self.saves, self.settings = method, saves, settings
        self.dist, self.device, self.precision = dist, dist.device, precision
        self.callback = callback if dist.is_main else None
        self.should_stop, self.periodic, self.on_first_signal = should_stop, periodic, on_first_signal
        self.networks = method.networks()
        self.emas = {name: EMA(self.networks[name], settings.ema_rate, settings.ema_warmup)
                     for name in method.ema_networks if settings.ema_rate is not None}
        self.t0 = time.monotonic()
        self.step = 0
        self.elapsed_before, self.nan_skips = 0.0, 0
        self.last_saved: int | None = None
        self.last_metrics: dict[str, Any] | None = None
        self.resumed_precision: str | None = None  # the precision the resumed save trained in (when it says)

    # ------------------------------------------------------------------------------------------ set-up
    def emit(self, kind: EventKind, **kwargs: Any) -> None:
        if self.callback is not None:
            s = self.settings
            self.callback(LoopEvent(kind=kind, step=self.step, max_steps=s.max_steps,
                                    elapsed=time.monotonic() - self.t0, max_time=s.max_time, **kwargs))

    def resume(self) -> int | None:
        """Restore the newest complete save, if any (exact resume); returns its step."""
        latest = self.saves.latest()
        if latest is not None:
            self._load(self.saves.read(latest))
        return latest

    def _load(self, save: Save) -> None:
        try:
            for name, weights in save.weights.items():
                self.networks[name].load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=True)
            for name, ema in self.emas.items():
                ema.load_state_dict({k: v.to(self.device) for k, v in save.ema[name].items()})
        except (RuntimeError, KeyError) as err:
            raise CheckpointError(f"{self.saves.checkpoint_path(save.step).parent}: saved weights do not fit the network "
                                  f"({str(err).splitlines()[0]})") from None
        try:
            self.method.load_state(save.tensors, save.meta)
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{self.saves.state_path(save.step)}: the training state does not fit this run "
                                  f"({str(err).splitlines()[0]})") from None
        global_key = f"rng.global.rank{self.dist.rank}"
        if global_key in save.tensors:
            torch.set_rng_state(save.tensors[global_key])
        cuda_key = f"rng.cuda.rank{self.dist.rank}"
        if self.device.type == "cuda" and cuda_key in save.tensors:
            torch.cuda.set_rng_state(save.tensors[cuda_key], self.device)
        self.step = save.step
        self.nan_skips = int(save.meta.get("nan_skips", 0))
        for ema in self.emas.values():
            # Every step that was not skipped updated the EMA (states written before "ema_updates" existed).
            ema.updates = int(save.meta.get("ema_updates", self.step - self.nan_skips))
        self.elapsed_before = float(save.meta.get("elapsed", 0.0))
        self.last_saved = self.step
        self.resumed_precision = save.meta.get("precision")

    def _wrap(self, module: nn.Module) -> Callable[..., torch.Tensor]:
        net = dist_utils.data_parallel(module, self.dist) if self.dist.distributed else module
        return AutocastModel(net, torch.bfloat16 if self.precision == "bf16" else None)

    # ------------------------------------------------------------------------------------------ saves
    def _save(self) -> None:
        """Gather the ranks' RNG states (and parameter digests under DDP); rank 0 writes the save."""
        step = self.step
        # Collectives first (every rank takes part); only rank 0 writes.
        rng_global = dist_utils.all_gather_bytes(self.dist, torch.get_rng_state())
        rng_cuda = (dist_utils.all_gather_bytes(self.dist, torch.cuda.get_rng_state(self.device))
                    if self.device.type == "cuda" else [])
        digests = (dist_utils.all_gather_bytes(self.dist, param_digest(self.networks))
                   if self.dist.distributed else [])
        if self.dist.is_main:
            self._write(step, rng_global, rng_cuda, digests)
        if digests and len({bytes(d.tolist()) for d in digests}) > 1:
            raise TrainingError(f"the ranks' parameters diverged by step {step} (distributed set-up is broken)")
        self.last_saved = step

    def _write(self, step: int, rng_global: list[torch.Tensor], rng_cuda: list[torch.Tensor],
               digests: list[torch.Tensor]) -> None:
        tensors = self.method.state_tensors()
        for rank, rng in enumerate(rng_global):
            tensors[f"rng.global.rank{rank}"] = rng
        for rank, rng in enumerate(rng_cuda):
            tensors[f"rng.cuda.rank{rank}"] = rng
        s = self.settings
        meta: dict[str, Any] = {
            **self.method.state_meta(), "nan_skips": self.nan_skips,
            "elapsed": self.elapsed_before + time.monotonic() - self.t0,
            "images_seen": step * s.batch_size, "world_size": self.dist.world_size,
            "ema_rate": s.ema_rate, "ema_warmup": s.ema_warmup,
            "ema_updates": next(iter(self.emas.values())).updates if self.emas else step - self.nan_skips,
            "precision": self.precision,
        }
        if digests:
            # Each rank hashed its own parameters: equal digests prove the replicas never diverged.
            meta["rank_param_sha256"] = [bytes(d.tolist()).hex() for d in digests]
        weights = {name: {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
                   for name, net in self.networks.items()}
        ema = {name: e.state_dict(self.networks[name]) for name, e in self.emas.items()}
        try:
            path = self.saves.write(Save(step=step, weights=weights, ema=ema, tensors=tensors, meta=meta))
        except CheckpointError as err:
            # One line that says what failed and what is safe: the save at `step` is incomplete, so resume ignores
            # it and the previous complete save stays the one to continue from.
            reason = str(err).split(": ", 1)[-1].split("; ")[0]
            kept = (f"the last complete checkpoint {self.saves.checkpoint_path(self.last_saved)} is intact; continue with "
                    f"--resume" if self.last_saved is not None else "no earlier checkpoint exists")
            where = self.saves.checkpoint_path(step).parent
            raise CheckpointError(f"saving {self.method.describe_step(step)} in {where} failed ({reason}): "
                                  f"{kept}") from None
        self.emit("save", path=path)

    # ------------------------------------------------------------------------------------------ periodic work
    def ema_network(self, name: str | None = None) -> nn.Module:
        name = name or next(iter(self.networks))
        network = copy.deepcopy(self.networks[name])
        if name in self.emas:
            network.load_state_dict(self.emas[name].state_dict(self.networks[name]))
        return network.eval().requires_grad_(False)

    def log_extra(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            self.saves.log(record)
        self.emit("log", metrics=record)

    def _run_periodic(self) -> float:
        """Rank 0's periodic work due at this step; returns the seconds it took."""
        due = [p for p in self.periodic if self.step % p.every == 0]
        if not due or not self.dist.is_main:
            return 0.0
        start = time.monotonic()
        context = PeriodicContext(step=self.step, method=self.method, _loop=self)
        for work in due:
            work.run(context)
        return time.monotonic() - start

    # ------------------------------------------------------------------------------------------ the loop
    def _is_control_step(self, step: int) -> bool:
        """Steps where the host looks at device values (NaN, stop flags): every step unless it would cost a sync."""
        s = self.settings
        if self.device.type == "cpu" or s.nan_policy == "skip" or self.method.syncs_every_step:
            return True
        return step % s.log_every == 0 or step % s.save_every == 0 or step == s.max_steps

    def _stop_reason(self, signals: StopSignals) -> StopReason | None:
        """Whether to stop now, agreed by every rank (max over ranks of each condition)."""
        s = self.settings
        flags = torch.tensor([
            float(signals.signum is not None),
            float(self.should_stop is not None and bool(self.should_stop())),
            float(s.max_time is not None and time.monotonic() - self.t0 >= s.max_time),
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
        good = (f"the last good checkpoint is {self.saves.checkpoint_path(self.last_saved)}" if self.last_saved is not None
                else "no checkpoint was saved yet")
        return TrainingError(f"non-finite loss ({float(loss.detach()):.4g}) at {self.method.describe_step(step)}: "
                             f"stopped, {good} ({self.method.nan_advice})")

    def _check_finite(self, bad: torch.Tensor, first_bad: torch.Tensor, loss: torch.Tensor, step: int) -> bool:
        """At a control step: raise for a non-finite loss (policy stop), or return True to skip this step."""
        flags = dist_utils.all_reduce_max(self.dist, torch.stack([bad.float(), (first_bad >= 0).float()]))
        if flags[1] > 0:
            raise self._non_finite(int(first_bad), torch.tensor(float("nan")))
        if flags[0] > 0:
            if self.settings.nan_policy == "stop":
                raise self._non_finite(step, loss)
            return True
        return False

    def _log(self, since: float, steps_since: int) -> None:
        now = time.monotonic()
        record: dict[str, Any] = {"step": self.step}
        record.update(self.method.log_record(lambda t: dist_utils.all_reduce_sum(self.dist, t)))
        record.update({
            "img_per_s": steps_since * self.settings.batch_size / max(now - since, 1e-9),
            "elapsed": self.elapsed_before + now - self.t0,
            "nan_skips": self.nan_skips,
            "precision": self.precision,
        })
        self.last_metrics = record
        if self.dist.is_main:
            self.saves.log(record)
        self.emit("log", metrics=record)

    def _one_step(self, first_bad: torch.Tensor, step_dev: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """Forward, backward, the NaN policy, the update and the EMAs; (whether this is a control step, first_bad)."""
        out: StepOutput = self.method.forward_backward(self.step)
        bad = ~(torch.isfinite(out.loss) & torch.isfinite(out.grad_norm))
        step_dev += 1
        next_step = self.step + 1
        control = self._is_control_step(next_step)
        skip = False
        if control:
            skip = self._check_finite(bad, first_bad, out.loss, next_step)
        else:
            # No sync here: remember the first bad step on the device; the next control step raises.
            first_bad = torch.where(bad & (first_bad < 0), step_dev, first_bad)
        if skip:
            self.nan_skips += 1
            self.method.discard()
            self.emit("warning", message=f"{self.method.describe_step(next_step)}: non-finite loss, step skipped "
                                         f"({self.nan_skips} so far)")
        else:
            self.method.apply(out)
            for name, ema in self.emas.items():
                ema.update(self.networks[name])
            self.method.accumulate(out)
        self.step = next_step
        return control, first_bad

    def run(self, start_message: str | None = None) -> LoopResult:
        """Train until a stop condition; ``start_message`` goes with the "start" event (e.g. the parameter count)."""
        s, dev = self.settings, self.device
        start_step = self.step
        self.method.prepare(Runtime(device=dev, dist=self.dist, precision=self.precision, wrap=self._wrap))
        # --max-time, elapsed and img/s count training only, not loading data and building the network.
        self.t0 = time.monotonic()
        first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
        step_dev = torch.full((), self.step, dtype=torch.int64, device=dev)
        log_t0, log_steps = time.monotonic(), 0
        reason: StopReason = "max_steps"
        self.emit("start", message=start_message)
        for net in self.networks.values():
            net.train()
        with StopSignals(on_first=self.on_first_signal) as signals:
            while s.max_steps is None or self.step < s.max_steps:
                control, first_bad = self._one_step(first_bad, step_dev)
                log_steps += 1
                self.emit("step")
                # The last step finishes the run whatever else asks it to stop (every rank knows it is the last).
                finished = s.max_steps is not None and self.step >= s.max_steps
                stop = self._stop_reason(signals) if control and not finished else None
                if self.step % s.log_every == 0 or stop is not None:
                    self._log(log_t0, log_steps)
                    log_t0, log_steps = time.monotonic(), 0
                if stop is not None or (self.step % s.save_every == 0 and (s.save_at_end or not finished)):
                    self._save()
                log_t0 += self._run_periodic()
                if stop is not None:
                    reason = stop
                    break
            if log_steps:
                self._log(log_t0, log_steps)
            if s.save_at_end and self.last_saved != self.step:
                self._save()
        elapsed = time.monotonic() - self.t0
        self.emit("end", path=self.saves.checkpoint_path(self.step) if self.last_saved == self.step else None, message=reason)
        return LoopResult(step=self.step, start_step=start_step, stop_reason=reason, elapsed=elapsed,
                          images_per_s=(self.step - start_step) * s.batch_size / max(elapsed, 1e-9),
                          nan_skips=self.nan_skips, last_metrics=self.last_metrics, last_saved=self.last_saved)
