"""What every refusal message of the house must carry: the value it refuses and the fix.

`assert_names_value_and_fix(message, *values)` checks that each offending value appears in the
message and that its last sentence (or that sentence's last clause after a semicolon) is an
instruction: it starts with a verb of `FIX_VERBS`, or is a "Did you mean ...?" hint. A message
that only says what is wrong fails.
"""

from __future__ import annotations

import re

FIX_VERBS = ("Set", "Use", "Remove", "Choose", "Pick", "Lower", "Raise", "Write", "Add", "Drop",
             "Pass", "Move", "Give", "Run", "Install", "Start", "Rename", "Delete", "Export",
             "Train", "Let", "Retrain", "Check", "Fix", "Restore", "Re-export", "Re-run",
             "Resume", "Replace", "Point", "Keep", "Try", "Make", "Put", "Free", "Wait")


def last_sentence(message: str) -> str:
    parts = [p for p in re.split(r"(?<=[.?!])\s+(?=[A-Z])", message.strip()) if p]
    return parts[-1] if parts else ""


def assert_names_value_and_fix(message: str, *values: object) -> None:
    for value in values:
        assert str(value) in message, f"{value!r} is not named in: {message}"
    tail = last_sentence(message)
    clauses = [tail, tail.rsplit("; ", 1)[-1]]  # "...; export another trial."
    verbs = tuple(v.lower() for v in FIX_VERBS) + ("did you mean",)
    assert any(c.lower().startswith(verbs) for c in clauses), (
        f"the message does not end with a fix: {message}")
