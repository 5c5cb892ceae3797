"""Liveness of the torch program's variables: deletes at the last use, and
pointwise results written over an operand that dies there.

The torch program (``torch_program.py``) is first written as statements in
the schedule's order with the plan's deletes (``program.frees`` between
kernels, a fused kernel's inner values at their last use inside it). Two
things the plan cannot say about torch calls are decided here, on those
statements:

- **deletes at the last use.** A kernel's inputs were deleted after the whole
  kernel (the plan frees between kernels); a value the plan frees dies at the
  last statement that names it, so a fused chain's first reads release their
  operands before its later ops allocate.
- **in place.** A pointwise op whose result has an operand's shape, dtype and
  strides writes into that operand (``torch.mul(a, b, out=a)``) when the
  operand's storage dies at that statement (an op called by its entry point,
  ``gelu_backward`` say, through its aten out overload: ``torch_out.py``):
  it was made by this program (an input or constant may be held by the
  caller or by autograd for a second backward), and no alias of it (a
  view, a tuple's element, a register's reshape) is named later. Eager's
  modules do this themselves (``relu_``, ``add_``); the functional graph
  lost it, and a fused kernel written as torch calls otherwise holds two
  values per step of its chain. This is the
  Triton wrapper's in-place reuse (``buffer_reuse``) for torch calls, decided
  on the program's own statements because fused kernels' inner values are
  not buffers of the plan.

Each statement is one unit of source (a stride check with its copy is one);
``del`` statements are rewritten, every other statement kept in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from retrograd.codegen.torch_calls import accepts_out, bound_name, in_place_method
from retrograd.codegen.torch_out import out_overload
from retrograd.codegen.wrapper import variable
from torch import fx
from torch._prims_common import is_non_overlapping_and_dense_or_false

__all__ = ["Statement", "tighten"]

#: a name read: not an attribute (``torch.permute``), not a keyword (``dim=``)
#: ops writing values into a copy of their first operand, which their
#: in-place method (``index_put_``, ``scatter_``) writes into itself
SCATTERS = {torch.ops.aten.index_put.default, torch.ops.aten.scatter.src,
            torch.ops.aten.scatter.value, torch.ops.aten.scatter_add.default}

NAME = re.compile(r"(?<![.\w])[A-Za-z_]\w*(?![\w=])")
ASSIGNED = re.compile(r"^([A-Za-z_][A-Za-z_0-9]*) = ")


@dataclass
class Statement:
    """One unit of program source; ``node``: the fx node it computes, if any;
    ``aliasing``: it returns an operand's storage (a scatter in place, a reshape)."""

    text: str
    node: fx.Node | None = None
    aliasing: bool = False
    variable: str | None = None   # the name it assigns, when it computes ``node``
    donor: fx.Node | None = None   # an input the plan lets this result write over


def _fresh(node: fx.Node | None) -> bool:
    """``node``'s result is new storage whatever its operands are: an aten op
    whose schema says it aliases nothing and mutates nothing, with a kernel of
    its own (not a composite of other ops)."""
    target = getattr(node, "target", None)
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return False
    tags = set(target.tags)
    if tags & {torch.Tag.inplace, torch.Tag.inplace_view, torch.Tag.maybe_aliasing_or_mutating}:
        return False
    if any(value.alias_info is not None for value in target._schema.returns):
        return False
    if target._opname.startswith("_unsafe"):
        return False
    # composite ops may hand back an operand itself (type_as of the same dtype)
    return not torch._C._dispatch_has_kernel_for_dispatch_key(
        target.name(), "CompositeImplicitAutograd")


class _Groups:
    """Variables that may share storage (union-find over names), and whether
    each group's storage was made by the program."""

    def __init__(self, foreign: set[str]):
        self.parent: dict[str, str] = {}
        self.foreign = set(foreign)   # groups holding an input, a constant, an unknown

    def root(self, name: str) -> str:
        while self.parent.get(name, name) != name:
            name = self.parent[name]
        return name

    def join(self, a: str, b: str) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[ra] = rb
            if ra in self.foreign:
                self.foreign.add(rb)

    def owned(self, name: str) -> bool:
        return self.root(name) not in self.foreign

    def members(self, name: str, known) -> list[str]:
        root = self.root(name)
        return [other for other in known if self.root(other) == root]


@dataclass
class _Ranges:
    """Where each variable's definitions are used: ``ends[i]`` the variables
    whose last use is statement ``i`` and that the plan deletes; ``live``:
    per variable, ``(start, end)`` ranges (``end`` None: never deleted)."""

    ends: dict[int, list[str]]
    live: dict[str, list[tuple[int, int | None]]]
    last: dict[str, int]   # the last statement naming each variable, deleted or not

    def alive_after(self, name: str, index: int) -> bool:
        return any(start <= index and (end is None or end > index)
                   for start, end in self.live.get(name, []))


def _references(statements: list[Statement], names: set[str]) -> list[set[str]]:
    found = []
    for statement in statements:
        text = statement.text
        if text.startswith(("#", "del ")):
            found.append(set())
        else:
            read = set(NAME.findall(text.split("  # ")[0])) & names
            if statement.donor is not None:   # it may write there: alive until then
                read.add(variable(statement.donor.name))
            found.append(read)
    return found


def _ranges(statements: list[Statement], references: list[set[str]]) -> _Ranges:
    opened: dict[str, int] = {}
    last: dict[str, int] = {}
    ends: dict[int, list[str]] = {}
    live: dict[str, list[tuple[int, int | None]]] = {}
    for index, (statement, names) in enumerate(zip(statements, references)):
        if statement.text.startswith("del "):
            for name in statement.text[4:].split(", "):
                if name in opened:
                    end = last[name]
                    ends.setdefault(end, []).append(name)
                    live.setdefault(name, []).append((opened.pop(name), end))
            continue
        for name in names:
            opened.setdefault(name, index)
            last[name] = index
    for name, start in opened.items():
        live.setdefault(name, []).append((start, None))
    return _Ranges(ends, live, last)


def _assigned(statement: Statement) -> list[str]:
    text = statement.text
    if text.startswith(("#", "del ", "if ")):
        return []
    if " = args" in text.split("\n")[0]:
        return [name.strip() for name in text.split(" = ")[0].split(",") if name.strip()]
    match = ASSIGNED.match(text)
    return [match.group(1)] if match else []


def tighten(statements: list[Statement], foreign: set[str]) -> list[str]:
    """The statements with deletes at last use and pointwise results written
    over dying operands; ``foreign``: variables the program did not make
    (inputs, constants). Returns the source lines (statements may span lines)."""
    names = set(foreign)
    for statement in statements:
        names.update(_assigned(statement))
    references = _references(statements, names)
    ranges = _ranges(statements, references)
    state = _State(ranges, _Groups(set()), {})
    out: list[str] = []
    for index, (statement, read) in enumerate(zip(statements, references)):
        if statement.text.startswith("del "):
            continue
        out.append(_define(state, statement, index, read, foreign))
        dying = ranges.ends.get(index, [])
        if dying:
            out.append(f"del {', '.join(dying)}")
    return out


@dataclass
class _State:
    """The walk's state: ranges, storage groups of definitions, and each
    variable's current definition (``name@index``: a name made again after a
    delete is another storage)."""

    ranges: _Ranges
    groups: _Groups
    current: dict[str, str]

    def key(self, name: str) -> str:
        return self.current.get(name, name)


def _define(state: _State, statement: Statement, index: int, read: set[str],
            foreign: set[str]) -> str:
    """Record what ``statement`` defines (its storage group); the statement's
    text, written over a dying operand where it may."""
    text = statement.text
    for name in _assigned(statement):
        if name in state.current and not _redefined(state.ranges, name, index):
            continue   # a stride fix rebinding a live name: the same group
        key = state.current[name] = f"{name}@{index}"
        groups = state.groups
        groups.parent[key] = key
        if name in foreign:
            groups.foreign.add(key)
        elif statement.node is None and not read - {name}:
            groups.foreign.add(key)   # nothing known of where it came from
        elif not _fresh(statement.node) or statement.aliasing:
            for other in read - {name}:
                groups.join(key, state.key(other))
        else:
            target = _donor(state, statement, index) or \
                _in_place_target(state, statement, index, read) or \
                _scatter_target(state, statement, index, read)
            if target is not None:
                text = _with_out(text, target, statement)
                groups.join(key, state.key(target))
    return text


def _redefined(ranges: _Ranges, name: str, index: int) -> bool:
    """Statement ``index`` starts a new range of ``name`` (made again after a delete)."""
    return any(start == index for start, _ in ranges.live.get(name, []))


def _in_place_target(state: _State, statement: Statement, index: int,
                     read: set[str]) -> str | None:
    """The operand ``statement``'s pointwise op may write its result into: one
    the program made, dying here with every alias of it, laid out as the result."""
    node = statement.node
    tags = set(node.target.tags)
    if torch.Tag.pointwise not in tags or torch.Tag.nondeterministic_seeded in tags:
        return None
    if _call_form(statement) is None:
        return None   # a method, an expression: no out= form checked
    result = node.meta.get("val")
    if not isinstance(result, torch.Tensor):
        return None
    operands = [(operand, variable(operand.name)) for operand in node.all_input_nodes]
    groups = state.groups
    for operand, name in operands:
        value = operand.meta.get("val")
        if name not in read or name not in state.ranges.ends.get(index, []) or \
                not groups.owned(state.key(name)) or not _same_layout(value, result):
            continue
        root = groups.root(state.key(name))
        if any(groups.root(state.key(other)) == root for other_node, other in operands
               if other != name):
            continue   # another operand shares its storage: not elementwise-safe
        members = [key.split("@")[0] for key in groups.parent if groups.root(key) == root]
        if any(state.ranges.alive_after(member, index) for member in members):
            continue
        if _writes_into(statement, operand):
            return name
    return None


def _dies_here(state: _State, name: str, index: int, others: list[str]) -> bool:
    """``name``'s storage was made by the program and dies at statement
    ``index`` with every alias of it, and no name in ``others`` shares it."""
    groups = state.groups
    if name not in state.ranges.ends.get(index, []) or not groups.owned(state.key(name)):
        return False
    root = groups.root(state.key(name))
    if any(groups.root(state.key(other)) == root for other in others if other != name):
        return False
    members = [key.split("@")[0] for key in groups.parent if groups.root(key) == root]
    return not any(state.ranges.alive_after(member, index) for member in members)


def _scatter_target(state: _State, statement: Statement, index: int,
                    read: set[str]) -> str | None:
    """The ``self`` a scatter (``SCATTERS``) may write into, as its in-place
    method: a fill it dies after (an embedding's gradient is ``index_put``
    into zeros; out of place, the zeros and their copy were alive together:
    LLaMA's backward peaked there at 1.12x default_partition's)."""
    node = statement.node
    if node.target not in SCATTERS or not isinstance(node.args[0], fx.Node):
        return None
    base = node.args[0]
    name = variable(base.name)
    if not statement.text.startswith(f"{statement.variable} = torch.{node.target._opname}"
                                     f"({name}, "):
        return None   # the in-place method replaces exactly this call
    others = [variable(n.name) for n in node.all_input_nodes if n is not base]
    if name not in read or not _same_layout(base.meta.get("val"), node.meta.get("val")) or \
            not _dies_here(state, name, index, others):
        return None
    return name if in_place_method(node) is not None else None


def _donor(state: _State, statement: Statement, index: int) -> str | None:
    """The donated input (``Buffer.reuses``: a parameter or optimizer state
    the step replaces) ``statement``'s pointwise result may be written over:
    nothing sharing its storage is named after this statement."""
    node, donor = statement.node, statement.donor
    if donor is None or torch.Tag.pointwise not in set(node.target.tags) or \
            _call_form(statement) is None or \
            not _same_layout(donor.meta.get("val"), node.meta.get("val")):
        return None
    name = variable(donor.name)
    groups = state.groups
    root = groups.root(state.key(name))
    members = [key.split("@")[0] for key in groups.parent if groups.root(key) == root]
    if any(state.ranges.last.get(member, -1) > index for member in members):
        return None
    return name if _writes_into(statement, donor) else None


def _call_form(statement: Statement) -> str | None:
    """How ``statement`` calls its op: ``"torch"`` (``y = torch.f(...)``),
    ``"entry"`` (the overload's bound entry point, ``torch_calls.bound_name``)
    or None (anything else)."""
    if statement.text.startswith(f"{statement.variable} = torch."):
        return "torch"
    target = statement.node.target
    if isinstance(target, torch._ops.OpOverload) and \
            statement.text.startswith(f"{statement.variable} = {bound_name(target)}("):
        return "entry"
    return None


def _writes_into(statement: Statement, operand: fx.Node) -> bool:
    """``statement``'s op, called in its out= form, writes its result into ``operand``."""
    if _call_form(statement) == "torch":
        return accepts_out(statement.node, operand)
    return out_overload(statement.node, operand) is not None


def _same_layout(value, result: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == result.shape and \
        value.dtype == result.dtype and value.stride() == result.stride() and \
        value.device == result.device and is_non_overlapping_and_dense_or_false(value)


def _operand(statement: Statement, name: str) -> fx.Node:
    """The operand node (or the donated input) the program names ``name``."""
    found = [n for n in statement.node.all_input_nodes if variable(n.name) == name]
    return found[0] if found else statement.donor


def _with_out(text: str, target: str, statement: Statement) -> str:
    """``y = torch.f(...)`` as ``y = torch.f(..., out=target)``, or as the
    in-place method ``y = target.f_(...)`` when ``target`` is its first operand;
    an entry point's call as its aten out overload (``torch_out.py``)."""
    code, marker, comment = text.partition("  # ")
    assert code.endswith(")"), code
    if _call_form(statement) == "entry":
        head = f"{statement.variable} = {bound_name(statement.node.target)}("
        overload, argument = out_overload(statement.node, _operand(statement, target))
        return f"{statement.variable} = {overload}({code[len(head):-1]}, " \
            f"{argument}={target}){marker}{comment}"
    head = f"{statement.variable} = torch.{statement.node.target._opname}("
    arguments = code[len(head):-1]
    if code.startswith(head) and (arguments == target or arguments.startswith(f"{target}, ")):
        method = in_place_method(statement.node)
        if method is not None:
            rest = arguments[len(target) + 2:]
            return f"{statement.variable} = {target}.{method}({rest}){marker}{comment}"
    return f"{code[:-1]}, out={target}){marker}{comment}"
