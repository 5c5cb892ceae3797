"""Deliberate faults for the reproducer tests (``test_repro.py``).

A test installs one with pytest's ``monkeypatch``; the fresh process that
runs the written ``repro.py`` installs the same one with ``install`` (the
fault is in retrograd, not in the user's model, so it must be there too),
then runs the file as ``__main__``:

    python -c "import repro_faults; repro_faults.run('fusion_sin', 'repro.py')"
"""

from __future__ import annotations

import runpy
import sys

import torch
from retrograd.codegen import ops
from retrograd.passes import cleanup, fusion

aten = torch.ops.aten
_FUSION = fusion.run
_CLEANUP = cleanup.run


def _fusion_refusing_sin(gm, ctx):
    """fusion that raises on any graph holding ``aten.sin`` (a crashing pass)."""
    if any(node.target is aten.sin.default for node in gm.graph.nodes):
        raise NotImplementedError("deliberate fault: fusion refuses aten.sin")
    return _FUSION(gm, ctx)


def _cleanup_refusing_sin(gm, ctx):
    """cleanup (a pass of the joint, inference and step stages) that raises on ``aten.sin``."""
    if any(node.target is aten.sin.default for node in gm.graph.nodes):
        raise NotImplementedError("deliberate fault: cleanup refuses aten.sin")
    return _CLEANUP(gm, ctx)


def _lowering_that_raises(node, operand):
    """A codegen lowering that crashes (an exception that is not retrograd's)."""
    raise KeyError(f"deliberate fault: no lowering for {node.target}")


#: name -> (object, attribute or key, replacement)
FAULTS = {
    "fusion_sin": (fusion, "run", _fusion_refusing_sin),
    "cleanup_sin": (cleanup, "run", _cleanup_refusing_sin),
    # codegen that emits cos for sin: a wrong number, which verify catches
    "codegen_sin_is_cos": (ops.LOWERINGS, aten.sin.default, ops.LOWERINGS[aten.cos.default]),
    "codegen_sin_raises": (ops.LOWERINGS, aten.sin.default, _lowering_that_raises),
}


def install(name: str, monkeypatch=None) -> None:
    """Put fault ``name`` in place (through ``monkeypatch`` when given)."""
    owner, key, value = FAULTS[name]
    if isinstance(owner, dict):
        if monkeypatch is not None:
            monkeypatch.setitem(owner, key, value)
        else:
            owner[key] = value
    elif monkeypatch is not None:
        monkeypatch.setattr(owner, key, value)
    else:
        setattr(owner, key, value)


def run(name: str | None, path: str) -> None:
    """Install fault ``name`` (None: none) and run the file ``path`` as a script."""
    if name is not None:
        install(name)
    sys.argv = [path]
    runpy.run_path(path, run_name="__main__")
