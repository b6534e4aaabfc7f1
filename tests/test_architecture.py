"""The shape of the package (docs/architecture.md): no import cycles, the packages in layers
(each imports only its own group or lower layers), ``flows/`` at the ground, the old module
paths importing with a deprecation warning,
no imports hidden inside functions, nothing outside ``flows/`` touching a flow's private
methods, every CLI flag documented and the sampling flags shared by ``sample`` and ``eval
fid``."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

import transflow
from transflow.cli import build_parser

PACKAGE = Path(transflow.__file__).parent


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = (p, ast.parse(p.read_text()))
    return out


MODULES = _modules()


def _imports(name: str, path: Path, tree: ast.Module, *, top_level_only: bool = False
             ) -> set[str]:
    """The package modules ``name`` imports (``from pkg import submodule`` counts as the
    submodule, not the package)."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if
                                                                      node.module else []))
            elif node.module and node.module.split(".")[0] == "transflow":
                base = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "transflow"}
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, p, tree) for name, (p, tree) in MODULES.items()}


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_flows_import_nothing_above_them():
    leaves = {m for m, deps in GRAPH.items() if not deps and not m.startswith("transflow.cli")}
    for m, deps in GRAPH.items():
        if m.startswith("transflow.flows"):
            above = {d for d in deps if not d.startswith("transflow.flows") and d not in leaves}
            assert not above, (m, above)


#: the layers of docs/architecture.md, lowest first: a module imports only modules of its own
#: group or of a lower layer (groups on one layer do not import each other)
LAYERS = [
    {"leaves": ("transflow.atomic", "transflow.torchfile", "transflow.likelihood",
                "transflow.version", "transflow._moved")},
    {"flows": ("transflow.flows",)},
    {"shared": ("transflow.distributed", "transflow.sampling")},
    {"data": ("transflow.data",), "io": ("transflow.io",)},
    {"interop": ("transflow.interop",)},
    {"evaluation": ("transflow.evaluation",)},
    {"training": ("transflow.training",)},
    {"cli": ("transflow.cli",)},
    {"facade": ("transflow", "transflow.__main__")},
]


def _group(module: str) -> tuple[int, str]:
    best = None
    for rank, groups in enumerate(LAYERS):
        for group, prefixes in groups.items():
            for pre in prefixes:
                hit = module == pre or (module.startswith(pre + ".") and pre != "transflow")
                if hit and (best is None or len(pre) > best[0]):
                    best = (len(pre), rank, group)
    assert best is not None, f"{module} is in no layer of docs/architecture.md"
    return best[1], best[2]


def test_packages_import_only_their_own_group_or_lower_layers():
    wrong = []
    for m, deps in GRAPH.items():
        rank, group = _group(m)
        for d in deps:
            d_rank, d_group = _group(d)
            if d_group != group and d_rank >= rank:
                wrong.append(f"{m} ({group}) imports {d} ({d_group})")
    assert not wrong, wrong
    assert _group("transflow.training.trainer") == (6, "training")  # the check sees packages
    assert _group("transflow.sampling") == (2, "shared")


def test_the_root_holds_only_the_shared_modules():
    root = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert root == ["__init__", "__main__", "_moved", "atomic", "distributed", "likelihood",
                    "sampling", "torchfile", "version"]


def test_moved_modules_still_import_with_a_deprecation_warning():
    import importlib
    import sys
    import warnings

    from transflow._moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mod = importlib.import_module(old)
        assert mod is importlib.import_module(new), old
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message)
                   for w in caught), old
    # the names users imported from the old paths are still there
    with pytest.warns(DeprecationWarning):
        sys.modules.pop("transflow.train", None)
        from transflow.train import TrainConfig, Trainer, train  # noqa: F401
    with pytest.warns(DeprecationWarning):
        sys.modules.pop("transflow.evaluate", None)
        from transflow.evaluate import evaluate_bpd, per_image_bpd  # noqa: F401


def test_no_package_import_hidden_inside_a_function_or_type_check():
    for name, (path, tree) in MODULES.items():
        top = _imports(name, path, tree, top_level_only=True)
        assert GRAPH[name] <= top, (name, GRAPH[name] - top)
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                pytest.fail(f"{name}: imports under TYPE_CHECKING")


def _private_flow_methods() -> set[str]:
    names = set()
    for name, (_, tree) in MODULES.items():
        if name.startswith("transflow.flows"):
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if isinstance(item, ast.FunctionDef) and item.name.startswith("_") \
                                and not item.name.startswith("__"):
                            names.add(item.name)
    return names


def test_nothing_outside_flows_calls_a_private_method_of_a_flow():
    private = _private_flow_methods()
    assert "_checkpoint_mode" in private  # the check sees the flows' private methods
    roots = [PACKAGE, PACKAGE.parents[1] / "tests", PACKAGE.parents[1] / "benchmarks"]
    offenders = []
    for root in roots:
        for p in root.rglob("*.py"):
            if "flows" in p.relative_to(root).parts:
                continue
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in private:
                    offenders.append(f"{p.name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = sub
                out |= {f"{name} {k}": v for k, v in _subparsers(sub).items()}
    return out


COMMANDS = _subparsers(build_parser())


def test_every_flag_of_every_command_has_help_text():
    missing = [(cmd, a.option_strings or a.dest) for cmd, p in COMMANDS.items()
               for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and not a.help]
    assert not missing, missing
    time_limit = next(a for a in COMMANDS["train"]._actions if "--time-limit" in a.option_strings)
    assert "minutes" in time_limit.help


def test_sample_and_eval_fid_share_their_sampling_flags():
    def flags(cmd: str) -> dict[str, tuple]:
        return {s: (a.dest, a.default, a.type, a.help) for a in COMMANDS[cmd]._actions
                for s in a.option_strings}

    sample, fid = flags("sample"), flags("eval fid")
    from transflow.sampling import SampleOptions

    shared = ["--class", "--guidance", "--guide", "--anneal", "--attn-temp", "--formula",
              "--temperature", "--method", "--segments", "--tol", "--max-iters", "--denoise",
              "--sigma", "--denoise-steps", "--denoise-mode", "--seed", "--batch-size",
              "--compile", "--device", "--num-samples"]
    for flag in shared:
        assert flag in sample and flag in fid, flag
        if flag != "--num-samples":  # only the default count differs
            assert sample[flag] == fid[flag], flag
    assert sample["--device"][1] == "auto"
    names = {f.name for f in __import__("dataclasses").fields(SampleOptions)}
    assert {sample[f][0] for f in shared if f not in ("--device", "--num-samples")} == names


def test_both_families_share_the_flow_interface():
    import inspect

    import torch

    from transflow import Jet, TarFlow
    from transflow.flows import Guidance
    from transflow.flows.solvers import invert_tarflow

    from conftest import jet_config, perturb, tarflow_config

    for name in ("forward", "inverse", "sample", "log_prob", "invert", "plan", "units"):
        sig = {str(inspect.signature(getattr(c, name))) for c in (TarFlow, Jet)}
        if name in ("forward", "inverse", "log_prob", "sample"):
            assert len(sig) == 1, (name, sig)
    g = Guidance(1.5, attn_temp=0.7)
    torch.manual_seed(0)
    for model in (perturb(TarFlow(tarflow_config(num_classes=3)), std=0.03),
                  perturb(Jet(jet_config(num_classes=3)), std=0.03)):
        z = torch.randn(2, 1, 8, 8)
        y = torch.tensor([0, 2])
        x = model.inverse(z, y, guidance=g, attn_temp=0.9)
        assert x.shape == z.shape and torch.isfinite(x).all()
        assert not torch.equal(x, model.inverse(z, y))  # guidance and temperature act
        assert len(model.units()) == (model.config.blocks if isinstance(model, TarFlow)
                                      else model.config.couplings)
        if isinstance(model, TarFlow):  # the exact inverse is the solvers' sequential plan
            assert torch.equal(x, invert_tarflow(model, z, y, guidance=g, attn_temp=0.9)[0])


def test_presets_are_typed():
    from transflow import PRESETS
    from transflow.flows import FlowConfig
    from transflow.training.presets import Preset
    from transflow.training.recipe import TrainConfig

    for name, p in PRESETS.items():
        assert isinstance(p, Preset) and p.name == name
        assert isinstance(p.model, FlowConfig) and isinstance(p.train, TrainConfig)
    assert PRESETS["tarflow-digits"].train.lr == 5e-3
    assert PRESETS["tarflow-imagenet64"].train.epochs == 200
