"""Jet parameters of google-research/big_vision (``models/proj/jet/jet.py``), as a flat ``.npz``.

big_vision stores the couplings stacked on a leading axis ``n`` under '/'-joined names; per
coupling ``i`` (``E`` = width, ``H`` heads, ``D`` = ``C*P*P`` values per token, ``T`` tokens):

=====================================================  =============================================
big_vision (``couplings/dnn/`` prefix)                 transflow (``couplings.i.conditioner.``)
=====================================================  =============================================
``init_proj/kernel [n, D/2, E]``, ``bias``             ``proj_in.weight [E, D/2]`` (transposed)
``posemb [n, 1, T, E]``                                ``pos_embed [T, E]``
``vit/encoderblock_b/LayerNorm_0``, ``LayerNorm_1``    ``layers.b.attn_norm``, ``layers.b.mlp_norm``
``.../MultiHeadDotProductAttention_0/{query,key,       ``layers.b.attn.qkv [3E, E]`` (q, k, v rows)
value}/kernel [n, E, H, E/H]``
``.../MultiHeadDotProductAttention_0/out/kernel        ``layers.b.attn.proj.weight [E, E]``
[n, H, E/H, E]``
``.../MlpBlock_0/Dense_0``, ``Dense_1``                ``layers.b.mlp.fc1``, ``layers.b.mlp.fc2``
``vit/encoder_norm``                                   ``norm``
``final_proj/kernel [n, E, D]``                        ``proj_out.weight [D, E]``
=====================================================  =============================================

plus the fixed permutations as one-hot matrices: ``channel_coupling_masks-FREEZE_ME [n, D, D]`` and
``spatial_coupling_masks-FREEZE_ME [n, T, T]`` (``perm = matrix.argmax(0)``; the matrix of the
kind a coupling does not use is all zeros). LayerNorm ``scale`` is our ``weight``. big_vision
works on NHWC images: feed ``x.permute(0, 3, 1, 2)`` to the imported model.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..atomic import PathLike, atomic_open
from ..flows import Jet, JetConfig, config_from_any
from ..flows.base import from_state_dict as model_from_state_dict

PREFIX = "couplings/dnn/"
CHANNEL_MASKS = "channel_coupling_masks-FREEZE_ME"
SPATIAL_MASKS = "spatial_coupling_masks-FREEZE_ME"

# big_vision-style config keys -> JetConfig fields
_CONFIG_ALIASES = {
    "img": "image_size", "img_size": "image_size", "image_size": "image_size",
    "channels": "channels", "patch_size": "patch_size", "ps": "patch_size",
    "depth": "couplings", "couplings": "couplings", "block_depth": "block_depth",
    "width": "width", "emb_dim": "width", "heads": "heads", "num_heads": "heads",
    "kinds": "kinds", "spatial_masks": "spatial_masks", "spatial_coupling_projs": "spatial_masks",
    "scale_factor": "scale_factor", "num_levels": "num_levels", "noise_std": "noise_std",
}


def jet_config_from_dict(d: Mapping[str, Any] | JetConfig) -> JetConfig:
    """A :class:`JetConfig` from a JetConfig, its ``to_dict()``, or big_vision-style fields
    (``img``, ``channels``, ``patch_size``/``ps``, ``depth``, ``block_depth``, ``width``/
    ``emb_dim``, ``heads``/``num_heads``, ``kinds``, ``spatial_masks``, ``scale_factor``)."""
    if isinstance(d, JetConfig):
        return d
    if not isinstance(d, Mapping):
        raise ValueError(f"expected a JetConfig or a dict, got {type(d).__name__}")
    if "model" in d:
        cfg = config_from_any(d, "the Jet config")
        if not isinstance(cfg, JetConfig):
            raise ValueError(f"the config is for model {d['model']!r}, not 'jet'")
        return cfg
    unknown = sorted(set(d) - set(_CONFIG_ALIASES))
    if unknown:
        raise ValueError(f"unknown Jet config field(s): {', '.join(unknown)}")
    fields: dict[str, Any] = {}
    for k, v in d.items():
        name = _CONFIG_ALIASES[k]
        if name == "patch_size" and isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise ValueError(f"only square patches are supported, got patch size {v}")
            v = v[0]
        if name in fields and fields[name] != v:
            raise ValueError(f"config gives two different values for {name}")
        fields[name] = v
    try:
        return JetConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid Jet config: {e}") from None


def _layer_keys(b: int) -> dict[str, str]:
    enc = f"vit/encoderblock_{b}/"
    att = enc + "MultiHeadDotProductAttention_0/"
    return {"ln0": enc + "LayerNorm_0/", "ln1": enc + "LayerNorm_1/",
            "q": att + "query/", "k": att + "key/", "v": att + "value/", "out": att + "out/",
            "fc1": enc + "MlpBlock_0/Dense_0/", "fc2": enc + "MlpBlock_0/Dense_1/"}


def _expected_shapes(cfg: JetConfig) -> dict[str, tuple[int, ...]]:
    n, e, h, t = cfg.couplings, cfg.width, cfg.heads, cfg.tokens
    d, hid = cfg.token_dim, cfg.width * cfg.mlp_ratio
    out: dict[str, tuple[int, ...]] = {
        CHANNEL_MASKS: (n, d, d),
        PREFIX + "final_proj/bias": (n, d), PREFIX + "final_proj/kernel": (n, e, d),
        PREFIX + "init_proj/bias": (n, e), PREFIX + "init_proj/kernel": (n, d // 2, e),
        PREFIX + "posemb": (n, 1, t, e),
        PREFIX + "vit/encoder_norm/bias": (n, e), PREFIX + "vit/encoder_norm/scale": (n, e),
    }
    for b in range(cfg.block_depth):
        k = {name: PREFIX + v for name, v in _layer_keys(b).items()}
        out |= {k["ln0"] + "bias": (n, e), k["ln0"] + "scale": (n, e),
                k["ln1"] + "bias": (n, e), k["ln1"] + "scale": (n, e),
                k["fc1"] + "bias": (n, hid), k["fc1"] + "kernel": (n, e, hid),
                k["fc2"] + "bias": (n, e), k["fc2"] + "kernel": (n, hid, e),
                k["out"] + "bias": (n, e), k["out"] + "kernel": (n, h, e // h, e)}
        for qkv in "qkv":
            out |= {k[qkv] + "bias": (n, h, e // h), k[qkv] + "kernel": (n, e, h, e // h)}
    out[SPATIAL_MASKS] = (n, t, t)
    return dict(sorted(out.items()))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz file ({e})") from None


def _perm_from_matrix(m: np.ndarray, what: str) -> Tensor:
    ok = (np.isin(m, (0.0, 1.0)).all() and (m.sum(0) == 1).all() and (m.sum(1) == 1).all())
    if not ok:
        raise ValueError(f"{what} is not a permutation matrix")
    return torch.from_numpy(np.ascontiguousarray(m.argmax(0))).long()


def jet_from_bigvision(npz_path_or_dict: PathLike | Mapping[str, Any],
                       config: JetConfig | Mapping[str, Any]) -> Jet:
    """A :class:`~transflow.Jet` with big_vision Jet parameters.

    ``npz_path_or_dict``: a flat ``.npz`` (or a dict of arrays) with '/'-joined names (a leading
    ``params/`` is dropped); ``config``: a JetConfig, its dict, or big_vision-style fields (see
    :func:`jet_config_from_dict`). The permutations come from the file's mask matrices. With NHWC
    inputs ``x``: ``model(x.permute(0, 3, 1, 2))`` gives big_vision's ``z`` (NCHW) and log-det."""
    cfg = jet_config_from_dict(config)
    if cfg.num_classes:
        raise ValueError("big_vision Jet models are unconditional; the config has "
                         f"num_classes={cfg.num_classes}")
    if isinstance(npz_path_or_dict, Mapping):
        raw = dict(npz_path_or_dict)
        source = "the big_vision Jet parameters"
    else:
        raw = _read_npz(Path(npz_path_or_dict))
        source = str(npz_path_or_dict)
    if raw and all(k.startswith("params/") for k in raw):
        raw = {k[len("params/"):]: v for k, v in raw.items()}
    params = {k: np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v)
              for k, v in raw.items()}

    expected = _expected_shapes(cfg)
    missing = [k for k in expected if k not in params]
    unexpected = [k for k in params if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {', '.join(repr(k) for k in missing[:5])}"] if missing else [])
        parts += ([f"unexpected {', '.join(repr(k) for k in unexpected[:5])}"]
                  if unexpected else [])
        raise ValueError(f"{source} does not match the Jet config: {'; '.join(parts)}")
    for k, shape in expected.items():
        if params[k].shape != shape:
            raise ValueError(f"{source}: tensor {k!r} has shape {list(params[k].shape)} in the "
                             f"file but {list(shape)} in the model")

    def t(key: str, i: int) -> Tensor:
        return torch.from_numpy(np.array(params[PREFIX + key][i], dtype=np.float32))

    e = cfg.width
    sd: dict[str, Tensor] = {}
    for i, (kind, _mask) in enumerate(cfg.coupling_plan()):
        used, unused = ((CHANNEL_MASKS, SPATIAL_MASKS) if kind == "channels"
                        else (SPATIAL_MASKS, CHANNEL_MASKS))
        if np.any(params[unused][i]) or not np.any(params[used][i]):
            raise ValueError(f"{source}: coupling {i} is not a {kind} coupling in the file "
                             f"(config kinds {cfg.kinds} disagree with its masks)")
        c = f"couplings.{i}."
        sd[c + "perm"] = _perm_from_matrix(params[used][i], f"{source}: {used}[{i}]")
        p = c + "conditioner."
        sd[p + "proj_in.weight"] = t("init_proj/kernel", i).T.contiguous()
        sd[p + "proj_in.bias"] = t("init_proj/bias", i)
        sd[p + "pos_embed"] = t("posemb", i)[0]
        for b in range(cfg.block_depth):
            k = _layer_keys(b)
            lp = f"{p}layers.{b}."
            sd[lp + "attn_norm.weight"] = t(k["ln0"] + "scale", i)
            sd[lp + "attn_norm.bias"] = t(k["ln0"] + "bias", i)
            sd[lp + "attn.qkv.weight"] = torch.cat(
                [t(k[q] + "kernel", i).reshape(e, e).T for q in "qkv"], dim=0).contiguous()
            sd[lp + "attn.qkv.bias"] = torch.cat([t(k[q] + "bias", i).reshape(e) for q in "qkv"])
            sd[lp + "attn.proj.weight"] = t(k["out"] + "kernel", i).reshape(e, e).T.contiguous()
            sd[lp + "attn.proj.bias"] = t(k["out"] + "bias", i)
            sd[lp + "mlp_norm.weight"] = t(k["ln1"] + "scale", i)
            sd[lp + "mlp_norm.bias"] = t(k["ln1"] + "bias", i)
            for ours, theirs in (("fc1", "fc1"), ("fc2", "fc2")):
                sd[lp + f"mlp.{ours}.weight"] = t(k[theirs] + "kernel", i).T.contiguous()
                sd[lp + f"mlp.{ours}.bias"] = t(k[theirs] + "bias", i)
        sd[p + "norm.weight"] = t("vit/encoder_norm/scale", i)
        sd[p + "norm.bias"] = t("vit/encoder_norm/bias", i)
        sd[p + "proj_out.weight"] = t("final_proj/kernel", i).T.contiguous()
        sd[p + "proj_out.bias"] = t("final_proj/bias", i)
    model = model_from_state_dict(cfg, sd, source)
    assert isinstance(model, Jet)
    return model


def jet_to_bigvision(model: Jet) -> dict[str, np.ndarray]:
    """big_vision's flat parameter dict (float32, couplings stacked on axis 0, names sorted) for
    an unconditional :class:`~transflow.Jet`; inverse of :func:`jet_from_bigvision`."""
    if not isinstance(model, Jet):
        raise ValueError(f"expected a Jet model, got {type(model).__name__}")
    cfg = model.config
    if cfg.num_classes:
        raise ValueError("big_vision Jet models are unconditional; this model has "
                         f"num_classes={cfg.num_classes}")
    if cfg.marginals or cfg.whiten or cfg.standardize:
        raise ValueError("big_vision Jet has no maps in front of the couplings; this model has "
                         f"marginals={cfg.marginals}, whiten={cfg.whiten}, "
                         f"standardize={cfg.standardize}")
    if cfg.mlp_ratio != 4 or cfg.norm_eps != 1e-6 or cfg.gelu != "tanh":
        raise ValueError("big_vision Jet uses mlp_ratio=4, norm_eps=1e-6 and tanh GELU; this "
                         f"model has mlp_ratio={cfg.mlp_ratio}, norm_eps={cfg.norm_eps}, "
                         f"gelu={cfg.gelu!r}")
    if cfg.shift or (cfg.unit_init and cfg.scale_factor != 2):
        raise ValueError("big_vision Jet has neither a shifted patch grid nor offset scales; "
                         f"this model has shift={cfg.shift}, unit_init={cfg.unit_init}")
    if cfg.token_dim % 2:
        raise ValueError("big_vision Jet splits tokens in equal halves; this model's tokens "
                         f"have an odd number of values ({cfg.token_dim})")
    e, h = cfg.width, cfg.heads
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    per: dict[str, list[np.ndarray]] = {}

    def put(key: str, v: Tensor) -> None:
        per.setdefault(key, []).append(v.to(torch.float32).contiguous().numpy())

    n, d, t = cfg.couplings, cfg.token_dim, cfg.tokens
    channel = np.zeros((n, d, d), np.float32)
    spatial = np.zeros((n, t, t), np.float32)
    for i, (kind, _mask) in enumerate(cfg.coupling_plan()):
        perm = sd[f"couplings.{i}.perm"].numpy()
        target = channel if kind == "channels" else spatial
        target[i][perm, np.arange(len(perm))] = 1.0
        p = f"couplings.{i}.conditioner."
        put(PREFIX + "init_proj/kernel", sd[p + "proj_in.weight"].T)
        put(PREFIX + "init_proj/bias", sd[p + "proj_in.bias"])
        put(PREFIX + "posemb", sd[p + "pos_embed"][None])
        for b in range(cfg.block_depth):
            k = {name: PREFIX + v for name, v in _layer_keys(b).items()}
            lp = f"{p}layers.{b}."
            put(k["ln0"] + "scale", sd[lp + "attn_norm.weight"])
            put(k["ln0"] + "bias", sd[lp + "attn_norm.bias"])
            qkv_w = sd[lp + "attn.qkv.weight"].chunk(3, dim=0)
            qkv_b = sd[lp + "attn.qkv.bias"].chunk(3, dim=0)
            for j, q in enumerate("qkv"):
                put(k[q] + "kernel", qkv_w[j].T.reshape(e, h, e // h))
                put(k[q] + "bias", qkv_b[j].reshape(h, e // h))
            put(k["out"] + "kernel", sd[lp + "attn.proj.weight"].T.reshape(h, e // h, e))
            put(k["out"] + "bias", sd[lp + "attn.proj.bias"])
            put(k["ln1"] + "scale", sd[lp + "mlp_norm.weight"])
            put(k["ln1"] + "bias", sd[lp + "mlp_norm.bias"])
            put(k["fc1"] + "kernel", sd[lp + "mlp.fc1.weight"].T)
            put(k["fc1"] + "bias", sd[lp + "mlp.fc1.bias"])
            put(k["fc2"] + "kernel", sd[lp + "mlp.fc2.weight"].T)
            put(k["fc2"] + "bias", sd[lp + "mlp.fc2.bias"])
        put(PREFIX + "vit/encoder_norm/scale", sd[p + "norm.weight"])
        put(PREFIX + "vit/encoder_norm/bias", sd[p + "norm.bias"])
        put(PREFIX + "final_proj/kernel", sd[p + "proj_out.weight"].T)
        put(PREFIX + "final_proj/bias", sd[p + "proj_out.bias"])
    out = {k: np.stack(v) for k, v in per.items()}
    out[CHANNEL_MASKS] = channel
    out[SPATIAL_MASKS] = spatial
    assert set(out) == set(_expected_shapes(cfg))
    return dict(sorted(out.items()))


def bigvision_config(cfg: JetConfig) -> dict[str, Any]:
    """The big_vision-style config fields for ``cfg`` (as read by :func:`jet_config_from_dict`)."""
    return {"img": cfg.image_size, "channels": cfg.channels, "patch_size": cfg.patch_size,
            "depth": cfg.couplings, "block_depth": cfg.block_depth, "width": cfg.width,
            "heads": cfg.heads, "kinds": list(cfg.kinds), "spatial_masks": list(cfg.spatial_masks),
            "scale_factor": cfg.scale_factor}


def config_sidecar(path: PathLike) -> Path:
    """Where :func:`save_bigvision` writes the config of ``PATH.npz``: ``PATH.config.json``."""
    path = Path(path)
    return path.with_name(path.stem + ".config.json")


def save_bigvision(model: Jet, path: PathLike, *, write_config: bool = True) -> Path:
    """Write :func:`jet_to_bigvision` as an uncompressed ``.npz`` (atomically) and, with
    ``write_config``, the big_vision-style config as :func:`config_sidecar` (``PATH.config.json``)
    beside it."""
    params = jet_to_bigvision(model)
    path = Path(path)
    with atomic_open(path, "wb") as f:
        np.savez(f, **params)
    if write_config:
        with atomic_open(config_sidecar(path), "w") as f:
            f.write(json.dumps(bigvision_config(model.config), indent=2) + "\n")
    return path


__all__ = ["jet_from_bigvision", "jet_to_bigvision", "save_bigvision", "jet_config_from_dict",
           "bigvision_config", "config_sidecar"]
