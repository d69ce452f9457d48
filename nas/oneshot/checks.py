"""The one-shot stage's checks of its whole-number arguments (`search_spaces.fields.whole_number`),
as `SettingError`s naming the setting each argument is (`oneshot.candidates`, `trials`), so that
a caller's edge can name it its own way (the CLI: its flag)."""

from __future__ import annotations

from typing import Any

from nas.settings import SettingError
from search_spaces.fields import whole_number
from spvit.errors import ConfigError


def whole_setting(setting: str, value: Any, minimum: int, fix: str, *,
                  rule: str | None = None) -> int:
    """`value` if it is an integer >= `minimum`, else a `SettingError` of `setting`: "`setting`
    must be {rule}, but got {value!r}. {fix}"."""
    try:
        return whole_number(f"`{setting}`", value, minimum, fix, rule=rule)
    except ConfigError as e:
        raise SettingError(setting, str(e)) from None


__all__ = ["whole_setting"]
