"""Small helpers shared by the evaluation modules."""

from __future__ import annotations

import reprlib

#: Characters of a value's repr kept in error messages (a tokenizer's or a dict's full repr runs to kilobytes).
REPR_LIMIT = 60

_repr = reprlib.Repr()
_repr.maxstring = REPR_LIMIT
_repr.maxother = REPR_LIMIT
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4


def short_repr(value, limit: int = REPR_LIMIT) -> str:
    """`repr(value)` shortened to about `limit` characters (containers elided with "...")."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe(value) -> str:
    """The type and a short repr of `value`, for error messages: "dict {'a': 1, ...}", "int 32"."""
    return f"{type(value).__name__} {short_repr(value)}"
