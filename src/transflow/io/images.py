"""Writing images: integer levels -> 8-bit pixels, PNG grids and folders, and the sample grids
of training runs."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_path
from ..flows import Flow, FlowConfig
from ..flows.sample_options import SampleOptions
from ..likelihood import nonfinite_images, unit_to_levels


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


def grid_labels(config: FlowConfig, per_class: int = 8) -> tuple[Tensor | None, int, int]:
    """The images of a training sample grid: labels (one row per class, at most 10 classes;
    None for unconditional models), the number of images and the row length."""
    if config.num_classes:
        classes = min(config.num_classes, 10)
        return torch.arange(classes).repeat_interleave(per_class), classes * per_class, per_class
    return None, 64, 8


@torch.no_grad()
def save_sample_grid(model: Flow, path: Path, seed: int = 0) -> tuple[np.ndarray, int]:
    """Write a PNG grid of samples drawn by the one sampler with ``transflow sample``'s default
    options and ``seed`` (image ``i`` from seed ``seed + i``; denoised when the model was
    trained with noise): one row per class for conditional models, else 8x8. Returns the grid
    ``uint8 [H, W, C]`` and how many samples were not finite (drawn mid grey)."""
    cfg = model.config
    y, n, nrow = grid_labels(cfg)
    x = model.sample(n, y, options=SampleOptions(seed=seed))
    bad = nonfinite_images(x)
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    pixels = levels_to_pixels(unit_to_levels(x, cfg.num_levels), cfg.num_levels)
    scale = max(1, 128 // (cfg.image_size * nrow) + 1) if cfg.image_size < 32 else 1
    mosaic = grid(pixels, nrow=nrow)
    save_png(mosaic, path, upscale=scale)
    return mosaic, bad
