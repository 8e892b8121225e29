"""Your model, your architecture: any SFT model behind the one interface the RL stage reads.

What the RL stage needs from a supervised model, for a batch of observations exactly as an
environment returns them (``bev`` uint8 ``[B, C, H, W]`` with values 0..255, ``state`` float32
``[B, S]``, the raw ego state), is the feature ``z`` float ``[B, D]`` its heads read and the plan
``waypoints`` float ``[B, K, 2]`` (metres, ego frame, x forward, y left). A module offers them in
either of two ways, and normalises its inputs itself:

* ``encode(bev, state) -> z`` and ``head(z) -> waypoints`` (as ``WaypointModel`` does), or
* ``forward(bev, state) -> (z, waypoints)``.

The three commands read it from ``--sft-checkpoint`` in one of four forms (:func:`read_sft`):

* this project's ``model.pt`` (``kind: "sft_waypoint_model"``);
* with ``--sft-model MODULE:FACTORY``: a plain ``state_dict`` file of the module ``FACTORY()``
  returns (``MODULE`` importable from the working folder or ``PYTHONPATH``), loaded with
  ``weights_only=True``; the SFT trainer with ``--sft-model`` writes such a file;
* a ``torch.export`` archive (``torch.export.save``, ``.pt2``) or a TorchScript file
  (``torch.jit.save``) whose ``forward`` returns ``(z, waypoints)``: programs that carry their
  architecture, so no ``--sft-model``. Export in eval mode with a dynamic batch dimension.

Before anything runs, :func:`adapt_to_spec` passes dummy batches shaped like the environment's
observations through the model and checks ``z`` and ``waypoints`` against the environment's spec;
a mismatch ends the command with one line. A model of another architecture is then wrapped in
:class:`ExternalSFTModel`, which gives it ``WaypointModel``'s interface (``feature_dim``,
``num_waypoints``, ``frozen_features``, and ``forward`` returning the plan).
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from training.common.errors import UserError
from training.common.io import load_checkpoint
from training.envs.protocol import EnvSpec
from training.sft.model import SFT_CHECKPOINT_KIND, WaypointModel, model_from_checkpoint

# Batch sizes of the shape check; two of them, so that a model traced or exported with a fixed
# batch size fails here and not in the middle of a run.
DUMMY_BATCH_SIZES = (2, 3)
_PROGRAM_LABELS = {"torchscript": "TorchScript", "export": "torch.export"}
_MAX_REASON_CHARS = 240


class ExternalSFTModel(nn.Module):
    """A module of any architecture behind ``WaypointModel``'s interface (built by :func:`adapt_to_spec`).

    Attributes:
        module: the wrapped module; its weights sit under ``module.`` in this one's state dict.
        feature_dim: D, the size of ``z``, read from the module's output on the dummy batch.
        num_waypoints: K.
        split: the module has ``encode`` and ``head`` (else ``forward`` returns both).
        fixed_mode: the module cannot change its train/eval mode (a ``torch.export`` program).
    """

    def __init__(
        self, module: nn.Module, feature_dim: int, num_waypoints: int, fixed_mode: bool = False
    ) -> None:
        super().__init__()
        self.module = module
        self.feature_dim = int(feature_dim)
        self.num_waypoints = int(num_waypoints)
        self.split = has_encode_and_head(module)
        self.fixed_mode = fixed_mode

    def features(self, bev: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """``(z [B, D], waypoints [B, K, 2] metres)`` with autograd (what the SFT trainer fits)."""
        z, waypoints = raw_outputs(self.module, self.split, bev, state)
        return z, waypoints

    def forward(self, bev: Tensor, state: Tensor) -> Tensor:
        """Waypoints ``[B, K, 2]`` in metres, ego frame: the plan the SFT policy drives."""
        return self.features(bev, state)[1]

    def frozen_features(self, bev: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """``(z [B, D], waypoints [B, K, 2])`` float32 for a frozen model, as ``WaypointModel``'s:
        in inference mode, cloned out of it. No autocast: the model runs in its own precision."""
        with torch.inference_mode():
            z, waypoints = self.features(bev, state)
        return z.float().clone(), waypoints.float().clone()

    def train(self, mode: bool = True) -> ExternalSFTModel:
        """Set the mode; an exported program keeps the mode it was exported in (it has no other)."""
        self.training = mode
        if not self.fixed_mode:
            self.module.train(mode)
        return self


def has_encode_and_head(module: nn.Module) -> bool:
    """Whether ``module`` offers ``encode`` and ``head``; otherwise its ``forward`` returns both."""
    return callable(getattr(module, "encode", None)) and callable(getattr(module, "head", None))


def raw_outputs(module: nn.Module, split: bool, bev: Tensor, state: Tensor) -> Any:
    """What the module returns for ``(bev, state)``: ``(z, head(z))`` or ``forward``'s result, unchecked."""
    if split:
        z = module.encode(bev, state)
        return z, module.head(z)
    return module(bev, state)


# --- the shape check --------------------------------------------------------------------------------


def adapt_to_spec(
    module: nn.Module, spec: EnvSpec, name: str, fixed_mode: bool = False
) -> WaypointModel | ExternalSFTModel:
    """Check ``module`` against ``spec`` on dummy batches; return it behind the project's interface.

    A ``WaypointModel`` comes back as it is, any other module wrapped in :class:`ExternalSFTModel`.
    The module's train/eval mode is left as it was.

    Args:
        name: how the one-line errors name the model (its file, or ``--sft-model``).
        fixed_mode: the module cannot switch to eval mode (a ``torch.export`` program).

    Raises:
        UserError: the module fails on the batch, does not return ``(z, waypoints)``, ``z`` is not
            2-D ``[B, D]`` float, or ``waypoints`` is not ``[B, K, 2]`` with the environment's ``K``.
    """
    split = has_encode_and_head(module)
    was_training = module.training
    if not fixed_mode:
        module.eval()
    try:
        feature_dims = {_check_batch(module, split, spec, name, batch) for batch in DUMMY_BATCH_SIZES}
    finally:
        if not fixed_mode:
            module.train(was_training)
    if len(feature_dims) > 1:
        raise UserError(
            f"SFT model {name}: the size of z changes with the batch size ({sorted(feature_dims)})"
        )
    if isinstance(module, WaypointModel):
        return module
    return ExternalSFTModel(module, feature_dims.pop(), spec.num_waypoints, fixed_mode)


def dummy_observation(spec: EnvSpec, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """All-zero ``(bev uint8 [batch, C, H, W], state float32 [batch, S])`` shaped by ``spec``."""
    bev = torch.zeros((batch, *spec.bev_shape), dtype=torch.uint8, device=device)
    return bev, torch.zeros((batch, spec.state_dim), dtype=torch.float32, device=device)


def _check_batch(module: nn.Module, split: bool, spec: EnvSpec, name: str, batch: int) -> int:
    """Run one dummy batch of ``batch`` observations and check the outputs; returns D."""
    bev, state = dummy_observation(spec, batch, module_device(module))
    observed = f"bev uint8 {list(bev.shape)}, state float32 {list(state.shape)}"
    try:
        with torch.inference_mode():
            outputs = raw_outputs(module, split, bev, state)
    except Exception as err:  # the user's code: any failure becomes one line naming the shapes
        hint = "; does it fix the batch size? trace or export it with a dynamic batch" if batch > 2 else ""
        raise UserError(
            f"SFT model {name} fails on this environment's observations ({observed}): {describe(err)}{hint}"
        ) from None
    if not (isinstance(outputs, tuple | list) and len(outputs) == 2 and all(map(torch.is_tensor, outputs))):
        raise UserError(
            f"SFT model {name}: forward(bev, state) must return (z [B, D], waypoints [B, K, 2]) "
            f"or the module must have encode and head; it returned {_describe_value(outputs)}"
        )
    z, waypoints = outputs
    if z.dim() != 2 or z.shape[0] != batch or not z.is_floating_point():
        raise UserError(
            f"SFT model {name}: z must be 2-D float [B, D], got {_describe_value(z)} for a batch of {batch}"
        )
    if list(waypoints.shape) != [batch, spec.num_waypoints, 2] or not waypoints.is_floating_point():
        raise UserError(
            f"SFT model {name} returns waypoints {_describe_value(waypoints)} for a batch of {batch}; "
            f"the environment takes float [B, K, 2] with K = {spec.num_waypoints} waypoints"
        )
    return int(z.shape[1])


def check_recorded_spec(recorded: dict[str, Any], spec: EnvSpec, path: str) -> None:
    """A project checkpoint's recorded world must be this environment's (observations, waypoint count)."""
    bev_shape = recorded.get("bev_shape")
    checks = (
        ("BEV shape", None if bev_shape is None else list(bev_shape), list(spec.bev_shape)),
        ("ego state size", recorded.get("state_dim"), spec.state_dim),
        ("waypoint count", recorded.get("num_waypoints"), spec.num_waypoints),
    )
    for what, model_value, env_value in checks:  # what was not recorded, the dummy batch checks
        if model_value is not None and model_value != env_value:
            raise UserError(
                f"SFT checkpoint {path} was trained for {what} {model_value}, the environment has {env_value}"
            )


# --- reading --sft-checkpoint and --sft-model -------------------------------------------------------


@dataclass
class SFTSource:
    """A ``--sft-checkpoint`` (and its ``--sft-model``) read as a file, before any environment exists.

    ``kind``: ``"project"`` (this project's ``model.pt``), ``"state_dict"`` (with ``--sft-model``),
    ``"torchscript"`` or ``"export"``.
    """

    path: str
    module: nn.Module  # on the requested device, in eval mode
    kind: str
    sft_model: str | None = None  # the MODULE:FACTORY that built a state_dict's module
    recorded_spec: dict[str, Any] | None = None  # the world a project checkpoint was trained in

    @property
    def name(self) -> str:
        return self.path if self.sft_model is None else f"{self.sft_model} ({self.path})"

    def for_env(self, spec: EnvSpec) -> WaypointModel | ExternalSFTModel:
        """The model checked against ``spec`` (:func:`adapt_to_spec`), ready for ``PPOPolicy``."""
        if self.recorded_spec is not None:
            check_recorded_spec(self.recorded_spec, spec, self.path)
        return adapt_to_spec(self.module, spec, self.name, fixed_mode=self.kind == "export")


def read_sft(
    checkpoint: str | Path,
    sft_model: str | None,
    device: torch.device | str = "cpu",
    default_sft_model: str | None = None,
) -> SFTSource:
    """Read ``--sft-checkpoint`` in any of the forms of this module's docstring.

    Args:
        sft_model: ``--sft-model MODULE:FACTORY``; only with a plain state_dict file.
        default_sft_model: the factory to use for a state_dict file when ``sft_model`` is None
            (the comparison passes the one the RL run recorded).

    Raises:
        UserError: the file is missing, corrupt, unsafe or of another kind, or does not go with
            ``--sft-model`` (one given for a file that names its architecture, or none for a
            state_dict), or the factory cannot build a module its weights fit.
    """
    path, device = Path(checkpoint), torch.device(device)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    program = program_kind(path)
    if program is not None:
        _refuse_factory(path, f"a {_PROGRAM_LABELS[program]} file", sft_model)
        return SFTSource(str(path), load_program(path, program, device), program)
    data = load_checkpoint(path)  # weights_only=True
    if data.get("kind") == SFT_CHECKPOINT_KIND:
        _refuse_factory(path, "this project's SFT checkpoint", sft_model)
        model = model_from_checkpoint(data, source=str(path)).to(device)
        return SFTSource(str(path), model, "project", recorded_spec=data.get("env_spec"))
    factory = sft_model or default_sft_model
    if not is_state_dict(data):
        kind = data.get("kind") or "unknown"
        raise UserError(
            f"checkpoint {path} is a {kind} checkpoint, expected {SFT_CHECKPOINT_KIND}, a state_dict "
            "with --sft-model MODULE:FACTORY, or a torch.export or TorchScript file"
        )
    if factory is None:
        raise UserError(
            f"{path} holds a plain state_dict: name the architecture it belongs to with "
            "--sft-model MODULE:FACTORY"
        )
    module = build_from_factory(factory)
    try:
        module.load_state_dict(data, strict=True)
    except RuntimeError as err:
        reason = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])
        raise UserError(f"{path} does not fit --sft-model {factory} ({reason[:_MAX_REASON_CHARS]})") from None
    return SFTSource(str(path), module.to(device).eval(), "state_dict", sft_model=factory)


def _refuse_factory(path: Path, what: str, sft_model: str | None) -> None:
    if sft_model is not None:
        raise UserError(
            f"{path} is {what}, which holds its architecture itself: drop --sft-model {sft_model} "
            "(--sft-model goes with a plain state_dict file)"
        )


def is_state_dict(data: dict[str, Any]) -> bool:
    """A non-empty dict of named tensors, as ``module.state_dict()`` returns."""
    return bool(data) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items())


def program_kind(path: Path) -> str | None:
    """``"export"`` or ``"torchscript"`` when ``path`` is such an archive, else None.

    Told by content: both are zip archives, like ``torch.save`` files, but a TorchScript archive
    holds ``code/`` and ``constants``, a ``torch.export`` archive ``archive_format`` and ``models/``.
    """
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            inner = [name.split("/", 1)[-1] for name in archive.namelist()]
    except (zipfile.BadZipFile, OSError):
        return None
    if "archive_format" in inner or any(name.startswith("models/") for name in inner):
        return "export"
    if "constants.pkl" in inner or any(name.startswith("code/") for name in inner):
        return "torchscript"
    return None


def load_program(path: Path, kind: str, device: torch.device) -> nn.Module:
    """The module of a TorchScript (``kind="torchscript"``) or ``torch.export`` archive on ``device``."""
    try:
        if kind == "torchscript":
            with warnings.catch_warnings():  # torch.jit is deprecated, its files still load
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location=device).eval()
        with path.open("rb") as handle:  # a handle: torch.export.load wants a .pt2 name otherwise
            program = torch.export.load(handle)
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        return program.module()
    except Exception as err:  # torch raises many kinds on a damaged archive
        raise UserError(f"cannot load {_PROGRAM_LABELS[kind]} file {path} ({describe(err)})") from None


# --- --sft-model MODULE:FACTORY ---------------------------------------------------------------------


def parse_factory_spec(spec: str) -> tuple[str, str]:
    """``"pkg.module:factory"`` -> ``("pkg.module", "factory")``; ``UserError`` when malformed."""
    module_name, sep, attr = spec.partition(":")
    dotted = (module_name, attr)
    if not sep or not all(part.isidentifier() for name in dotted for part in name.split(".")):
        raise UserError(
            f"--sft-model must be MODULE:FACTORY, e.g. my_models.driving:build_model; got {spec!r}"
        )
    return module_name, attr


def resolve_factory(spec: str) -> Callable[[], Any]:
    """Import ``MODULE`` and return its ``FACTORY`` (a dotted path inside the module is allowed).

    The working folder is searched too (appended to ``sys.path``), so ``--sft-model`` works the
    same from the console scripts as from ``python -m``.

    Raises:
        UserError: the module cannot be imported, lacks the attribute, or it is not callable.
    """
    module_name, attr = parse_factory_spec(spec)
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name + ".").startswith(err.name + "."):
            raise UserError(
                f"--sft-model {spec}: no module named {err.name!r} (run from the folder that holds it "
                "or add that folder to PYTHONPATH)"
            ) from None
        raise UserError(f"--sft-model {spec}: importing {module_name} failed ({describe(err)})") from None
    except Exception as err:  # the user's module: a syntax error or an exception while importing
        raise UserError(f"--sft-model {spec}: importing {module_name} failed ({describe(err)})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"--sft-model {spec}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(
            f"--sft-model {spec}: {attr} is not callable (type {type(target).__name__}); it must be a "
            "function or class that returns a torch.nn.Module"
        )
    return target


def build_from_factory(spec: str) -> nn.Module:
    """``FACTORY()`` of ``--sft-model MODULE:FACTORY``; ``UserError`` unless it returns an ``nn.Module``."""
    factory = resolve_factory(spec)
    try:
        module = factory()
    except Exception as err:  # the user's factory
        raise UserError(f"--sft-model {spec}: calling it failed ({describe(err)})") from None
    if not isinstance(module, nn.Module):
        raise UserError(f"--sft-model {spec} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


# --- small helpers ----------------------------------------------------------------------------------


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU for a module without any)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def describe(err: BaseException) -> str:
    """``"TypeName: first line of the message"``, shortened to fit in one line of an error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def _describe_value(value: Any) -> str:
    if torch.is_tensor(value):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    if isinstance(value, tuple | list):
        return (
            f"a {type(value).__name__} of {len(value)} ({', '.join(_describe_value(v) for v in value[:3])})"
        )
    return f"a {type(value).__name__}"


__all__ = [
    "DUMMY_BATCH_SIZES",
    "ExternalSFTModel",
    "SFTSource",
    "adapt_to_spec",
    "build_from_factory",
    "check_recorded_spec",
    "parse_factory_spec",
    "read_sft",
    "resolve_factory",
]
