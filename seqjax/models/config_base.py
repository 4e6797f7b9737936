"""Checks and helpers shared by the models' frozen config dataclasses; errors name `<ConfigClass>.<field>`."""

from __future__ import annotations

import dataclasses
from typing import Any


class ConfigBase:
    """Mixin for frozen config dataclasses: `replace(**changes)` derives a variant (validated again)."""

    def replace(self, **changes) -> Any:
        return dataclasses.replace(self, **changes)


def check_positive_ints(config: Any, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Each field in `names` (and each in `optional` that is not None) is an int >= 1 (bools rejected)."""
    for name in (*names, *optional):
        value = getattr(config, name)
        if name in optional and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive int, got {name}={value!r}")


def check_rates(config: Any, names: tuple[str, ...], *, include_one: bool = False) -> None:
    """Each field is in [0, 1) ([0, 1] with `include_one`)."""
    for name in names:
        value = getattr(config, name)
        if not (0.0 <= value <= 1.0 if include_one else 0.0 <= value < 1.0):
            interval = "[0, 1]" if include_one else "[0, 1)"
            raise ValueError(f"{type(config).__name__}.{name} must be in {interval}, got {name}={value!r}")
