"""User-facing errors: one clear line naming the input and what to do."""

from __future__ import annotations


class FhavatarError(Exception):
    """An error caused by an input or a setting, reported to the user as one line.

    Args:
        what: what was wrong, naming the input (e.g. "avatar 'x.npz' is corrupt: missing key 'uv_maps'").
        fix: what the user should do about it.
    """

    exit_code = 2

    def __init__(self, what: str, fix: str = "") -> None:
        self.what = what
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.what}" + (f" — {self.fix}" if self.fix else "")


class InputError(FhavatarError):
    """A missing, unreadable or malformed input file."""


class ConfigError(FhavatarError):
    """A bad option or configuration value."""


class WeightsError(FhavatarError):
    """Missing or mismatched model weights / user-supplied checkpoints."""
