"""The standalone face on code that needs tensor values: capture through dynamo.

The standalone face traces a call into one graph with static shapes, which
code like ``if y.sum() > 0``, ``.item()``, ``x[x > 0]`` or transformers'
padding-mask helpers (``mask.all()``) cannot be: the fake tensors of the
trace have no values. Dynamo can: it runs such code in Python and splits
the program into graphs around it, each of which retrograd's torch.compile
face compiles. So, with ``data_dependent="split"`` (the default), the first
such call makes the compiled object hand this and every later call to
``torch.compile(target, backend=retrograd)`` with the same options, after a
warning naming the op and the source line; ``data_dependent="error"``
raises the ``UnsupportedError`` instead (errors.py). ``retrograd.grad``
always raises: its dead-gradient spec needs the whole call as one graph.

Guards and recompiles are then dynamo's (``torch._dynamo.config``), and
``.reports`` are those of the graph that ran last.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from typing import Any, Callable

import torch

from retrograd.backend import CompiledGraph, retrograd_backend
from retrograd.errors import user_stacklevel
from retrograd.options import Options

__all__ = ["DynamoFallback"]

log = logging.getLogger("retrograd")


class DynamoFallback:
    """``target`` compiled by ``torch.compile`` with retrograd as its backend,
    keeping track of which of its graphs ran last (for ``.reports``)."""

    def __init__(self, target: Callable, options: Options, reason: str):
        self.last: CompiledGraph | None = None
        self.graphs: list[CompiledGraph] = []
        mapping = asdict(options)
        mapping.pop("data_dependent")

        def backend(gm: torch.fx.GraphModule, example_inputs):
            graph = _Tracked(retrograd_backend(gm, example_inputs, options=mapping), self)
            self.graphs.append(graph)
            return graph

        self.compiled = torch.compile(target, backend=backend)
        message = (f"{reason}; compiling it through "
                   f"torch.compile(backend=\"retrograd\") instead, which splits the graph "
                   f"there (data_dependent=\"error\" raises instead)")
        log.info(message)
        warnings.warn(message, stacklevel=user_stacklevel())

    def __call__(self, *args, **kwargs) -> Any:
        return self.compiled(*args, **kwargs)

    @property
    def reports(self) -> dict[str, dict]:
        return {} if self.last is None else self.last.reports


class _Tracked:
    """A ``CompiledGraph`` that tells its fallback when it runs."""

    def __init__(self, graph: CompiledGraph, owner: DynamoFallback):
        self.graph, self.owner = graph, owner

    def __call__(self, *args):
        self.owner.last = self.graph
        return self.graph(*args)

    @property
    def reports(self) -> dict[str, dict]:
        return self.graph.reports
