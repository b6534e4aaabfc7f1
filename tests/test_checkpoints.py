"""The pretrained layout (config.json + model.safetensors), training runs, the Hub, load errors."""

from __future__ import annotations

import json
import os
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import transflow
from transflow import Flow, Jet, TarFlow, build
from transflow.atomic import atomic_open
from transflow.io import models as checkpoints
from transflow.io.hub import push_to_hub
from transflow.io.models import load, parse_hub_path, save_pretrained

from conftest import JET_VARIANTS, TARFLOW_VARIANTS, jet_config, perturb, tarflow_config

VARIANTS = ([("tarflow", v) for v in ("nvp", "vp-cond", "starflow-all")]
            + [("jet", v) for v in ("default", "cond")])


def make_model(family: str, variant: str, seed: int = 0) -> Flow:
    if family == "tarflow":
        model = TarFlow(tarflow_config(**TARFLOW_VARIANTS[variant]))
    else:
        model = Jet(jet_config(**JET_VARIANTS[variant]))
    perturb(model, std=0.05, seed=seed)
    if isinstance(model, TarFlow) and not model.config.nvp:
        with torch.no_grad():
            model.prior_var_tokens.uniform_(0.5, 2.0)
    return model.eval()


def identical(a: Flow, b: Flow) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def inputs(model: Flow, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, c.channels, c.image_size, c.image_size, generator=g) * 2 - 1
    y = torch.tensor([0, 1, -1]) if c.num_classes else None
    return x, y


# ---------------------------------------------------------------------------------------------
# the pretrained layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "variant"), VARIANTS)
def test_save_load_round_trip(tmp_path, family, variant):
    model = make_model(family, variant)
    out = save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == model.config.to_dict()
    tensors = load_file(out / "model.safetensors")
    assert set(tensors) == set(model.state_dict())  # buffers included
    with safe_open(out / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["model"] == family and meta["weights"] == "raw"

    loaded = transflow.load(out)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert not loaded.training
    identical(loaded, model)
    x, y = inputs(model)
    z, logdet = model(x, y)
    z2, logdet2 = loaded(x, y)
    assert torch.equal(z, z2) and torch.equal(logdet, logdet2)
    # an ordinary, trainable model: real tensors, gradients flow
    assert all(p.requires_grad and not p.is_meta for p in loaded.parameters())
    loaded.train()
    loaded.log_prob(x, y).sum().backward()
    assert all(p.grad is not None for p in loaded.parameters())


def test_buffers_are_saved_not_rebuilt(tmp_path):
    jet = make_model("jet", "default")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # permutations the config's seed would not give
        for c in jet.couplings:
            if c.kind == "channels":
                c.perm.copy_(torch.randperm(c.perm.numel(), generator=g))
    rebuilt = Jet(jet.config)
    assert any(not torch.equal(a.perm, b.perm) for a, b in zip(jet.couplings, rebuilt.couplings,
                                                          strict=True))
    jet.save_pretrained(tmp_path / "jet")
    identical(Jet.from_pretrained(tmp_path / "jet"), jet)

    vp = make_model("tarflow", "vp-cond")
    vp.save_pretrained(tmp_path / "vp")
    loaded = TarFlow.from_pretrained(tmp_path / "vp")
    assert torch.equal(loaded.prior_var_tokens, vp.prior_var_tokens)
    assert not torch.equal(loaded.prior_var_tokens, torch.ones_like(loaded.prior_var_tokens))


def test_ema_weights_are_the_saved_model(tmp_path):
    model = make_model("tarflow", "vp-cond")
    ema = {k: p.detach() + 0.25 for k, p in model.named_parameters()}  # parameters only
    save_pretrained(model, tmp_path / "m", ema_state_dict=ema)
    loaded = load(tmp_path / "m")
    for k, p in loaded.named_parameters():
        assert torch.equal(p, ema[k]), k
    assert torch.equal(loaded.prior_var_tokens, model.prior_var_tokens)  # buffers: the model's
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert f.metadata()["weights"] == "ema"
    with pytest.raises(ValueError, match=r"tensor\(s\) the model lacks: 'nope'"):
        save_pretrained(model, tmp_path / "x", ema_state_dict={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="'blocks.0.pos_embed' has shape"):
        save_pretrained(model, tmp_path / "x",
                        ema_state_dict={"blocks.0.pos_embed": torch.zeros(2)})


def test_dtype_is_kept(tmp_path):
    model = make_model("jet", "default").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    identical(loaded, model)


def test_load_accepts_the_files_and_flow_methods(tmp_path, monkeypatch):
    model = make_model("tarflow", "nvp")
    model.save_pretrained(tmp_path / "m")
    for path in (tmp_path / "m", tmp_path / "m" / "model.safetensors",
                 tmp_path / "m" / "config.json", str(tmp_path / "m")):
        identical(load(path), model)
    identical(load(tmp_path / "m", device="cpu"), model)
    identical(load(tmp_path / "m", map_location=torch.device("cpu")), model)
    assert transflow.load is load and transflow.save_pretrained is save_pretrained
    identical(Flow.from_pretrained(tmp_path / "m"), model)
    with pytest.raises(ValueError, match="holds a TarFlow model, not Jet"):
        Jet.from_pretrained(tmp_path / "m")
    # relative paths work too
    monkeypatch.chdir(tmp_path)
    identical(load("m"), model)


# ---------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------
def write_run_checkpoint(run: Path, model: Flow, ema: dict | None, name: str = "checkpoint.pt"):
    run.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters())
    torch.save({"format": 1, "step": 10, "model": model.state_dict(), "ema": ema,
                "optimizer": opt.state_dict(), "model_config": model.config.to_dict()},
               run / name)


def test_training_run_directory(tmp_path):
    model = make_model("jet", "cond")
    ema_model = make_model("jet", "cond", seed=1)
    run = tmp_path / "run"
    (run).mkdir()
    (run / "config.json").write_text(json.dumps({"model": model.config.to_dict(),
                                                 "train": {"steps": 10}}))
    write_run_checkpoint(run, model, ema_model.state_dict())
    identical(load(run), ema_model)  # unfinished run: the checkpoint's EMA weights
    identical(load(run / "checkpoint.pt"), ema_model)
    write_run_checkpoint(run, model, None)
    identical(load(run), model)  # no EMA: the raw weights
    final = make_model("jet", "cond", seed=2)
    final.save_pretrained(run / "model")
    identical(load(run), final)  # finished run: RUN/model/


def test_training_run_falls_back_to_the_previous_checkpoint(tmp_path):
    model, older = make_model("tarflow", "nvp"), make_model("tarflow", "nvp", seed=3)
    run = tmp_path / "run"
    write_run_checkpoint(run, older, None, name="checkpoint.prev.pt")
    write_run_checkpoint(run, model, None)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # killed mid-write
    with pytest.warns(UserWarning, match="loading the previous checkpoint"):
        loaded = load(run)
    identical(loaded, older)


def test_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "hacked.txt"

    class Payload:
        def __reduce__(self):
            return os.system, (f"echo hacked > {marker}",)

    model = make_model("tarflow", "nvp")
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(),
                "ema": None, "extra": Payload()}, run / "checkpoint.pt")
    # a valid previous checkpoint must not be used to paper over a malicious newest one
    write_run_checkpoint(run, model, None, name="checkpoint.prev.pt")
    for path in (run, run / "checkpoint.pt"):
        with pytest.raises(ValueError, match=r"refusing to unpickle .*checkpoint\.pt"):
            load(path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        checkpoints.read_state_dict(run / "checkpoint.pt")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# load errors: one clear sentence each
# ---------------------------------------------------------------------------------------------
def saved(tmp_path: Path, family: str = "tarflow", **kw) -> Path:
    model = (TarFlow(tarflow_config(**kw)) if family == "tarflow" else Jet(jet_config(**kw)))
    return save_pretrained(model, tmp_path / f"{family}-{len(list(tmp_path.iterdir()))}")


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a pretrained model directory"):
        load(tmp_path / "empty")
    d = saved(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has config.json but no model.safetensors"):
        load(d)
    d = saved(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match="has model.safetensors but no config.json"):
        load(d)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a model file transflow can load"):
        load(tmp_path / "notes.txt")


def test_foreign_or_invalid_config(tmp_path):
    d = saved(tmp_path)
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(ValueError, match=r"config.json is not a transflow config"):
        load(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load(d)
    (d / "config.json").write_text(json.dumps({"model": "tarflow", "widht": 3}))
    with pytest.raises(ValueError, match="not a valid tarflow config: unknown tarflow config "
                                         "field"):
        load(d)


def test_checkpoint_of_another_architecture(tmp_path):
    d = saved(tmp_path)  # a TarFlow's tensors ...
    (d / "config.json").write_text(jet_config().to_json())  # ... under a Jet config
    with pytest.raises(ValueError, match=r"does not match the model: missing tensor\(s\) "
                                         r"'couplings.0.perm'.*unexpected tensor\(s\) "
                                         r"'blocks\.0\."):
        load(d)


def test_checkpoint_of_another_shape(tmp_path):
    small, big = saved(tmp_path, width=32), saved(tmp_path, width=64)
    (small / "config.json").write_text((big / "config.json").read_text())
    with pytest.raises(ValueError) as e:
        load(small)
    assert str(e.value) == (f"{small / 'model.safetensors'}: tensor 'blocks.0.pos_embed' has "
                            "shape [16, 32] in the file but [16, 64] in the model")


def test_unexpected_tensor_is_named(tmp_path):
    d = saved(tmp_path, "jet")
    tensors = load_file(d / "model.safetensors")
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) 'extra.weight'"):
        load(d)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path, damage):
    d = saved(tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 1000,
                   "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file"):
        load(d)


def test_corrupt_torch_checkpoint(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"garbage\.pt is not a readable PyTorch checkpoint"):
        load(tmp_path / "garbage.pt")
    run = tmp_path / "run"
    write_run_checkpoint(run, make_model("jet", "default"), None)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"checkpoint\.pt is not a readable PyTorch checkpoint"):
        load(run)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="is not a transflow training checkpoint"):
        load(tmp_path / "bare.pt")


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------
def test_failed_save_keeps_the_previous_files(tmp_path, monkeypatch):
    import safetensors.torch

    old = make_model("tarflow", "nvp")
    d = save_pretrained(old, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(make_model("tarflow", "nvp", seed=5), d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # no partial or temp files
    identical(load(d), old)


def test_atomic_open(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as f:
        f.write("new, half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    with atomic_open(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]


def test_overwriting_a_pretrained_directory(tmp_path):
    save_pretrained(make_model("tarflow", "nvp"), tmp_path / "m")
    jet = make_model("jet", "default")
    save_pretrained(jet, tmp_path / "m")
    identical(load(tmp_path / "m"), jet)
    # a loaded model's tensors are memory-mapped from the file: saving it over that very file
    # must not corrupt it (the new file replaces the old one, which stays alive for the map)
    loaded = load(tmp_path / "m")
    with torch.no_grad():
        loaded.couplings[0].conditioner.proj_in.weight.add_(1.0)
    save_pretrained(loaded, tmp_path / "m")
    again = load(tmp_path / "m")
    identical(again, loaded)
    assert not torch.equal(again.couplings[0].conditioner.proj_in.weight,
                           jet.couplings[0].conditioner.proj_in.weight)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        save_pretrained(jet, tmp_path / "file")


# ---------------------------------------------------------------------------------------------
# the Hugging Face Hub (no network: the library is replaced by a fake)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ref", "want"), [
    ("hf://owner/name", ("owner/name", None)),
    ("hf://owner/name/", ("owner/name", None)),
    ("hub:owner/name", ("owner/name", None)),
    ("hf://apple/tarflow-afhq@v1.0", ("apple/tarflow-afhq", "v1.0")),
    ("hub:a-b/c_d.e@refs/pr/1", ("a-b/c_d.e", "refs/pr/1")),
    ("runs/owner/name", None),
    ("owner/name", None),
])
def test_parse_hub_path(ref, want):
    assert parse_hub_path(ref) == want


@pytest.mark.parametrize("ref", ["hf://name-only", "hf://a/b/c", "hub:", "hf://a b/c",
                                 "hf://a/b@"])
def test_parse_hub_path_rejects_malformed_references(ref):
    with pytest.raises(ValueError, match="is not a Hub reference"):
        parse_hub_path(ref)


def test_missing_hub_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'transflow\[hub\]'"):
        load("hf://owner/name")
    with pytest.raises(ImportError, match=r"pip install 'transflow\[hub\]'"):
        push_to_hub(make_model("jet", "default"), "owner/name")


def test_hub_download_and_upload_with_a_fake_library(tmp_path, monkeypatch):
    model = make_model("tarflow", "vp-cond")
    calls = _fake_hub(monkeypatch, tmp_path / "remote")

    url = push_to_hub(model, "me/flow", private=True, token="t")
    assert url.endswith("/commit/main")
    assert calls["create"] == ("me/flow", True, True) and calls["token"] == "t"
    assert calls["uploads"][-1][2] == ["README.md", "config.json", "model.safetensors"]
    assert "library_name: transflow" in (tmp_path / "remote" / "me__flow" / "main" /
                                         "README.md").read_text()

    loaded = load("hf://me/flow@main")
    assert calls["downloads"][-1] == ("me/flow", "main", ["config.json", "model.safetensors"])
    identical(loaded, model)
    with pytest.raises(ValueError, match="not a Hub repo id"):
        push_to_hub(model, "me/flow@main")


def test_flows_do_not_import_file_handling_at_import_time():
    code = ("import sys, transflow.flows; "
            "bad = [m for m in ('safetensors', 'huggingface_hub', 'transflow.interop') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_save_refuses_non_flows(tmp_path):
    with pytest.raises(ValueError, match="expected a transflow Flow model"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "m")  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_pretrained(build(tarflow_config()), tmp_path / "ok")


def _fake_hub(monkeypatch, remote_root: Path) -> dict:
    """A stand-in for huggingface_hub keeping uploads per (repo, revision) under
    ``remote_root``: no network."""
    import shutil

    calls: dict = {"uploads": [], "downloads": [], "branches": []}

    def where(repo_id, revision):
        return remote_root / repo_id.replace("/", "__") / (revision or "main")

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls["downloads"].append((repo_id, revision, allow_patterns))
        d = where(repo_id, revision)
        if not d.exists():
            raise FileNotFoundError(f"404 Client Error: repository {repo_id} not found")
        return str(d)

    class HfApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def create_branch(self, repo_id, branch, exist_ok=False):
            calls["branches"].append((repo_id, branch))

        def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
            calls["uploads"].append((repo_id, revision, sorted(os.listdir(folder_path)),
                                     commit_message))
            shutil.copytree(folder_path, where(repo_id, revision), dirs_exist_ok=True)
            return f"https://huggingface.co/{repo_id}/commit/{revision or 'main'}"

    fake = types.ModuleType("huggingface_hub")
    fake.snapshot_download = snapshot_download
    fake.HfApi = HfApi
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    return calls


def test_push_a_run_from_the_cli_and_load_a_bare_repo_id(tmp_path, monkeypatch, capsys):
    from transflow import TarFlow
    from transflow.cli import main

    calls = _fake_hub(monkeypatch, tmp_path / "hub")
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "3", "--eval-images", "20",
                 "--width", "32", "--blocks", "2", "--layers", "1", "--head-dim", "16",
                 "--no-progress"]) == 0
    assert main(["push", str(run), "me/digits-flow", "--revision", "v1", "--private"]) == 0
    assert "pushed" in capsys.readouterr().out
    repo, revision, files, _ = calls["uploads"][-1]
    assert (repo, revision) == ("me/digits-flow", "v1")
    assert calls["branches"] == [("me/digits-flow", "v1")]
    assert files == ["README.md", "config.json", "model.safetensors", "samples.png"]
    assert calls["create"] == ("me/digits-flow", True, True)
    card = (tmp_path / "hub" / "me__digits-flow" / "v1" / "README.md").read_text()
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for needle in ("library_name: transflow", '"model": "tarflow"', '"width": 32', "`digits`",
                   "steps: 3", f"final test bits/dim: {final['test_bpd']:.4f}",
                   "D log(2/K)", "![samples](samples.png)", 'transflow.load("me/digits-flow")'):
        assert needle in card, needle
    # a bare repo id (no such local path) and a revision: the Hub copy, equal to the run's model
    monkeypatch.chdir(tmp_path)
    back = load("me/digits-flow", revision="v1")
    assert calls["downloads"][-1] == ("me/digits-flow", "v1", ["config.json", "model.safetensors"])
    identical(back, load(run))
    bf16 = TarFlow.from_pretrained("hf://me/digits-flow@v1", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with pytest.raises(ValueError, match="no such local path; could not download"):
        load("me/missing")
    with pytest.raises(ValueError, match="names revision 'v1' but revision='v2'"):
        load("hf://me/digits-flow@v1", revision="v2")
    with pytest.raises(ValueError, match="applies to Hub repositories"):
        load(run, revision="v1")
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        load(run, dtype=torch.int8)
    # from a model directory (not a run): no training section, no sample grid
    assert main(["push", str(run / "model"), "me/bare"]) == 0
    assert calls["uploads"][-1][:3] == ("me/bare", None, ["README.md", "config.json",
                                                          "model.safetensors"])
    assert "Not recorded" in (tmp_path / "hub" / "me__bare" / "main" / "README.md").read_text()
