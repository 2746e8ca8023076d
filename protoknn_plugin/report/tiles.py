"""Image files for the HTML report: small PNG tiles with boxes drawn by PIL (no matplotlib: fast).

Colours follow the figures: blue is where a prototype activates, orange the patch it was
projected onto (dashed in figures, a thinner line here).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from ..explain import Box
from ..figures import BOX_COLOR, CELL_COLOR

TILE = 112  # pixels on the long side of a tile


class TileWriter:
    """Writes tiles under ``folder`` and returns their paths relative to ``root`` (for <img src>)."""

    def __init__(self, splits, root: Path, folder: str = "img"):
        self.splits, self.root = splits, Path(root)
        self.folder = self.root / folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = folder

    def _pil(self, image: Tensor) -> Tuple[Image.Image, float]:
        shown = self.splits.denormalize(image.detach().cpu().float())
        array = (shown.clamp(0, 1) * 255).round().byte()
        array = array.expand(3, *array.shape[1:]) if array.shape[0] == 1 else array
        pil = Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).numpy()), "RGB")
        scale = TILE / max(pil.size)
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        return pil.resize(size, Image.NEAREST if scale >= 1 else Image.BILINEAR), scale

    def write(self, name: str, image: Tensor, box: Optional[Box] = None, cell: Optional[Box] = None,
              crop: Optional[Box] = None) -> str:
        """Save ``image`` (C, H, W), optionally cropped to ``crop`` first, with the activation ``box``
        (blue) and projected ``cell`` (orange); returns the path relative to the report root."""
        if crop is not None:
            x0, y0, x1, y1 = crop
            image = image[..., y0:y1, x0:x1]
        pil, scale = self._pil(image)
        draw = ImageDraw.Draw(pil)
        for rect, colour, width in ((box, BOX_COLOR, 3), (cell, CELL_COLOR, 2)):
            if rect is not None:
                x0, y0, x1, y1 = (round(v * scale) for v in rect)
                draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=colour, width=width)
        path = self.folder / f"{name}.png"
        pil.save(path, optimize=False)
        return f"{self.prefix}/{path.name}"
