"""The static-shape per-token step of sequential TarFlow inversion (``sample(compile=...)``,
``transflow sample --compile``): equal to the plain sequential solver, compiled on the CPU, and
refused where it cannot run. The CUDA-graph capture is checked in ``tests/test_cuda.py``."""

from __future__ import annotations

import pytest
import torch

from transflow import TarFlow, build
from transflow.flows import Guidance

from conftest import TARFLOW_VARIANTS, jet_config, perturb, tarflow_config


def model_for(variant: str) -> TarFlow:
    torch.manual_seed(0)
    return perturb(TarFlow(tarflow_config(**TARFLOW_VARIANTS[variant])), std=0.05,
                   scale_shift=0.1).eval()


@pytest.mark.parametrize("variant", ["nvp", "vp", "cond", "starflow-all", "datamaps",
                                     "noise-cond"])
def test_static_eager_step_equals_the_sequential_solver(variant):
    model = model_for(variant)
    c = model.config
    z = torch.randn(4, c.channels, c.image_size, c.image_size,
                    generator=torch.Generator().manual_seed(1))
    k = model.config.num_classes
    y = torch.tensor([0, 1, 2, -1]) if k else None
    guides = [None] + ([Guidance(1.5), Guidance(1.0, attn_temp=0.8, anneal=True)] if k else [])
    for g in guides:
        ref, _ = model.invert(z, y, guidance=g)
        got, stats = model.invert(z, y, guidance=g, static="eager")
        assert ref.abs().max() > 0.5
        assert (got - ref).abs().max() < 1e-5
        assert all(s.converged and s.passes == model.config.tokens - 1 for s in stats)


def test_static_modes_are_checked():
    model = model_for("nvp")
    z = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        model.invert(z, static="graph")
    with pytest.raises(ValueError, match="unknown static mode"):
        model.invert(z, static="fast")
    with pytest.raises(ValueError, match="compile must be a bool"):
        model.sample(2, compile="fast")
    # the parallel plans and Jet have no per-token loop: the option changes nothing there
    ref, _ = model.invert(z, plan="jacobi")
    got, _ = model.invert(z, plan="jacobi", static="eager")
    assert torch.equal(ref, got)
    jet = build(jet_config())
    assert torch.equal(jet.sample(2, seed=0, compile=True), jet.sample(2, seed=0))


@pytest.mark.slow
def test_compiled_step_equals_eager_and_the_cli_flag(tmp_path, capsys):
    """torch.compile of the static step on the CPU (what ``--compile`` picks without CUDA)."""
    from transflow import save_pretrained
    from transflow.cli import main

    model = model_for("cond")
    x_eager = model.sample(3, y=[0, 1, 2], seed=0, guidance=1.0)
    x_comp = model.sample(3, y=[0, 1, 2], seed=0, guidance=1.0, compile=True)
    assert (x_comp - x_eager).abs().max() < 1e-4
    save_pretrained(model, tmp_path / "m")
    out = tmp_path / "s.npz"
    assert main(["sample", str(tmp_path / "m"), "-o", str(out), "--n", "3", "--compile",
                 "--quiet"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
