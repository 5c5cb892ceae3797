"""The program IR: what fusion produces and codegen and the runtime consume.

Three plain dataclasses, deliberately small (tinygrad's and Inductor's
scheduler nodes are the models): a ``Buffer`` is a tensor the program
touches, a ``Kernel`` is one launch (a generated Triton kernel, an extern
call of an aten op, or a view that moves no data), and a ``Program`` is the
buffers plus the kernels in schedule order. Fusion builds it, schedule
orders it, buffer_reuse fills in lifetimes and offsets, codegen turns each
kernel into source and the runtime executes it. Plan first, emit second.

This module imports nothing of retrograd's and nothing heavy, so every
package may depend on it. Dtypes are kept as strings ("float32") for that
reason; fx nodes are carried as opaque objects.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

__all__ = ["Buffer", "Kernel", "Program", "ArenaWindow", "ITEMSIZE", "ROLES", "KINDS",
           "Role", "Kind", "Family", "PassResult", "CodegenSupport"]

#: Bytes per element of the dtypes retrograd plans for.
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
    "complex64": 8, "complex128": 16,
}

class Role(enum.StrEnum):
    """What a buffer is to the program (a ``str``: ``role == "view"`` reads as before)."""

    INPUT = "input"            # handed in by the caller
    CONSTANT = "constant"      # held by the graph (get_attr)
    OUTPUT = "output"          # returned by the program
    TEMPORARY = "temporary"    # lives only inside one call
    VIEW = "view"              # aliases another buffer's storage and owns none


class Kind(enum.StrEnum):
    """How a kernel runs."""

    TRITON = "triton"          # a generated kernel
    EXTERN = "extern"          # a call of the aten op in torch
    VIEW = "view"              # an aliasing aten op (no data moves, no launch)


class Family(enum.StrEnum):
    """What a kernel computes, set by fusion; codegen picks its generator by it."""

    POINTWISE = "pointwise"    # one lane per element
    INDEXING = "indexing"      # pointwise, reading some input through computed indices
    REDUCTION = "reduction"    # rows reduced over some dims, with prologue and epilogue
    SCATTER = "scatter"        # one lane per index, writing through it
    POOLING = "pooling"        # one lane per output window
    SCAN = "scan"              # rows scanned along one dim (cumsum, cumprod)
    MATMUL = "matmul"          # a matmul template with a fused prologue/epilogue
    EXTERN = "extern"
    VIEW = "view"


ROLES = tuple(Role)
KINDS = tuple(Kind)


@dataclass
class Buffer:
    """A tensor value of the program, named after the fx node that makes it."""

    name: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str
    role: Role = Role.TEMPORARY
    view_of: str | None = None      # for role "view": the buffer aliased
    first_use: int | None = None    # kernel index that defines it (-1: on entry)
    last_use: int | None = None     # last kernel index that reads it
    offset: int | None = None       # arena offset in bytes, once planned
    arena: int | None = None        # which of the program's arenas (index in ``arenas``)
    reuses: str | None = None       # outside the arenas: written in place over this buffer

    def __post_init__(self) -> None:
        self.role = Role(self.role)   # a plain string is checked here: ValueError if unknown

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of storage the buffer spans (strides included, views too)."""
        if self.numel == 0:
            return 0
        span = 1 + sum((size - 1) * abs(stride)
                       for size, stride in zip(self.shape, self.strides))
        return span * ITEMSIZE.get(self.dtype, 4)

    @property
    def logical_bytes(self) -> int:
        """Bytes of the elements themselves: what a kernel reads or writes."""
        return self.numel * ITEMSIZE.get(self.dtype, 4)


@dataclass
class Kernel:
    """One step of the program: the fx nodes it covers, what it reads and writes."""

    name: str
    kind: Kind
    nodes: list[Any]                                  # fx nodes, in order
    inputs: list[str] = field(default_factory=list)   # buffer names read
    outputs: list[str] = field(default_factory=list)  # buffer names written
    source: str | None = None                         # codegen fills this
    numel: int = 0                                    # triton: elements iterated
    # triton: a view node whose value equals, element for element in the
    # kernel's iteration order, a register of this kernel (a reshape of an
    # in-kernel value); maps the view's name to that node's name.
    aliases: dict[str, str] = field(default_factory=dict)
    # triton reductions: the shape every "full" node has and the dimensions
    # reduced; ``numel`` is then the number of rows (reduction outputs).
    full_shape: tuple[int, ...] | None = None
    reduced_dims: tuple[int, ...] | None = None
    # what it computes; fusion sets it for triton kernels (extern and view
    # kernels are their own family)
    family: Family | None = None
    # matmul templates: the block configuration chosen (BLOCK_M, BLOCK_N, ...)
    tuning: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.kind = Kind(self.kind)   # a plain string is checked here: ValueError if unknown
        if self.family is None and self.kind != Kind.TRITON:
            self.family = Family(str(self.kind))
        elif self.family is not None:
            self.family = Family(self.family)

    @property
    def is_reduction(self) -> bool:
        return self.reduced_dims is not None

    @property
    def extent(self) -> int:
        """Elements reduced per row (1 for pointwise kernels)."""
        if not self.is_reduction:
            return 1
        return math.prod(self.full_shape[d] for d in self.reduced_dims)

    @property
    def scratch(self) -> list[str]:
        """A reduction's outputs no node of it makes: workspace it writes and
        reads only while it runs (a split reduction's partials), planned like
        any temporary and read by no later kernel."""
        if not self.is_reduction:
            return []
        made = {node.name for node in self.nodes}
        return [name for name in self.outputs if name not in made]

    @property
    def op(self) -> str:
        """The aten op of an extern or view kernel ("aten.mm.default")."""
        return str(self.nodes[0].target) if self.nodes else ""

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes]


@dataclass
class ArenaWindow:
    """One arena: taken before kernel ``start`` runs, given back after kernel ``stop``."""

    start: int
    stop: int
    nbytes: int
    strategy: str = ""


@dataclass
class Program:
    """Buffers and kernels in schedule order, with the graph's signature."""

    name: str
    buffers: dict[str, Buffer]
    kernels: list[Kernel]
    inputs: list[str]                 # placeholder names, in call order
    outputs: list[Any]                # buffer names, or non-tensor constants
    constants: dict[str, Any] = field(default_factory=dict)  # get_attr values
    frees: dict[int, list[str]] = field(default_factory=dict)  # after kernel i
    # output -> input it is the next value of (a training step's new parameter):
    # buffer_reuse writes it over the input where that is safe
    updates: dict[str, str] = field(default_factory=dict)

    # buffer_reuse fills these: one arena per busy window of the schedule
    # (windows never overlap in time), and the largest of them, which is the
    # most arena memory the program holds at once.
    arenas: list["ArenaWindow"] = field(default_factory=list)
    arena_bytes: int | None = None

    def root(self, name: str) -> str:
        """The buffer whose storage ``name`` uses (itself unless a view)."""
        buffer = self.buffers.get(name)
        while buffer is not None and buffer.view_of and buffer.view_of != name:
            name = buffer.view_of
            buffer = self.buffers.get(name)
        return name

    def escaping(self) -> set[str]:
        """Buffers that outlive a call: outputs and the storage their views use."""
        outputs = [name for name in self.outputs if isinstance(name, str)]
        return set(outputs) | {self.root(name) for name in outputs}

    def kernels_of(self, kind: str) -> list[Kernel]:
        return [kernel for kernel in self.kernels if kernel.kind == kind]

    def validate(self) -> None:
        """Raise ValueError unless every name resolves and reads follow writes."""
        defined = set(self.inputs) | set(self.constants)
        for index, kernel in enumerate(self.kernels):
            if not isinstance(kernel.kind, Kind) or not isinstance(kernel.family, (Family,
                                                                                  type(None))):
                raise ValueError(f"kernel {kernel.name}: kind {kernel.kind!r} and family "
                                 f"{kernel.family!r} must be ir.Kind and ir.Family")
            for name in kernel.inputs:
                if name not in defined:
                    raise ValueError(
                        f"kernel {index} {kernel.name} reads {name!r} before it is written")
            for name in kernel.outputs:
                if name not in self.buffers:
                    raise ValueError(f"kernel {kernel.name} writes unknown buffer {name!r}")
                defined.add(name)
        for name in self.outputs:
            if isinstance(name, str) and name not in defined:
                raise ValueError(f"program output {name!r} is never written")

    def describe(self) -> str:
        """A readable listing, one kernel a line: what the dumps show after fusion."""
        lines = [f"# program {self.name}: {len(self.kernels)} kernels",
                 f"inputs: {', '.join(self.inputs)}"]
        for index, kernel in enumerate(self.kernels):
            outs = ", ".join(kernel.outputs)
            ins = ", ".join(kernel.inputs)
            lines.append(f"{index:4d} {kernel.kind:7s} {kernel.name}: {outs} <- {ins}"
                         f"   # {', '.join(kernel.node_names)}")
            if self.frees.get(index):
                lines.append(f"     free {', '.join(self.frees[index])}")
        lines.append(f"outputs: {', '.join(map(str, self.outputs))}")
        return "\n".join(lines) + "\n"


class PassResult(NamedTuple):
    """What every pass returns (as torch.fx's ``PassResult``): the subject it
    was given, changed in place, or the new one it made (fusion: a Program
    from a graph; checkpoint: the forward and backward graphs), and the
    numbers it reports (its stats in the report)."""

    subject: Any
    stats: dict[str, Any]


class CodegenSupport(Protocol):
    """What codegen can lower, as the passes see it: handed to them in their
    context by the compiler, since no pass imports codegen. Each takes an fx node."""

    def can_lower(self, node: Any) -> bool:
        """A pointwise op, or one reading through computed indices."""

    def can_reduce(self, node: Any) -> bool:
        """A reduction codegen emits (sum, amax, var_mean, ...)."""

    def describe_reduction(self, node: Any) -> tuple[Any, list[int], Any] | None:
        """(the reduced tensor, the reduced dims, how) of a reduction, else None."""

    def can_scatter(self, node: Any) -> bool:
        """A scatter or index_put codegen writes through its indices."""

    def can_pool(self, node: Any) -> bool:
        """A pooling window op (max/avg pool and their backwards)."""

    def can_scan(self, node: Any) -> bool:
        """A prefix scan (cumsum, cumprod) codegen emits as a Triton scan."""

    def is_fill(self, node: Any) -> bool:
        """A constant fill, inlined as a literal where it is read."""

    def is_generator(self, node: Any) -> bool:
        """An op whose value depends on the element's position (arange, a draw)."""

    def reads_shape_only(self, node: Any, arg: Any = None) -> bool:
        """An op that reads only the shape of its argument (``arg``, or any)."""

    def reads_by_index(self, node: Any) -> bool:
        """An op that reads an input through computed indices (gather, embedding)."""

    def reduction_scratch(self, kernel: "Kernel", interpreted: bool) -> list["Buffer"]:
        """Workspace a reduction kernel's code will use (a split's partials), if any."""
