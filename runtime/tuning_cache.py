"""Autotuning results on disk, in the kernel cache folder, beside the kernels.

A result (which block configuration of a template won, against what) is
looked up by a key: a dict naming the kernel's source, the device and the
versions. It is written as ``<kind>_<24 hex digits>.py`` (the hex digits
hash the key and the versions, ``loader.source_key``), so the kernel
cache's size cap, eviction and ``retrograd cache clear`` (disk_cache.py)
count and remove it like any kernel. The file holds one Python literal and
is never executed: it is read once without following a link, only if it is
a regular file of ours that no one else can write, and parsed with
``ast.literal_eval``; a record whose stored key is not the key asked for,
or that does not parse, is a miss and is rewritten.
"""

from __future__ import annotations

import ast
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from retrograd.runtime import disk_cache
from retrograd.runtime.disk_cache import ours_alone
from retrograd.runtime.loader import cache_dir, source_key

__all__ = ["lookup", "store", "path_for"]

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def _key_text(key: dict[str, Any]) -> str:
    return repr(sorted(key.items()))


def path_for(kind: str, key: dict[str, Any]) -> Path:
    """Where the record for ``key`` lives (``kind`` names the file, e.g. ``matmul_tuning``)."""
    return cache_dir() / f"{kind}_{source_key(_key_text(key))}.py"


def _read(path: Path) -> str | None:
    try:
        handle = os.open(path, _READ_FLAGS)
    except OSError:
        return None
    try:
        if not ours_alone(os.fstat(handle)):
            return None
        with os.fdopen(handle, "rb", closefd=False) as file:
            return file.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(handle)


def lookup(kind: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """The record stored for ``key``, or None (absent, untrusted, damaged, another key's)."""
    path = path_for(kind, key)
    text = _read(path)
    if text is None:
        return None
    try:
        record = ast.literal_eval(text.split("\n", 1)[1] if text.startswith("#") else text)
    except (ValueError, SyntaxError, IndexError, MemoryError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("key") != _key_text(key):
        return None
    disk_cache.touch(path)
    return record


def store(kind: str, key: dict[str, Any], record: dict[str, Any]) -> Path:
    """Write ``record`` for ``key`` atomically (temporary file, then ``os.replace``)."""
    path = path_for(kind, key)
    text = f"# retrograd autotuning record: data, never executed\n" \
           f"{repr({**record, 'key': _key_text(key)})}\n"
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}_", suffix=".tmp",
                                         dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(text.encode("utf-8"))
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    disk_cache.note_write(path.parent, path, len(text.encode("utf-8")))
    return path
