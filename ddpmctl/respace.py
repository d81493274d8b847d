"""Respacing: run a trained diffusion on a subsequence of its steps (Nichol & Dhariwal 2021, Sec. 4)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ddpmctl.diffusion import GaussianDiffusion


def _ddim_stride_steps(num_timesteps: int, desired_count: int) -> set[int]:
    """range(0, T, i) for the smallest integer stride i >= 1 giving exactly N steps (docs/conventions.md #13)."""
    if desired_count < 1:
        raise ValueError(f"ddim{desired_count}: the number of steps must be >= 1")
    # Strides beyond T all give the single step {0}, so i = 1..T covers every achievable count.
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == desired_count:
            return set(range(0, num_timesteps, stride))
    raise ValueError(
        f"cannot take exactly {desired_count} steps of a {num_timesteps}-step chain with an integer stride "
        f"(ddim{desired_count}); choose another count or a plain step count such as {desired_count!s}"
    )


def _parse_section_counts(spec: str) -> list[int]:
    try:
        return [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"cannot read timestep spacing {spec!r}: use a step count ('100'), section counts ('10,15,20') "
            f"or 'ddimN'"
        ) from None


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Which of ``num_timesteps`` original steps to keep (IDDPM ``space_timesteps``, docs/conventions.md #12-13).

    ``section_counts`` is "ddimN" (DDIM's fixed stride), a comma-separated string or a list of per-section step
    counts: the chain is cut into len(counts) near-equal sections, each strided to its count.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"the number of diffusion steps must be an integer >= 1, got {num_timesteps!r}")
    num_timesteps = int(num_timesteps)
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"cannot read timestep spacing {spec!r}: expected 'ddimN', e.g. 'ddim50'") from None
            return _ddim_stride_steps(num_timesteps, desired)
        counts = _parse_section_counts(spec)
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("timestep spacing needs at least one section count")
    if any(c < 0 for c in counts):
        raise ValueError(f"section counts must be >= 0, got {counts}")

    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(counts):
        # The first T % n sections are one step longer.
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"cannot take {section_count} steps from a section of {size} steps "
                f"({num_timesteps} steps split into {len(counts)} sections)"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate by repeated float addition and round half to even, exactly as the reference does.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    if not all_steps:
        raise ValueError(f"timestep spacing {section_counts!r} keeps no steps")
    return set(all_steps)


def respace(diffusion: GaussianDiffusion, use_timesteps: Iterable[int]) -> GaussianDiffusion:
    """``diffusion`` restricted to the steps ``use_timesteps`` (indices into its own steps; docs/conventions.md #14).

    New betas beta'_i = 1 - abar[m_i] / abar[m_{i-1}] (abar before m_0 is 1); the posterior is recomputed from
    them. The result calls the network with the ORIGINAL indices: its timestep_map is the parent's map at m.
    """
    if isinstance(use_timesteps, torch.Tensor):
        use_timesteps = use_timesteps.tolist()
    steps = sorted({int(s) for s in use_timesteps})
    if not steps:
        raise ValueError("respacing needs at least one timestep")
    if steps[0] < 0 or steps[-1] >= diffusion.num_timesteps:
        raise ValueError(
            f"timesteps to keep must lie in 0..{diffusion.num_timesteps - 1}, got {steps[0]}..{steps[-1]}"
        )
    alphas_cumprod = diffusion.alphas_cumprod.numpy()
    # The reference's loop over numpy float64 scalars, so the new betas match it bit for bit.
    last_alpha_cumprod = 1.0
    new_betas = []
    for i in steps:
        alpha_cumprod = alphas_cumprod[i]
        new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
        last_alpha_cumprod = alpha_cumprod
    return GaussianDiffusion(
        np.array(new_betas, dtype=np.float64),
        mean_type=diffusion.mean_type,
        var_type=diffusion.var_type,
        loss_type=diffusion.loss_type,
        timestep_map=diffusion.timestep_map[torch.tensor(steps, dtype=torch.int64)],
        original_num_steps=diffusion.original_num_steps,
    )
