"""ddpmctl.train: loss goes down, determinism, EMA, run-folder rules, NaN policy, --keep, bf16, class-conditional."""

from __future__ import annotations

import json
from collections.abc import Callable
import math
from pathlib import Path


import pytest
import torch

import ddpmctl.train as train_module
from ddpmctl.build import build_model
from ddpmctl.checkpoint import load_checkpoint
from ddpmctl.config import TrainConfig
from ddpmctl.errors import ConfigError, TrainingError
from ddpmctl.train import TrainEvent, train
from conftest import assert_same, auto_precision, tensors

CPU = torch.device("cpu")
# A tiny network (about 60k parameters) on the 8x8 digits: a training step takes a few milliseconds.
TINY = dict(data="builtin:digits", model_channels=16, channel_mult=(1, 2), res_blocks=1, attention_resolutions=(4,),
            timesteps=20, batch_size=16, log_every=1, save_every=1000)



def tiny(out: Path, **overrides: object) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(out), "max_steps": 4, **overrides})


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases(tmp_path: Path) -> None:
    config = tiny(tmp_path / "run", max_steps=60, loss="simple", var_type="fixed_small", lr=2e-3)
    result = train(config, device=CPU)
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    # The first steps score about 1 (eps_hat ~ 0); a network that learned anything beats that clearly.
    assert last < 0.7 * first, (first, last)
    assert result.step == 60 and result.stop_reason == "max_steps"


def test_run_folder_contents(tmp_path: Path, cpu_class: str) -> None:
    run = tmp_path / "run"
    result = train(tiny(run, max_steps=4, save_every=2, ema=0.99), device=CPU)
    names = sorted(p.name for p in run.iterdir())
    assert names == sorted(["config.json", "metrics.jsonl",
                            "ema_0.99_000002.safetensors", "model_000002.safetensors", "state_000002.safetensors",
                            "state_000002.json", "ema_0.99_000004.safetensors", "model_000004.safetensors",
                            "state_000004.safetensors", "state_000004.json"])
    assert result.ema_checkpoint == run / "ema_0.99_000004.safetensors"
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["max_steps"] == 4 and saved["model"]["model_channels"] == 16
    assert saved["data"]["source"] == "builtin:digits" and saved["diffusion"]["loss_type"] == "rescaled_mse"
    state = json.loads((run / "state_000004.json").read_text())
    assert state["step"] == 4 and state["files"]["model"] == "model_000004.safetensors"
    ckpt = load_checkpoint(result.ema_checkpoint)
    assert ckpt.kind == "model"
    assert ckpt.lineage == [{"op": "train", "run": "run", "step": 4, "ema": 0.99, "data": "builtin:digits",
                             "flip": False, "ema_warmup": "power", "ema_updates": 4}]
    assert ckpt.config.out_channels == 2  # 1 channel, learned sigma
    record = metrics(run)[-1]
    for key in ("step", "loss", "mse", "vb", "q1", "q2", "q3", "q4", "grad_norm", "lr", "img_per_s", "elapsed"):
        assert key in record
    assert record["lr"] == pytest.approx(2e-4)  # chosen for 8x8 data (config.default_training)
    assert record["precision"] == result.precision == auto_precision(cpu_class)
    assert saved["train"]["lr"] == 2e-4 and saved["train"]["timesteps"] == 20  # the values used, for --resume


def test_ema_is_the_reference_average(tmp_path: Path) -> None:
    """--ema-warmup none, rate 0.75, after one step: ema = 0.75 * initial weights + 0.25 * weights after the step."""
    run = tmp_path / "run"
    config = tiny(run, max_steps=1, ema=0.75, seed=3, ema_warmup="none")
    train(config, device=CPU)
    ckpt = load_checkpoint(run / "model_000001.safetensors")
    torch.manual_seed(3)  # train() builds the network right after seeding the global RNG with --seed
    initial = build_model(ckpt.config).state_dict()
    after = tensors(run / "model_000001.safetensors")
    ema = tensors(run / "ema_0.75_000001.safetensors")
    moved = 0
    for name, value in ema.items():
        expected = initial[name] * 0.75 + after[name] * 0.25
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
        moved += int(not torch.equal(initial[name], after[name]))
    assert moved > 0


def test_same_seed_is_bit_identical(tmp_path: Path) -> None:
    kwargs = dict(max_steps=5, save_every=5, dropout=0.1, timestep_sampler="loss-second-moment")
    train(tiny(tmp_path / "a", **kwargs), device=CPU)
    train(tiny(tmp_path / "b", **kwargs), device=CPU)
    train(tiny(tmp_path / "c", seed=1, **kwargs), device=CPU)
    for name in ("ema_0.9999_000005.safetensors", "model_000005.safetensors", "state_000005.safetensors"):
        assert_same(tensors(tmp_path / "a" / name), tensors(tmp_path / "b" / name))
    a, c = tensors(tmp_path / "a" / "model_000005.safetensors"), tensors(tmp_path / "c" / "model_000005.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.every_cpu
def test_resume_in_process_is_exact(tmp_path: Path, cpu_class: str) -> None:
    # Under every class: NCHW and channels_last training, fp32 and (avx512-bf16) bf16 steps all resume exactly.
    # EMA rate 0.9: its warm-up's decay passes 0.9 only after 31 updates, so the resume at 3 is mid warm-up.
    kwargs = dict(save_every=3, dropout=0.1, timestep_sampler="loss-second-moment", batch_size=24, ema=0.9)
    train(tiny(tmp_path / "full", max_steps=7, **kwargs), device=CPU)
    train(tiny(tmp_path / "part", max_steps=3, **kwargs), device=CPU)
    state = json.loads((tmp_path / "part" / "state_000003.json").read_text())
    assert state["ema_warmup"] == "power" and state["ema_updates"] == 3
    result = train(tiny(tmp_path / "part", max_steps=7, **kwargs), device=CPU, resume=True)
    assert result.start_step == 3 and result.step == 7 and result.precision == auto_precision(cpu_class)
    for name in ("ema_0.9_000007.safetensors", "model_000007.safetensors", "state_000007.safetensors"):
        assert_same(tensors(tmp_path / "full" / name), tensors(tmp_path / "part" / name))
    assert [m["step"] for m in metrics(tmp_path / "part")] == list(range(1, 8))


def test_refuses_out_holding_another_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(run, max_steps=2), device=CPU)
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(tiny(run, max_steps=2), device=CPU)
    assert (run / "state_000002.json").exists()
    # --force deletes the old run's files (and only those) and starts over.
    (run / "notes.txt").write_text("mine")
    result = train(tiny(run, max_steps=1), device=CPU, force=True)
    assert result.step == 1 and not (run / "state_000002.json").exists()
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_with_a_different_config_names_the_field(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(run, max_steps=2), device=CPU)
    with pytest.raises(ConfigError) as err:
        train(tiny(run, max_steps=4, lr=3e-4), device=CPU, resume=True)
    assert "--lr" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no training run to resume"):
        train(tiny(tmp_path / "empty", max_steps=2), device=CPU, resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path,
                                                           poison_losses: Callable[[float, set[int]], None]) -> None:
    run = tmp_path / "run"
    poison_losses(float("nan"), {5})
    with pytest.raises(TrainingError, match="at step 5") as err:
        train(tiny(run, max_steps=8, save_every=2), device=CPU)
    assert "model_000004" not in str(err.value) and "ema_0.9999_000004.safetensors" in str(err.value)
    assert train_module.runfolder.complete_saves(run) == [2, 4]
    weights = tensors(run / "model_000004.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nan_policy_skip_counts_skips(tmp_path: Path, poison_losses: Callable[[float, set[int]], None]) -> None:
    run = tmp_path / "run"
    poison_losses(float("nan"), {2, 3})
    events: list[TrainEvent] = []
    result = train(tiny(run, max_steps=5, nan_policy="skip"), device=CPU, callback=events.append)
    assert result.step == 5 and result.nan_skips == 2
    assert metrics(run)[-1]["nan_skips"] == 2
    assert json.loads((run / "state_000005.json").read_text())["nan_skips"] == 2
    assert sum(e.kind == "warning" for e in events) == 2
    assert all(torch.isfinite(v).all() for v in tensors(run / "model_000005.safetensors").values())


def test_keep_prunes_old_saves(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # A temporary file of a killed writer is cleaned up too.
    run.mkdir()
    (run / ".model_000001.safetensors.999.deadbeef.tmp").write_bytes(b"partial")
    train(tiny(run, max_steps=5, save_every=1, keep=2), device=CPU, force=True)
    steps = sorted({p.name for p in run.iterdir()} - {"config.json", "metrics.jsonl"})
    assert steps == ["ema_0.9999_000004.safetensors", "ema_0.9999_000005.safetensors", "model_000004.safetensors",
                     "model_000005.safetensors", "state_000004.json", "state_000004.safetensors",
                     "state_000005.json", "state_000005.safetensors"]


def test_bf16_trains_close_to_fp32(tmp_path: Path) -> None:
    kwargs = dict(max_steps=6, loss="simple", var_type="fixed_small", lr=1e-3)
    fp32 = train(tiny(tmp_path / "fp32", precision="fp32", **kwargs), device=CPU)
    bf16 = train(tiny(tmp_path / "bf16", precision="bf16", **kwargs), device=CPU)
    a, b = fp32.last_metrics["loss"], bf16.last_metrics["loss"]
    assert math.isfinite(b) and abs(a - b) < 0.1 * a
    wa, wb = tensors(fp32.model_checkpoint), tensors(bf16.model_checkpoint)
    assert all(v.dtype == torch.float32 for v in wb.values())  # parameters stay fp32
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # autocast really ran in bf16


def test_class_conditional(tmp_path: Path) -> None:
    result = train(tiny(tmp_path / "run", class_cond=True, max_steps=2), device=CPU)
    ckpt = load_checkpoint(result.ema_checkpoint)
    assert ckpt.config.model.num_classes == 10
    assert ckpt.config.data.class_names == tuple(str(i) for i in range(10))
    assert any(name.startswith("label_emb") for name in tensors(result.ema_checkpoint))


def test_should_stop_saves_at_the_current_step(tmp_path: Path) -> None:
    steps: list[int] = []
    result = train(tiny(tmp_path / "run", max_steps=50), device=CPU,
                   callback=lambda e: steps.append(e.step) if e.kind == "step" else None,
                   should_stop=lambda: len(steps) >= 3)
    assert result.stop_reason == "stopped" and result.step == 3
    assert (tmp_path / "run" / "state_000003.json").exists()


def test_max_time_stops(tmp_path: Path) -> None:
    result = train(tiny(tmp_path / "run", max_steps=None, max_time=0.5), device=CPU)
    assert result.stop_reason == "max_time" and result.step >= 1
    assert result.ema_checkpoint.exists()


def test_batch_must_divide_among_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ddpmctl import distributed

    monkeypatch.setattr(train_module.dist_utils, "setup",
                        lambda device: distributed.DistInfo(rank=0, world_size=3, device=device))
    monkeypatch.setattr(train_module.dist_utils, "barrier", lambda dist: None)
    with pytest.raises(ConfigError, match="divide"):
        train(tiny(tmp_path / "run", batch_size=16), device=CPU)


def test_image_folder_of_mixed_sizes_and_formats(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i, (size, ext) in enumerate([((20, 16), "png"), ((12, 12), "jpg"), ((6, 9), "png"), ((16, 30), "jpeg")]):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / ("sub" if i % 2 else ".") / f"img{i}.{ext}")
    events: list[TrainEvent] = []
    result = train(tiny(tmp_path / "run", data=str(folder), image_size=8, max_steps=2, batch_size=4), device=CPU,
                   callback=events.append)
    ckpt = load_checkpoint(result.ema_checkpoint)
    assert ckpt.config.model.in_channels == 3 and ckpt.config.data.num_images == 4
    # The 6x9 image is smaller than 8x8: upscaled, and the data loader's note reaches the caller.
    assert any(e.kind == "warning" for e in events)
