"""Seeds derived from the user's ``--seed``: every random stream of ddpmctl is named by integer keys under it, and
:func:`derive_seed` is the one way a stream's generator seed is made.

The streams (keys after the run seed):

- sampling: ``(image index, SAMPLE_NOISE | SAMPLE_LABEL)``: image i's noise and class label (samplers.py);
- bits/dim: ``(purpose, image index, block)`` with nll.py's purposes (its per-term noise, pilot and Monte-Carlo draws);
- CLD bits/dim: ``(CLD_NLL, image index, probe)``: one trajectory's dequantisation, v_0 and trace probe (cld_nll.py);
- training: ``(TRAIN_DROPOUT, rank)``: each rank's dropout stream (the data stream is ``torch.Generator(seed)``
  itself, shared by every rank);
- distillation: ``(DISTILL_STAGE, steps)``: a stage's data, timestep and noise draws, so a resumed stage never depends
  on how earlier stages ran; ``(DISTILL_REPORT,)``: the report's noises.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLD_NLL", "DISTILL_REPORT", "DISTILL_STAGE", "SAMPLE_LABEL", "SAMPLE_NOISE", "TRAIN_DROPOUT", "derive_seed"]

SAMPLE_NOISE, SAMPLE_LABEL = 0, 1
TRAIN_DROPOUT, DISTILL_STAGE, DISTILL_REPORT = 0x7A11, 0xD157, 0x5EED
CLD_NLL = 0xC1D


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit generator seed for the stream ``keys`` of run seed ``seed`` (numpy's SeedSequence:
    portable across machines and versions). Seed and keys must be >= 0."""
    if seed < 0 or any(key < 0 for key in keys):
        raise ValueError("seed and stream keys must be >= 0")
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
