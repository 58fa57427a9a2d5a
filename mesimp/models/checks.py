"""Validation shared by the model configs: width lists and positive sizes."""

from __future__ import annotations

from typing import Any

from mesimp.errors import BadInputError


def hidden_list(hidden: Any) -> list[int]:
    """``hidden`` as a list of layer widths (an int means one layer)."""
    widths = hidden if isinstance(hidden, (list, tuple)) else [hidden]
    if not widths:
        raise BadInputError("hidden needs at least one layer width")
    for v in widths:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise BadInputError(f"hidden widths must be integers > 0, got {hidden!r}")
    return [int(v) for v in widths]


def check_positive(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise BadInputError(f"{name} must be an integer > 0, got {v!r}")
    if not 0.0 <= config.dropout < 1.0:
        raise BadInputError(f"dropout must be in [0, 1), got {config.dropout}")
