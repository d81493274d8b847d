"""`student`: the N deterministic DDIM steps a progressively distilled student was trained for (Salimans & Ho 2022).

The driver hands it the student's grid (original indices, noisiest first, the top one at SNR ~ 0); the denoiser
turns the student's v / x / both head into x_hat and re-derives eps from it; the step is DDIM's at eta = 0.
"""

from __future__ import annotations

from . import ClipOptions
from .ddim import DDIMSampler


class StudentSampler(DDIMSampler):
    """z_s = alpha_s x_hat + sigma_s eps_hat for each grid step t -> s; the last step returns x_hat (clipped)."""

    api_version = 2
    name = "student"
    description = "the few deterministic steps of a distilled student (ddpmctl distill); --steps N or omitted"
    checkpoint_kinds = ("student",)
    default_steps = None

    Options = ClipOptions  # no eta (the student was trained on eta = 0), no spacing (its grid is its own)
