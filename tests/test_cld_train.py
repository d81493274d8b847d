"""`train --method cld`: the options it takes and refuses, the kind-cld checkpoints it writes and how they validate,
exact resume, bf16, the NaN policy, and (slow) two torchrun ranks against one process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from conftest import assert_same_files, tensors
from ddpmctl.build import build_model
from ddpmctl.checkpoint import FORMAT, load_checkpoint, read_checkpoint_info, save_checkpoint
from ddpmctl.cli.app import app
from ddpmctl.config import (CLD_DIFFUSION, CheckpointConfig, CldConfig, DiffusionConfig, ModelConfig, TrainConfig,
                            default_cld_training)
from ddpmctl.errors import CheckpointError, TrainingError
from ddpmctl.train import train

runner = CliRunner()

TINY = dict(data="builtin:digits", method="cld", model_channels=8, channel_mult=(1, 2), res_blocks=1,
            attention_resolutions=(4,), batch_size=12, save_every=4, log_every=2, precision="fp32", seed=5)
TINY_FLAGS = ["--model-channels", "8", "--channel-mult", "1,2", "--res-blocks", "1", "--attention-resolutions", "4",
              "--batch-size", "12", "--device", "cpu"]
MODEL = ModelConfig(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,))


def _config(out: Path, **changes: object) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(out), **changes})


def _one_error_line(args: list[str]) -> tuple[int, str]:
    res = runner.invoke(app, args)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, res.output)
    return res.exit_code, lines[0]


# ------------------------------------------------------------------------------------------------ the options
def test_defaults_are_the_official_ones_and_other_methods_are_unchanged() -> None:
    config = TrainConfig(data="builtin:digits", method="cld").with_data_defaults(image_size=8, num_images=1437)
    assert (config.lr, config.grad_clip, config.cld_weighting, config.cld_mass, config.cld_beta, config.cld_gamma,
            config.weight_decay) == (2e-4, 1.0, "reweightedv2", 0.25, 4.0, 0.04, 0.0)
    assert config.make_diffusion_config() == CLD_DIFFUSION
    assert config.make_cld_config() == CldConfig(mass=0.25, beta=4.0, gamma=0.04, numerical_eps=1e-9, t_min=1e-5)
    # The data-chosen part is train's own (batch, dropout, flips).
    iddpm = TrainConfig(data="builtin:digits").with_data_defaults(image_size=8, num_images=1437)
    assert (config.batch_size, config.dropout, config.flip) == (iddpm.batch_size, iddpm.dropout, iddpm.flip)
    assert set(default_cld_training(8, 1437)) >= {"cld_weighting", "cld_mass", "cld_beta", "cld_gamma"}
    # IDDPM and DDGAN configs (run and checkpoint) carry no cld key: their JSON is what it was before CLD.
    for train_config in (TrainConfig(data="x"), TrainConfig(data="x", method="ddgan")):
        dumped = train_config.model_dump_json()
        assert "cld" not in dumped, dumped
        assert train_config.make_cld_config() is None
    ckpt = CheckpointConfig(model=MODEL, diffusion=DiffusionConfig(schedule="cosine", timesteps=10))
    assert "cld" not in ckpt.model_dump_json() and "cld" not in ckpt.model_dump()
    assert ckpt.network_in_channels == 1
    cld = CheckpointConfig(model=MODEL, diffusion=CLD_DIFFUSION, cld=CldConfig(beta=2.0))
    assert json.loads(cld.model_dump_json())["cld"]["beta"] == 2.0 and cld.network_in_channels == 2
    assert CheckpointConfig.model_validate_json(cld.model_dump_json()) == cld


@pytest.mark.parametrize(("args", "words"), [
    (["--schedule", "linear"], "--schedule do(es) not apply to --method cld"),
    (["--schedule", "cosine"], "--schedule do(es) not apply to --method cld"),  # the default value, given
    (["--timesteps", "1000"], "--timesteps do(es) not apply"),
    (["--timesteps", "50"], "--timesteps do(es) not apply"),
    (["--mean-type", "eps"], "--mean-type do(es) not apply"),
    (["--mean-type", "x0"], "--mean-type do(es) not apply"),
    (["--var-type", "fixed-small"], "--var-type do(es) not apply"),
    (["--loss", "simple"], "--loss do(es) not apply"),
    (["--timestep-sampler", "loss-second-moment"], "--timestep-sampler do(es) not apply"),
    (["--class-cond"], "unconditional"),
    (["--init-from", "/nonexistent/model.safetensors"], "does not apply to --method cld"),
    (["--cld-mass", "0"], "--cld-mass"),
    (["--cld-weighting", "likelihoods"], "--cld-weighting"),
])
def test_cld_refuses_what_does_not_apply_in_one_line(args: list[str], words: str, tmp_path: Path) -> None:
    code, line = _one_error_line(["train", "builtin:digits", "--method", "cld", "--out", str(tmp_path / "run"),
                                  "--max-steps", "1", *TINY_FLAGS, *args])
    assert code == 2 and words in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", [["--cld-weighting", "likelihood"], ["--cld-mass", "1"], ["--cld-beta", "2"],
                                  ["--cld-gamma", "0.1"]])
@pytest.mark.parametrize("method", [[], ["--method", "iddpm"], ["--method", "ddgan"]])
def test_cld_options_need_method_cld(flag: list[str], method: list[str], tmp_path: Path) -> None:
    code, line = _one_error_line(["train", "builtin:digits", *method, *flag, "--out", str(tmp_path / "run")])
    assert code == 2 and flag[0] in line and "add --method cld" in line, line


# --------------------------------------------------------------------------------------------- checkpoints
def _cld_config(**changes: object) -> CheckpointConfig:
    return CheckpointConfig(model=MODEL, diffusion=CLD_DIFFUSION, cld=CldConfig(**changes))


def test_cld_checkpoints_validate(tmp_path: Path) -> None:
    """kind cld iff the config has a cld section; the network reads 2C channels; a hostile header (a cld section
    under another kind, a cld kind without one, a cld section with a chain's diffusion block) is one
    CheckpointError line naming the file."""
    config = _cld_config(mass=1.0)
    state = {k: torch.randn_like(v) for k, v in build_model(config).state_dict().items()}
    assert state["input_blocks.0.0.weight"].shape[1] == 2  # (x, v) of a 1-channel image
    path = save_checkpoint(tmp_path / "cld.safetensors", state, config, kind="cld", lineage=[])
    ckpt = load_checkpoint(path)
    assert ckpt.kind == "cld" and ckpt.config.cld == CldConfig(mass=1.0)
    out = ckpt.model(torch.randn(2, 2, 8, 8), torch.tensor([1.0, 999.0]))
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises((CheckpointError, ValueError)):
        save_checkpoint(tmp_path / "m.safetensors", state, config, kind="model", lineage=[])

    plain = json.loads(config.model_dump_json())
    del plain["cld"]
    chain = {**json.loads(config.model_dump_json()),
             "diffusion": json.loads(DiffusionConfig(schedule="cosine", timesteps=1000).model_dump_json())}
    bad_mass = json.loads(config.model_dump_json())
    bad_mass["cld"]["mass"] = -1.0
    for kind, payload, words in [
        ("model", config.model_dump_json(), "kind is model but config.cld is set"),
        ("ddgan", config.model_dump_json(), "config.cld"),
        ("cld", json.dumps(plain), "kind is cld but config.cld is missing"),
        ("cld", json.dumps(chain), "diffusion block"),
        ("cld", json.dumps(bad_mass), "mass"),
    ]:
        bad = tmp_path / f"bad_{kind}.safetensors"
        safetensors.torch.save_file(state, str(bad), metadata={
            "format": FORMAT, "config": payload, "kind": kind, "lineage": "[]", "created_with": "0.1.0"})
        for load in (load_checkpoint, read_checkpoint_info):
            with pytest.raises(CheckpointError) as caught:
                load(bad)
            message = str(caught.value)
            assert "\n" not in message and str(bad) in message and words in message, (kind, message)


# ------------------------------------------------------------------------------------------------ training
def test_training_writes_cld_checkpoints_and_metrics(tmp_path: Path) -> None:
    result = train(_config(tmp_path / "run", max_steps=4), device=torch.device("cpu"))
    ckpt = load_checkpoint(result.ema_checkpoint)
    assert ckpt.kind == "cld" and ckpt.config.cld == CldConfig() and ckpt.config.diffusion == CLD_DIFFUSION
    assert load_checkpoint(tmp_path / "run" / "model_000004.safetensors").kind == "cld"
    assert ckpt.model.input_blocks[0][0].weight.shape[1] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        assert {"loss", "q1", "q2", "q3", "q4", "grad_norm", "lr"} <= set(record) and "mse" not in record
        assert math.isfinite(record["loss"]) and record["loss"] > 0 and record["lr"] == 2e-4
        # The loss is the batch mean of per-sample losses, the quartiles the means of those samples by t: the loss
        # lies within their range.
        quartiles = [record[f"q{i}"] for i in range(1, 5) if record[f"q{i}"] is not None]
        assert min(quartiles) <= record["loss"] <= max(quartiles)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["method"] == "cld" and saved["train"]["cld_beta"] == 4.0
    # The command line runs the same method, and a resumed run keeps the saved process.
    res = runner.invoke(app, ["train", "builtin:digits", "--method", "cld", "--out", str(tmp_path / "run"),
                              "--resume", "--max-steps", "6", "--cld-beta", "2", "--quiet", "--device", "cpu"])
    assert res.exit_code != 0 and "--cld-beta" in res.stderr and "saved 4.0" in res.stderr, res.output


def test_first_step_loss_is_the_hsm_loss_of_the_initial_network(tmp_path: Path) -> None:
    """The first logged loss (log every step) is the reweightedv2 HSM loss, recomputed here from the run's draws:
    the initial network (the same seed) on (x_t, v_t) built from its own reference kernel (Phi and Sigma with the
    Cholesky factor of torch.linalg.cholesky), summed over pixels and averaged over the batch."""
    from ddpmctl.batches import ImageBatches
    from ddpmctl.data import load_dataset

    result = train(_config(tmp_path / "run", max_steps=1, log_every=1, dropout=0.0, flip=False, cld_beta=3.0),
                   device=torch.device("cpu"))
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    config = CheckpointConfig.model_validate_json(
        json.dumps({k: v for k, v in json.loads((tmp_path / "run" / "config.json").read_text()).items()
                    if k in ("model", "diffusion", "data")} | {"cld": {"beta": 3.0}}))
    torch.manual_seed(5)
    model = build_model(config)
    g = torch.Generator().manual_seed(5)
    dataset = load_dataset("builtin:digits", image_size=None, color="auto", class_cond=False, split="train")
    x0, _ = ImageBatches(dataset, g, batch_size=12, flip=False, labels=False, device=torch.device("cpu"),
                         rank_slice=slice(0, 12), layout=torch.contiguous_format).next()
    t = torch.rand(12, generator=g, dtype=torch.float64) * (1 - 1e-5) + 1e-5
    eps_x, eps_v = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    assert float(t.min()) > 1e-3
    assert logged == pytest.approx(sum(_reference_hsm_losses(model, x0, t, eps_x, eps_v, beta=3.0)) / 12, rel=1e-4)
    assert result.step == 1


def _reference_hsm_losses(model: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor, eps_x: torch.Tensor,
                          eps_v: torch.Tensor, *, beta: float) -> list[float]:
    """The reweightedv2 HSM loss per image of ``model`` at the given draws, with the kernel written out here from
    its closed form (independently of ddpmctl.cld): Phi, Sigma = diag(1, M) + Phi (Sigma_0 - diag(1, M)) Phi^T and
    torch.linalg.cholesky; M 0.25, Gamma 1, gamma 0.04."""
    gam, m, gamma0 = 1.0, 0.25, 0.04
    losses = []
    for i in range(len(t)):
        b = beta * float(t[i])
        a = 2 * b / gam
        phi_xx, phi_vx = math.exp(-a) * (1 + a), -math.exp(-a) * b
        # Sigma(b) = diag(1, M) + Phi (diag(0, gamma M) - diag(1, M)) Phi^T, in float64 (harmless here: t is not
        # near 0 for these draws, checked below).
        phi = torch.tensor([[phi_xx, math.exp(-a) * 4 * b / gam**2], [phi_vx, math.exp(-a) * (1 - a)]],
                           dtype=torch.float64)
        stationary = torch.diag(torch.tensor([1.0, m], dtype=torch.float64))
        sigma = stationary + phi @ (torch.diag(torch.tensor([0.0, gamma0 * m], dtype=torch.float64)) - stationary) \
            @ phi.T + 1e-9 * torch.eye(2, dtype=torch.float64)
        lower = torch.linalg.cholesky(sigma)
        x = phi_xx * x0[i].double() + lower[0, 0] * eps_x[i].double()
        v = phi_vx * x0[i].double() + lower[1, 0] * eps_x[i].double() + lower[1, 1] * eps_v[i].double()
        with torch.no_grad():
            out = model(torch.cat([x, v]).float()[None], torch.tensor([float(t[i]) * 1000])).double()[0]
        residual = out + v * lower[1, 1] / sigma[1, 1] - eps_v[i].double()
        losses.append(float((residual**2).sum()))
    return losses


def test_heldout_loss_is_the_hsm_loss_at_fixed_draws_and_leaves_training_unchanged(tmp_path: Path) -> None:
    """--val-every logs val_loss: the raw network's HSM loss on the held-out digits at draws fixed for the run
    (recomputed here with the written-out kernel), and the run's files equal a run without it."""
    from ddpmctl.data import load_dataset
    from ddpmctl.validation import CldHeldOutSet
    from ddpmctl.watch import HELDOUT_SEED

    watched, plain = tmp_path / "watched", tmp_path / "plain"
    changes = dict(max_steps=4, save_every=2, dropout=0.0)
    train(_config(watched, val_every=2, **changes), device=torch.device("cpu"))
    train(_config(plain, **changes), device=torch.device("cpu"))
    assert_same_files(plain, watched, ["model_000004.safetensors", "ema_0.9999_000004.safetensors",
                                       "state_000004.safetensors"])
    held = [r for r in map(json.loads, (watched / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in held] == [2, 4]
    model = load_checkpoint(watched / "model_000002.safetensors").model.cpu()
    images = load_dataset("builtin:digits", image_size=None, color="auto", class_cond=False, split="test").images
    draws = CldHeldOutSet(images, 1e-5, seed=HELDOUT_SEED)
    assert draws.t.min() >= 1e-5 and draws.t.max() <= 1.0
    x0 = images.float() / 127.5 - 1.0
    expected = _reference_hsm_losses(model, x0, draws.t, draws.noise_x, draws.noise_v, beta=4.0)
    assert held[0]["val_loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_stopped_and_resumed_run_ends_bit_identical(tmp_path: Path) -> None:
    """Stopped at step 5 (between saves) and resumed: the same network, EMA, optimizer state and metrics as the
    run that went straight to step 8 (dropout and flips on: their draws are restored too)."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    changes = dict(max_steps=8, dropout=0.1, flip=True, cld_weighting="likelihood")
    train(_config(full, **changes), device=torch.device("cpu"))
    steps: list[int] = []

    def callback(event: object) -> None:
        if getattr(event, "kind") == "step":
            steps.append(getattr(event, "step"))

    first = train(_config(stopped, **changes), device=torch.device("cpu"), callback=callback,
                  should_stop=lambda: bool(steps) and steps[-1] >= 5)
    assert first.step == 5 and first.stop_reason == "stopped"
    resumed = train(_config(stopped, **changes), device=torch.device("cpu"), resume=True)
    assert resumed.start_step == 5 and resumed.step == 8
    assert_same_files(full, stopped, ["ema_0.9999_000008.safetensors", "model_000008.safetensors",
                                      "state_000008.safetensors"])
    assert any(k.startswith("optim.") for k in tensors(full / "state_000008.safetensors"))

    def numbers(path: Path) -> list[dict[str, object]]:
        return [{k: v for k, v in json.loads(line).items() if k not in ("img_per_s", "elapsed")}
                for line in path.read_text().splitlines()]

    assert numbers(full / "metrics.jsonl")[-1] == numbers(stopped / "metrics.jsonl")[-1]


def test_bf16_runs(tmp_path: Path) -> None:
    result = train(_config(tmp_path / "run", max_steps=2, log_every=1, precision="bf16"), device=torch.device("cpu"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.step == 2 and all(r["precision"] == "bf16" and math.isfinite(r["loss"]) for r in records)
    assert load_checkpoint(result.ema_checkpoint).kind == "cld"


def test_non_finite_loss_follows_the_nan_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN loss at the third step: --nan-policy stop ends the run naming the step; skip leaves the weights and
    the EMA untouched that step and goes on."""
    from ddpmctl import cld_method

    calls = {"n": 0}
    real = cld_method.CldMethod.losses

    def poisoned(self: object, *args: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        losses = real(self, *args)  # type: ignore[arg-type]
        return losses + float("nan") if calls["n"] == 3 else losses

    monkeypatch.setattr(cld_method.CldMethod, "losses", poisoned)
    with pytest.raises(TrainingError, match="step 3"):
        train(_config(tmp_path / "stop", max_steps=4), device=torch.device("cpu"))
    calls["n"] = 0
    result = train(_config(tmp_path / "skip", max_steps=4, nan_policy="skip"), device=torch.device("cpu"))
    assert result.nan_skips == 1 and result.step == 4
    state = json.loads((tmp_path / "skip" / "state_000004.json").read_text())
    assert state["ema_updates"] == 3


def test_digits_example_config_is_the_demo_network_under_cld() -> None:
    """examples/configs/digits_cld.toml: the demo's U-Net, batch and learning rate (examples/configs/digits.toml),
    so the two methods compare on the same network, with the official process."""
    try:  # Python >= 3.11
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    configs = Path(__file__).resolve().parents[1] / "examples" / "configs"
    cld = TrainConfig(**tomllib.loads((configs / "digits_cld.toml").read_text()))
    demo = TrainConfig(**tomllib.loads((configs / "digits.toml").read_text()))
    assert cld.method == "cld" and cld.make_cld_config() == CldConfig()
    shapes = [c.with_data_defaults(image_size=8, num_images=1437).make_model_config(image_size=8, channels=1,
                                                                                   num_classes=None)
              for c in (cld, demo)]
    assert shapes[0] == shapes[1]
    assert (cld.batch_size, cld.lr, cld.grad_clip) == (demo.batch_size, demo.lr, demo.grad_clip)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path: Path) -> None:
    """2 torchrun ranks (gloo) and one process, same seed and global batch (dropout off: it draws per rank): the
    same metrics and weights to fp32 rounding (only the order of additions differs)."""
    import os
    import subprocess
    import sys

    flags = ["builtin:digits", "--method", "cld", "--model-channels", "32", "--channel-mult", "1,2",
             "--res-blocks", "1", "--attention-resolutions", "4", "--batch-size", "16", "--dropout", "0",
             "--max-steps", "6", "--save-every", "3", "--log-every", "3", "--precision", "fp32", "--quiet",
             "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run([*torchrun, "-m", "ddpmctl", "train", *flags, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=240, start_new_session=True)
    assert two.returncode == 0 and two.stderr == "", two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "ddpmctl", "train", *flags, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=240, start_new_session=True)
    assert one.returncode == 0, one.stderr[-3000:]
    for a, b in zip((tmp_path / "one" / "metrics.jsonl").read_text().splitlines(),
                    (tmp_path / "two" / "metrics.jsonl").read_text().splitlines(), strict=True):
        ra, rb = json.loads(a), json.loads(b)
        for key in ("loss", "q1", "q2", "q3", "q4", "grad_norm"):
            if ra[key] is None:
                assert rb[key] is None
            else:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    wa, wb = (tensors(tmp_path / name / "ema_0.9999_000006.safetensors") for name in ("one", "two"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5)
    assert load_checkpoint(tmp_path / "two" / "ema_0.9999_000006.safetensors").kind == "cld"
