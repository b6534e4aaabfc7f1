"""Importers and exporters for the original TarFlow (apple/ml-tarflow) and Jet (big_vision) code.

Parity: the fixtures in ``../shared/fixtures`` hold outputs of the unmodified original code for
small random models; the imported models must reproduce every one of them. Round trips: a model
of ours exported to the original layout and imported back is bit-identical, and an original
checkpoint imported and exported again is bit-identical too.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

from transflow import Jet, JetConfig, TarFlow, TarFlowConfig, cli, load
from transflow.interop import (
    jet_config_from_dict,
    jet_from_bigvision,
    jet_to_bigvision,
    save_bigvision,
    save_original,
    tarflow_from_original,
    tarflow_to_original,
)
from transflow.interop.jet_bigvision import (
    CHANNEL_MASKS,
    SPATIAL_MASKS,
    bigvision_config,
    config_sidecar,
)
from transflow.interop.tarflow_original import original_config

from conftest import perturb, shared_path

TARFLOW_FIXTURES = ["tiny_uncond", "tiny_vp", "tiny_cond10"]
# guided samples need the guidance API (a separate issue); every other entry is checked here
GUIDED_PREFIXES = ("cfg_", "attn_temp_")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def tarflow_fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(shared_path(f"fixtures/tarflow-original/{name}.npz")) as f:
        return {k: f[k] for k in f.files}


def original_state_dict(data: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("state_dict/"): torch.from_numpy(v.copy())
            for k, v in data.items() if k.startswith("state_dict/")}


def original_kwargs(data: dict[str, np.ndarray]) -> dict:
    c = json.loads(str(data["config_json"]))
    return dict(patch_size=c["patch_size"], width=c["channels"], blocks=c["num_blocks"],
                layers=c["layers_per_block"], num_classes=c["num_classes"], nvp=c["nvp"])


def import_fixture(name: str) -> tuple[TarFlow, dict[str, np.ndarray]]:
    data = tarflow_fixture(name)
    return tarflow_from_original(original_state_dict(data), **original_kwargs(data)), data


def scaled_noise(model: TarFlow, noise: torch.Tensor) -> torch.Tensor:
    """The original's reverse multiplies its input by ``var.sqrt()`` first."""
    var = model.prior_var()
    return noise if var is None else noise * var.sqrt()


def close(got: torch.Tensor, want: np.ndarray | torch.Tensor, tol: float) -> None:
    want = torch.as_tensor(want)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def assert_state_dicts_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def our_tarflow(variant: str) -> TarFlow:
    """A random model of ours with the fixtures' architecture, far from the identity."""
    kw = dict(image_size=8, channels=3, patch_size=2, width=64, blocks=2, layers=2, head_dim=64)
    kw |= {"nvp": {}, "vp": dict(nvp=False), "cond": dict(num_classes=10)}[variant]
    model = perturb(TarFlow(TarFlowConfig(**kw)), std=0.02, seed=1)
    with torch.no_grad():
        if not model.config.nvp:
            g = torch.Generator().manual_seed(2)
            model.prior_var_tokens.copy_(torch.rand(model.prior_var_tokens.shape, generator=g)
                                         + 0.5)
        for block in model.blocks:
            if block.class_embed is not None:  # the original can only store the mean as null
                block.class_embed[-1] = block.class_embed[:-1].mean(0)
    return model.eval()


FIXTURE_FOR_VARIANT = {"nvp": "tiny_uncond", "vp": "tiny_vp", "cond": "tiny_cond10"}


# ---------------------------------------------------------------------------------------------
# TarFlow: parity with the original code
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TARFLOW_FIXTURES)
def test_tarflow_import_reproduces_original_outputs(name):
    model, data = import_fixture(name)
    x, noise = torch.from_numpy(data["x"]), torch.from_numpy(data["noise"])
    tags = sorted({k.split("/")[0] for k in data if "/" in k and not k.startswith("state_dict/")})
    checked = []
    for tag in tags:
        if tag.startswith(GUIDED_PREFIXES):
            continue
        assert tag in ("uncond", "cond"), f"fixture entry {tag!r} is not checked by this test"
        y = torch.from_numpy(data["y"]) if tag == "cond" else None
        z, logdet = model(x, y)
        close(z, data[f"{tag}/z"], 1e-5)
        close(logdet, data[f"{tag}/logdet"], 1e-5)
        close(model.inverse(scaled_noise(model, noise), y), data[f"{tag}/sample"], 1e-4)
        checked.append(tag)
    assert checked == (["cond", "uncond"] if model.config.num_classes else ["uncond"])
    # the outputs are not trivial: the latent differs from the input
    assert (torch.from_numpy(data["uncond/z"]) - x).abs().max() > 0.1


def test_tarflow_import_config_and_null_class():
    model, data = import_fixture("tiny_cond10")
    c = json.loads(str(data["config_json"]))
    cfg = model.config
    assert (cfg.image_size, cfg.channels, cfg.patch_size, cfg.width, cfg.blocks, cfg.layers,
            cfg.num_classes, cfg.nvp, cfg.head_dim) == (8, 3, 2, 64, 2, 2, 10, True, 64)
    assert original_config(cfg) == c
    ce = torch.from_numpy(data["state_dict/blocks.1.class_embed"])[:, 0]
    assert torch.equal(model.blocks[1].class_embed[:10], ce)
    assert torch.equal(model.blocks[1].class_embed[10], ce.mean(0))
    # labels -1 take the same (mean-class) branch as labels None
    x = torch.from_numpy(data["x"])
    z_none, _ = model(x)
    z_neg, _ = model(x, torch.full((4,), -1))
    assert torch.equal(z_none, z_neg)


def test_tarflow_vp_import_uses_the_prior_variance():
    data = tarflow_fixture("tiny_vp")
    sd = original_state_dict(data)
    var = torch.rand(16, 12, generator=torch.Generator().manual_seed(0)) + 0.5
    sd["var"] = var
    model = tarflow_from_original(sd, **original_kwargs(data))
    assert torch.equal(model.prior_var_tokens, var)
    # token t, value (c, i, j) of the unfold order is pixel (c, 2*row(t) + i, 2*col(t) + j)
    t, c, i, j = 6, 2, 1, 0
    assert model.prior_var()[c, 2 * (t // 4) + i, 2 * (t % 4) + j] == var[t, c * 4 + i * 2 + j]
    assert torch.equal(tarflow_to_original(model)["var"], var)


def test_tarflow_import_from_file_and_cli(tmp_path, capsys):
    data = tarflow_fixture("tiny_cond10")
    sd = original_state_dict(data)
    ckpt = tmp_path / "orig.pth"
    torch.save(sd, ckpt)
    from_api = tarflow_from_original(ckpt, **original_kwargs(data))
    rc = cli.main(["convert", "tarflow-original", str(ckpt), "--patch-size", "2", "--width", "64",
                   "--blocks", "2", "--layers", "2", "--classes", "10", str(tmp_path / "out")])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    from_cli = load(tmp_path / "out")
    assert_state_dicts_identical(from_api.state_dict(), from_cli.state_dict())
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    close(from_cli(x, y)[0], data["cond/z"], 1e-5)


def test_tarflow_cli_import_errors(tmp_path, capsys):
    data = tarflow_fixture("tiny_uncond")
    ckpt = tmp_path / "orig.pth"
    torch.save(original_state_dict(data), ckpt)
    base = ["convert", "tarflow-original", str(ckpt), str(tmp_path / "out")]
    assert cli.main(base + ["--patch-size", "2"]) == 2
    assert "needs --width, --blocks, --layers" in capsys.readouterr().err
    assert cli.main(base + ["--patch-size", "2", "--width", "64", "--blocks", "3",
                            "--layers", "2"]) == 2
    assert "has 2 blocks but blocks=3" in capsys.readouterr().err
    assert cli.main(base + ["--patch-size", "2", "--width", "64", "--blocks", "2",
                            "--layers", "2", "--config", "c.json"]) == 2
    assert "--config does not apply" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("change", "message"), [
    (dict(blocks=3), "has 2 blocks but blocks=3"),
    (dict(layers=1), "has 2 layers per block but layers=1"),
    (dict(width=128), "has width 64 but width=128"),
    (dict(num_classes=10), "has 0 classes but num_classes=10"),
    (dict(nvp=False), "is an NVP (affine) model but nvp=False"),
    (dict(patch_size=4), "does not divide into channels"),
])
def test_tarflow_import_rejects_wrong_architecture(change, message):
    data = tarflow_fixture("tiny_uncond")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tarflow_from_original(original_state_dict(data), **(original_kwargs(data) | change))


def test_tarflow_import_names_missing_and_misshapen_tensors():
    data = tarflow_fixture("tiny_uncond")
    kw = original_kwargs(data)
    sd = original_state_dict(data)
    del sd["blocks.1.attn_blocks.0.mlp.main.2.bias"]
    with pytest.raises(ValueError, match=r"missing tensor\(s\) 'blocks.1.attn_blocks.0.mlp.main"):
        tarflow_from_original(sd, **kw)
    sd = original_state_dict(data)
    sd["blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) 'blocks.0.extra'"):
        tarflow_from_original(sd, **kw)
    sd = original_state_dict(data)
    sd["blocks.0.attn_blocks.1.mlp.main.0.weight"] = torch.zeros(128, 64)
    with pytest.raises(ValueError, match=r"tensor 'blocks.0.attn_blocks.1.mlp.main.0.weight' has "
                                         r"shape \[128, 64\] in the file but \[256, 64\] in the "
                                         r"model"):
        tarflow_from_original(sd, **kw)


def test_tarflow_import_warns_about_non_unit_var_for_nvp():
    data = tarflow_fixture("tiny_uncond")
    sd = original_state_dict(data)
    sd["var"] = sd["var"] * 2
    with pytest.warns(UserWarning, match="'var' is not all ones"):
        tarflow_from_original(sd, **original_kwargs(data))


def test_tarflow_import_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "hacked"

    class Payload:
        def __reduce__(self):
            return os.system, (f"echo hacked > {marker}",)

    ckpt = tmp_path / "evil.pth"
    torch.save({"var": torch.ones(16, 12), "payload": Payload()}, ckpt)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        tarflow_from_original(ckpt, patch_size=2, width=64, blocks=2, layers=2)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# TarFlow: round trips through the original layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TARFLOW_FIXTURES)
def test_original_state_dict_round_trip_is_bit_identical(name):
    model, data = import_fixture(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the null class is exactly the mean: no warning
        back = tarflow_to_original(model)
    assert_state_dicts_identical(back, original_state_dict(data))


@pytest.mark.parametrize("variant", ["nvp", "vp", "cond"])
def test_tarflow_export_import_round_trip(variant):
    model = our_tarflow(variant)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = tarflow_to_original(model)
    # exactly the layout (names, order, shapes) of the original code's state dict
    fixture = tarflow_fixture(FIXTURE_FOR_VARIANT[variant])
    want = {k: tuple(v.shape) for k, v in original_state_dict(fixture).items()}
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert list(sd) == list(want)
    assert torch.equal(sd["blocks.1.attn_mask"], torch.ones(16, 16).tril())
    if model.config.nvp:
        assert torch.equal(sd["var"], torch.ones(16, 12))

    back = tarflow_from_original({k: v.clone() for k, v in sd.items()},
                                 **original_kwargs(fixture))
    assert back.config == model.config
    assert_state_dicts_identical(back.state_dict(), model.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 8, 8, generator=g)
    y = torch.tensor([0, 4, 9]) if model.config.num_classes else None
    for labels in ([None, y] if y is not None else [None]):
        z, logdet = model(x, labels)
        z2, logdet2 = back(x, labels)
        assert torch.equal(z, z2) and torch.equal(logdet, logdet2)
        assert logdet.abs().min() > 1.0 or not model.config.nvp  # far from volume-preserving
        sample = model.inverse(scaled_noise(model, noise), labels)
        assert sample.isfinite().all()
        assert torch.equal(sample, back.inverse(scaled_noise(back, noise), labels))


def test_tarflow_export_warns_when_null_class_is_not_the_mean():
    model = our_tarflow("cond")
    with torch.no_grad():
        model.blocks[0].class_embed[-1] += 0.1
    with pytest.warns(UserWarning, match="null class differs from the mean"):
        sd = tarflow_to_original(model)
    assert sd["blocks.0.class_embed"].shape == (10, 1, 64)
    assert torch.equal(sd["blocks.0.class_embed"][:, 0], model.blocks[0].class_embed[:10])


@pytest.mark.parametrize("change", [dict(final_norm=True), dict(scale="softplus"),
                                    dict(soft_clip=2.0), dict(layers=[2, 1]),
                                    dict(gelu="tanh"), dict(mix=True), dict(shift=True),
                                    dict(noise_std=0.05, noise_max=0.3)])
def test_tarflow_export_refuses_what_the_original_cannot_represent(change):
    cfg = TarFlowConfig(**(dict(image_size=8, channels=3, patch_size=2, width=64, blocks=2,
                                layers=2, head_dim=64) | change))
    with pytest.raises(ValueError, match="cannot represent"):
        tarflow_to_original(TarFlow(cfg))


def test_tarflow_cli_export(tmp_path, capsys):
    model = our_tarflow("vp")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "exported" / "model.pth"
    assert cli.main(["convert", "--to", "tarflow-original", str(tmp_path / "model"),
                     str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    assert_state_dicts_identical(sd, tarflow_to_original(model))
    assert [p.name for p in out.parent.iterdir()] == ["model.pth"]  # no temporary files left
    # exporting a TarFlow to the Jet format is a one-line error
    assert cli.main(["convert", "--to", "jet-bigvision", str(tmp_path / "model"),
                     str(tmp_path / "x.npz")]) == 2
    assert "needs a Jet" in capsys.readouterr().err
    path = save_original(model, tmp_path / "api.pth")
    assert_state_dicts_identical(torch.load(path, weights_only=True), sd)


# ---------------------------------------------------------------------------------------------
# Jet: parity with big_vision
# ---------------------------------------------------------------------------------------------
def jet_fixture() -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    config = json.loads(shared_path("fixtures/jet-bigvision/config.json").read_text())
    with np.load(shared_path("fixtures/jet-bigvision/params.npz")) as f:
        params = {k: f[k] for k in f.files}
    with np.load(shared_path("fixtures/jet-bigvision/io.npz")) as f:
        io = {k: f[k] for k in f.files}
    return config, params, io


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2)


def test_jet_import_reproduces_bigvision_outputs():
    config, params, io = jet_fixture()
    model = jet_from_bigvision(shared_path("fixtures/jet-bigvision/params.npz"), config)
    assert set(io) == {"x", "z", "logdet", "noise", "inverse"}
    z, logdet = model(nchw(io["x"]))
    close(z.permute(0, 2, 3, 1), io["z"], 1e-5)
    close(logdet, io["logdet"], 1e-5)
    inv = model.inverse(nchw(io["noise"]))
    close(inv.permute(0, 2, 3, 1), io["inverse"], 1e-4)
    # the permutations are the file's
    for i, (kind, _) in enumerate(model.config.coupling_plan()):
        mats = params[CHANNEL_MASKS if kind == "channels" else SPATIAL_MASKS]
        assert torch.equal(model.couplings[i].perm, torch.from_numpy(mats[i].argmax(0)))
    assert np.abs(io["logdet"]).min() > 1.0


def test_jet_config_from_bigvision_fields():
    config, _, _ = jet_fixture()
    cfg = jet_config_from_dict(config)
    assert (cfg.image_size, cfg.channels, cfg.patch_size, cfg.couplings, cfg.block_depth,
            cfg.width, cfg.heads) == (16, 3, 4, 5, 2, 64, 2)
    assert cfg.kinds == ["channels", "channels", "spatial"]
    assert jet_config_from_dict(bigvision_config(cfg)) == cfg
    assert jet_config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown Jet config field"):
        jet_config_from_dict(config | {"dropout": 0.1})
    with pytest.raises(ValueError, match="not 'jet'"):
        jet_config_from_dict(TarFlowConfig().to_dict())


def test_jet_cli_import(tmp_path):
    config, _, io = jet_fixture()
    npz = shared_path("fixtures/jet-bigvision/params.npz")
    # the config.json beside the parameters is found without --config
    assert cli.main(["convert", "jet-bigvision", str(npz), str(tmp_path / "a")]) == 0
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert cli.main(["convert", "jet-bigvision", str(npz), "--config", str(tmp_path / "c.json"),
                     str(tmp_path / "b")]) == 0
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert_state_dicts_identical(a.state_dict(), b.state_dict())
    close(a(nchw(io["x"]))[0].permute(0, 2, 3, 1), io["z"], 1e-5)


def test_jet_cli_import_errors(tmp_path, capsys):
    npz = tmp_path / "params.npz"
    npz.write_bytes(b"")
    assert cli.main(["convert", "jet-bigvision", str(npz), str(tmp_path / "out")]) == 2
    assert "no --config given" in capsys.readouterr().err
    assert cli.main(["convert", "jet-bigvision", str(npz), str(tmp_path / "out"),
                     "--width", "3"]) == 2
    assert "only apply to tarflow-original" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Jet: round trips through the big_vision layout
# ---------------------------------------------------------------------------------------------
def our_jet(**kw) -> Jet:
    cfg = JetConfig(**(dict(image_size=8, channels=3, patch_size=2, couplings=6, block_depth=2,
                            width=32, heads=2) | kw))
    model = perturb(Jet(cfg), seed=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for c in model.couplings:  # permutations the config's seed would not produce
            if c.kind == "channels":
                c.perm.copy_(torch.randperm(c.perm.numel(), generator=g))
    return model.eval()


def test_bigvision_round_trip_is_bit_identical():
    config, params, _ = jet_fixture()
    back = jet_to_bigvision(jet_from_bigvision(params, config))
    assert list(back) == sorted(params)
    for k, v in params.items():
        assert back[k].dtype == np.float32 and back[k].shape == v.shape, k
        assert np.array_equal(back[k], v), k


@pytest.mark.parametrize("kinds", [["channels", "channels", "spatial"], ["spatial", "channels"]])
def test_jet_export_import_round_trip(kinds):
    model = our_jet(kinds=kinds)
    params = jet_to_bigvision(model)
    for i, (kind, _) in enumerate(model.config.coupling_plan()):
        unused = SPATIAL_MASKS if kind == "channels" else CHANNEL_MASKS
        assert not params[unused][i].any()
    back = jet_from_bigvision(params, bigvision_config(model.config))
    assert_state_dicts_identical(back.state_dict(), model.state_dict())
    g = torch.Generator().manual_seed(6)
    x = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 8, 8, generator=g)
    z, logdet = model(x)
    z2, logdet2 = back(x)
    assert torch.equal(z, z2) and torch.equal(logdet, logdet2)
    assert logdet.abs().min() > 1.0
    sample = model.inverse(noise)
    assert sample.isfinite().all()
    assert torch.equal(sample, back.inverse(noise))


def test_jet_npz_files_and_cli_export(tmp_path):
    model = our_jet()
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "params.npz"
    assert cli.main(["convert", "--to", "jet-bigvision", str(tmp_path / "model"), str(out)]) == 0
    with np.load(out, allow_pickle=False) as f:
        written = {k: f[k] for k in f.files}
    want = jet_to_bigvision(model)
    assert list(written) == list(want)
    assert all(np.array_equal(written[k], want[k]) for k in want)
    sidecar = json.loads(config_sidecar(out).read_text())
    assert sidecar == bigvision_config(model.config)
    # and back through the CLI, config found beside the .npz
    assert cli.main(["convert", "jet-bigvision", str(out), str(tmp_path / "again")]) == 0
    assert_state_dicts_identical(load(tmp_path / "again").state_dict(), model.state_dict())
    path = save_bigvision(model, tmp_path / "api.npz", write_config=False)
    assert not config_sidecar(path).exists()


def test_jet_import_errors():
    config, params, _ = jet_fixture()
    wrong_kinds = config | {"kinds": ["spatial", "channels", "channels"]}
    with pytest.raises(ValueError, match="coupling 0 is not a spatial coupling"):
        jet_from_bigvision(params, wrong_kinds)
    with pytest.raises(ValueError, match=r"'couplings/dnn/posemb' has shape \[5, 1, 16, 64\] in "
                                         r"the file but \[5, 1, 4, 64\] in the model"):
        jet_from_bigvision(params, config | {"img": 8})
    missing = {k: v for k, v in params.items() if not k.endswith("encoder_norm/scale")}
    with pytest.raises(ValueError, match="missing 'couplings/dnn/vit/encoder_norm/scale'"):
        jet_from_bigvision(missing, config)
    broken = dict(params)
    broken[CHANNEL_MASKS] = params[CHANNEL_MASKS].copy()
    broken[CHANNEL_MASKS][0, 0, :] = 1.0
    with pytest.raises(ValueError, match="not a permutation matrix"):
        jet_from_bigvision(broken, config)
    with pytest.raises(ValueError, match="unconditional"):
        jet_from_bigvision(params, jet_config_from_dict(config).replace(num_classes=3))


def test_jet_export_refuses_conditional_models():
    with pytest.raises(ValueError, match="unconditional"):
        jet_to_bigvision(our_jet(num_classes=3))


@pytest.mark.parametrize("change", [dict(shift=True), dict(unit_init=True, scale_factor=4.0)])
def test_jet_export_refuses_what_big_vision_cannot_represent(change):
    with pytest.raises(ValueError, match="shifted patch grid"):
        jet_to_bigvision(our_jet(**change))
    jet_to_bigvision(our_jet(unit_init=True))  # at the paper's factor 2 there is no offset
