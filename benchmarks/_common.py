"""What several benchmark scripts share: synthetic JPEG folders and the table + JSON ending."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple


def generate_jpegs(root: Path, images: int, classes: int, size: int, seed: int = 0) -> None:
    """``images`` smooth random JPEGs (quality 90) in ``classes`` folders; skipped if present."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.exists() and done.read_text() == f"{images} {classes} {size}":
        return
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        # low-frequency noise scaled up: JPEG sizes like photographs (~15-30 kB), not like white noise
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i:06d}.jpg", quality=90)
    done.write_text(f"{images} {classes} {size}")


def print_and_save(title: str, rows: Iterable[Tuple[str, str]], result: Dict[str, Any], out: Optional[str]) -> None:
    """A two-column rich table (measure, value), then ``result`` as JSON at ``out`` when given."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
