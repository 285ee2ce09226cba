"""Contact sheets: many results in one picture, a grid of square tiles with captions under them
(a batch's summary, the quality benchmark's truth-and-result strips).

A tile is an image (an array, a tensor in [0, 1], or a PNG file) or, where there is none, a grey
panel with a word on it. Captions are drawn left-aligned under their tile and may run on under
the tiles to their right when those have none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .files import atomic_write

if TYPE_CHECKING:
    import numpy as np
    import torch

PAD = 6
LINE_HEIGHT = 14
TITLE_HEIGHT = 16
PANEL = (205, 205, 205)
BLACK, GREEN, RED = (0, 0, 0), (0, 100, 0), (160, 0, 0)


@dataclass(frozen=True)
class Tile:
    """One cell: ``image`` ((H, W, 3) uint8, a (3, H, W) tensor in [0, 1], or a path to an image;
    None: a grey panel showing ``placeholder``) and ``caption`` lines of (text, RGB colour)."""

    image: np.ndarray | torch.Tensor | Path | None = None
    caption: tuple[tuple[str, tuple[int, int, int]], ...] = ()
    placeholder: str = ""


def _tile_image(image: np.ndarray | torch.Tensor | Path, size: int) -> object:
    from PIL import Image

    if isinstance(image, Path):
        with Image.open(image) as img:
            picture = img.convert("RGB")
    else:
        from .export import to_uint8

        picture = Image.fromarray(to_uint8(image))
    return picture if picture.size == (size, size) else picture.resize((size, size), Image.BILINEAR)


def contact_sheet(tiles: Sequence[Tile], path: Path, *, columns: int, size: int = 128, caption_lines: int = 2,
                  titles: Sequence[str] = ()) -> Path:
    """Draw ``tiles`` row by row, ``columns`` a row, each ``size`` pixels square with room for
    ``caption_lines`` lines under it, ``titles`` (one per column) over the first row, and write a
    PNG to ``path`` atomically. Returns ``path``."""
    from PIL import Image, ImageDraw

    columns = max(1, columns)
    rows = max(1, math.ceil(len(tiles) / columns))
    top = TITLE_HEIGHT if titles else 0
    cell_height = size + caption_lines * LINE_HEIGHT + PAD
    sheet = Image.new("RGB", (PAD + columns * (size + PAD), top + PAD + rows * cell_height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((PAD + c * (size + PAD) + 2, 2), title, fill=BLACK)
    for i, tile in enumerate(tiles):
        x = PAD + (i % columns) * (size + PAD)
        y = top + PAD + (i // columns) * cell_height
        if tile.image is not None:
            sheet.paste(_tile_image(tile.image, size), (x, y))
        else:
            draw.rectangle((x, y, x + size - 1, y + size - 1), fill=PANEL)
            draw.text((x + 6, y + size // 2 - 6), tile.placeholder, fill=RED)
        draw.rectangle((x - 1, y - 1, x + size, y + size), outline=(180, 180, 180))
        for k, (text, colour) in enumerate(tile.caption[:caption_lines]):
            draw.text((x, y + size + 2 + k * (LINE_HEIGHT - 2)), text, fill=colour)
    return atomic_write(Path(path), lambda tmp: sheet.save(tmp, format="PNG"))
