"""Timestep samplers: uniform and loss-second-moment importance sampling (docs/conventions.md #16)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ddpmctl.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)


def _diffusion(T: int) -> SimpleNamespace:
    return SimpleNamespace(num_timesteps=T)


def _fill(sampler: LossSecondMomentResampler, T: int, rounds: int, seed: int = 0) -> dict[int, list[float]]:
    """Feed ``rounds`` losses per step; return each step's full history (independent bookkeeping)."""
    rng = np.random.default_rng(seed)
    seen: dict[int, list[float]] = {k: [] for k in range(T)}
    for _ in range(rounds):
        ts = rng.permutation(T)
        losses = rng.uniform(0.1, 3.0, size=T) * (ts + 1)
        sampler.update_with_local_losses(torch.from_numpy(ts), torch.from_numpy(losses))
        for t, loss in zip(ts.tolist(), losses.tolist()):
            seen[t].append(loss)
    return seen


def test_uniform_sampler() -> None:
    s = UniformSampler(_diffusion(7))
    assert np.array_equal(s.weights(), np.ones(7))
    t, w = s.sample(1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.shape == (1000,) and t.min() >= 0 and t.max() <= 6
    assert set(t.tolist()) == set(range(7))
    assert w.dtype == torch.float32 and (w == 1).all()
    t2, _ = s.sample(1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)
    assert s.state_dict() == {}


def test_warm_up_gives_all_ones_until_every_step_has_full_history() -> None:
    T = 6
    s = LossSecondMomentResampler(_diffusion(T))
    assert np.array_equal(s.weights(), np.ones(T))
    _fill(s, T, 9)
    # Every step has 9 entries; one step more short of 10 keeps it uniform.
    s.update_with_all_losses(list(range(T - 1)), [1.0] * (T - 1))
    assert np.array_equal(s.weights(), np.ones(T))
    s.update_with_all_losses([T - 1], [2.0])
    assert not np.array_equal(s.weights(), np.ones(T))


def test_weights_formula_and_fifo_history() -> None:
    T = 5
    s = LossSecondMomentResampler(_diffusion(T))
    seen = _fill(s, T, 13)
    # FIFO: only the last 10 losses of each step count.
    rms = np.array([math.sqrt(sum(v * v for v in seen[k][-10:]) / 10) for k in range(T)])
    want = rms / rms.sum() * (1 - 0.001) + 0.001 / T
    np.testing.assert_allclose(s.weights(), want, rtol=1e-12)
    # Importance weights are 1 / (T p_t).
    t, w = s.sample(4000, "cpu", generator=torch.Generator().manual_seed(1))
    p = want / want.sum()
    np.testing.assert_allclose(w.numpy(), 1 / (T * p[t.numpy()]), rtol=1e-6)
    # Larger losses are drawn more often, in proportion to p.
    freq = np.bincount(t.numpy(), minlength=T) / 4000
    assert np.abs(freq - p).max() < 0.03


def test_state_round_trip_resumes_exactly() -> None:
    T = 8
    a = LossSecondMomentResampler(_diffusion(T))
    _fill(a, T, 12)
    state = a.state_dict()
    assert set(state) == {"loss_history", "loss_counts"}
    assert state["loss_history"].dtype == torch.float64 and state["loss_history"].shape == (T, 10)
    assert state["loss_counts"].dtype == torch.int64 and state["loss_counts"].tolist() == [10] * T
    b = LossSecondMomentResampler(_diffusion(T))
    b.load_state_dict({k: v.clone() for k, v in state.items()})
    assert np.array_equal(a.weights(), b.weights())
    for s in (a, b):
        s.update_with_all_losses([0, 3], [5.0, 0.25])
    assert np.array_equal(a.weights(), b.weights())
    ta, wa = a.sample(64, "cpu", generator=torch.Generator().manual_seed(3))
    tb, wb = b.sample(64, "cpu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(ta, tb) and torch.equal(wa, wb)
    # A partially warmed-up state round-trips too.
    c = LossSecondMomentResampler(_diffusion(T))
    c.update_with_all_losses([1, 1, 2], [1.0, 2.0, 3.0])
    d = LossSecondMomentResampler(_diffusion(T))
    d.load_state_dict(c.state_dict())
    assert d.state_dict()["loss_counts"].tolist() == [0, 2, 1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError):
        LossSecondMomentResampler(_diffusion(T + 1)).load_state_dict(state)


def test_named_samplers() -> None:
    assert isinstance(create_named_schedule_sampler("uniform", _diffusion(3)), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", _diffusion(3)), LossSecondMomentResampler)
    with pytest.raises(ValueError):
        create_named_schedule_sampler("magic", _diffusion(3))


def test_update_with_local_losses_takes_the_all_gather_path_in_a_process_group(one_rank_group: object,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The path every torchrun rank takes (one rank here); that 2 ranks gather each other's losses is checked
    # against a single process in test_distributed.py.
    assert dist.is_initialized()
    gathered: list[torch.Tensor] = []
    real_all_gather = dist.all_gather

    def all_gather(outputs: list[torch.Tensor], tensor: torch.Tensor, *args: object, **kwargs: object) -> object:
        gathered.append(tensor.clone())
        return real_all_gather(outputs, tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_gather", all_gather)
    s = LossSecondMomentResampler(_diffusion(4))
    s.update_with_local_losses(torch.tensor([0, 2, 2]), torch.tensor([1.5, 2.0, 4.0], dtype=torch.float64))
    # The batch size, then the timesteps and the losses went through the collective.
    assert [g.tolist() for g in gathered] == [[3], [0, 2, 2], [1.5, 2.0, 4.0]]
    state = s.state_dict()
    assert state["loss_counts"].tolist() == [1, 0, 2, 0]
    assert state["loss_history"][2, :2].tolist() == [2.0, 4.0]
