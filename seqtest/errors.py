"""One error type for bad configuration, so the CLI can report it in one clean line."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is
    allowed."""


def require(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raise ConfigError for `field` unless `ok`; `allowed` says what would have been accepted."""
    if not ok:
        raise ConfigError(f"{field}={value!r} is invalid: expected {allowed}")


def require_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ConfigError unless `value` is one of `choices`, listing them."""
    choices = list(choices)
    require(value in choices, field, value, "one of " + ", ".join(map(str, choices)))


def require_positive_int(field: str, value: Any) -> None:
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        field,
        value,
        "a positive integer",
    )
