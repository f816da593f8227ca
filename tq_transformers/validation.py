"""Argument checks that raise a ValueError or TypeError naming the parameter, what is allowed and what was given."""

from __future__ import annotations

from typing import Any

_REPR_LIMIT = 80


def short_repr(value: Any) -> str:
    """`repr(value)` cut to a readable length (a config or tokenizer repr runs to kilobytes)."""
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def check_int(name: str, value: Any, minimum: int, allowed: str | None = None, maximum: int | None = None) -> None:
    """TypeError unless `value` is an int (not a bool); ValueError unless minimum <= value (<= maximum)."""
    allowed = allowed or (f"an integer in {minimum}..{maximum}" if maximum is not None else f"an integer >= {minimum}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {short_repr(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {short_repr(value)}")


def check_choice(name: str, value: Any, choices: tuple, kind: type | None = None) -> None:
    """ValueError unless `value` is one of `choices`; with `kind`, a TypeError first unless it is a `kind`."""
    if kind is not None and not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__}, one of {choices}, got {type(value).__name__} "
                        f"{short_repr(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {short_repr(value)}")


def check_rate(name: str, value: Any, minimum: int, maximum: int, denominator: int, allowed: str) -> None:
    """TypeError unless `value` is an int or a float (not a bool); ValueError unless minimum <= value <= maximum and
    value is a multiple of 1 / `denominator` (a bit rate: whole bits, or a split the method supports)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {short_repr(value)}")
    if not minimum <= value <= maximum or value * denominator != int(value * denominator):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_mapping(name: str, value: Any, allowed: str) -> None:
    """TypeError unless `value` is a dict."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {short_repr(value)}")
