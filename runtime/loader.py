"""Generated source on disk and loaded as modules.

Triton's ``jit`` needs a kernel's source to be findable by ``inspect`` (a
plain ``exec`` of a string silently computes wrong results under the
interpreter), so every kernel and program is written to a per-user cache
folder, and the verified text is registered in ``linecache`` under that
file's name before it is compiled.

Safety rules, because several processes may compile at once and the folder
is a place code is loaded from:
- the folder is created owner-only (0700) and refused if others can write it
  (group or other write bits, or another user owns it);
- a file's name carries a hash of its content and of the versions that
  could change what it means. A file is read once, without following a
  link, and reused only if it is a regular file of ours that no one else
  can write and its bytes hash to that key; anything else (tampered,
  truncated, not UTF-8, a link, another user's) is rebuilt, never loaded
  and never an error;
- what runs is compiled by us from those verified bytes: no bytecode is
  written and any ``__pycache__`` found is ignored, so an altered ``.pyc``
  cannot bypass the check;
- writes go to a temporary file in the same folder, then ``os.replace``,
  which is atomic on POSIX: readers see the old file or the whole new one.

Bounds, for long runs: a loaded module lives while a program uses it, then
it and what Triton and ``linecache`` keep of it are released (releases.py);
``_WRITTEN`` keeps the latest ``WRITTEN_MAX`` sources; the folder has a
size cap with least recently used eviction (disk_cache.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
import stat
import sys
import tempfile
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from types import ModuleType

import torch
from retrograd.runtime import disk_cache
from retrograd.runtime.device import interpreter_mode
from retrograd.runtime.disk_cache import ours_alone
from retrograd.runtime.releases import forget_released, handle

__all__ = ["cache_dir", "load_module", "ours_alone", "source_key", "write_source"]

#: (path, interpreted) -> the module's handle while it is alive (releases.py)
_LOADED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
#: path -> the source this process wrote or verified there, latest WRITTEN_MAX only
_WRITTEN: OrderedDict[str, str] = OrderedDict()
WRITTEN_MAX = 512
_LOCK = threading.RLock()   # _LOADED, _WRITTEN, linecache entries of ours
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


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


def _read_trusted(path: Path, size: int | None = None) -> str | None:
    """The file's text if it is trusted and UTF-8, read once without following a
    link; ``None`` for anything else (missing, a link, a FIFO, another user's,
    not exactly ``size`` bytes long when ``size`` is given, not UTF-8)."""
    try:
        handle = os.open(path, _READ_FLAGS)
    except OSError:
        return None
    try:
        info = os.fstat(handle)
        if not ours_alone(info) or (size is not None and info.st_size != size):
            return None
        with os.fdopen(handle, "rb", closefd=False) as file:
            data = file.read()
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(handle)


def _key_of(path: Path) -> str:
    """The content key a cache file's name carries (``<stem>_<key>.py``)."""
    return path.stem.rsplit("_", 1)[-1]


def _write_atomically(path: Path, source: str) -> None:
    """Write ``path`` through a temporary file beside it and ``os.replace``."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}_", suffix=".tmp",
                                         dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(source.encode("utf-8"))
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)   # replaces a link or a bad file itself, never its target
        disk_cache.note_write(path.parent, path, len(source.encode("utf-8")))
    except IsADirectoryError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise RuntimeError(f"retrograd: {path} is a folder where a cached file goes; "
                           f"delete it and compile again") from error
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_source(stem: str, source: str) -> Path:
    """Write ``source`` as ``<stem>_<key>.py`` atomically, or reuse a verified copy."""
    key = source_key(source)
    folder = cache_dir()
    path = folder / f"{stem}_{key}.py"
    if _read_trusted(path, len(source.encode("utf-8"))) != source:
        _write_atomically(path, source)
    elif str(path) not in _WRITTEN:
        disk_cache.touch(path)   # used now: least recently used eviction keeps it
    with _LOCK:
        _WRITTEN[str(path)] = source
        _WRITTEN.move_to_end(str(path))
        while len(_WRITTEN) > WRITTEN_MAX:
            _WRITTEN.popitem(last=False)
    return path


def _verified_source(path: Path) -> str:
    """The text to run for ``path``: its bytes if they hash to the key in its
    name; else, when this process wrote it, the file is rebuilt from that text."""
    text = _read_trusted(path)
    if text is not None and source_key(text) == _key_of(path):
        return text
    with _LOCK:
        known = _WRITTEN.get(str(path))
    if known is None:
        raise RuntimeError(
            f"retrograd: cached file {path} does not match the hash in its name (changed, "
            f"damaged, a link or another user's); delete it and compile again")
    _write_atomically(path, known)
    return known


def load_module(path: Path, interpreted: bool) -> ModuleType:
    """Run a generated file's verified text as a module; kernels are decorated
    for the interpreter if asked. No bytecode is read or written.

    What comes back is a handle (releases.py): it, and so the module, lives
    while a program holds one of its functions; ``_LOADED`` finds it only
    meanwhile, and the caches that outlive it are cleaned at the next load.
    """
    cache_key = (str(path), interpreted)
    with _LOCK:
        forget_released(_LOADED)
        module = _LOADED.get(cache_key)
        if module is None:
            module = handle(_execute(Path(path), interpreted), str(path))
            _LOADED[cache_key] = module
        return module


def _execute(path: Path, interpreted: bool) -> ModuleType:
    source = _verified_source(path)
    filename = str(path)
    # Triton reads kernels back through inspect/linecache: give it exactly the
    # verified text (an entry without mtime is never re-read from disk).
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    name = f"retrograd_generated.{path.stem}{'_interpreted' if interpreted else ''}"
    module = ModuleType(name)
    module.__file__ = filename
    code = compile(source, filename, "exec", dont_inherit=True)
    with interpreter_mode(interpreted):
        exec(code, module.__dict__)  # noqa: S102 -- verified generated code, see above
    return module
