"""Validation shared by the configuration dataclasses: one wording for every "field must be an integer" error."""

from __future__ import annotations


def require_ints(owner: object, minimums: dict[str, int]) -> None:
    """Raises ValueError naming ``<Class>.<field>`` for the first field of ``owner`` that is not an int (bools are
    rejected) of at least its minimum."""
    for name, minimum in minimums.items():
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{type(owner).__name__}.{name}={value!r} must be an integer >= {minimum}")
