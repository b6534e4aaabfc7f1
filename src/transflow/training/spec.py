"""What a training run is, resolved once: :class:`RunSpec` (model config, training config, data,
the preset it came from). The CLI and :func:`transflow.training.train` both build it here, so
both apply the same rules:

- a new run (:func:`new_run`): the preset (named, or the default for the data) with the data's
  shape and the given overrides on top; a directory that already holds a run is refused;
- a resume (:func:`resume_run`): the run's own ``config.json`` (read once) with only the
  settings of :data:`~transflow.training.recipe.RESUMABLE` changed; any other change is refused
  with one message naming every refused setting.

``config.json`` is :meth:`RunSpec.to_config`; :meth:`RunSpec.from_config` reads it back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..data.huggingface import HFOptions
from ..data.sources import ImageData, load_data
from ..flows import FAMILIES, FlowConfig
from ..io.rundir import RunDir, model_config_from
from ..version import __version__
from .presets import default_preset, fit_to_data, get_config, get_preset
from .recipe import RESUMABLE, TrainConfig, check_noise, resolve_schedule


def flag(name: str) -> str:
    """The CLI flag of a config field: ``lr`` -> ``--lr``, ``time_limit`` -> ``--time-limit``."""
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data a run trains on: the source as the user named it (``digits``, a path,
    ``hf:NAME``) and how it is read (``resize``, ``hf`` options)."""

    spec: str = "digits"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def load(self, image_size: int | None = None, channels: int | None = None,
             strict: bool = False) -> ImageData:
        return load_data(self.spec, image_size=image_size, channels=channels, strict=strict,
                         resize=self.options.get("resize", "center-crop"),
                         hf=HFOptions(**self.options.get("hf", {})))


@dataclasses.dataclass
class RunRequest:
    """What was asked for, before resolution: ``None`` / empty means "not given". ``model`` and
    ``train`` hold typed overrides of model-config and :class:`TrainConfig` fields."""

    data: str | None = None
    data_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    family: str | None = None
    preset: str | None = None
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    unconditional: bool = False
    out: str | None = None
    init_from: str | None = None


@dataclasses.dataclass
class RunSpec:
    """A resolved run: everything the :class:`~transflow.training.trainer.Trainer` needs to know
    besides the data arrays. ``train`` has its epochs resolved to steps."""

    model: FlowConfig
    train: TrainConfig
    data: DataSpec
    preset: str | None = None
    init_from: str | None = None
    resume: bool = False

    def to_config(self, data: ImageData, processes: int = 1) -> dict[str, Any]:
        """The ``config.json`` of the run (``data``: the loaded data, for its name and sizes)."""
        d: dict[str, Any] = {
            "model": self.model.to_dict(), "train": self.train.to_dict(),
            "data": {"spec": self.data.spec or data.name, "name": data.name,
                     "train_images": len(data.x_train), "test_images": len(data.x_test),
                     **({"options": self.data.options} if self.data.options else {})},
            "transflow_version": __version__}
        if self.preset:
            d["preset"] = self.preset
        if processes > 1:
            d["processes"] = processes
        return d

    @classmethod
    def from_config(cls, d: dict[str, Any], source: str) -> RunSpec:
        """The spec of a ``config.json`` (already checked by :meth:`RunDir.read_config`)."""
        try:
            train = TrainConfig.from_dict(d["train"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: bad 'train' section ({e})") from None
        return cls(model=model_config_from(d["model"], source), train=train,
                   data=DataSpec(d["data"]["spec"], d["data"].get("options", {})),
                   preset=d.get("preset"))


def complete(spec: RunSpec, data: ImageData) -> RunSpec:
    """The checks every spec passes before training: epochs resolved to steps for ``data``'s
    training set, and the training noise consistent with the model."""
    train = resolve_schedule(spec.train, len(data.x_train))
    check_noise(spec.model.noise_std, train, spec.model.marginals)
    return dataclasses.replace(spec, train=train)


# ---------------------------------------------------------------------------------------------
# a new run
# ---------------------------------------------------------------------------------------------
def new_run(request: RunRequest, data: ImageData) -> RunSpec:
    """Preset + data properties + overrides -> the spec of a new run. A named preset is taken as
    it is; the default one (``<family>-digits`` / ``<family>-small``) is fitted to the data."""
    family = request.family
    preset = request.preset
    if preset is None:
        preset = default_preset(family or "tarflow", data.name)
    chosen = get_preset(preset)
    if family and family != chosen.model.family:
        raise ValueError(f"preset {preset!r} is a {chosen.model.family} config, not {family}")
    train = _train_config(chosen.train, request.train)
    model = _model_config(request, chosen.model.family, preset, data,
                          _dequant_defaults(train.dequant, request.model, chosen.model))
    spec = RunSpec(model, train, DataSpec(request.data or "digits", request.data_options),
                   preset=preset, init_from=request.init_from)
    return complete(spec, data)


def _dequant_defaults(dequant: str, given: dict[str, Any], preset: FlowConfig
                      ) -> dict[str, Any]:
    """Model settings that follow the training noise unless given: Gaussian noise leaves the
    marginals' support [-1, 1], so they are off; uniform dequantization (the likelihood
    recipe) trains without Gaussian noise, so ``noise_std`` (and ``noise_max``) are 0."""
    if dequant == "gaussian":
        return {} if "marginals" in given else {"marginals": False}
    return {k: 0.0 for k in ("noise_std", "noise_max")
            if k not in given and getattr(preset, k, 0.0)}


def _model_config(request: RunRequest, family: str, preset: str, data: ImageData,
                  defaults: dict[str, Any]) -> FlowConfig:
    own = {f.name for f in dataclasses.fields(FAMILIES[family][0])}
    overrides: dict[str, Any] = {"image_size": data.image_size, "channels": data.channels,
                                 "num_levels": data.num_levels,
                                 "num_classes": 0 if request.unconditional else data.num_classes,
                                 **defaults}
    for name, value in request.model.items():
        if name not in own:
            raise ValueError(f"{flag(name)} is not a {family} option")
        overrides[name] = value
    if overrides["image_size"] != data.image_size:
        raise ValueError(f"--image-size {overrides['image_size']} differs from the data's "
                         f"{data.image_size}; resize image folders with --image-size at load")
    if request.preset:
        return get_config(preset, **overrides)
    return fit_to_data(preset, **overrides)


def _train_config(base: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    kw = base.to_dict() | given
    # an explicit step count replaces the preset's epochs (and warmup steps its warmup epochs)
    if "steps" in given and "epochs" not in given:
        kw["epochs"] = 0.0
    if "warmup" in given and "warmup_epochs" not in given:
        kw["warmup_epochs"] = 0.0
    return TrainConfig.from_dict(kw)


def check_new_run_dir(run: RunDir) -> None:
    """A new run never reuses a directory that holds one (its checkpoint and metrics would be
    overwritten)."""
    if run.holds_run():
        raise ValueError(f"run directory {run.path} already holds a run; use --resume "
                         f"{run.path} (resume=True) to continue it or --out to start a new one")


# ---------------------------------------------------------------------------------------------
# a resume
# ---------------------------------------------------------------------------------------------
def read_run(run: RunDir) -> RunSpec:
    """The spec a run directory was trained with (its ``config.json``, read once)."""
    return RunSpec.from_config(run.read_config(), str(run.config_path))


def resume_run(run: RunDir, request: RunRequest, saved: RunSpec | None = None) -> RunSpec:
    """The run's own spec with the resumable settings of ``request`` applied; ``ValueError``
    naming every setting that would change what the run computes."""
    saved = saved or read_run(run)
    train = saved.train.to_dict()
    refused = []
    for name, value in request.train.items():
        if name in RESUMABLE:
            train[name] = value
        elif train.get(name) != value:
            refused.append(f"{flag(name)} (the run has {train.get(name)!r})")
    refused += [f"{flag(name)} (a model option)" for name in request.model]
    for name, value in (("--preset", request.preset), ("--model", request.family),
                        ("--init-from", request.init_from), ("--out", request.out)):
        if value is not None:
            refused.append(name)
    if request.data is not None and request.data != saved.data.spec:
        refused.append(f"--data (the run trains on {saved.data.spec!r})")
    if request.unconditional:
        refused.append("--unconditional")
    if refused:
        raise ValueError(f"--resume continues {run.path} as it was configured; these cannot "
                         f"change: {', '.join(refused)} (start a new run with --out instead)")
    try:
        resumed = TrainConfig.from_dict(train)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{run.config_path}: bad 'train' section ({e})") from None
    return dataclasses.replace(saved, train=resumed, resume=True)


def changed_fields(saved: TrainConfig | FlowConfig, given: TrainConfig | FlowConfig
                   ) -> dict[str, Any]:
    """The fields of ``given`` that differ from ``saved`` (a Python resume's overrides). The
    warmup a time budget shortened is not a change."""
    old, new = saved.to_dict(), given.to_dict()
    out = {k: v for k, v in new.items() if old.get(k) != v}
    if (isinstance(saved, TrainConfig) and saved.time_limit > 0 and "warmup" in out
            and out["warmup"] >= saved.warmup):
        del out["warmup"]
    return out
