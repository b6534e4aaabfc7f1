"""Memory savers for training: activation checkpointing (TarFlow and Jet) and Jet's reversible
backward give the plain forward's outputs and the plain backward's gradients, keep far fewer
activations, and leave inversion and sampling alone."""

from __future__ import annotations

import pytest
import torch

from transflow import Jet, TarFlow
from transflow.flows.jet import ReversibleCouplings

from conftest import jet_config, perturb, tarflow_config

TARFLOW = {
    "nvp-cond": dict(num_classes=3),
    "vp-cond": dict(nvp=False, num_classes=3),
}
JET = {
    "cond": dict(num_classes=3, couplings=4, kinds=["channels", "spatial"]),
    "uncond": dict(couplings=5, kinds=["spatial", "channels", "channels"]),
}
MODES = [dict(checkpointing="block"), dict(checkpointing="layer")]
JET_MODES = MODES + [dict(reversible=True)]


def perturb_all(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Far from the identity: random N(0, 0.1^2) output projections (zero at initialisation)
    with a log-scale shift, noisy embeddings, and every other parameter (weights, biases,
    LayerNorms) moved by N(0, 0.05^2) noise."""
    perturb(model, std=0.1, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj_out" not in name and "embed" not in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.05)
    return model


def make(family: str, variant: str, **kw):
    torch.manual_seed(0)
    if family == "tarflow":
        model = TarFlow(tarflow_config("4x4x3", **(TARFLOW[variant] | kw)))
    else:
        model = Jet(jet_config("4x4x3", **(JET[variant] | kw)))
    model = perturb_all(model.double())
    if not getattr(model.config, "nvp", True):
        with torch.no_grad():
            model.prior_var_tokens.uniform_(0.5, 2.0)
    return model


def inputs(model, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.rand(batch, c.channels, c.image_size, c.image_size, generator=g,
                   dtype=torch.float64) * 2 - 1
    y = torch.randint(-1, c.num_classes, (batch,), generator=g) if c.num_classes else None
    return x, y


def run(model, x, y, x_grad=False, **memory):
    """Forward + backward of a loss depending on both ``z`` and ``logdet``, with the given
    memory settings; returns ``(z, logdet, {name: grad}, x.grad)``."""
    model.configure_memory(**memory)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(x_grad)
    z, logdet = model(x, y)
    w = torch.linspace(-1, 1, z[0].numel(), dtype=z.dtype).view(z[0].shape)
    loss = -(model.prior_log_prob(z) + logdet).mean() + (torch.sin(z) * w).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.configure_memory()
    return z.detach(), logdet.detach(), grads, x.grad


def assert_grads_equal(got: dict, ref: dict, tol: float = 1e-8) -> None:
    assert got.keys() == ref.keys()
    for n, r in ref.items():
        scale = max(1.0, float(r.abs().max()))
        diff = float((got[n] - r).abs().max())
        assert diff <= tol * scale, f"gradient of {n} differs by {diff:.3g} (scale {scale:.3g})"


CASES = ([("tarflow", v, m) for v in TARFLOW for m in MODES]
         + [("jet", v, m) for v in JET for m in JET_MODES])


@pytest.mark.parametrize("family,variant,memory", CASES,
                         ids=[f"{f}-{v}-{m.get('checkpointing', 'reversible')}"
                              for f, v, m in CASES])
def test_gradients_equal_plain_backward(family, variant, memory):
    model = make(family, variant)
    x, y = inputs(model)
    z0, ld0, g0, gx0 = run(model, x, y, x_grad=True)
    z1, ld1, g1, gx1 = run(model, x, y, x_grad=True, **memory)
    if family == "jet" or model.config.nvp:
        assert ld0.abs().min() > 1.0, "log-determinant too close to zero for a real test"
    assert (z0 - x).abs().max() > 0.3, "weights too close to the identity for a real test"
    assert torch.isfinite(z0).all() and torch.isfinite(ld0).all()
    assert torch.equal(z1, z0) and torch.equal(ld1, ld0)
    # every parameter gets a real gradient, so a missing or wrong one would show
    assert g0.keys() == {n for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in g0.values())
    assert_grads_equal(g1, g0)
    assert_grads_equal({"x": gx1}, {"x": gx0})


@pytest.mark.parametrize("variant", list(JET))
def test_reversible_without_input_grad(variant):
    """The usual training case (data needs no gradient): parameter gradients still match, and
    the input gradient is not produced."""
    model = make("jet", variant)
    x, y = inputs(model, seed=1)
    _, _, g0, _ = run(model, x, y)
    _, _, g1, gx = run(model, x, y, reversible=True)
    assert gx is None
    assert_grads_equal(g1, g0)


def test_reversible_with_frozen_couplings():
    """Frozen parameters get no gradient through the function; the rest still match (with the
    first coupling frozen and no input gradient the backward stops before it)."""
    model = make("jet", "uncond")
    x, y = inputs(model, seed=2)
    for i in (0, 2):
        model.couplings[i].requires_grad_(False)
    _, _, g0, _ = run(model, x, y)
    _, _, g1, _ = run(model, x, y, reversible=True)
    assert not any(k.startswith(("couplings.0.", "couplings.2.")) for k in g1)
    assert any(k.startswith("couplings.1.") for k in g1)
    assert_grads_equal(g1, g0)


def test_reversible_params_are_function_inputs():
    """The parameters reach autograd through the reversible function's node (so DDP's and
    optimizers' hooks on them fire once, from the usual accumulation)."""
    model = make("jet", "cond")
    model.configure_memory(reversible=True)
    x, y = inputs(model)
    z, _ = model(x, y)
    seen, stack = set(), [z.grad_fn]
    node_names = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        node_names.add(type(node).__name__)
        if hasattr(node, "variable"):
            node_names.add(f"leaf:{id(node.variable)}")
        stack.extend(n for n, _ in node.next_functions)
    assert "ReversibleCouplingsBackward" in node_names
    leaves = {n for n in node_names if n.startswith("leaf:")}
    assert leaves == {f"leaf:{id(p)}" for p in model.couplings.parameters()}
    fired = []
    hooks = [p.register_hook(lambda g, n=n: fired.append(n))
             for n, p in model.named_parameters()]
    (z.sum()).backward()
    for h in hooks:
        h.remove()
    assert sorted(fired) == sorted(n for n, _ in model.named_parameters())


def saved_bytes(model, x, y, **memory) -> int:
    """Bytes of the tensors autograd saves for backward during one training forward."""
    model.configure_memory(**memory)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, logdet = model(x, y)
        (model.prior_log_prob(z) + logdet).mean()
    model.configure_memory()
    return total


def kept_bytes(model, x, y, **memory) -> int:
    """Net bytes allocated by one training forward and still alive after it, measured by the
    CPU allocator through the profiler: saved activations, checkpoint inputs and outputs,
    whichever mechanism keeps them."""
    model.configure_memory(**memory)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        out = model(x, y)
    model.configure_memory()
    del out
    # every allocation (+) and free (-) in the window, attributed to an op or not ("[memory]")
    return sum(e.self_cpu_memory_usage for e in prof.events())


def big_jet(couplings: int):
    torch.manual_seed(0)
    cfg = jet_config("8x8x1", couplings=couplings, width=64, heads=2, block_depth=2)
    return perturb(Jet(cfg))


def test_reversible_keeps_no_per_coupling_activations():
    x, _ = inputs(big_jet(4), batch=8)
    x = x.float()
    plain4, plain8 = saved_bytes(big_jet(4), x, None), saved_bytes(big_jet(8), x, None)
    rev4 = saved_bytes(big_jet(4), x, None, reversible=True)
    rev8 = saved_bytes(big_jet(8), x, None, reversible=True)
    assert plain8 > 1.8 * plain4  # plain: grows with the couplings
    assert rev8 == rev4  # reversible: independent of the number of couplings
    assert rev8 < plain8 / 20
    assert 0 < rev4 < plain4 / 4
    # the allocator's view agrees: what the forward leaves alive
    k_plain = kept_bytes(big_jet(8), x, None)
    k_rev = kept_bytes(big_jet(8), x, None, reversible=True)
    assert k_rev < k_plain / 4


def big_tarflow():
    torch.manual_seed(0)
    cfg = tarflow_config("8x8x1", width=64, head_dim=32, blocks=4, layers=2)
    return perturb(TarFlow(cfg))


def test_checkpointing_keeps_fewer_activations():
    model = big_tarflow()
    x, _ = inputs(model, batch=8)
    x = x.float()
    plain = saved_bytes(model, x, None)
    assert saved_bytes(model, x, None, checkpointing="block") < plain / 4
    assert saved_bytes(model, x, None, checkpointing="layer") < plain / 4
    k_plain = kept_bytes(model, x, None)
    k_block = kept_bytes(model, x, None, checkpointing="block")
    k_layer = kept_bytes(model, x, None, checkpointing="layer")
    assert k_block < k_plain / 4
    assert k_block < k_layer < k_plain / 2
    jet = big_jet(8)
    plain = kept_bytes(jet, x, None)
    assert kept_bytes(jet, x, None, checkpointing="block") < plain / 4
    assert kept_bytes(jet, x, None, checkpointing="layer") < plain / 2


def test_no_grad_forward_is_plain():
    """Checkpointing and the reversible function only act when grad is enabled."""
    for model, memory in [(make("tarflow", "nvp-cond"), dict(checkpointing="block")),
                          (make("jet", "cond"), dict(reversible=True))]:
        x, y = inputs(model)
        model.configure_memory(**memory)
        with torch.no_grad():
            z, logdet = model(x, y)
        assert z.grad_fn is None
        z2, _ = model(x, y)
        assert z2.grad_fn is not None
        model.configure_memory()
        z0, ld0 = model(x, y)
        assert torch.equal(z, z0) and torch.equal(logdet, ld0)


def test_defaults_and_errors():
    tar, jet = make("tarflow", "nvp-cond"), make("jet", "cond")
    for m in (tar, jet):
        assert m.checkpointing == "none" and m.reversible is False
        with pytest.raises(ValueError, match="unknown checkpointing"):
            m.configure_memory(checkpointing="blocks")
        assert m.checkpointing == "none"
    with pytest.raises(ValueError, match="TarFlow does not support reversible"):
        tar.configure_memory(reversible=True)
    assert tar.reversible is False
    with pytest.raises(ValueError, match="checkpointing='none'"):
        jet.configure_memory(checkpointing="block", reversible=True)
    with pytest.raises(ValueError, match="bool"):
        jet.configure_memory(reversible=1)
    jet.configure_memory(reversible=True)
    assert jet.reversible is True
    tar.configure_memory("layer")
    assert tar.checkpointing == "layer"
    # runtime settings: not part of the config, not in the state dict
    assert "checkpointing" not in tar.config.to_dict()
    assert set(tar.state_dict()) == set(make("tarflow", "nvp-cond").state_dict())


@pytest.mark.parametrize("family,variant,memory",
                         [("tarflow", "nvp-cond", dict(checkpointing="block")),
                          ("tarflow", "vp-cond", dict(checkpointing="layer")),
                          ("jet", "cond", dict(checkpointing="layer")),
                          ("jet", "cond", dict(reversible=True))])
def test_inverse_and_sampling_unaffected(family, variant, memory):
    ref = make(family, variant)
    model = make(family, variant)
    model.configure_memory(**memory)
    x, y = inputs(model)
    with torch.no_grad():
        z, _ = ref(x, y)
    assert torch.equal(model.inverse(z, y), ref.inverse(z, y))
    torch.testing.assert_close(model.inverse(z, y), x, rtol=0, atol=1e-10)
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    assert torch.equal(model.sample(3, y=y[:3], generator=g1), ref.sample(3, y=y[:3], generator=g2))


def test_reversible_function_directly():
    """``ReversibleCouplings.run`` on tokens equals the coupling loop, values and gradients."""
    model = make("jet", "cond")
    x, y = inputs(model)
    y = model.check_labels(y, x.shape[0])
    t = model.tokens(x).requires_grad_()
    ref, ld_ref = t, 0
    for c in model.couplings:
        ref, ld = c(ref, y)
        ld_ref = ld_ref + ld
    out, ld_out = ReversibleCouplings.run(model.couplings, t, y)
    assert torch.equal(out, ref) and torch.equal(ld_out, ld_ref)
    g_ref = torch.autograd.grad((ref.square().sum() + ld_ref.sum()), t)[0]
    g_out = torch.autograd.grad((out.square().sum() + ld_out.sum()), t)[0]
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-9)


def test_reversible_under_autocast():
    """fp32 model under bf16 autocast: the reversible backward re-enters autocast for the
    rebuild and matches the plain one."""
    torch.manual_seed(0)
    model = perturb(Jet(jet_config("4x4x3", num_classes=3)), std=0.05)
    x, y = inputs(model)
    x = x.float()
    res = []
    for memory in (dict(), dict(reversible=True)):
        model.configure_memory(**memory)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, logdet = model(x, y)
            loss = -(model.prior_log_prob(z) + logdet).mean()
        loss.backward()
        res.append((z.detach(), logdet.detach(),
                    torch.cat([p.grad.flatten() for p in model.parameters()])))
    (z0, ld0, g0), (z1, ld1, g1) = res
    assert z1.dtype == z0.dtype == torch.float32 and ld1.dtype == torch.float32
    assert torch.equal(z1, z0) and torch.equal(ld1, ld0)
    # the rebuild re-enters autocast, so its conditioner outputs are the forward's (bf16 ones):
    # only fp32 rounding of the rebuilt x2 separates the gradients (without autocast: ~4e-3)
    assert (g1 - g0).norm() <= 1e-5 * g0.norm()


def test_reversible_costs_one_extra_conditioner_pass():
    """Backward rebuilds and recomputes a coupling with one conditioner pass (as block
    checkpointing recomputes it once): two passes per coupling per training step."""
    model = make("jet", "cond")
    x, y = inputs(model)
    calls = []
    for i, c in enumerate(model.couplings):
        c.conditioner.register_forward_hook(lambda *_, i=i: calls.append(i))
    n = len(model.couplings)
    for memory, per_step in [(dict(), list(range(n))),
                             (dict(checkpointing="block"), list(range(n)) + list(range(n))[::-1]),
                             (dict(reversible=True), list(range(n)) + list(range(n))[::-1])]:
        calls.clear()
        run(model, x, y, **memory)
        assert calls == per_step, memory
