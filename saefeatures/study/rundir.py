"""A run directory: lock, manifest, metrics and per-stage caching, all written atomically.

``manifest.json`` records the config, model identity, package versions and, per stage, the key
of its inputs and its wall time; a stage whose key is unchanged and whose outputs load is skipped
on the next run (`RunDir.reuse`), one whose outputs are missing or corrupt is recomputed. What
describes only the process that opened the run (when it started, its config, machine, package
versions, timings: `VOLATILE_MANIFEST`, `VOLATILE_METRICS`) is written only once something is
computed: a command that recomputes nothing leaves manifest.json and metrics.json byte-identical. A stage
that recomputes replaces its whole section of ``metrics.json`` (the nested metrics object
documented in the README), so nothing of an older config survives beside the new numbers. One process at a
time writes a run directory: `RunDir.open` takes an exclusive lock on ``DIR/.lock`` and a second
opener fails at once, naming the holder's pid. A finished run reopens with ``readonly=True``. Under
`torchrun` rank 0 holds the lock and writes; the other ranks open it with ``follower=True``: no
lock, and their `save` writes nothing (they compute their share and hand it to rank 0).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from safetensors import SafetensorError

from ..errors import UserError
from ..files import CorruptArtifactError, json_default, read_json, remove_stale_temps, write_json

log = logging.getLogger(__name__)

PACKAGES = ("saefeatures", "torch", "transformer-lens", "sae-lens", "transformers", "numpy", "wandb")
LOCK_FILE = ".lock"
LOAD_ERRORS = (CorruptArtifactError, SafetensorError, FileNotFoundError, KeyError, ValueError)
"""What loading a missing, cut-short or malformed artifact raises: the stage is recomputed."""

VOLATILE_MANIFEST = ("started", "config", "config_path", "packages", "machine", "model", "corpus", "sae", "last_run")
"""Manifest keys every opening sets again: saved only when a stage's record or a metric changes."""
VOLATILE_METRICS = ("timings",)
"""Metrics sections of the same kind (wall times of this process)."""

T = TypeVar("T")


class RunDirError(UserError):
    """A run directory that cannot be used as asked: locked by another run, or not writable."""


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def set_nested(d: dict[str, Any], dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for k in head:
        d = d.setdefault(k, {})
    d[last] = value


def _unwritable(path: Path, e: OSError) -> RunDirError:
    return RunDirError(f"cannot write to run directory {path} ({e.strerror or e}); choose a writable --out "
                       "with free space, or open a finished run with RunDir.open(path, readonly=True) to inspect it")


@dataclass
class RunDir:
    """The run directory of one study, with its manifest and metrics."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    readonly: bool = False
    follower: bool = False
    """Another rank than 0 of a distributed run: reads the run, never writes its manifest or metrics."""
    skipped: list[str] = field(default_factory=list)
    """Stages skipped in this process (inputs unchanged, outputs load)."""
    recomputed: list[str] = field(default_factory=list)
    """Stages run in this process."""
    current: str = "open"
    """The stage last begun (what a failure is reported in)."""
    _lock_fd: int | None = field(default=None, repr=False)
    _saved: str | None = field(default=None, repr=False)
    """`_record` of what manifest.json and metrics.json hold on disk (None: unknown or unreadable)."""

    @classmethod
    def open(cls, path: Path | str, readonly: bool = False, follower: bool = False) -> "RunDir":
        """Open (creating) ``path`` for writing, locked against other runs; ``readonly`` opens an
        existing run for inspection, without a lock, and refuses to save; ``follower`` opens the
        directory rank 0 of the same distributed run holds (no lock; `save` does nothing)."""
        path = Path(path)
        if follower:
            run = cls(path, follower=True)
        elif readonly:
            if not (path / "manifest.json").is_file():
                raise RunDirError(f"{path} is not a run directory (no manifest.json)")
            run = cls(path, readonly=True)
        else:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise _unwritable(path, e) from None
            run = cls(path)
            run._lock()
            if removed := remove_stale_temps(path):
                log.info("removed %d temp files an interrupted run left in %s", removed, path)
        for name in ("manifest", "metrics"):
            f = path / f"{name}.json"
            if f.exists():
                try:
                    setattr(run, name, read_json(f))
                except CorruptArtifactError as e:
                    if readonly:
                        raise
                    log.warning("%s: every stage will be recomputed", e)
                    run.manifest, run.metrics = {}, {}
                    break
        else:
            run._saved = run._record()
        run.manifest.setdefault("stages", {})
        return run

    def _record(self) -> str:
        """Manifest and metrics without their volatile parts, as one comparable string."""
        lasting = {"manifest": {k: v for k, v in self.manifest.items() if k not in VOLATILE_MANIFEST and k != "stages"},
                   "stages": self.manifest.get("stages") or {},
                   "metrics": {k: v for k, v in self.metrics.items() if k not in VOLATILE_METRICS}}
        return json.dumps(lasting, sort_keys=True, default=json_default)

    def _lock(self) -> None:
        lock = self.path / LOCK_FILE
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _unwritable(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunDirError(f"{self.path} is in use by another saefeatures run (pid {holder}); wait for it "
                                  "to finish, or choose another --out") from None
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise _unwritable(self.path, e) from None
        self._lock_fd = fd

    def close(self) -> None:
        """Release the lock (also released when the process exits, however it ends)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save(self) -> None:
        """Write metrics, then the manifest: a stage the manifest marks done has its metrics on disk.
        Nothing is written when only volatile entries changed (see the module docstring)."""
        if self.readonly:
            raise RunDirError(f"{self.path} was opened read-only")
        if self.follower:
            return
        record = self._record()
        if record == self._saved and not self.recomputed:  # a process that computed saves its own entries too
            return
        write_json(self.path / "metrics.json", self.metrics)
        write_json(self.path / "manifest.json", self.manifest)
        self._saved = record

    def record(self, section: str, values: dict[str, Any]) -> None:
        """Merge ``values`` into metrics under the dotted ``section`` and save."""
        for k, v in values.items():
            set_nested(self.metrics, f"{section}.{k}" if section else k, v)
        self.save()

    def replace(self, section: str, values: dict[str, Any]) -> None:
        """Set the dotted ``section`` of metrics to ``values`` (dropping what was there) and save."""
        set_nested(self.metrics, section, {})
        self.record(section, values)

    def drop(self, section: str) -> None:
        """Remove the dotted ``section`` from metrics (not saved until the next write)."""
        *head, last = section.split(".")
        d = self.metrics
        for k in head:
            d = d.get(k, {})
        if isinstance(d, dict):
            d.pop(last, None)

    def is_done(self, stage: str, key: str, outputs: tuple[Path, ...] = ()) -> bool:
        entry = self.manifest["stages"].get(stage, {})
        return entry.get("key") == key and entry.get("done", False) and all(p.exists() for p in outputs)

    def reuse(self, stage: str, key: str, load: Callable[[], T]) -> T | None:
        """``load()`` of the stage's outputs when it finished with this ``key``; None when it must
        (re)run: inputs changed, never finished, or an output missing or corrupt (logged by name)."""
        if not self.is_done(stage, key):
            return None
        try:
            out = load()
        except LOAD_ERRORS as e:
            log.warning("%s: outputs unusable (%s: %s); recomputing", stage, type(e).__name__, e)
            return None
        self.skipped.append(stage)
        return out

    @contextmanager
    def stage(self, name: str, key: str = "") -> Iterator[None]:
        """Time a stage and mark it done with its input key when the block completes (it is marked
        not done on disk first, so outputs half-rewritten by an interrupted stage are never trusted).
        A stage without a key (loading the model, the SAE) records only its time, in ``timings``."""
        t0 = time.perf_counter()
        self.current = name
        if key:
            self.manifest["stages"][name] = {"key": key, "done": False}
            self.save()
        yield
        seconds = time.perf_counter() - t0
        set_nested(self.metrics, f"timings.{name}_s", round(seconds, 2))
        if key:
            self.manifest["stages"][name] = {"key": key, "done": True, "seconds": round(seconds, 2)}
            self.recomputed.append(name)
        self.save()

    def summary(self) -> str:
        """One line: the stages skipped and the stages recomputed in this process."""
        return (f"stages skipped (inputs unchanged): {', '.join(self.skipped) or 'none'}; "
                f"recomputed: {', '.join(self.recomputed) or 'none'}")
