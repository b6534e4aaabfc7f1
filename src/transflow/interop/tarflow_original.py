"""Checkpoints of the original TarFlow code (apple/ml-tarflow ``transformer_flow.Model``).

The original state dict differs from ours only in names and two tensors:

============================================  ==========================================
original                                      transflow
============================================  ==========================================
``blocks.i.attn_blocks.j.attention.norm``     ``blocks.i.layers.j.attn_norm``
``blocks.i.attn_blocks.j.attention.qkv``      ``blocks.i.layers.j.attn.qkv``
``blocks.i.attn_blocks.j.attention.proj``     ``blocks.i.layers.j.attn.proj``
``blocks.i.attn_blocks.j.mlp.norm``           ``blocks.i.layers.j.mlp_norm``
``blocks.i.attn_blocks.j.mlp.main.0`` / ``2``  ``blocks.i.layers.j.mlp.fc1`` / ``fc2``
``blocks.i.class_embed [K, 1, W]``            ``blocks.i.class_embed [K+1, W]`` (row K: null)
``blocks.i.attn_mask [T, T]`` (causal tril)   (none: causal attention is built in)
``var [T, D]``                                ``prior_var_tokens [T, D]`` (VP only)
============================================  ==========================================

The original's unconditional branch adds the *mean* of the class embeddings; importing sets our
learned null class to exactly that mean, so unconditional outputs match. The original always
builds blocks with head dim 64, MLP ratio 4, LayerNorm eps 1e-5, exact GELU, ``exp`` scales.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import PathLike, atomic_open
from ..flows import TarFlow, TarFlowConfig
from ..flows.base import check_state_dict, empty_model
from ..flows.base import from_state_dict as model_from_state_dict
from ..io.models import read_state_dict

# ours -> original, for the tensors inside blocks.i.layers.j (blocks.i.attn_blocks.j)
_LAYER_NAMES = {
    "attn_norm": "attention.norm",
    "attn.qkv": "attention.qkv",
    "attn.proj": "attention.proj",
    "mlp_norm": "mlp.norm",
    "mlp.fc1": "mlp.main.0",
    "mlp.fc2": "mlp.main.2",
}
_LAYER_NAMES_BACK = {v: k for k, v in _LAYER_NAMES.items()}
_OURS_LAYER = re.compile(r"^blocks\.(\d+)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_ORIG_LAYER = re.compile(r"^blocks\.(\d+)\.attn_blocks\.(\d+)\.(.+)\.(weight|bias)$")
_BLOCK_DIRECT = ("proj_in.weight", "proj_in.bias", "pos_embed", "proj_out.weight",
                 "proj_out.bias")


def original_name(name: str) -> str:
    """Our tensor name -> the original's (``ValueError`` for tensors the original lacks)."""
    if name == "prior_var_tokens":
        return "var"
    m = _OURS_LAYER.match(name)
    if m and m.group(3) in _LAYER_NAMES:
        i, j, mod, kind = m.groups()
        return f"blocks.{i}.attn_blocks.{j}.{_LAYER_NAMES[mod]}.{kind}"
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in (*_BLOCK_DIRECT, "class_embed"):
        return name
    raise ValueError(f"tensor {name!r} has no counterpart in the original TarFlow layout")


def _our_name(name: str) -> str | None:
    """Original tensor name -> ours (``None`` for tensors we drop: ``attn_mask``, ``var``)."""
    if name == "var" or re.fullmatch(r"blocks\.\d+\.attn_mask", name):
        return None
    m = _ORIG_LAYER.match(name)
    if m and m.group(3) in _LAYER_NAMES_BACK:
        i, j, mod, kind = m.groups()
        return f"blocks.{i}.layers.{j}.{_LAYER_NAMES_BACK[mod]}.{kind}"
    return name  # unchanged names; anything unknown is reported by the shape check


def _check_representable(cfg: TarFlowConfig) -> None:
    problems = []
    if cfg.scale != "exp":
        problems.append(f"scale={cfg.scale!r}")
    if cfg.soft_clip:
        problems.append(f"soft_clip={cfg.soft_clip}")
    if cfg.final_norm:
        problems.append("final_norm=True")
    if len(set(cfg.layers_per_block())) != 1:
        problems.append(f"layers={cfg.layers}")
    if cfg.mlp_ratio != 4:
        problems.append(f"mlp_ratio={cfg.mlp_ratio}")
    if cfg.norm_eps != 1e-5:
        problems.append(f"norm_eps={cfg.norm_eps}")
    if cfg.gelu != "exact":
        problems.append(f"gelu={cfg.gelu!r}")
    # maps the original does not have
    for name in ("marginals", "standardize", "whiten", "mix", "shift"):
        if getattr(cfg, name):
            problems.append(f"{name}=True")
    if cfg.noise_max:
        problems.append(f"noise_max={cfg.noise_max} (noise-conditional)")
    if problems:
        raise ValueError("the original TarFlow code cannot represent this model "
                         f"({', '.join(problems)})")


def _expected_original_shapes(cfg: TarFlowConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the original state dict for ``cfg`` (in the original's order)."""
    ours = empty_model(cfg).state_dict()
    t, d, w, k = cfg.tokens, cfg.token_dim, cfg.width, cfg.num_classes
    out: dict[str, tuple[int, ...]] = {"var": (t, d)}
    for name, v in ours.items():
        if name == "prior_var_tokens":
            continue
        if name.endswith(".proj_in.weight"):  # the original's buffers precede its submodules
            out[name.replace("proj_in.weight", "attn_mask")] = (t, t)
        if name.endswith(".class_embed"):
            out[name] = (k, 1, w)
        else:
            out[original_name(name)] = tuple(v.shape)
    return out


def _describe_mismatch(sd: Mapping[str, Tensor], *, blocks: int, layers: int, width: int,
                       num_classes: int, nvp: bool, token_dim: int) -> str:
    """A sentence about the first structural argument that disagrees with the state dict."""
    found = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if len(found) != blocks:
        return f"the checkpoint has {len(found)} blocks but blocks={blocks} was given"
    found = {int(m.group(1)) for k in sd
             if (m := re.match(r"blocks\.0\.attn_blocks\.(\d+)\.", k))}
    if len(found) != layers:
        return f"the checkpoint has {len(found)} layers per block but layers={layers} was given"
    w = sd.get("blocks.0.proj_in.weight")
    if w is not None and w.dim() == 2 and w.shape[0] != width:
        return f"the checkpoint has width {w.shape[0]} but width={width} was given"
    ce = sd.get("blocks.0.class_embed")
    k = 0 if ce is None else ce.shape[0]
    if k != num_classes:
        return f"the checkpoint has {k} classes but num_classes={num_classes} was given"
    po = sd.get("blocks.0.proj_out.weight")
    if po is not None and po.dim() == 2 and po.shape[0] in (token_dim, 2 * token_dim):
        file_nvp = po.shape[0] == 2 * token_dim
        if file_nvp != nvp:
            kind = "an NVP (affine)" if file_nvp else "a VP (shift-only)"
            return f"the checkpoint is {kind} model but nvp={nvp} was given"
    return ""


def _infer_image(sd: Mapping[str, Tensor], patch_size: int, source: str) -> tuple[int, int]:
    """``(image_size, channels)`` from ``var [T, C*P*P]`` (or ``pos_embed`` and ``proj_in``)."""
    if "var" in sd and sd["var"].dim() == 2:
        t, d = sd["var"].shape
    elif "blocks.0.pos_embed" in sd and "blocks.0.proj_in.weight" in sd:
        t, d = sd["blocks.0.pos_embed"].shape[0], sd["blocks.0.proj_in.weight"].shape[1]
    else:
        raise ValueError(f"{source} is not an original TarFlow state dict: it has neither 'var' "
                         "nor 'blocks.0.pos_embed' and 'blocks.0.proj_in.weight'")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    grid = math.isqrt(t)
    if grid * grid != t:
        raise ValueError(f"{source} has {t} tokens, not a square grid of patches")
    if d % (patch_size * patch_size):
        raise ValueError(f"{source} has tokens of {d} values, which patch_size={patch_size} "
                         f"does not divide into channels (C * {patch_size}^2)")
    return grid * patch_size, d // (patch_size * patch_size)


def original_config(cfg: TarFlowConfig) -> dict[str, int | bool]:
    """Constructor arguments of the original ``transformer_flow.Model`` for ``cfg``."""
    return {"in_channels": cfg.channels, "img_size": cfg.image_size,
            "patch_size": cfg.patch_size, "channels": cfg.width, "num_blocks": cfg.blocks,
            "layers_per_block": cfg.layers_per_block()[0], "nvp": cfg.nvp,
            "num_classes": cfg.num_classes}


def tarflow_from_original(state_dict_or_path: Mapping[str, Tensor] | PathLike, *,
                          patch_size: int, width: int, blocks: int, layers: int,
                          num_classes: int = 0, nvp: bool = True, head_dim: int = 64,
                          noise_std: float = 0.0, num_levels: int = 256) -> TarFlow:
    """A :class:`~transflow.TarFlow` with the weights of an original TarFlow checkpoint.

    ``state_dict_or_path`` is the original ``Model.state_dict()`` or a ``.pth`` / ``.pt`` /
    ``.safetensors`` file holding it (read with ``weights_only=True``). Image size and channels
    come from ``var [T, C*P*P]``; the other arguments are the original's constructor arguments
    (``channels`` there is ``width`` here). ``noise_std`` / ``num_levels`` only describe the
    training data in the config. Outputs match the original: ``model(x)`` gives its latent (as an
    image) and its log-determinant times ``D``; ``model.inverse(z * model.prior_var().sqrt())``
    (VP) or ``model.inverse(z)`` (NVP) its ``reverse(z)``; labels ``None``/-1 its mean-class
    branch. The returned model may share memory with ``state_dict_or_path``."""
    if isinstance(state_dict_or_path, Mapping):
        sd = {k: v for k, v in state_dict_or_path.items()}
        source = "the original TarFlow state dict"
    else:
        sd = read_state_dict(state_dict_or_path)
        source = str(Path(state_dict_or_path))
    image_size, channels = _infer_image(sd, patch_size, source)
    hint = _describe_mismatch(sd, blocks=blocks, layers=layers, width=width,
                              num_classes=num_classes, nvp=nvp,
                              token_dim=channels * patch_size * patch_size)
    if hint:
        raise ValueError(f"{source} does not match the given architecture: {hint}")
    try:
        cfg = TarFlowConfig(image_size=image_size, channels=channels, patch_size=patch_size,
                            width=width, blocks=blocks, layers=layers, head_dim=head_dim,
                            nvp=nvp, num_classes=num_classes, noise_std=noise_std,
                            num_levels=num_levels)
    except ValueError as e:
        raise ValueError(f"cannot build a TarFlow for {source}: {e}") from None
    check_state_dict(_expected_original_shapes(cfg), sd, source)

    ours: dict[str, Tensor] = {}
    for name, v in sd.items():
        new = _our_name(name)
        if new is None:
            continue
        if new.endswith(".class_embed"):
            k = v.reshape(v.shape[0], v.shape[-1])
            v = torch.cat([k, k.mean(0, keepdim=True)], dim=0)
        ours[new] = v
    var = sd["var"]
    if nvp:
        if not bool((var == 1).all()):
            warnings.warn(f"{source}: 'var' is not all ones although the model is NVP; the "
                          "original scales its sampling noise by var.sqrt(), transflow's NVP "
                          "models use a standard normal prior, so 'var' is ignored",
                          stacklevel=2)
    else:
        ours["prior_var_tokens"] = var
    for i in range(blocks):
        mask = sd[f"blocks.{i}.attn_mask"]
        if not torch.equal(mask.to(torch.bool), torch.ones_like(mask, dtype=torch.bool).tril()):
            raise ValueError(f"{source}: blocks.{i}.attn_mask is not the causal (lower-triangular)"
                             " mask the original builds; this is not a TarFlow checkpoint")
    model = model_from_state_dict(cfg, ours, source)
    assert isinstance(model, TarFlow)
    return model


def tarflow_to_original(model: TarFlow) -> dict[str, Tensor]:
    """The state dict the original ``transformer_flow.Model`` (built with
    :func:`original_config`) loads, with the original's names and order.

    Our learned null class is dropped (the original uses the mean of the class embeddings for
    unconditional samples; a ``UserWarning`` says so when they differ); ``attn_mask`` is the
    causal mask; ``var`` is the VP prior variance, or ones for NVP models. Model config options
    the original lacks (softplus scale, soft clipping, final norm, per-block layer counts,
    the data maps ``marginals`` and ``whiten``) raise ``ValueError``; a head dim other than 64
    warns (the original hard-codes 64). Like ``state_dict()``, the tensors share memory with
    the model (CPU models)."""
    if not isinstance(model, TarFlow):
        raise ValueError(f"expected a TarFlow model, got {type(model).__name__}")
    cfg = model.config
    _check_representable(cfg)
    if cfg.head_dim != 64:
        warnings.warn(f"head_dim={cfg.head_dim}: the original TarFlow code builds its blocks "
                      "with head dim 64; pass the same head dim when loading this state dict",
                      stacklevel=2)
    ours = model.state_dict()
    dtype = next(iter(ours.values())).dtype
    out: dict[str, Tensor] = {}
    if cfg.nvp:
        out["var"] = torch.ones(cfg.tokens, cfg.token_dim, dtype=dtype)
    else:
        out["var"] = ours["prior_var_tokens"].detach().cpu()
    for name, v in ours.items():
        if name == "prior_var_tokens":
            continue
        v = v.detach().cpu()
        if name.endswith(".class_embed"):
            classes, null = v[:-1], v[-1]
            mean = classes.mean(0)
            tol = 1e-6 * (1.0 + float(classes.abs().max()))
            if not torch.allclose(null, mean, rtol=0.0, atol=tol):
                warnings.warn(f"{name}: the learned null class differs from the mean of the "
                              "class embeddings; the original TarFlow cannot store it and uses "
                              "the mean for unconditional samples", stacklevel=2)
            out[name] = classes.reshape(classes.shape[0], 1, classes.shape[1]).clone()
        else:
            out[original_name(name)] = v
        if name.endswith(".proj_in.weight"):
            out[name.replace("proj_in.weight", "attn_mask")] = torch.ones(
                cfg.tokens, cfg.tokens, dtype=v.dtype).tril()
    expected = _expected_original_shapes(cfg)
    return {k: out[k] for k in expected}


def save_original(model: TarFlow, path: PathLike) -> Path:
    """Write :func:`tarflow_to_original` as a ``.pth`` (``torch.save``), atomically."""
    sd = tarflow_to_original(model)
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save(sd, f)
    return path


__all__ = ["tarflow_from_original", "tarflow_to_original", "save_original", "original_config",
           "original_name"]
