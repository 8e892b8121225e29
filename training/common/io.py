"""Atomic files and safe checkpoints.

Every file a run writes goes through here: it is written to a temporary file in the same
folder, flushed to disk, then renamed over the target, so after a crash at any moment a
file is either its old version or its new one. Checkpoints are dicts of tensors and plain
data, loaded with ``weights_only=True`` so that a checkpoint can never run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from training.common.errors import UserError

CHECKPOINT_FORMAT_VERSION = 1


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600 files; use the usual mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically; never leaves a half-written file."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path) -> Any:
    """Read a JSON file, turning a missing or corrupt file into a ``UserError``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read JSON file {path}: {err}") from None


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Save a checkpoint dict (tensors and plain data only) atomically."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, expected_kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` on the CPU.

    Args:
        path: the ``.pt`` file.
        expected_kind: when given, the checkpoint's ``"kind"`` entry must equal it
            (``"sft_waypoint_model"`` or ``"ppo_delta_waypoint"``).

    Raises:
        UserError: the file is missing, truncated, corrupt, would need to run code to load,
            or holds another kind of checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(path):
            raise UserError(
                f"refusing to load {path}: it holds objects that would run code when loaded; "
                "only checkpoints of tensors and plain data are accepted"
            ) from None
        raise UserError(f"checkpoint {path} is not a torch checkpoint or is corrupt") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} is truncated or corrupt ({reason})") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint {path} does not hold a dict (found {type(checkpoint).__name__})")
    if expected_kind is not None:
        kind = checkpoint.get("kind")
        if kind != expected_kind:
            raise UserError(
                f"checkpoint {path} is a {kind or 'unknown'!s} checkpoint, expected {expected_kind}"
            )
    return checkpoint


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (used to tie an RL run to its SFT checkpoint)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check that files can be written there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise UserError(f"output directory {path} is not writable ({err.strerror or err})") from None
    return path
