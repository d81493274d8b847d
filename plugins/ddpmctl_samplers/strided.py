"""`strided`: ancestral sampling on K evenly spaced steps of the chain (IDDPM Sec. 4, the reference's respacing)."""

from __future__ import annotations

from .ancestral import AncestralSampler


class StridedSampler(AncestralSampler):
    """Ancestral sampling on K evenly spaced steps; the learned variances are rescaled to the K-step chain (the
    network's v interpolates between the new beta and beta_tilde). Strided K on a checkpoint equals ``ancestral``
    on its ``respace --steps K`` checkpoint, bit for bit."""

    name = "strided"
    description = "ancestral sampling on K evenly spaced steps, learned variances rescaled (IDDPM Sec. 4)"
    default_steps = 50
    whole_chain = False
