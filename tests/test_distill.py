"""Progressive distillation: grids, target, heads (closed forms), the student sampler, exact resume."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch

from ddpmctl.build import build_diffusion, build_model
from ddpmctl.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from ddpmctl.fileio import load_tensors, save_tensors
from ddpmctl.config import CheckpointConfig, DiffusionConfig, ModelConfig, StudentConfig
from ddpmctl.distill import DistillConfig, distill
from ddpmctl.loop import LoopEvent
from ddpmctl.progressive import (
    CLEAN,
    GridDenoiser,
    ddim_on_grid,
    distillation_target,
    midpoint_grid,
    stage_times,
    student_grid,
    student_predict_xstart,
    teacher_target,
)
from ddpmctl.errors import ConfigError, SamplerError
from ddpmctl.samplers import SampleRNG, build_denoiser, sampling_timesteps
from ddpmctl.schedules import beta_schedule
from ddpmctl_samplers.ddim import DDIMSampler
from ddpmctl_samplers.student import StudentSampler
from conftest import assert_same_files, perturb_weights


def _abar(T: int, schedule: str = "cosine") -> torch.Tensor:
    return torch.cumprod(1.0 - beta_schedule(schedule, T), dim=0)


# ---------------------------------------------------------------------------------------------------------------
# Grids


@pytest.mark.parametrize(("T", "from_steps"), [(4000, 1024), (1000, 256), (4000, 2048), (1000, 512), (100, 64),
                                               (10, 8), (1023, 512), (4001, 1024)])
def test_student_grids_nest_in_teacher_grids(T: int, from_steps: int) -> None:
    n = from_steps
    while n > 1:
        teacher, student, mids = student_grid(T, n), student_grid(T, n // 2), midpoint_grid(T, n // 2)
        assert student == teacher[1::2]  # k_i of N steps = k_{2i} of 2N steps
        assert mids == teacher[0::2]  # k'_i = k_{2i-1}: the teacher's intermediate points lie on its own grid
        assert len(set(teacher)) == n and teacher == sorted(teacher)
        assert teacher[0] >= 0 and teacher[-1] == T - 1  # the top step is the last index (SNR ~ 0)
        n //= 2


def test_grid_values_and_stage_times() -> None:
    # Independent arithmetic: for a power-of-two N, i T / N is exact in binary floating point.
    T, N = 4000, 1024
    assert student_grid(T, N) == [round(i * T / N) - 1 for i in range(1, N + 1)]
    assert student_grid(1000, 4) == [249, 499, 749, 999]
    starts, mids, ends = stage_times(1000, 4)
    assert starts == [249, 499, 749, 999]
    assert mids == [124, 374, 624, 874]  # round((i - 1/2) * 250) - 1 (124.5 -> half to even ... here exact)
    assert ends == [CLEAN, 249, 499, 749]  # t'' = k_{i-1}: clean data after the first step
    for i in range(1, 5):
        assert ends[i - 1] < mids[i - 1] < starts[i - 1]


# ---------------------------------------------------------------------------------------------------------------
# Heads


@pytest.mark.parametrize("param", ["v", "x", "both"])
def test_student_predict_xstart_inverts(param: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    abar = torch.tensor([1e-9, 0.1, 0.5, 0.9, 0.9999], dtype=torch.float64).view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    z = alpha * x + sigma * eps
    if param == "v":
        output = alpha * eps - sigma * x  # Salimans & Ho: v = alpha eps - sigma x
    elif param == "x":
        output = x
    else:
        output = torch.cat([eps, x], dim=1)  # [eps-head | x-head]
    torch.testing.assert_close(student_predict_xstart(output, z, alpha, sigma, param), x, rtol=0, atol=1e-9)


def test_both_head_weights_x_head_at_high_noise() -> None:
    z = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    alpha, sigma = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    x_head = torch.full_like(z, 0.3)
    out = student_predict_xstart(torch.cat([torch.randn_like(z), x_head], 1), z, alpha, sigma, "both")
    torch.testing.assert_close(out, x_head)  # alpha = 0: the eps head has no say (it would divide by 0)
    with pytest.raises(ValueError, match="2 output channels"):
        student_predict_xstart(z, z, alpha, sigma, "both")


# ---------------------------------------------------------------------------------------------------------------
# The target, with an exact teacher for Gaussian data


class GaussianEps(torch.nn.Module):
    """The exact eps-prediction for data N(m, s^2) per pixel: E[x0 | z] in closed form."""

    def __init__(self, abar: torch.Tensor, m: float, s: float) -> None:
        super().__init__()
        self.abar, self.m, self.s = abar, m, s

    def posterior_mean(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar[t].sqrt().view(-1, 1, 1, 1).to(z.dtype)
        var = 1 - self.abar[t].view(-1, 1, 1, 1).to(z.dtype)
        return self.m + a * self.s**2 / (a**2 * self.s**2 + var) * (z - a * self.m)

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        a = self.abar[t].sqrt().view(-1, 1, 1, 1).to(z.dtype)
        sigma = (1 - self.abar[t]).sqrt().view(-1, 1, 1, 1).to(z.dtype)
        return (z - a * self.posterior_mean(z, t)) / sigma


def _ddim(z: torch.Tensor, x_hat: torch.Tensor, abar_t: float, abar_next: float) -> torch.Tensor:
    """The deterministic DDIM update written out independently (Song et al. eq. 12, eta = 0)."""
    eps = (z - math.sqrt(abar_t) * x_hat) / math.sqrt(1 - abar_t)
    return math.sqrt(abar_next) * x_hat + math.sqrt(1 - abar_next) * eps


def test_target_makes_one_student_step_land_on_two_teacher_steps() -> None:
    T, N = 100, 4
    abar = _abar(T)
    model = GaussianEps(abar, m=0.2, s=0.5)
    teacher = GridDenoiser(model, "eps", abar)
    starts, mids, ends = stage_times(T, N)
    g = torch.Generator().manual_seed(3)
    for i in range(1, N + 1):
        t, tm, tp = starts[i - 1], mids[i - 1], ends[i - 1]
        x = 0.2 + 0.5 * torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
        z = abar[t].sqrt() * x + (1 - abar[t]).sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
        ones = torch.ones(3, dtype=torch.int64)
        x_tilde = teacher_target(teacher, z, t * ones, tm * ones, tp * ones, clip=False)
        # The teacher's two steps, by hand: t -> t' -> t''.
        abar_prev = 1.0 if tp == CLEAN else float(abar[tp])
        z_mid = _ddim(z, model.posterior_mean(z, t * ones), float(abar[t]), float(abar[tm]))
        x_mid = model.posterior_mean(z_mid, tm * ones)
        z_tpp = _ddim(z_mid, x_mid, float(abar[tm]), abar_prev)
        # One student step from t with x_hat = x_tilde lands on the same point.
        torch.testing.assert_close(_ddim(z, x_tilde, float(abar[t]), abar_prev), z_tpp, rtol=0, atol=1e-6)
        if i == 1:
            # The last-step rule: to clean data, the target is the teacher's x_hat at the midpoint.
            torch.testing.assert_close(x_tilde, x_mid, rtol=0, atol=1e-9)
        else:
            # Not the pitfall of using the teacher's own x_hat as the target.
            assert not torch.allclose(x_tilde, model.posterior_mean(z, t * ones), atol=1e-3)


def test_distillation_target_formula_by_hand() -> None:
    z, zpp = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    a, s, app, spp = (torch.tensor(v, dtype=torch.float64) for v in (0.3, math.sqrt(1 - 0.09), 0.8, 0.6))
    expected = (0.1 - (0.6 / math.sqrt(0.91)) * 0.7) / (0.8 - (0.6 / math.sqrt(0.91)) * 0.3)
    assert float(distillation_target(z, zpp, a, s, app, spp)) == pytest.approx(expected, rel=1e-12)


def test_ddim_on_grid_recovers_a_single_point() -> None:
    T = 50
    abar = _abar(T)
    x_star = torch.linspace(-0.9, 0.9, 16, dtype=torch.float64).view(1, 1, 4, 4)

    class Exact(torch.nn.Module):
        def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            a = abar[t].sqrt().view(-1, 1, 1, 1)
            return (z - a * x_star) / (1 - abar[t]).sqrt().view(-1, 1, 1, 1)

    x_T = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    out = ddim_on_grid(GridDenoiser(Exact(), "eps", abar), x_T, student_grid(T, 4))
    torch.testing.assert_close(out, x_star.expand(3, -1, -1, -1))


# ---------------------------------------------------------------------------------------------------------------
# The student sampler


def _tiny_model_config() -> ModelConfig:
    return ModelConfig(image_size=8, in_channels=1, model_channels=16, num_res_blocks=1,
                       attention_resolutions=(4,), channel_mult=(1, 2), num_heads=1)


def _fake_student(model: torch.nn.Module, T: int, param: str, steps: int) -> LoadedCheckpoint:
    diffusion = DiffusionConfig(timesteps=T)
    config = CheckpointConfig(model=_tiny_model_config(), diffusion=diffusion,
                              student=StudentConfig(param=param, steps=tuple(student_grid(T, steps)),
                                                    teacher_steps=2 * steps))
    return LoadedCheckpoint(path=Path("student_4.safetensors"), config=config, kind="student", lineage=[],
                            created_with="test", model=model, diffusion=build_diffusion(diffusion), num_parameters=0,
                            sha256="0" * 64)


@pytest.mark.parametrize("param", ["v", "x", "both"])
def test_student_sampler_exact_student_returns_the_point(param: str) -> None:
    T = 40
    abar = _abar(T).float()
    x_star = torch.linspace(-0.8, 0.8, 64).view(1, 1, 8, 8)
    seen: list[int] = []

    class ExactStudent(torch.nn.Module):
        def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            seen.append(int(t[0]))
            a = abar[t].sqrt().view(-1, 1, 1, 1)
            s = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
            eps = (z - a * x_star) / s
            x = x_star.expand_as(z)
            return {"v": a * eps - s * x, "x": x, "both": torch.cat([eps, x], 1)}[param]

    checkpoint = _fake_student(ExactStudent(), T, param, 4)
    sampler = StudentSampler()
    timesteps = sampling_timesteps(checkpoint, sampler, None)
    assert len(timesteps) == 4
    infos = []
    out = sampler.sample(build_denoiser(checkpoint, timesteps), torch.randn(2, 1, 8, 8), timesteps,
                         noise=SampleRNG(0, range(2)), callback=infos.append)
    torch.testing.assert_close(out, x_star.expand(2, -1, -1, -1), rtol=0, atol=1e-5)
    assert seen == student_grid(T, 4)[::-1]  # exactly N network calls, top step first
    assert [i.index for i in infos] == [0, 1, 2, 3] and infos[-1].t == student_grid(T, 4)[0]
    assert torch.equal(infos[-1].x, infos[-1].pred_xstart)  # the last step returns x_hat


def test_student_sampler_matches_distill_sampling_and_validates() -> None:
    T = 40
    torch.manual_seed(0)
    model = perturb_weights(build_model(CheckpointConfig(model=_tiny_model_config(), diffusion=DiffusionConfig(timesteps=T))),
                            0.05)
    model.eval()
    checkpoint = _fake_student(model, T, "both", 4)
    x_T = torch.randn(3, 1, 8, 8)
    timesteps = sampling_timesteps(checkpoint, StudentSampler(), None)
    with torch.no_grad():
        out = StudentSampler().sample(build_denoiser(checkpoint, timesteps), x_T, timesteps,
                                      noise=SampleRNG(0, range(3)))
        ref = ddim_on_grid(GridDenoiser(model, "both", checkpoint.diffusion.alphas_cumprod), x_T,
                           student_grid(T, 4))
    torch.testing.assert_close(out, ref)
    with pytest.raises(SamplerError, match="4-step student.*--steps 4"):
        sampling_timesteps(checkpoint, StudentSampler(), 8)
    with pytest.raises(SamplerError, match="is a distilled student: sample it with --sampler student"):
        sampling_timesteps(checkpoint, DDIMSampler(), None)
    teacher = LoadedCheckpoint(path=Path("ema.safetensors"), config=CheckpointConfig(
        model=_tiny_model_config(), diffusion=DiffusionConfig(timesteps=T)), kind="model", lineage=[],
        created_with="test", model=model, diffusion=checkpoint.diffusion, num_parameters=0, sha256="")
    with pytest.raises(SamplerError, match="not a distilled student"):
        sampling_timesteps(teacher, StudentSampler(), None)


# ---------------------------------------------------------------------------------------------------------------
# The run: resume of an interrupted stage == uninterrupted


@pytest.fixture
def tiny_teacher(tmp_path: Path) -> Path:
    T = 16
    torch.manual_seed(0)
    model_config = _tiny_model_config()
    model = perturb_weights(build_model(CheckpointConfig(model=model_config, diffusion=DiffusionConfig(timesteps=T))), 0.05)
    config = CheckpointConfig(model=model_config, diffusion=DiffusionConfig(timesteps=T))
    return save_checkpoint(tmp_path / "ema.safetensors", model.state_dict(), config, kind="model",
                           lineage=[{"op": "train", "step": 1}])


def _config(ckpt: Path, out: Path, **kw: object) -> DistillConfig:
    base = dict(checkpoint=str(ckpt), data="builtin:digits", out=str(out), from_steps=8, to_steps=2,
                iters_per_stage=5, batch_size=4, report_samples=4, save_every=2, lr=1e-3)
    base.update(kw)
    return DistillConfig(**base)


def test_resume_of_an_interrupted_stage_equals_uninterrupted(tiny_teacher: Path, tmp_path: Path) -> None:
    straight = distill(_config(tiny_teacher, tmp_path / "a"))
    assert [s.steps for s in straight.stages] == [4, 2] and not straight.interrupted

    events: list = []

    def stop() -> bool:  # Ctrl-C in stage 2 after its 3rd update (not on a save_every boundary)
        return any(e.kind == "step" and e.stage == 2 and e.step == 3 for e in events)

    first = distill(_config(tiny_teacher, tmp_path / "b"), callback=events.append, should_stop=stop)
    assert first.interrupted and (tmp_path / "b" / "state_2.safetensors").exists()
    assert (tmp_path / "b" / "student_4.safetensors").exists()
    with pytest.raises(ConfigError, match="--resume"):
        distill(_config(tiny_teacher, tmp_path / "b"))
    with pytest.raises(ConfigError, match="--lr"):
        distill(_config(tiny_teacher, tmp_path / "b", lr=2e-3), resume=True)
    resumed = distill(_config(tiny_teacher, tmp_path / "b"), resume=True)
    assert not resumed.interrupted and not (tmp_path / "b" / "state_2.safetensors").exists()

    assert_same_files(tmp_path / "a", tmp_path / "b", ["student_4.safetensors", "student_2.safetensors"])
    assert [s.student_distance for s in resumed.stages] == [s.student_distance for s in straight.stages]

    student = load_checkpoint(tmp_path / "a" / "student_2.safetensors")
    assert student.kind == "student" and student.config.student.steps == tuple(student_grid(16, 2))
    assert student.config.student.param == "both" and student.config.student.teacher_steps == 4
    assert student.config.model.dropout == 0.0 and student.config.diffusion.use_timesteps is None
    assert [e.get("op") for e in student.lineage] == ["train", "distill", "distill"]
    assert student.lineage[-1]["parent"] == "student_4.safetensors" and student.lineage[-1]["stage"] == 2
    assert student.lineage[1]["parent"] == "ema.safetensors" and len(student.lineage[1]["parent_sha256"]) == 64


def test_sigint_saves_the_stage_and_a_0_1_state_with_slash_keys_still_resumes(tiny_teacher: Path,
                                                                              tmp_path: Path) -> None:
    straight = distill(_config(tiny_teacher, tmp_path / "a"))

    def ctrl_c(event: LoopEvent) -> None:  # Ctrl-C in stage 1 after its 3rd update
        if event.kind == "step" and event.stage == 1 and event.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    first = distill(_config(tiny_teacher, tmp_path / "b"), callback=ctrl_c)
    state = tmp_path / "b" / "state_4.safetensors"
    assert first.interrupted and state.exists() and not first.stages
    # Rewrite the state as ddpmctl 0.1 did: "/" separators and the optimizer's param_groups in the metadata.
    tensors, meta = load_tensors(state)
    assert any(k.startswith("optim.") for k in tensors) and "rng.generator" in tensors
    old = {("model/" + k[len("model."):] if k.startswith("model.") else k.replace(".", "/")): v
           for k, v in tensors.items()}
    save_tensors(state, old, {**meta, "param_groups": "[]"})
    resumed = distill(_config(tiny_teacher, tmp_path / "b"), resume=True)
    assert_same_files(tmp_path / "a", tmp_path / "b", ["student_4.safetensors", "student_2.safetensors"])
    assert [s.student_distance for s in resumed.stages] == [s.student_distance for s in straight.stages]


def test_bad_plans_are_one_line_errors(tiny_teacher: Path, tmp_path: Path) -> None:
    cases = [({"to_steps": 3}, "not a power of two"), ({"from_steps": 12}, "not a power of two"),
             ({"from_steps": 32}, "exceeds the 16 steps"), ({"to_steps": 8}, "must be smaller")]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            distill(_config(tiny_teacher, tmp_path / "x", **kw))


def test_default_head_and_both_initialisation() -> None:
    from ddpmctl.distill import zero_extra_head
    from ddpmctl.progressive import default_param

    assert default_param("v", 2, 1) == "v" and default_param("x0", 1, 1) == "x"  # exact copies of the teacher
    assert default_param("eps", 2, 1) == "both" and default_param("eps", 1, 1) == "v"
    torch.manual_seed(0)
    model = perturb_weights(build_model(CheckpointConfig(model=_tiny_model_config(), diffusion=DiffusionConfig(timesteps=16))),
                            0.05)
    torch.manual_seed(1)
    z, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 9])
    reference = model(z, t)
    zero_extra_head(model, 1, 2)
    out = model(z, t)
    assert torch.equal(out[:, 1:], torch.zeros_like(out[:, 1:]))  # the x-head starts at zero
    torch.testing.assert_close(out[:, :1], reference[:, :1])  # the eps head is untouched
    assert reference[:, 1:].abs().sum() > 0  # (so the zeros above are the initialisation's doing)


def test_teacher_clip_follows_the_official_code_for_v_and_keeps_it_for_eps(tmp_path: Path) -> None:
    # The official progressive distillation leaves a v (or x0) teacher's x_hat unclipped; an eps teacher's x_hat is
    # its error times sigma / alpha at high noise, so ddpmctl clamps it there. --teacher-clip overrides either way.
    torch.manual_seed(0)
    model_config = _tiny_model_config()
    runs = {}
    for mean_type in ("v", "eps"):
        diffusion = DiffusionConfig(timesteps=16, mean_type=mean_type)
        model = perturb_weights(build_model(CheckpointConfig(model=model_config, diffusion=diffusion)), 0.3)
        runs[mean_type] = save_checkpoint(tmp_path / f"{mean_type}.safetensors", model.state_dict(),
                                          CheckpointConfig(model=model_config, diffusion=diffusion), kind="model",
                                          lineage=[{"op": "train", "step": 1}])
    clips = {}
    for name, ckpt, flag in (("v", runs["v"], None), ("v-clip", runs["v"], True), ("eps", runs["eps"], None),
                             ("eps-noclip", runs["eps"], False)):
        distill(_config(ckpt, tmp_path / name, from_steps=4, to_steps=2, iters_per_stage=2, teacher_clip=flag,
                        report_samples=0))
        student = load_checkpoint(tmp_path / name / "student_2.safetensors")
        clips[name] = student.lineage[-1]["teacher_clip"]
    assert clips == {"v": False, "v-clip": True, "eps": True, "eps-noclip": False}
    # The flag changes the targets, hence the student (this teacher's x_hat leaves [-1, 1]).
    a, b = (load_tensors(tmp_path / name / "student_2.safetensors")[0] for name in ("v", "v-clip"))
    assert any(not torch.equal(a[key], b[key]) for key in a)
