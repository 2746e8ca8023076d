"""How numbers and classes are written wherever a person reads them: figures, tables, HTML pages."""
from __future__ import annotations

import math
from typing import Optional


def format_number(value: float, sign: bool = False) -> str:
    """Four significant digits; fixed notation where it stays short (1e-3 <= |value| < 1e5, or 0),
    else scientific. ``sign``: always show + or -."""
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        digits = max(0, 3 - int(math.floor(math.log10(abs(value))))) if value else 3
        return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return f"{value:+.3e}" if sign else f"{value:.3e}"


def class_name(splits, index: Optional[int]) -> str:
    """The name of class ``index`` in ``splits.classes``; "?" for None, "class N" when it has no name."""
    if index is None:
        return "?"
    classes = list(getattr(splits, "classes", []))
    return str(classes[index]) if 0 <= index < len(classes) else f"class {index}"
