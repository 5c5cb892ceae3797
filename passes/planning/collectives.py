"""Collectives in a program: which kernels issue and wait, and FSDP2's order.

A functional collective traced into a graph (``torch.distributed.
_functional_collectives``: ``_c10d_functional.all_reduce`` and its kin) is
two extern kernels: the *issue*, which starts the communication and returns
at once with a tensor the network is still filling, and ``wait_tensor``,
which blocks until it is complete. Compute placed between the two overlaps
the communication. The schedule pass (``passes/schedule.py``) uses
``issues``/``waits`` to hoist issues and sink waits; this module also
marks FSDP2's units and orders their collectives as FSDP2 does
(``issue_order``, ``bound_gathers``). How much of the communication the
schedule hides is predicted by ``comm_timeline.py``.

; where the
group's size cannot be found (no process group), wire bytes and times are
``None``.
"""

from __future__ import annotations

from itertools import pairwise

from retrograd.ir import Kernel, Program
from retrograd.passes.op_classes import PHASE, RECOMPUTED
from torch import fx

__all__ = [
    "FSDP_REDUCE",
    "FSDP_UNIT",
    "RESHARD",
    "WAIT",
    "bound_gathers",
    "fsdp_unit",
    "is_issue",
    "is_wait",
    "issue_order",
    "mark_after_waits",
    "mark_regathered",
    "read_until_wait",
    "reads_regathered",
    "reduced_unit",
    "regathered",
]

WAIT = "_c10d_functional.wait_tensor.default"
#: ``node.meta["custom"]`` keys (``torch.fx.traceback.annotate``) that
#: compiler/fsdp.py puts on the nodes gathering an FSDP2 unit's parameters:
#: the unit's index in forward order, and whether the unit reshards after
#: its forward (the gathered parameters are then all-gathered again for the
#: backward: the checkpoint pass recomputes them, never saves them).
FSDP_UNIT = "retrograd_fsdp_unit"
RESHARD = "retrograd_reshard"
#: the mark on the nodes of a unit's gradient reduce-scatter: the unit's index
FSDP_REDUCE = "retrograd_fsdp_reduce"
PREFIX = "_c10d_functional."


def is_wait(kernel: Kernel) -> bool:
    return kernel.kind == "extern" and kernel.op == WAIT


def is_issue(kernel: Kernel) -> bool:
    """An extern kernel that starts a functional collective."""
    return kernel.kind == "extern" and kernel.op.startswith(PREFIX) and kernel.op != WAIT


def mark_after_waits(graph: fx.Graph) -> int:
    """Give every node computed from a collective's result a phase of its own
    (``PHASE`` plus the waits it follows), so fusion never puts it in one
    kernel with a node that does not follow the same waits: a bucket's
    parameter update fused into a backward kernel made the rest of the
    backward wait for that bucket's all-reduce, and nothing overlapped.
    Returns the number of nodes marked."""
    after: dict[fx.Node, frozenset[str]] = {}
    marked = 0
    for node in graph.nodes:
        waits = frozenset().union(*(after.get(arg, frozenset())
                                    for arg in node.all_input_nodes))
        if node.op == "call_function" and str(node.target) == WAIT:
            waits |= {node.name}
        if not waits:
            continue
        after[node] = waits
        if node.op == "call_function":
            phase = str(node.meta.get(PHASE)).split(" after ")[0]
            node.meta[PHASE] = f"{phase} after {','.join(sorted(waits))}"
            marked += 1
    return marked


def fsdp_unit(node) -> int | None:
    """The FSDP2 unit whose parameters ``node`` gathers (compiler/fsdp.py),
    or None for any other node."""
    custom = getattr(node, "meta", {}).get("custom") or {}
    return custom.get(FSDP_UNIT)


def regathered(node) -> bool:
    """True for a node gathering the parameters of a unit that reshards
    after its forward: the checkpoint pass recomputes it for the backward
    (all-gathered again) and never saves it. The mark comes from the traced
    code, so the plan is the same on every rank, whatever its budget."""
    custom = getattr(node, "meta", {}).get("custom") or {}
    return bool(custom.get(RESHARD))


def read_until_wait(program: Program) -> dict[str, int]:
    """Each collective issue's inputs -> the index of its wait: a functional
    all-gather or reduce-scatter reads its input asynchronously (gloo's and
    NCCL's threads) until the wait, so the arena must not hand the input's
    slot to another kernel before then."""
    waits = {program.root(kernel.inputs[0]): index
             for index, kernel in enumerate(program.kernels) if is_wait(kernel) and kernel.inputs}
    found: dict[str, int] = {}
    for kernel in program.kernels:
        if not is_issue(kernel):
            continue
        wait = max((waits.get(program.root(out), -1) for out in kernel.outputs), default=-1)
        for name in kernel.inputs:
            found[name] = max(found.get(name, -1), wait)
    return {name: wait for name, wait in found.items() if wait >= 0}


def mark_regathered(graph: fx.Graph) -> int:
    """Extend the ``RESHARD`` mark from the gathering nodes to every pure
    forward node computed from marked nodes alone (a weight's transpose, its
    cast under autocast): functions of a resharding unit's parameters, so
    recomputed for the backward from the second all-gather, never saved.
    Returns how many nodes were marked."""
    marked = 0
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if node.op != "call_function" or regathered(node) or not inputs \
                or not all(regathered(arg) for arg in inputs):
            continue
        if node.is_impure() or getattr(getattr(node.target, "_schema", None),
                                       "is_mutable", False):
            continue
        custom = dict(node.meta.get("custom") or {})
        custom.update({RESHARD: True, FSDP_UNIT: fsdp_unit(inputs[0])})
        node.meta["custom"] = custom
        marked += 1
    return marked


def reads_regathered(node) -> bool:
    """True for a node that computes from a resharding unit's parameters
    (and something else: an activation). The checkpoint pass never
    recomputes it: recomputing it in the backward would need that unit's
    parameters gathered again wherever the recomputation lands (a residual
    stream's recomputation pulls every block's), not one unit ahead. So the
    backward gets such values saved, as FSDP2's eager autograd does."""
    return not regathered(node) and any(regathered(arg)
                                        for arg in getattr(node, "all_input_nodes", ()))


def _gathers(program: Program) -> dict[tuple[int, bool], list[int]]:
    """(unit, recomputed) -> the all-gather issues of that unit's parameters,
    in program order (a unit holds one per dtype)."""
    groups: dict[tuple[int, bool], list[int]] = {}
    for index, kernel in enumerate(program.kernels):
        if not is_issue(kernel) or "all_gather" not in kernel.op:
            continue
        node = next((n for n in kernel.nodes if fsdp_unit(n) is not None), None)
        if node is not None:
            key = (fsdp_unit(node), RECOMPUTED in node.meta)
            groups.setdefault(key, []).append(index)
    return groups


def _waits_of(program: Program, issues: list[int]) -> list[int]:
    outputs = {name for i in issues for name in program.kernels[i].outputs}
    return [j for j, kernel in enumerate(program.kernels) if is_wait(kernel)
            and kernel.inputs and program.root(kernel.inputs[0]) in outputs]


def _forward_readers(program: Program, unit: int) -> list[int]:
    """Kernels reading what the forward gather of ``unit`` produced."""
    made = {name for kernel in program.kernels
            if any(fsdp_unit(n) == unit and RECOMPUTED not in n.meta
                   for n in kernel.nodes if hasattr(n, "meta"))
            for name in kernel.outputs}
    return [j for j, kernel in enumerate(program.kernels)
            if any(n in made or program.root(n) in made for n in kernel.inputs)]


def bound_gathers(program: Program, waiting: list[set[int]],
                  consumers: dict[int, list[int]]) -> set[int]:
    """Prefetch one FSDP2 unit ahead, no earlier (bounded memory), as FSDP2
    does: the all-gathers of each unit (forward ones, then the backward's
    re-gathers, in program order) are issued only after the waits of the
    unit gathered before them, i.e. once that unit's compute may start; and
    a unit's re-gather only after every reader of its forward gather, so the
    forward's full parameters are dead before they are gathered again.
    Adds the edges to the schedule's ``waiting``/``consumers``; returns the
    kernels that prepare a gather's input (padding, flattening the shards),
    which the schedule runs as soon as they may, as it runs the issues."""
    groups = _gathers(program)

    def edge(before: int, after: int) -> None:
        if before != after and before not in waiting[after]:
            waiting[after].add(before)
            consumers.setdefault(before, []).append(after)
    keys = list(groups)
    for previous, key in pairwise(keys):
        for wait in _waits_of(program, groups[previous]):
            for issue in groups[key]:
                edge(wait, issue)
    for unit, recomputed in keys:
        if recomputed:
            for reader in _forward_readers(program, unit):
                for issue in groups[(unit, True)]:
                    edge(reader, issue)
    _one_reduce_in_flight(program, edge)
    return _feeders(program, [i for issues in groups.values() for i in issues], waiting)


def reduced_unit(kernel: Kernel) -> int | None:
    """The FSDP2 unit whose gradients ``kernel`` reduce-scatters, or None."""
    for node in kernel.nodes:
        unit = (getattr(node, "meta", {}).get("custom") or {}).get(FSDP_REDUCE)
        if unit is not None:
            return unit
    return None


def _one_reduce_in_flight(program: Program, edge) -> None:
    """Each FSDP2 reduce-scatter issued only after the previous one's wait,
    as FSDP2 waits for the last unit's reduce-scatter in the next unit's
    post-backward: a reduce-scatter's input (its unit's full gradients)
    lives until its wait, so unbounded, every unit's full gradients were
    alive at once. (The schedule runs such a wait as soon as the next
    reduce-scatter is otherwise ready: ``blocked_issues``.)"""
    issues = [i for i, kernel in enumerate(program.kernels) if is_issue(kernel)
              and reduced_unit(kernel) is not None]
    for before, after in pairwise(issues):
        for wait in _waits_of(program, [before]):
            edge(wait, after)


def issue_order(program: Program) -> list[int]:
    """The order every rank issues the collectives in: the program's, except
    that an FSDP2 unit's gradient reduce-scatter comes before the backward's
    re-gathers of units two or more below it, as FSDP2 issues them (unit u's
    reduce-scatter after its backward, where unit u-1 is already gathered and
    unit u-2's gather is prefetched next). compiler/fsdp.py traces every
    reduce-scatter after the whole backward, so in the program's order each
    unit's full gradients waited behind every re-gather (the last one's issue
    near the backward's end) and were all alive there. The order depends on
    the traced collectives alone, so it is the same on every rank."""
    issues = [i for i, kernel in enumerate(program.kernels) if is_issue(kernel)]
    regathers = {i: unit for (unit, recomputed), found in _gathers(program).items()
                 if recomputed for i in found}
    for index in [i for i in issues if reduced_unit(program.kernels[i]) is not None]:
        unit = reduced_unit(program.kernels[index])
        here = issues.index(index)
        target = next((k for k, i in enumerate(issues[:here])
                       if regathers.get(i, unit) < unit - 1), None)
        if target is not None:
            issues.insert(target, issues.pop(here))
    return issues


def _feeders(program: Program, issues: list[int], waiting: list[set[int]]) -> set[int]:
    """The kernels, all of whose nodes gather parameters, that ``issues``
    wait for, transitively (a view of a shard, the padded concatenation)."""
    found: set[int] = set()
    stack = list(issues)
    while stack:
        for before in waiting[stack.pop()]:
            kernel = program.kernels[before]
            nodes = [n for n in kernel.nodes if hasattr(n, "meta")]
            if before in found or is_wait(kernel) or not nodes or \
                    any(fsdp_unit(n) is None for n in nodes):
                continue
            found.add(before)
            stack.append(before)
    return found
