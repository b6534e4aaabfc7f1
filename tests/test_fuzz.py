"""Property-based checks: random small configs stay invertible with finite log-determinants, and
the data loaders turn arbitrary bytes into data or one clear ValueError, never a crash."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transflow import Jet, JetConfig, TarFlow, TarFlowConfig
from transflow.data import load_data

from conftest import perturb

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def tarflow_configs(draw):
    patch = draw(st.sampled_from([1, 2, 4]))
    size = draw(st.sampled_from([s for s in (2, 4, 8) if s % patch == 0 and (s // patch) ** 2 > 1]))
    head = draw(st.sampled_from([8, 16]))
    blocks = draw(st.integers(1, 3))
    layers = draw(st.one_of(st.integers(1, 2), st.lists(st.integers(1, 2), min_size=blocks,
                                                        max_size=blocks)))
    return TarFlowConfig(image_size=size, channels=draw(st.integers(1, 3)), patch_size=patch,
                         width=head * draw(st.integers(1, 2)), head_dim=head, blocks=blocks,
                         layers=layers, nvp=draw(st.booleans()),
                         scale=draw(st.sampled_from(["exp", "softplus"])),
                         soft_clip=draw(st.sampled_from([0.0, 1.5])),
                         final_norm=draw(st.booleans()),
                         num_classes=draw(st.sampled_from([0, 3])))


@st.composite
def jet_configs(draw):
    patch = draw(st.sampled_from([1, 2]))
    size = draw(st.sampled_from([2, 4, 8] if patch == 1 else [4, 8]))  # an even token count
    channels = draw(st.sampled_from([2, 4] if patch == 1 else [1, 2, 3]))
    heads = draw(st.sampled_from([1, 2]))
    return JetConfig(image_size=size, channels=channels, patch_size=patch,
                     couplings=draw(st.integers(1, 4)), block_depth=draw(st.integers(1, 2)),
                     width=8 * heads, heads=heads,
                     kinds=draw(st.sampled_from([["channels"], ["spatial"],
                                                 ["channels", "spatial"]])),
                     num_classes=draw(st.sampled_from([0, 2])),
                     perm_seed=draw(st.integers(0, 100)))


def check_flow(model, seed: int) -> None:
    model = perturb(model.double(), std=0.05, seed=seed).eval()
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, c.channels, c.image_size, c.image_size, generator=g,
                   dtype=torch.float64) * 2 - 1
    y = torch.randint(-1, c.num_classes, (3,), generator=g) if c.num_classes else None
    z, logdet = model(x, y)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    torch.testing.assert_close(model.inverse(z, y), x, rtol=0, atol=1e-9)


@SETTINGS
@given(cfg=tarflow_configs(), seed=st.integers(0, 1000))
def test_random_tarflows_are_invertible(cfg, seed):
    check_flow(TarFlow(cfg), seed)


@SETTINGS
@given(cfg=jet_configs(), seed=st.integers(0, 1000))
def test_random_jets_are_invertible(cfg, seed):
    check_flow(Jet(cfg), seed)


@SETTINGS
@given(blobs=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=6),
       suffixes=st.lists(st.sampled_from([".png", ".jpg", ".gif", ".txt", ""]), min_size=6,
                         max_size=6))
def test_folder_loader_survives_random_bytes(tmp_path_factory, blobs, suffixes):
    folder = tmp_path_factory.mktemp("fuzz")
    for i, blob in enumerate(blobs):
        (folder / f"f{i}{suffixes[i]}").write_bytes(blob)
    try:
        with pytest.warns(UserWarning):
            load_data(str(folder), image_size=4)
    except ValueError as e:
        assert str(e)
    except pytest.fail.Exception:
        raise


@SETTINGS
@given(blob=st.binary(min_size=0, max_size=2000))
def test_npz_loader_survives_random_bytes(tmp_path_factory, blob):
    p = tmp_path_factory.mktemp("npz") / "d.npz"
    p.write_bytes(blob)
    with pytest.raises(ValueError):
        load_data(str(p))


@SETTINGS
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=5),
       dtype=st.sampled_from([np.uint8, np.float32, np.int64]))
def test_npz_loader_survives_odd_arrays(tmp_path_factory, shape, dtype):
    p = tmp_path_factory.mktemp("npz") / "d.npz"
    np.savez(p, x_train=np.zeros(shape, dtype), x_test=np.zeros(shape, dtype))
    try:
        d = load_data(str(p))
    except ValueError:
        return
    assert d.x_train.dtype == torch.uint8 and d.x_train.dim() == 4
