"""The sampling/evaluation network call (ddpmctl.inference): micro-batches change results only at float rounding
(as --batch-size does: a batch of another size may take other kernel blockings); bf16 is opt-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ddpmctl.build import build_model
from ddpmctl.checkpoint import load_checkpoint, save_checkpoint
from ddpmctl.cli.app import app
from ddpmctl.config import CheckpointConfig, DiffusionConfig, ModelConfig
from ddpmctl.inference import InferenceNetwork, default_micro_batch, inference_network
from ddpmctl.nll import evaluate_nll
from ddpmctl.samplers import generate, get_sampler
from conftest import perturb_weights

T = 30
MODEL = ModelConfig(image_size=8, in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,))
DIFFUSION = DiffusionConfig(schedule="cosine", timesteps=T, var_type="learned_range")


def _perturbed(model_config: ModelConfig) -> torch.nn.Module:
    # The zero-initialised output layers would make every output 0: perturb every weight.
    net = build_model(CheckpointConfig(model=model_config, diffusion=DIFFUSION))
    return perturb_weights(net, 0.05, generator=torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = CheckpointConfig(model=MODEL, diffusion=DIFFUSION)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors",
                           dict(_perturbed(MODEL).state_dict()), config, kind="model", lineage=[])


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, T, (n,), generator=gen)


@torch.no_grad()
def test_micro_batches_match_one_call() -> None:
    net = _perturbed(MODEL)
    x, t = _inputs(11)
    whole = net(x, t)
    for size in (1, 3, 4, 11, 50):
        assert torch.allclose(InferenceNetwork(net, micro_batch=size)(x, t), whole, atol=1e-5, rtol=0), size
    assert torch.equal(InferenceNetwork(net, micro_batch=None)(x, t), whole)
    assert torch.equal(InferenceNetwork(net, micro_batch=11)(x, t), whole)  # one call: the same computation


@torch.no_grad()
def test_class_labels_are_split_with_the_images() -> None:
    net = _perturbed(MODEL.model_copy(update={"num_classes": 3}))
    x, t = _inputs(7)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    ref = net(x, t, y=y)
    assert torch.allclose(InferenceNetwork(net, micro_batch=2)(x, t, y=y), ref, atol=1e-5, rtol=0)
    # A wrong split would pair image i with another image's label.
    assert not torch.allclose(InferenceNetwork(net, micro_batch=2)(x, t, y=y.flip(0)), ref, atol=1e-2, rtol=0)


@torch.no_grad()
def test_bf16_runs_the_network_in_bf16_and_hands_back_fp32() -> None:
    net = _perturbed(MODEL)
    x, t = _inputs(6)
    ref = net(x, t)
    out = InferenceNetwork(net, precision="bf16", micro_batch=4)(x, t)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not torch.equal(out, ref)  # bf16 arithmetic really happened
    rel = (out - ref).norm() / ref.norm()
    assert rel < 3e-2, rel  # bf16 keeps ~3 significant digits per op
    assert torch.equal(out, InferenceNetwork(net, precision="bf16", micro_batch=4)(x, t))  # deterministic


def test_wrapper_forwards_no_attributes() -> None:
    # Samplers get a Denoiser, never the network: the wrapper needs no attribute forwarding.
    net = _perturbed(MODEL)
    wrapped = InferenceNetwork(net, micro_batch=2)
    assert wrapped.module is net and wrapped.micro_batch == 2
    with pytest.raises(AttributeError):
        wrapped.time_scale  # noqa: B018


def test_options_are_validated() -> None:
    net = _perturbed(MODEL)
    with pytest.raises(ValueError, match="precision"):
        InferenceNetwork(net, precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="micro_batch"):
        InferenceNetwork(net, micro_batch=0)


def test_default_micro_batch() -> None:
    cpu = torch.device("cpu")
    assert default_micro_batch(cpu, 32, 64) == 64  # benchmark config (a) (benchmarks/README.md)
    assert default_micro_batch(cpu, 32, 128) == 32  # the CIFAR-10 model
    assert default_micro_batch(cpu, 512, 256) == 1  # never 0
    assert default_micro_batch(torch.device("cuda"), 32, 64) is None  # accelerators take the whole batch
    assert inference_network(torch.nn.Identity(), cpu, 32, 64).micro_batch == 64
    assert inference_network(torch.nn.Identity(), cpu, 32, 64, micro_batch=None).micro_batch is None


@pytest.mark.every_cpu
def test_generate_micro_batch_keeps_every_image(ckpt_path: Path) -> None:
    ckpt = load_checkpoint(ckpt_path)
    sampler = get_sampler("strided")()
    a, _ = generate(ckpt, sampler, num=9, batch_size=9, seed=2, steps=5, micro_batch=None)
    b, _ = generate(ckpt, sampler, num=9, batch_size=9, seed=2, steps=5, micro_batch=2)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert isinstance(ckpt.model, torch.nn.Module) and not isinstance(ckpt.model, InferenceNetwork)  # not mutated


@pytest.mark.every_cpu
def test_generate_bf16_is_close_to_fp32_and_reproducible(ckpt_path: Path) -> None:
    ckpt = load_checkpoint(ckpt_path)
    sampler = get_sampler("ddim")()
    fp32, _ = generate(ckpt, sampler, num=6, batch_size=6, seed=1, steps=6)
    bf16, _ = generate(ckpt, sampler, num=6, batch_size=6, seed=1, steps=6, precision="bf16")
    again, _ = generate(ckpt, sampler, num=6, batch_size=4, seed=1, steps=6, precision="bf16")
    assert torch.equal(bf16, again)
    assert not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().mean() < 0.02, (bf16 - fp32).abs().mean()


@pytest.mark.every_cpu
def test_eval_nll_micro_batch_keeps_the_result(ckpt_path: Path) -> None:
    ckpt = load_checkpoint(ckpt_path)
    images = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    whole = evaluate_nll(ckpt, images, batch_size=40, seed=0, micro_batch=None)
    split = evaluate_nll(ckpt, images, batch_size=40, seed=0, micro_batch=7)
    assert torch.allclose(whole.bpd, split.bpd, atol=0, rtol=1e-5)


def test_cli_sample_precision(ckpt_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["sample", str(ckpt_path), "--out", str(tmp_path / "s"), "--steps", "3",
                                 "--num", "2", "--precision", "bf16", "--json", "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["precision"] == "bf16"
    assert (tmp_path / "s" / "000001.png").is_file()
    bad = runner.invoke(app, ["sample", str(ckpt_path), "--out", str(tmp_path / "b"), "--precision", "fp16"])
    assert bad.exit_code == 2
    assert "--precision" in bad.output and "fp16" in bad.output and len(bad.output.splitlines()) == 1
    assert "Traceback" not in bad.output and not (tmp_path / "b").exists()


def test_malloc_tuning_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    from ddpmctl.allocator import tune_malloc

    monkeypatch.setenv("DDPMCTL_MALLOC_TUNING", "0")
    assert tune_malloc() is False
    monkeypatch.delenv("DDPMCTL_MALLOC_TUNING")
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert tune_malloc() is expected  # mallopt accepted both thresholds (it refuses values beyond glibc's caps)


def test_cli_sample_failure_leaves_no_empty_out(ckpt_path: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import ddpmctl.samplers
    from ddpmctl.errors import SamplerError

    def broken(*args: object, **kwargs: object) -> None:
        raise SamplerError("the network produced NaN at step 3")

    monkeypatch.setattr(ddpmctl.samplers, "generate", broken)
    out = tmp_path / "new"
    result = CliRunner().invoke(app, ["sample", str(ckpt_path), "--out", str(out), "--steps", "3", "--quiet"])
    assert result.exit_code == 1 and "NaN at step 3" in result.output
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["sample", str(ckpt_path), "--out", str(kept), "--steps", "3", "--quiet"])
    assert result.exit_code == 1 and (kept / "notes.txt").read_text() == "mine"  # an existing folder stays
