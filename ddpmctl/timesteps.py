"""Which steps of a chain a run takes: even (IDDPM), the reference's ``ddim`` stride, or uniform in log-SNR; beside
``ddpmctl.respace``, whose ``space_timesteps`` is the even and stride rules (docs/conventions.md #12-13). Used by
the sampling driver (once per run) and by ``ddpmctl respace``."""

from __future__ import annotations

from collections.abc import Sequence

from ddpmctl.choices import Spacing
from ddpmctl.errors import SamplerError
from ddpmctl.respace import space_timesteps

__all__ = ["choose_timesteps", "step_counts_with_ddim_stride"]


def step_counts_with_ddim_stride(total: int) -> list[int]:
    """Every K the "ddimK" stride rule (range(0, total, i); docs/conventions.md #13) gives on a ``total`` chain."""
    return sorted({len(range(0, total, stride)) for stride in range(1, total + 1)})


def _logsnr_uniform(log_snr: Sequence[float], steps: int, span: tuple[float, float] | None = None) -> set[int]:
    """``steps`` distinct positions of a chain (``log_snr``: lambda per position, ascending positions, descending
    lambda): the top step, then ``steps - 1`` positions nearest to values evenly spaced in lambda over ``span`` =
    (lambda_low, lambda_high), clamped to the chain's range from the step below the top to the bottom step (None:
    that whole range; DPM-Solver's time steps on a discrete chain).

    The top step of a cosine chain sits at the clipped beta of 0.999, 3.5 units of lambda below its neighbour: a
    grid starting there would put its next targets in a gap the chain cannot fill (they would collapse onto the
    top steps). On the Gaussian check this halves dpmpp-2m's error at 5-50 steps (benchmarks/README.md).
    Where the top step is instead close below the range's low end (a linear chain's top two steps differ by 0.01
    in lambda), a first target there would spend a network call on nearly the top step again and make the next
    step's 2M extrapolation 1/(2r) huge: so the first step is never shorter than the grid's others, and when it
    would be, the grid is uniform from the top step itself (the two rules agree where the gap equals the spacing).
    """
    total = len(log_snr)
    if steps == 1:
        return {total - 1}
    top, bottom = log_snr[-2] if steps > 2 else log_snr[-1], log_snr[0]
    if span is not None:
        low, high = span
        if not low < high:
            raise SamplerError(f"the log-SNR range needs its low end below its high end, not {low:g} .. {high:g}")
        top, bottom = max(top, min(low, bottom)), min(bottom, max(high, top))
    if steps > 2 and top - log_snr[-1] < (bottom - top) / (steps - 2):
        top = log_snr[-1] + (bottom - log_snr[-1]) / (steps - 1)
    targets = [top + (bottom - top) * j / (steps - 2) for j in range(steps - 1)] if steps > 2 else [bottom]
    # The chain's lambda decreases with the position: the nearest position by bisection, then kept distinct.
    chosen = [total - 1]
    for target in targets:
        lo, hi = 0, total - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if log_snr[mid] > target else (lo, mid)
        chosen.append(lo if abs(log_snr[lo] - target) <= abs(log_snr[hi] - target) else hi)
    # Strictly decreasing positions with room for the rest: from the top down, then from the bottom up.
    for j in range(1, steps):
        chosen[j] = min(chosen[j], chosen[j - 1] - 1)
    for j in range(steps - 1, -1, -1):
        chosen[j] = max(chosen[j], steps - 1 - j, chosen[j + 1] + 1 if j < steps - 1 else 0)
    return set(chosen)


def choose_timesteps(total: int, steps: int, spacing: Spacing, *, log_snr: Sequence[float] | None = None,
                     log_snr_span: tuple[float, float] | None = None) -> set[int]:
    """K positions of a ``total``-step chain (the one --steps check and the one spacing helper of ddpmctl).

    even: the IDDPM rule (docs/conventions.md #12); ddim: the reference's stride range(0, total, i)
    (docs/conventions.md #13; a SamplerError names nearby K that work); logsnr: uniform in lambda = log alpha -
    log sigma between the top and the bottom step (``log_snr``: lambda of each position, ascending positions), or
    over ``log_snr_span`` = (lambda_low, lambda_high) within them.
    One step is always the TOP step: a single network call on pure noise must be made where the network expects
    pure noise.
    """
    if not 1 <= steps <= total:
        raise SamplerError(f"--steps must be between 1 and the chain's {total} steps, not {steps}")
    if steps == 1:
        return {total - 1}
    if spacing == "even":
        return space_timesteps(total, str(steps))
    if spacing == "logsnr":
        if log_snr is None or len(log_snr) != total:
            raise ValueError("spacing logsnr needs the log-SNR of every step of the chain")
        return _logsnr_uniform(log_snr, steps, log_snr_span)
    try:
        return space_timesteps(total, f"ddim{steps}")
    except ValueError:
        counts = step_counts_with_ddim_stride(total)
        nearby = [c for c in counts if c < steps][-2:] + [c for c in counts if c > steps][:2]
        raise SamplerError(f"spacing ddim cannot give exactly {steps} steps on a {total}-step chain "
                           f"(possible nearby: {', '.join(map(str, nearby))}); pick one or use even spacing") from None
