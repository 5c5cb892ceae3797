"""Generated source on disk and loaded as modules.

Triton's ``jit`` needs kernels in real files (a plain ``exec`` silently
computes wrong results under the interpreter), so every kernel and program
is written to a per-user cache folder and imported from there.

Safety rules, because several processes may compile at once:
- the folder is created owner-only (0700) and refused if others can write it
  (group or other write bits, or another user owns it);
- a file's name carries a hash of its content and of the versions that
  could change what it means; a file is reused only if its content hashes
  to that key, so a half-written or tampered file is rewritten, never loaded;
- writes go to a temporary file in the same folder, then ``os.replace``,
  which is atomic on POSIX: readers see the old file or the whole new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import stat
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

from retrograd.runtime.device import interpreter_mode

__all__ = ["cache_dir", "source_key", "write_source", "load_module"]

_LOADED: dict[tuple[str, bool], ModuleType] = {}


def cache_dir() -> Path:
    """``RETROGRAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/retrograd`` or ``~/.cache/retrograd``."""
    root = os.environ.get("RETROGRAD_CACHE_DIR")
    if root:
        path = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "retrograd"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    # Another user's folder is one that user can write: same refusal.
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise PermissionError(
            f"retrograd: kernel cache {path} belongs to another user (uid {info.st_uid}); "
            f"set RETROGRAD_CACHE_DIR to a folder of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"retrograd: kernel cache {path} is writable by other users; "
            f"fix it with 'chmod 700 {path}' or set RETROGRAD_CACHE_DIR")
    return path


def _versions() -> str:
    import triton  # local: the compiler face must not pay for it at import
    return f"python {sys.version_info[:3]} torch {torch.__version__} triton {triton.__version__}"


def source_key(source: str) -> str:
    return hashlib.sha256((_versions() + "\n" + source).encode()).hexdigest()[:24]


def _content_matches(path: Path, key: str) -> bool:
    try:
        return source_key(path.read_text()) == key
    except OSError:
        return False


def write_source(stem: str, source: str) -> Path:
    """Write ``source`` as ``<stem>_<key>.py`` atomically, or reuse a verified copy."""
    key = source_key(source)
    folder = cache_dir()
    path = folder / f"{stem}_{key}.py"
    if path.exists() and _content_matches(path, key):
        return path
    handle, temporary = tempfile.mkstemp(prefix=f".{stem}_", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(source)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def load_module(path: Path, interpreted: bool) -> ModuleType:
    """Import a generated file; kernels are decorated for the interpreter if asked."""
    cache_key = (str(path), interpreted)
    if cache_key in _LOADED:
        return _LOADED[cache_key]
    name = f"retrograd_generated.{path.stem}{'_interpreted' if interpreted else ''}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with interpreter_mode(interpreted):
        spec.loader.exec_module(module)
    _LOADED[cache_key] = module
    return module
