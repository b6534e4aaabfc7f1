"""The learned maps in front of a flow stack (data -> flow input), started from the data.

:class:`Marginals` (``config.marginals``): a per-dimension monotone map that Gaussianizes every
pixel's marginal. :class:`PixelStandardize` (``config.standardize``): a per-dimension affine
map started at every pixel's mean and spread under the training noise. :class:`PatchWhitening`
(``config.whiten``): a linear map of every patch,
started at the whitening of the (mapped) patches. Both are exact bijections with their
log-determinants in the likelihood, and both are inverted after the flow when sampling.

Marginals.

For each dimension ``d`` (channel and pixel position) the model holds ``K`` bin masses
``m_d = softmax(logits_d)`` on the ``K`` equal dequantization bins of ``[-1, 1]`` (bin width
``2/K``). Their piecewise-linear CDF ``F_d`` (density ``m_dj K / 2`` on bin ``j``) followed by the
standard normal quantile gives the map, data -> flow input:

    u_d = Phi^{-1}(eps + (1 - 2 eps) F_d(x_d)),
    log |du_d/dx_d| = log(m_dj K / 2) + log(1 - 2 eps) - log phi(u_d)

(``eps`` = :data:`EPS` = 1e-6 keeps the ends of ``[-1, 1]`` finite), so with the flow at the
identity and a standard normal prior the model is the independent-pixel categorical model
``prod_d m_{d,k_d}`` times ``(1 - 2 eps)^D`` (the ``-log phi`` terms cancel the prior; the factor
costs 2.9e-6 bits/dim).
:meth:`Marginals.init_from_levels` sets the masses to the training set's smoothed per-pixel
histograms, so training starts at that baseline instead of a flow at the identity, which must
grow log-scales of several nats per dimension to fit spiky marginals (MNIST's background is one
grey level). The masses are trained with the flow.

The inverse ``x_d = F_d^{-1}(Phi(u_d))`` maps the real line onto ``[-1, 1]``: samples are always
finite in range (a non-finite flow output stays NaN, or goes to the nearest end for +-inf).
Computed in float64 (float32 on devices without it): ``Phi^{-1}`` near 0 and 1 needs it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .patching import patchify, unpatchify

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
#: the CDF is squeezed into [EPS, 1 - EPS], so [-1, 1] maps onto [Phi^-1(EPS), Phi^-1(1 - EPS)]
#: = [-4.75, 4.75] and the ends (which float32 dequantization hits: k = 0 with u < 4e-6 rounds
#: to x = -1) stay finite with their exact log-determinant
EPS = 1e-6
_LOG_SQUEEZE = math.log1p(-2 * EPS)


def _wide(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


class Marginals(nn.Module):
    """Per-dimension Gaussianizing map on images ``[B, C, H, W]`` in ``[-1, 1]`` with ``K`` bins.

    ``logits [C*H*W, K]``: unnormalised log bin masses (zeros: the uniform marginal, for which
    the map is ``Phi^{-1}((x + 1) / 2)``)."""

    def __init__(self, channels: int, size: int, bins: int):
        super().__init__()
        self.shape = (channels, size, size)
        self.bins = bins
        self.logits = nn.Parameter(torch.zeros(channels * size * size, bins))

    def _tables(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Bin log masses ``[D, K]``, masses ``[D, K]`` and CDF at the bin edges ``[D, K+1]``."""
        log_m = torch.log_softmax(self.logits.to(dtype), dim=-1)
        m = log_m.exp()
        cdf = torch.cat([m.new_zeros(m.shape[0], 1), m.cumsum(-1)], dim=-1)
        cdf = cdf / cdf[:, -1:]  # exactly 1 at the top edge
        return log_m, m, cdf

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data ``x [B, C, H, W]`` in ``[-1, 1]`` -> ``(u [B, C, H, W], logdet [B])``;
        ``u`` in ``x``'s dtype (float32 at least), ``logdet`` float32 (float64 for float64
        input). The density is zero outside ``[-1, 1]`` (``logdet = -inf``: the model's support
        is the dequantized data's, so Gaussian noise augmentation does not go with it)."""
        wide = _wide(x.device)
        with torch.autocast(x.device.type, enabled=False):
            log_m, m, cdf = self._tables(wide)
            k = self.bins
            xd = x.to(wide).flatten(1).T  # [D, B]
            pos = (xd + 1.0) * (k / 2.0)
            j = torch.nan_to_num(pos.floor(), nan=0.0).clamp(0, k - 1).long()
            frac = (pos - j).clamp(0.0, 1.0)  # NaN stays NaN
            f = EPS + (1.0 - 2.0 * EPS) * (cdf.gather(1, j) + m.gather(1, j) * frac)
            u = torch.special.ndtri(f)
            logdet_d = (log_m.gather(1, j) + (math.log(k / 2.0) + _LOG_SQUEEZE + _HALF_LOG_2PI)
                        + 0.5 * u * u)
            # no density outside [-1, 1] (the map is constant there), NaN stays NaN
            outside = (xd < -1.0) | (xd > 1.0)
            logdet_d = torch.where(outside, torch.full_like(logdet_d, -math.inf), logdet_d)
            logdet_d = torch.where(torch.isnan(xd), xd, logdet_d)
            out = torch.float64 if x.dtype == torch.float64 else torch.float32
            y = u.T.reshape(x.shape).to(torch.promote_types(x.dtype, torch.float32))
            return y, logdet_d.sum(0).to(out)

    def inverse(self, u: Tensor) -> Tensor:
        """Flow-side ``u [B, C, H, W]`` -> data ``x`` in ``[-1, 1]`` (``u``'s dtype)."""
        wide = _wide(u.device)
        with torch.autocast(u.device.type, enabled=False):
            _, m, cdf = self._tables(wide)
            k = self.bins
            ud = u.to(wide).flatten(1).T.contiguous()  # [D, B]
            f = ((torch.special.ndtr(ud) - EPS) / (1.0 - 2.0 * EPS)).clamp(0.0, 1.0)
            j = torch.searchsorted(cdf[:, 1:k].contiguous(), f, right=True).clamp(0, k - 1)
            lo, mass = cdf.gather(1, j), m.gather(1, j)
            frac = ((f - lo) / mass.clamp_min(1e-300)).clamp(0.0, 1.0)  # NaN stays NaN
            x = (j + frac) * (2.0 / k) - 1.0
            return x.T.reshape(u.shape).to(u.dtype)

    @torch.no_grad()
    def init_from_counts(self, counts: Tensor, alpha: float = 1.0) -> None:
        """Set the masses to the add-``alpha`` smoothed histograms ``counts [D, K]``."""
        if tuple(counts.shape) != tuple(self.logits.shape):
            raise ValueError(f"expected counts of shape {list(self.logits.shape)}, got "
                             f"{list(counts.shape)}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        self.logits.copy_(torch.log(counts.to(torch.float64) + alpha).to(self.logits.dtype))

    @torch.no_grad()
    def init_from_levels(self, levels: Tensor, alpha: float = 1.0) -> None:
        """Set the masses to the add-``alpha`` smoothed per-dimension histograms of integer
        images ``levels [N, C, H, W]`` (values in ``[0, K)``)."""
        self.init_from_counts(level_counts(levels, self.bins), alpha)


def level_counts(levels: Tensor, bins: int) -> Tensor:
    """Per-dimension histograms ``[C*H*W, bins]`` (int64) of integer images ``[N, C, H, W]``."""
    k = torch.as_tensor(levels).flatten(1).long()
    if k.numel() and (int(k.min()) < 0 or int(k.max()) >= bins):
        raise ValueError(f"levels must lie in [0, {bins}), got {int(k.min())}..{int(k.max())}")
    d = k.shape[1]
    flat = (torch.arange(d).mul_(bins) + k).flatten()
    return torch.bincount(flat, minlength=d * bins).view(d, bins)


class PixelStandardize(nn.Module):
    """A learned affine map of every dimension (channel and pixel position), data -> flow:

        u_d = (x_d - m_d) exp(-s_d),    logdet = -sum_d s_d

    :meth:`init_from_samples` sets ``m_d`` and ``exp(s_d)`` to the mean and standard deviation
    of each dimension over the (dequantized, noised) training images: with Gaussian training
    noise a pixel the data never changes (MNIST's background) starts as exactly the noise's
    ``N(0, 1)``, where the flow at its identity would otherwise have to grow log-scales of
    ``log(1/sigma)`` per dimension first. Smooth (the score exists), unlike the marginals."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(channels, size, size))
        self.log_scale = nn.Parameter(torch.zeros(channels, size, size))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, C, H, W]`` -> ``((x - m) exp(-s) [B, C, H, W], logdet [B])``."""
        u = (x - self.shift.to(x.dtype)) * torch.exp(-self.log_scale).to(x.dtype)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        logdet = (-self.log_scale.to(dtype).sum()).expand(x.shape[0])
        return u, logdet

    def inverse(self, u: Tensor) -> Tensor:
        return u * torch.exp(self.log_scale).to(u.dtype) + self.shift.to(u.dtype)

    @torch.no_grad()
    def init_from_samples(self, images: Tensor | Iterable[Tensor], floor: float = 1e-3) -> None:
        """Mean and standard deviation per dimension of images ``[N, C, H, W]`` (or an
        iterable of such batches, accumulated in float64); a spread below ``floor`` times the
        mean spread is raised to it (a constant pixel under uniform dequantization)."""
        n, total, squares = 0, 0.0, 0.0
        for x in [images] if isinstance(images, Tensor) else images:
            x = x.double().cpu()
            n += len(x)
            total = total + x.sum(0)
            squares = squares + x.pow(2).sum(0)
        if n < 2:
            raise ValueError("the pixel standardization needs at least 2 images")
        mean = total / n
        std = ((squares - n * mean * mean) / (n - 1)).clamp_min(0).sqrt()
        std = std.clamp_min(floor * float(std.mean()))
        self.shift.copy_(mean.to(self.shift))
        self.log_scale.copy_(std.log().to(self.log_scale))


class PatchWhitening(nn.Module):
    """A learned invertible linear map of every ``P x P`` patch's ``D = C P P`` values (the same
    ``D x D`` matrix ``W`` and shift ``b`` for every patch, ``unfold`` order):

        t' = W (t - b),    logdet = T log |det W|   (``T`` patches)

    :meth:`init_from_samples` sets ``W = L^{-1}`` for the Cholesky factor ``L`` of the patches'
    covariance (and ``b`` their mean), so the flow starts from decorrelated patch values."""

    def __init__(self, channels: int, size: int, patch_size: int):
        super().__init__()
        self.channels, self.size, self.patch = channels, size, patch_size
        d = channels * patch_size ** 2
        self.weight = nn.Parameter(torch.eye(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def _tokens(self, x: Tensor) -> Tensor:
        return patchify(x, self.patch, "cpp")

    def _image(self, t: Tensor) -> Tensor:
        return unpatchify(t, self.channels, self.size, self.size, self.patch, "cpp")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, C, H, W]`` -> ``(W (patches - b) as [B, C, H, W], logdet [B])``."""
        t = self._tokens(x)
        w = self.weight.to(t.dtype)
        out = (t - self.bias.to(t.dtype)) @ w.T
        logabs = torch.linalg.slogdet(self.weight.double())[1]
        n_tok = t.shape[1]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        logdet = (n_tok * logabs).to(dtype).expand(x.shape[0])
        return self._image(out), logdet

    def inverse(self, u: Tensor) -> Tensor:
        t = self._tokens(u)
        w = self.weight.double()
        x = torch.linalg.solve(w, t.double().reshape(-1, t.shape[-1]).T).T
        x = x.reshape(t.shape) + self.bias.double()
        return self._image(x.to(u.dtype))

    @torch.no_grad()
    def init_from_samples(self, images: Tensor | Iterable[Tensor], eps: float = 1e-6) -> None:
        """Whitening of the patches of flow-side images ``[N, C, H, W]`` (or an iterable of
        such batches, accumulated in float64); ``eps`` times the mean variance is added to the
        covariance's diagonal."""
        d = self.weight.shape[0]
        n, total, outer = 0, torch.zeros(d, dtype=torch.float64), torch.zeros(
            d, d, dtype=torch.float64)
        for x in [images] if isinstance(images, Tensor) else images:
            t = self._tokens(x.double()).reshape(-1, d).cpu()
            n += len(t)
            total += t.sum(0)
            outer += t.T @ t
        if n < 2:
            raise ValueError("the patch whitening needs at least 2 patches")
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        cov = cov + eps * cov.diagonal().mean() * torch.eye(d, dtype=torch.float64)
        chol = torch.linalg.cholesky(cov)
        w = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=torch.float64), upper=False)
        self.weight.copy_(w.to(self.weight))
        self.bias.copy_(mean.to(self.bias))
