"""The EMA warm-up: its decay schedule, its first steps, `none` bit-identical to improved-diffusion's update_ema,
exact resume with the warm-up (also from a run folder written before it existed), and `info` naming the EMA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ddpmctl.fileio import load_tensors
from ddpmctl.cli.app import app
from ddpmctl.config import TrainConfig
from ddpmctl.ema import EMA, POWER, decay_summary, ema_decay, reached_decay
from ddpmctl.train import train

CPU = torch.device("cpu")
TINY = dict(data="builtin:digits", model_channels=16, channel_mult=(1, 2), res_blocks=1, attention_resolutions=(4,),
            timesteps=20, batch_size=16, log_every=1, save_every=1000, dropout=0.1)


def test_power_schedule() -> None:
    assert ema_decay(0.9999, "power", 0) == 0.0  # the first update copies the trained weights
    assert ema_decay(0.9999, "power", 1) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema_decay(0.9999, "power", 7) == pytest.approx(1 - 8 ** (-2 / 3)) == pytest.approx(0.75)
    decays = [ema_decay(0.999, "power", t) for t in range(0, 50_000, 97)]
    assert decays == sorted(decays)  # grows with the step ...
    assert max(decays) == 0.999  # ... up to --ema, where it stays
    # 1 - (1 + t)^(-2/3) reaches 0.999 at t = 1000^(3/2) - 1 = 31,621.8
    assert ema_decay(0.999, "power", 31_621) < 0.999 == ema_decay(0.999, "power", 31_622)
    assert POWER == 2 / 3
    assert ema_decay(0.9999, "none", 0) == ema_decay(0.9999, "none", 10**6) == 0.9999
    with pytest.raises(ValueError, match="power, none"):
        ema_decay(0.9, "bias", 0)


def test_the_decay_reached_is_shown_not_only_the_cap() -> None:
    # After n updates the last one used 1 - n^(-2/3): 0.9937 after 2,000 updates with the cap at 0.9999.
    assert reached_decay(0.9999, "power", 2000) == pytest.approx(1 - 2000 ** (-2 / 3))
    assert reached_decay(0.9999, "power", 2000) == pytest.approx(0.99370, abs=1e-5)
    assert reached_decay(0.999, "power", 10**6) == 0.999 and reached_decay(0.9999, "none", 3) == 0.9999
    assert decay_summary(0.9999, "power", 0, 2000) == f"EMA decay {1 - 2000 ** (-2 / 3):.6g} by update 2,000 (cap 0.9999)"
    assert decay_summary(0.9999, "power", 600, 1200) == (f"EMA decay {1 - 600 ** (-2 / 3):.6g} after 600 updates, "
                                                         f"{1 - 1200 ** (-2 / 3):.6g} by update 1,200 (cap 0.9999)")
    assert decay_summary(0.9999, "none", 5, 10) == "EMA decay 0.9999 (no warm-up)"


def test_progress_header_shows_the_decay_the_run_reaches(tmp_path: Path) -> None:
    args = ["train", "builtin:digits", "--model-channels", "16", "--channel-mult", "1,2", "--res-blocks", "1",
            "--attention-resolutions", "4", "--timesteps", "20", "--batch-size", "16", "--device", "cpu",
            "--max-steps", "3", "--ema", "0.99", "-o", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"EMA decay {1 - 3 ** (-2 / 3):.6g} by update 3 (cap 0.99)" in " ".join(result.stderr.split())
    resumed = CliRunner().invoke(app, ["train", "-o", str(tmp_path / "run"), "--resume", "--max-steps", "5"])
    assert resumed.exit_code == 0, resumed.output
    assert (f"EMA decay {1 - 3 ** (-2 / 3):.6g} after 3 updates, {1 - 5 ** (-2 / 3):.6g} by update 5 (cap 0.99)"
            in " ".join(resumed.stderr.split()))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _perturb(net: nn.Module, scale: float) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)


def test_power_warmup_forgets_the_initialisation() -> None:
    net = _net()
    initial = [p.detach().clone() for p in net.parameters()]
    ema = EMA(net, 0.9999)
    _perturb(net, 1.0)
    first = [p.detach().clone() for p in net.parameters()]
    ema.update(net)
    for shadow, param in zip(ema.params, first):
        assert torch.equal(shadow, param)  # decay 0: exactly the trained weights, nothing of the init
    _perturb(net, 1.0)
    ema.update(net)
    d = 1 - 2 ** (-2 / 3)
    for shadow, a, b, init in zip(ema.params, first, net.parameters(), initial):
        torch.testing.assert_close(shadow, d * a + (1 - d) * b, rtol=0, atol=1e-6)
        assert not torch.allclose(shadow, init)
    assert ema.updates == 2


def test_none_is_improved_diffusions_update_ema_bit_for_bit() -> None:
    """update_ema: targ.detach().mul_(rate).add_(src, alpha=1 - rate), the average starting at the init."""
    net = _net()
    reference = [p.detach().clone() for p in net.parameters()]
    ema = EMA(net, 0.999, "none")
    for _ in range(25):
        _perturb(net, 0.1)
        ema.update(net)
        for targ, src in zip(reference, net.parameters()):
            targ.mul_(0.999).add_(src.detach(), alpha=1 - 0.999)
    for shadow, targ in zip(ema.params, reference):
        assert torch.equal(shadow, targ)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)[0]


def _same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def test_a_run_folder_from_before_the_warmup_resumes_as_none(tmp_path: Path) -> None:
    """Older config.json / state JSONs lack ema_warmup / ema_updates: they resume with the EMA they had (none)."""
    kw = dict(TINY, ema=0.9)
    train(TrainConfig(**kw, ema_warmup="none", out=str(tmp_path / "full"), max_steps=6), device=CPU)
    part = tmp_path / "part"
    train(TrainConfig(**kw, ema_warmup="none", out=str(part), max_steps=3), device=CPU)
    config = json.loads((part / "config.json").read_text())
    del config["train"]["ema_warmup"]
    (part / "config.json").write_text(json.dumps(config))
    state = json.loads((part / "state_000003.json").read_text())
    del state["ema_warmup"], state["ema_updates"]
    (part / "state_000003.json").write_text(json.dumps(state))
    # The CLI fills omitted options from the saved run; the default (power) must not replace the legacy none.
    result = CliRunner().invoke(app, ["train", "--out", str(part), "--resume", "--max-steps", "6", "--quiet"])
    assert result.exit_code == 0, result.output
    _same(tmp_path / "full" / "ema_0.9_000006.safetensors", part / "ema_0.9_000006.safetensors")


def test_info_names_the_ema(tmp_path: Path) -> None:
    train(TrainConfig(**TINY, out=str(tmp_path / "p"), max_steps=2, ema=0.99), device=CPU)
    train(TrainConfig(**TINY, out=str(tmp_path / "n"), max_steps=2, ema=0.99, ema_warmup="none"), device=CPU)
    runner = CliRunner()
    shown = {}
    for run, name in (("p", "ema_0.99_000002"), ("n", "ema_0.99_000002"), ("p", "model_000002")):
        result = runner.invoke(app, ["info", str(tmp_path / run / f"{name}.safetensors"), "--json"])
        assert result.exit_code == 0, result.output
        shown[(run, name)] = json.loads(result.stdout)["weights"]
    assert shown[("p", "ema_0.99_000002")].startswith("EMA rate 0.99, warm-up")
    # The decay reached, not only the cap: the second update's 1 - 2^(-2/3).
    assert shown[("p", "ema_0.99_000002")].endswith(
        f"2 updates: decay {1 - 2 ** (-2 / 3):.6g} reached (an average over about the last {2 ** (2 / 3):.0f} steps)")
    assert "no warm-up" in shown[("n", "ema_0.99_000002")]
    assert shown[("p", "model_000002")] == "raw training weights (step 2)"
    table = runner.invoke(app, ["info", str(tmp_path / "p" / "ema_0.99_000002.safetensors")])
    assert "weights" in table.stdout and "warm-up" in " ".join(table.stdout.split())
