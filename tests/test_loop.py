"""The training loop with a method of two networks and two optimizers (the shape of a GAN: a discriminator step and a
generator step per iteration, lazy regularisation, an EMA of the generator only): exact resume, the NaN policy,
periodic work, and the run folder's saves of a second network."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ddpmctl.distributed import DistInfo
from ddpmctl.errors import TrainingError
from ddpmctl.loop import LoopSettings, Periodic, PeriodicContext, Save, TrainingLoop
from ddpmctl.method import Method, Runtime, StepOutput
from ddpmctl.optim import load_optimizer_state, optimizer_state_tensors

CPU = DistInfo(rank=0, world_size=1, device=torch.device("cpu"))


class ToyGan(Method):
    """G maps noise to points, D scores points; D steps inside forward_backward, G in apply; an R1-like penalty
    on real points every ``lazy`` steps."""

    ema_networks = ("generator",)

    def __init__(self, lazy: int = 3, poison: set[int] | None = None) -> None:
        torch.manual_seed(0)
        self.generator, self.discriminator = nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 8), nn.Tanh(),
                                                                             nn.Linear(8, 1))
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=1e-2, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=1e-2, betas=(0.5, 0.9))
        self.rng = torch.Generator().manual_seed(1)
        self.lazy, self.poison = lazy, poison or set()
        self.sums = torch.zeros(2)

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def prepare(self, runtime: Runtime) -> None:
        self.g, self.d = runtime.wrap(self.generator), runtime.wrap(self.discriminator)

    def forward_backward(self, step: int) -> StepOutput:
        real = torch.randn(16, 2, generator=self.rng) * 0.5 + 2.0
        z = torch.randn(16, 2, generator=self.rng)
        real.requires_grad_(step % self.lazy == 0)
        d_real = self.d(real)
        d_loss = nn.functional.softplus(-d_real).mean() + nn.functional.softplus(self.d(self.g(z).detach())).mean()
        if step % self.lazy == 0:  # lazy regularisation: the penalty, scaled by its interval
            (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
            d_loss = d_loss + self.lazy * grad.pow(2).sum(1).mean()
        self.opt_d.zero_grad()
        d_loss.backward()
        self.opt_d.step()
        g_loss = nn.functional.softplus(-self.d(self.g(z))).mean()
        if step + 1 in self.poison:
            g_loss = g_loss + float("nan")
        self.opt_g.zero_grad()
        g_loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.generator.parameters(), float("inf"))
        return StepOutput(loss=g_loss, grad_norm=norm, extra=d_loss.detach())

    def apply(self, out: StepOutput) -> None:
        self.opt_g.step()

    def discard(self) -> None:
        self.opt_g.zero_grad()

    def accumulate(self, out: StepOutput) -> None:
        self.sums += torch.stack([out.loss.detach(), out.extra])

    def log_record(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        sums = reduce_sum(self.sums)
        self.sums = torch.zeros(2)
        return {"g_loss": float(sums[0]), "d_loss": float(sums[1])}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**optimizer_state_tensors(self.opt_g, "optim.g."), **optimizer_state_tensors(self.opt_d, "optim.d."),
                "rng": self.rng.get_state()}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        load_optimizer_state(self.opt_g, tensors, "optim.g.")
        load_optimizer_state(self.opt_d, tensors, "optim.d.")
        self.rng.set_state(tensors["rng"])


class MemorySaves:
    """Saves kept in memory (deep copies), metrics in a list."""

    def __init__(self) -> None:
        self.saves: dict[int, Save] = {}
        self.records: list[dict[str, Any]] = []

    def latest(self) -> int | None:
        return max(self.saves) if self.saves else None

    def write(self, save: Save) -> Path:
        self.saves[save.step] = copy.deepcopy(save)
        return self.checkpoint_path(save.step)

    def read(self, step: int) -> Save:
        return copy.deepcopy(self.saves[step])

    def checkpoint_path(self, step: int) -> Path:
        return Path(f"mem/{step}")

    def state_path(self, step: int) -> Path:
        return Path(f"mem/state_{step}")

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)


def run(saves: MemorySaves, max_steps: int, **kw: Any) -> tuple[ToyGan, TrainingLoop]:
    method = ToyGan(poison=kw.pop("poison", None))
    settings = LoopSettings(max_steps=max_steps, save_every=4, log_every=2, ema_rate=0.9, batch_size=16,
                            nan_policy=kw.pop("nan_policy", "stop"))
    loop = TrainingLoop(method, saves, settings, dist=CPU, precision="fp32", **kw)
    loop.resume()
    loop.run()
    return method, loop


def everything(saves: MemorySaves, step: int) -> dict[str, torch.Tensor]:
    save = saves.saves[step]
    flat = {f"w.{n}.{k}": v for n, w in save.weights.items() for k, v in w.items()}
    flat.update({f"ema.{n}.{k}": v for n, w in save.ema.items() for k, v in w.items()})
    flat.update(save.tensors)
    return flat


def test_two_networks_resume_bit_exactly_with_an_ema_of_one() -> None:
    straight = MemorySaves()
    method, loop = run(straight, 11)
    assert sorted(straight.saves) == [4, 8, 11]
    save = straight.saves[11]
    assert set(save.weights) == {"generator", "discriminator"} and set(save.ema) == {"generator"}
    assert save.meta["ema_updates"] == 11
    # The EMA moved away from the raw weights, and the discriminator trained too.
    assert not torch.equal(save.ema["generator"]["weight"], save.weights["generator"]["weight"])
    assert not torch.equal(save.weights["discriminator"]["0.weight"], ToyGan().discriminator[0].weight.detach())

    resumed = MemorySaves()
    run(resumed, 6)
    assert sorted(resumed.saves) == [4, 6]
    del resumed.saves[6]  # continue from step 4, as after a kill between saves
    resumed.records.clear()
    _, second = run(resumed, 11)
    assert second.step == 11
    a, b = everything(straight, 11), everything(resumed, 11)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The logged sums after the resumed save agree as well.
    assert [r["g_loss"] for r in straight.records if r["step"] > 4] == [r["g_loss"] for r in resumed.records]


def test_nan_policy_skip_leaves_the_ema_alone_and_stop_names_the_step() -> None:
    saves = MemorySaves()
    _, loop = run(saves, 5, poison={3}, nan_policy="skip")
    assert loop.nan_skips == 1 and saves.saves[5].meta["ema_updates"] == 4
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 3: stopped, the last good .*mem/"
                                            r"|non-finite loss \(nan\) at step 3: stopped, no checkpoint"):
        run(MemorySaves(), 5, poison={3})


def test_periodic_work_sees_the_step_and_the_ema_network() -> None:
    seen: list[tuple[int, torch.Tensor]] = []

    def preview(context: PeriodicContext) -> None:
        network = context.ema_network()
        assert not network.training and not any(p.requires_grad for p in network.parameters())
        seen.append((context.step, network.weight.detach().clone()))
        context.log({"preview": context.step * 10})

    saves = MemorySaves()
    run(saves, 8, periodic=(Periodic(every=4, run=preview),))
    assert [step for step, _ in seen] == [4, 8]
    # At step 8 the periodic work ran after the save: it saw the saved EMA weights.
    assert torch.equal(seen[1][1], saves.saves[8].ema["generator"]["weight"])
    assert {"step": 4, "preview": 40} in saves.records and {"step": 8, "preview": 80} in saves.records


def test_run_folder_keeps_a_second_network_and_its_ema_in_the_state(tmp_path: Path) -> None:
    from ddpmctl.build import build_model
    from ddpmctl.checkpoint import load_checkpoint
    from ddpmctl.config import CheckpointConfig, DiffusionConfig, ModelConfig, TrainConfig
    from ddpmctl.train import RunFolderSaves

    model_config = ModelConfig(image_size=8, in_channels=1, model_channels=8, num_res_blocks=1,
                               attention_resolutions=(), channel_mult=(1, 2))
    ckpt_config = CheckpointConfig(model=model_config, diffusion=DiffusionConfig(timesteps=10))
    unet = build_model(ckpt_config).state_dict()
    disc = ToyGan().discriminator.state_dict()
    # The sampled network is the method's first: here a generator, as a GAN method names it.
    folder = RunFolderSaves(TrainConfig(data="builtin:digits", out=str(tmp_path / "run")), CPU, sampled="generator")
    folder.ckpt_config = ckpt_config
    folder.path.mkdir()
    meta = {"ema_warmup": "power", "ema_updates": 3, "step": 3}
    folder.write(Save(step=3, weights={"generator": unet, "discriminator": disc}, ema={"generator": unet},
                      tensors={"optim.0.step": torch.tensor(3.0)}, meta=meta))
    back = folder.read(3)
    assert folder.latest() == 3 and back.step == 3
    assert set(back.weights) == {"generator", "discriminator"} and set(back.ema) == {"generator"}
    assert load_checkpoint(folder.checkpoint_path(3)).num_parameters == sum(v.numel() for v in unet.values())
    for key, value in disc.items():
        assert torch.equal(back.weights["discriminator"][key], value)
    assert set(back.tensors) == {"optim.0.step"}
