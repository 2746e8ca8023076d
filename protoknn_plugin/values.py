"""Values from text: the one place that reads a command-line or config value as a Python value.

``parse_number`` is the leaf every reader shares (``5`` -> 5, ``1e-3`` -> 0.001, else the text);
``parse_value`` adds booleans, ``none`` and tuples (``--head-opt`` values); ``parse_pairs`` reads
``KEY=VALUE`` items whose values are numbers or text (``--backbone-opt``); ``parse_flag`` reads a
yes/no option that may arrive as a bool (config files) or as already-read text or a number.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Union

from .errors import ProtoKNNError

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def parse_number(text: str) -> Union[int, float, str]:
    """``5`` -> 5, ``1e-3`` -> 0.001, anything else -> ``text`` unchanged."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_value(text: str) -> Any:
    """``5`` -> 5, ``1e-3`` -> 0.001, ``true``/``false`` -> bool, ``none`` -> None,
    ``5,0.1`` or ``(5,0.1)`` -> (5, 0.1), anything else -> the text."""
    text = text.strip()
    inner = text[1:-1] if text[:1] in "([" and text[-1:] in ")]" else None
    if inner is not None or "," in text:
        return tuple(parse_value(part) for part in (inner if inner is not None else text).split(",") if part.strip())
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    return parse_number(text)


def parse_pairs(pairs: Iterable[str]) -> Dict[str, Union[int, float, str]]:
    """('width=16', 'depth=3') -> {'width': 16, 'depth': 3}; values are read as int, float or text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ProtoKNNError(f"cannot read option {pair!r}; write KEY=VALUE, e.g. width=16")
        options[key.strip()] = parse_number(value)
    return options


def parse_flag(value: Any, what: str) -> bool:
    """A yes/no option given as a bool or as text ("false", "0", "yes", ...); ``what`` names the
    option in the error, e.g. ``"protoknn head option straight_through"``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ProtoKNNError(f"{what} must be true or false, got {value!r}")


__all__ = ["parse_number", "parse_value", "parse_pairs", "parse_flag"]
