"""`ddpmctl train` (under construction)."""

from __future__ import annotations

from ddpmctl.cli.common import fail


def train_command() -> None:
    """(under construction)"""
    raise fail("not implemented yet")
