"""`ddpmctl distill` (under construction)."""

from __future__ import annotations

from ddpmctl.cli.common import fail


def distill_command() -> None:
    """(under construction)"""
    raise fail("not implemented yet")
