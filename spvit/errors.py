"""Errors raised for bad user input anywhere in the house.

`ConfigError` is the one exception type that means "the input is wrong, not the code": an
impossible architecture, a malformed search space, a bad flag, a corrupt checkpoint. Its message
is one line that states the rule, the value and the fix. The CLI prints that line and exits 2
(no traceback); library users can catch it like any `ValueError`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """Bad user input. The message is one line: the rule, the offending value, and the fix."""

    def __init__(self, message: str) -> None:
        # One line, always: CLI output and logs rely on it.
        super().__init__(" ".join(str(message).split()))


def did_you_mean(value: object, options: Iterable[str]) -> str:
    """` Did you mean 'x'?` for the option closest to `value`, or "" when none is close.

    The one spelling hint of the house: every "unknown key/choice" message appends it.
    """
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    return f" Did you mean '{close[0]}'?" if close else ""
