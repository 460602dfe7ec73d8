"""Files written atomically and checked when read back: the one home of every artifact write.

A write goes to a uniquely named temp file beside its target (``.NAME.XXXX.tmp``), is fsynced and
then renamed over the target, so a reader, a crash or a second writer never sees a torn file and
two writers never share a temp name. A failed write removes its temp file and raises
`ArtifactWriteError` naming the path. Reading back, a truncated or malformed JSON or safetensors
file raises `CorruptArtifactError` naming it, so callers recompute instead of loading it silently.

Example:
    >>> write_json(Path("runs/x/metrics.json"), {"dense": {"auroc": 0.6}})
    >>> read_json(Path("runs/x/metrics.json"))["dense"]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from .errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class ArtifactWriteError(UserError):
    """An output file could not be written (read-only or full directory, ...)."""


class CorruptArtifactError(UserError):
    """An artifact on disk is truncated or malformed."""


def json_default(o: Any) -> Any:
    """JSON for tensors and arrays (as lists) and paths (as strings)."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A unique temp path beside ``path`` to write to; on success it is fsynced and renamed onto
    ``path``, on failure removed."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise ArtifactWriteError(f"cannot write {path}: {e.strerror or e}; make {path.parent} writable "
                                 "(with free space) or choose another output directory") from e
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # the mode a plain open() gives, not mkstemp's 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ArtifactWriteError(f"cannot write {path}: {e.strerror or e}; make {path.parent} writable "
                                 "(with free space) or choose another output directory") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """A fresh temp directory beside ``path`` to fill; on success it replaces ``path`` (a reader sees the
    old directory or the new one, never a half-written one), on failure it is removed.

    Example:
        >>> with atomic_dir("runs/sae/shipped") as tmp:
        ...     save_file(weights, tmp / "sae_weights.safetensors")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically (tensors and arrays as lists)."""
    write_text(path, json.dumps(obj, indent=indent, default=json_default))


def save_safetensors(path: Path | str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors atomically."""
    from safetensors.torch import save_file  # torch only where tensors are: reading JSON needs none

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_json(path: Path | str) -> Any:
    """Parse a JSON file; a cut-short or malformed one raises `CorruptArtifactError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptArtifactError(f"{path} is corrupt ({e}); delete it or rerun the stage that writes it") from e


def load_safetensors(path: Path | str, framework: str = "pt") -> dict[str, Any]:
    """Load a safetensors file as torch tensors (``framework="np"``: numpy arrays, without importing
    torch); a truncated or malformed one raises `CorruptArtifactError` naming it."""
    path = Path(path)
    if framework == "np":
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CorruptArtifactError(f"{path} is corrupt ({e}); delete it or rerun the stage that writes it") from e


def remove_stale_temps(root: Path) -> int:
    """Delete temp files a killed writer left under ``root`` (only while no writer runs there)."""
    n = 0
    for tmp in root.rglob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def save_figure(path: Path | str, fig: Any, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure atomically (format from the suffix of ``path``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), **savefig_kwargs)
