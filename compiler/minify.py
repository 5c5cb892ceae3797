"""``retrograd minify repro.py``: shrink a reproducer to the fewest nodes that
still fail the same way, and write ``repro_minified.py`` beside it.

Delta debugging over the graph, in the manner of torch's fx minifier and
Inductor's ``minifier_launcher``: first the shortest prefix of the graph that
still fails (a binary search over where to cut it; what the prefix computes
for later nodes becomes the outputs), then, until nothing more goes,
``ddmin`` over the outputs (drop some) and over the nodes (replace some by
placeholders of their recorded shape, stride and dtype, so everything only
they needed goes too). A candidate is kept when it has fewer nodes and its
stage fails with the recorded signature (``repro.failure_signature``: the
error's type and pass or stage), on fresh random inputs, in this process.
The stage's own arguments follow the graph: forward outputs stay first (the
joint stage's ``num_fwd_outputs``), and the loss cotangent, gradient spec and
in-place updates are kept by node name and renumbered.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.fx as fx
from retrograd import repro
from retrograd.repro_writer import Snapshot, copy_graph, repro_source

__all__ = ["Case", "load", "minimize", "main"]


@dataclasses.dataclass
class Case:
    """A graph under minification and its stage's arguments, by name."""

    graph: fx.Graph
    root: fx.GraphModule                      # holds the constants
    stage: repro.Stage                        # name, graph id, options
    forward: list[bool]                       # per output: the forward's (joint stage)
    updates: list[str | None]                 # per output: the input it updates (step)
    seed: str | None = None                   # step: the loss cotangent's placeholder
    gradients: dict | None = None             # joint: GradientSpec by placeholder names

    @property
    def size(self) -> int:
        return len(self.graph.nodes)

    def placeholders(self) -> list[fx.Node]:
        return [node for node in self.graph.nodes if node.op == "placeholder"]

    def output(self) -> fx.Node:
        return next(node for node in reversed(self.graph.nodes) if node.op == "output")

    def outputs(self) -> list:
        value = self.output().args[0]
        return list(value) if isinstance(value, (list, tuple)) else [value]


def _is_tangent(node: fx.Node) -> bool:
    return node.op == "placeholder" and node.name.startswith("tangents")


def case_of(graph_module: fx.GraphModule, stage: repro.Stage) -> Case:
    """A Case for a rebuilt reproducer: positions turned into names."""
    graph = copy_graph(graph_module.graph)
    names = [node.name for node in graph.nodes if node.op == "placeholder"]
    count = len(_outputs_of(graph))
    forward = [i < (stage.num_fwd_outputs or 0) for i in range(count)]
    updates = [names[stage.updates[i]] if i in stage.updates else None for i in range(count)]
    gradients = None
    if stage.gradients is not None:
        primals = [n for n in names if not n.startswith("tangents")]
        tangents = [n for n in names if n.startswith("tangents")]
        gradients = {key: (None if value is None else
                           [(primals if key == "wanted" else tangents)[i] for i in value])
                     for key, value in stage.gradients.items()}
    seed = names[stage.seed] if stage.seed is not None else None
    return Case(graph, graph_module, stage, forward, updates, seed, gradients)


def _outputs_of(graph: fx.Graph) -> list:
    value = next(n for n in reversed(graph.nodes) if n.op == "output").args[0]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def stage_of(case: Case) -> repro.Stage | None:
    """The case's stage with positions; None when a named input is gone."""
    names = [node.name for node in case.placeholders()]
    stage = dataclasses.replace(case.stage, updates={
        i: names.index(name) for i, name in enumerate(case.updates) if name in names})
    if case.stage.num_fwd_outputs is not None:
        stage.num_fwd_outputs = sum(case.forward)
    if case.seed is not None:
        if case.seed not in names:
            return None
        stage.seed = names.index(case.seed)
    if case.gradients is not None:
        primals = [n for n in names if not n.startswith("tangents")]
        tangents = [n for n in names if n.startswith("tangents")]
        stage.gradients = {key: (None if value is None else tuple(
            (primals if key == "wanted" else tangents).index(n) for n in value
            if n in (primals if key == "wanted" else tangents)))
            for key, value in case.gradients.items()}
    return stage


def inputs_of(case: Case) -> list:
    """Each placeholder's recorded metadata (``repro.Input``) or number."""
    return [repro.Input.like(node.meta["val"]) if isinstance(node.meta.get("val"), torch.Tensor)
            else node.meta.get("val") for node in case.placeholders()]


def _copy(case: Case) -> Case:
    return dataclasses.replace(case, graph=copy_graph(case.graph), forward=list(case.forward),
                               updates=list(case.updates))


def _set_outputs(case: Case, values: list, forward: list[bool],
                 updates: list[str | None]) -> None:
    output = case.output()
    output.args = (tuple(values),)
    descriptors = output.meta.pop("desc", None)
    if descriptors is not None and len(descriptors) == len(values):
        output.meta["desc"] = descriptors
    case.forward, case.updates = forward, updates


def _tidy(case: Case) -> Case | None:
    """Drop dead nodes and unused inputs; None when no output is left."""
    case.graph.eliminate_dead_code()
    for node in case.placeholders():
        if not node.users:
            case.graph.erase_node(node)
    if not any(isinstance(value, fx.Node) for value in case.outputs()):
        return None
    case.graph.lint()
    return case


def replace_by_inputs(case: Case, names: Sequence[str]) -> Case | None:
    """Nodes ``names`` become inputs of their recorded metadata (before the
    tangents, which AOTAutograd passes last)."""
    case = _copy(case)
    nodes = {node.name: node for node in case.graph.nodes}
    for name in names:
        node = nodes[name]
        if node.op in ("placeholder", "output") or \
                not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        with case.graph.inserting_before(node):
            placeholder = case.graph.placeholder(f"{name}_input")
        placeholder.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(placeholder)
        case.graph.erase_node(node)
    _sort_placeholders(case.graph)
    return _tidy(case)


def _sort_placeholders(graph: fx.Graph) -> None:
    """Placeholders first (primals, then tangents), in their present order."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    ordered = [n for n in placeholders if not _is_tangent(n)] + \
        [n for n in placeholders if _is_tangent(n)]
    for node in reversed(ordered):
        head = next(iter(graph.nodes))
        if head is not node:
            head.prepend(node)


def drop_outputs(case: Case, indices: Sequence[int]) -> Case | None:
    """The graph without outputs ``indices``."""
    case = _copy(case)
    keep = [i for i in range(len(case.outputs())) if i not in set(indices)]
    values = case.outputs()
    _set_outputs(case, [values[i] for i in keep], [case.forward[i] for i in keep],
                 [case.updates[i] for i in keep])
    return _tidy(case)


def cut(case: Case, count: int) -> Case | None:
    """The first ``count`` computing nodes; what later nodes (or the outputs)
    read of them becomes the outputs, the forward's first."""
    case = _copy(case)
    computing = [n for n in case.graph.nodes if n.op not in ("placeholder", "output")]
    kept, rest = computing[:count], set(computing[count:])
    frontier = [n for n in kept if isinstance(n.meta.get("val"), torch.Tensor) and any(
        user in rest or user.op == "output" for user in n.users)]
    backward = _reaching_tangents(case.graph)
    ordered = [n for n in frontier if n not in backward] + [n for n in frontier if n in backward]
    _set_outputs(case, ordered, [n not in backward for n in ordered], [None] * len(ordered))
    for node in reversed(computing[count:]):
        case.graph.erase_node(node)
    return _tidy(case)


def _reaching_tangents(graph: fx.Graph) -> set[fx.Node]:
    reached: set[fx.Node] = set()
    for node in graph.nodes:
        if _is_tangent(node) or any(i in reached for i in node.all_input_nodes):
            reached.add(node)
    return reached


class Search:
    """Counts the tries and keeps the last failure's message."""

    def __init__(self, expected: tuple[str, ...], max_tries: int):
        self.expected, self.max_tries = tuple(expected), max_tries
        self.tries, self.message = 0, ""

    def fails(self, case: Case | None) -> bool:
        """Whether ``case`` still fails the recorded way (fresh copy, fresh inputs)."""
        if case is None or self.tries >= self.max_tries:
            return False
        stage = stage_of(case)
        if stage is None:
            return False
        self.tries += 1
        graph_module = fx.GraphModule(case.root, copy_graph(case.graph))
        same, error = repro.fails_as(stage, graph_module, inputs_of(case), self.expected)
        if same:
            self.message = str(error)
        return same


def shortest_prefix(case: Case, search: Search) -> Case:
    """The shortest failing prefix by bisection (the whole graph fails)."""
    low, high = 1, len([n for n in case.graph.nodes if n.op not in ("placeholder", "output")])
    best = case
    while low < high:
        middle = (low + high) // 2
        candidate = cut(case, middle)
        if search.fails(candidate):
            best, high = candidate, middle
        else:
            low = middle + 1
    return best


def ddmin(case: Case, items: Callable[[Case], list], apply: Callable[[Case, list], Case | None],
          search: Search) -> Case:
    """Zeller's delta debugging: remove chunks of ``items`` (halves, then
    quarters...) while the result is smaller and still fails."""
    chunks = 2
    while True:
        present = items(case)
        if not present:
            return case
        size = -(-len(present) // chunks)
        for start in range(0, len(present), size):
            candidate = apply(case, present[start:start + size])
            if candidate is not None and _measure(candidate) < _measure(case) \
                    and search.fails(candidate):
                case, chunks = candidate, max(chunks - 1, 2)
                break
        else:
            if chunks >= len(present) or search.tries >= search.max_tries:
                return case
            chunks = min(2 * chunks, len(present))


def _measure(case: Case) -> tuple[int, int]:
    """Nodes, then outputs: dropping an output that another output still needs
    removes no node, but lets the next round remove its producer."""
    return case.size, len(case.outputs())


def _computing(case: Case) -> list[str]:
    return [n.name for n in case.graph.nodes if n.op not in ("placeholder", "output")
            and isinstance(n.meta.get("val"), torch.Tensor)]


def minimize(case: Case, search: Search) -> Case:
    """The smallest case found that fails like ``case``."""
    case = shortest_prefix(case, search)
    while True:
        measure = _measure(case)
        case = ddmin(case, lambda c: list(range(len(c.outputs()))), drop_outputs, search)
        case = ddmin(case, _computing, replace_by_inputs, search)
        if _measure(case) >= measure or search.tries >= search.max_tries:
            return case


def load(path: Path):
    """The reproducer file as a module (not run as ``__main__``)."""
    name = f"retrograd_repro_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"retrograd minify: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def main(path: Path, output: Path | None = None, max_tries: int = 300) -> int:
    """Shrink the reproducer at ``path``; write ``repro_minified.py`` beside it."""
    if not path.is_file():
        print(f"retrograd: no such file: {path}", file=sys.stderr)
        return 1
    loaded = load(path)
    graph_module = repro.build(loaded.Repro, loaded.INPUTS, getattr(loaded, "DESCRIPTORS", {}))
    case = case_of(graph_module, loaded.STAGE)
    search = Search(loaded.EXPECTED, max_tries)
    if not search.fails(case):
        print(f"retrograd minify: {path} does not fail as it records {search.expected}; "
              f"nothing to shrink (run it to see what it does)", file=sys.stderr)
        return 1
    before = case.size
    case = minimize(case, search)
    output = output or path.with_name(f"{path.stem}_minified.py")
    taken = Snapshot(stage_of(case), case.graph,
                     {n.target: getattr(case.root, n.target) for n in case.graph.nodes
                      if n.op == "get_attr"}, inputs_of(case))
    output.write_text(repro_source(taken, search.message, search.expected, output.name))
    print(f"retrograd minify: {before} -> {case.size} nodes in {search.tries} tries; "
          f"wrote {output}")
    return 0
