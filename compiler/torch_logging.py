"""PyTorch's own tools: ``TORCH_LOGS`` names and ``TORCH_TRACE`` (tlparse) artifacts.

``register`` adds the artifacts ``retrograd_passes`` (one line per pass) and
``retrograd_memory`` (each program's memory plan) to torch's log registry.
``TORCH_LOGS=retrograd`` needs no registration: torch accepts an importable
module's name and then shows the ``logging.getLogger("retrograd")`` logger.
``retrograd`` is deliberately not registered as a torch log at import: torch
takes a registered log over (no propagation to the root logger, its level
reset), which would cut retrograd's logger off from the user's ``logging``
setup. So the artifact loggers live under torch's own ``torch`` log
(``torch._retrograd.__retrograd_passes``), whose handler prints them. torch
validates ``TORCH_LOGS`` while it is imported, so the installed package
registers them from a ``torch.backends`` entry point, which torch runs just
before it parses ``TORCH_LOGS`` (torch/__init__.py); importing this module
registers them too (then ``torch._logging.set_logs(retrograd_passes=True)``
works in an uninstalled checkout).

``trace`` writes one artifact to the structured trace (``TORCH_TRACE``) that
tlparse reads; it costs one attribute test when tracing is off.
"""

from __future__ import annotations

import logging
from typing import Callable

__all__ = ["register", "passes_log", "memory_log", "tracing", "trace"]

ARTIFACTS = {
    "retrograd_passes": "retrograd: one line per pass (nodes before/after, seconds, stats)",
    "retrograd_memory": "retrograd: each compiled program's memory plan (buffers, arenas)",
}


def register() -> None:
    """Register retrograd's artifacts with torch's logging; never raises (it
    runs inside ``import torch``, where an error would fail the import)."""
    try:
        from torch._logging import _internal
        registry = _internal.log_registry
        for name, description in ARTIFACTS.items():
            if not registry.is_artifact(name):
                _internal.register_artifact(name, description, visible=True)
    except Exception as error:   # an older or newer torch: its own logs still work
        logging.getLogger("retrograd").debug("retrograd: TORCH_LOGS names not registered: %s",
                                             error)


def _artifact_log(name: str) -> logging.Logger:
    """torch's artifact logger for ``name`` (a plain child logger if torch has none)."""
    try:
        from torch._logging import getArtifactLogger
        return getArtifactLogger("torch._retrograd", name)
    except Exception:   # never fail ``import torch`` (this runs inside it)
        return logging.getLogger(f"torch._retrograd.__{name}")


register()
passes_log = _artifact_log("retrograd_passes")
memory_log = _artifact_log("retrograd_memory")


def tracing() -> bool:
    """Whether structured tracing (``TORCH_TRACE``) is on: torch's trace logger keeps
    its handler only then (the check torch's partitioner makes)."""
    try:
        from torch._logging._internal import trace_log
    except ImportError:
        return False
    return bool(trace_log.handlers)


def trace(name: str, payload: Callable[[], str], encoding: str = "string") -> None:
    """One artifact ``name`` in the structured trace, under the current compile id."""
    if not tracing():
        return
    from torch._logging import trace_structured
    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding},
                     payload_fn=payload)
