"""`ddpmctl eval-nll` (under construction)."""

from __future__ import annotations

from ddpmctl.cli.common import fail


def eval_nll_command() -> None:
    """(under construction)"""
    raise fail("not implemented yet")
