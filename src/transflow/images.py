"""Writing images: integer levels -> 8-bit pixels, PNG grids and folders."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_path


def levels_to_pixels(levels: Tensor, num_levels: int) -> np.ndarray:
    """Levels ``0..K-1`` ``[N, C, H, W]`` -> ``uint8 [N, H, W, C]`` pixels spanning 0..255."""
    k = levels.to(torch.int64).cpu()
    if num_levels != 256:
        k = torch.round(k.double() * (255.0 / (num_levels - 1))).to(torch.int64)
    return k.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid(pixels: np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """``uint8 [N, H, W, C]`` -> one ``uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C]`` mosaic."""
    n, h, w, c = pixels.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h,
            pad + q * (w + pad):pad + q * (w + pad) + w] = pixels[i]
    return out


def save_png(image: np.ndarray, path: str | os.PathLike, upscale: int = 1) -> None:
    """Write ``uint8 [H, W, C]`` (C = 1 or 3) to ``path`` atomically, nearest-neighbour
    upscaled by ``upscale``."""
    from PIL import Image

    if upscale > 1:
        image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
    im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
