"""Patchify / unpatchify: images ``[B, C, H, W]`` <-> token sequences ``[B, T, D]``.

Tokens are ordered row-major over the patch grid (``T = (H/P) * (W/P)``, ``D = C * P * P``).
Two orders of the values inside a token are supported, because the two model families were
published with different ones:

- ``"cpp"`` (TarFlow, ``torch.nn.functional.unfold`` order): channel, then row, then column.
- ``"ppc"`` (Jet, NHWC order): row, then column, then channel.
"""

from __future__ import annotations

from torch import Tensor

TOKEN_ORDERS = ("cpp", "ppc")


def patchify(x: Tensor, patch_size: int, order: str = "cpp") -> Tensor:
    """``[B, C, H, W]`` image -> ``[B, T, D]`` tokens."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p)
    if order == "cpp":
        x = x.permute(0, 2, 4, 1, 3, 5)  # b, gh, gw, c, ph, pw
    elif order == "ppc":
        x = x.permute(0, 2, 4, 3, 5, 1)  # b, gh, gw, ph, pw, c
    else:
        raise ValueError(f"unknown token order {order!r}; expected one of {TOKEN_ORDERS}")
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(t: Tensor, channels: int, height: int, width: int, patch_size: int,
               order: str = "cpp") -> Tensor:
    """``[B, T, D]`` tokens -> ``[B, C, H, W]`` image (exact inverse of :func:`patchify`)."""
    b = t.shape[0]
    p = patch_size
    gh, gw = height // p, width // p
    if order == "cpp":
        x = t.reshape(b, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    elif order == "ppc":
        x = t.reshape(b, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    else:
        raise ValueError(f"unknown token order {order!r}; expected one of {TOKEN_ORDERS}")
    return x.reshape(b, channels, height, width)


def roll_tokens(t: Tensor, channels: int, size: int, patch_size: int, k: int,
                order: str = "cpp") -> Tensor:
    """Tokens ``[B, T, D]`` of a ``size x size`` image -> the tokens of that image rolled
    cyclically by ``k`` pixels down and right (a permutation of the values; ``-k`` undoes it)."""
    img = unpatchify(t, channels, size, size, patch_size, order).roll((k, k), dims=(2, 3))
    return patchify(img, patch_size, order)
