"""space_timesteps (docs/conventions.md #12-13) and respacing (#14) against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpmctl.diffusion import GaussianDiffusion
from ddpmctl.respace import respace, space_timesteps
from ddpmctl.schedules import beta_schedule


def _base(T: int = 4000, var_type: str = "learned_range", mean_type: str = "eps") -> GaussianDiffusion:
    return GaussianDiffusion(beta_schedule("cosine", T), mean_type=mean_type, var_type=var_type,
                             loss_type="rescaled_mse")


def test_ddim50_on_4000_steps() -> None:
    steps = space_timesteps(4000, "ddim50")
    assert len(steps) == 50
    assert max(steps) == 3920 and min(steps) == 0
    assert steps == set(range(0, 4000, 80))


def test_ddim_uses_the_smallest_stride() -> None:
    # T = 1000, 30 steps: strides 34 (30 steps: ceil(1000/34) = 30) is the smallest giving exactly 30.
    assert space_timesteps(1000, "ddim30") == set(range(0, 1000, 34))
    assert space_timesteps(10, "ddim10") == set(range(10))


def test_ddim_impossible_count_raises() -> None:
    with pytest.raises(ValueError, match="40"):
        space_timesteps(100, "ddim40")
    with pytest.raises(ValueError):
        space_timesteps(100, "ddimx")


def test_single_section_small_cases() -> None:
    assert space_timesteps(10, "3") == {0, 4, 9}
    assert space_timesteps(10, [3]) == {0, 4, 9}
    assert space_timesteps(10, "1") == {0}
    assert space_timesteps(10, "10") == set(range(10))
    # K evenly spaced reals from 0 to T-1 (T = 101, K = 4): 0, 33.3, 66.7, 100 -> 0, 33, 67, 100.
    assert space_timesteps(101, "4") == {0, 33, 67, 100}


def test_section_counts_sizes_and_placement() -> None:
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45
    first, second, third = steps[:10], steps[10:25], steps[25:]
    assert all(s < 100 for s in first) and all(100 <= s < 200 for s in second) and all(200 <= s < 300 for s in third)
    assert first[0] == 0 and first[-1] == 99 and second[0] == 100 and second[-1] == 199 and third[-1] == 299
    # Uneven split: T = 10 into 3 sections of sizes 4, 3, 3.
    assert space_timesteps(10, "2,1,3") == {0, 3, 4, 7, 8, 9}


def test_rounding_uses_accumulated_floats_and_half_to_even() -> None:
    # Independent re-implementation of docs/conventions.md #12 for one section.
    T, K = 4000, 100
    stride = (T - 1) / (K - 1)
    cur, want = 0.0, set()
    for _ in range(K):
        want.add(round(cur))
        cur += stride
    assert space_timesteps(T, str(K)) == want
    assert len(want) == K and max(want) == T - 1


@pytest.mark.parametrize("spec", ["11", "5,6", "", "a,b", [0], "0"])
def test_impossible_sections_raise(spec: object) -> None:
    with pytest.raises(ValueError):
        space_timesteps(10, spec)  # type: ignore[arg-type]


def test_respaced_betas_reproduce_abar_at_chosen_steps() -> None:
    base = _base()
    use = space_timesteps(4000, "ddim50") | {3999}
    d = respace(base, use)
    steps = sorted(use)
    abar = base.alphas_cumprod.numpy()
    assert d.num_timesteps == len(steps)
    np.testing.assert_allclose(np.cumprod(1 - d.betas.numpy()), abar[steps], rtol=1e-9)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), abar[steps], rtol=1e-9)
    # beta'_i = 1 - abar[m_i] / abar[m_{i-1}], abar before m_0 is 1.
    prev = np.concatenate([[1.0], abar[steps][:-1]])
    np.testing.assert_allclose(d.betas.numpy(), 1 - abar[steps] / prev, rtol=1e-12)
    assert d.timestep_map.tolist() == steps and d.timestep_map.dtype == torch.int64
    assert d.original_num_steps == 4000
    assert (d.mean_type, d.var_type, d.loss_type) == (base.mean_type, base.var_type, base.loss_type)


def test_respaced_learned_range_uses_the_new_beta() -> None:
    base = _base(200)
    d = respace(base, range(0, 200, 10))
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([3, 19])
    out = d.p_mean_variance(lambda x, tt: torch.cat([torch.zeros_like(x), torch.ones_like(x)], 1), x, t)
    abar = base.alphas_cumprod.numpy()
    want = [math.log(1 - abar[10 * k] / abar[10 * (k - 1)]) for k in t.tolist()]  # frac = 1: log of the new beta
    torch.testing.assert_close(out["log_variance"][:, 0, 0, 0], torch.tensor(want, dtype=torch.float64),
                               rtol=1e-9, atol=0)


def test_respace_of_respaced_composes_the_map() -> None:
    base = _base(1000)
    first = respace(base, range(0, 1000, 10))  # 100 steps: 0, 10, ..., 990
    second = respace(first, {0, 50, 99})
    assert second.timestep_map.tolist() == [0, 500, 990]
    assert second.original_num_steps == 1000
    abar = base.alphas_cumprod.numpy()
    np.testing.assert_allclose(second.alphas_cumprod.numpy(), abar[[0, 500, 990]], rtol=1e-9)


def test_respace_single_step_chain_works() -> None:
    base = _base(100, var_type="fixed_small")
    d = respace(base, [99])
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    out = d.p_sample(lambda x, t: torch.zeros_like(x), x, torch.zeros(2, dtype=torch.int64))
    assert torch.isfinite(out["sample"]).all()
    assert d.timestep_map.tolist() == [99]


@pytest.mark.parametrize("steps", [set(), {-1, 3}, {0, 4000}])
def test_respace_rejects_bad_steps(steps: set[int]) -> None:
    with pytest.raises(ValueError):
        respace(_base(), steps)
