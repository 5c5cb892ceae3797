"""Triton source for one fused pointwise kernel.

The kernel iterates over the elements of its nodes in row-major order, one
block of ``BLOCK`` elements per program, like Triton's vector-add tutorial.
Every node of the group shares that iteration order (fusion guarantees it:
same element count, edges that are same-shape or row-major reshapes), so an
in-kernel value is one register per element. Tensors from outside are loaded
through their strides, broadcast dimensions getting stride 0; values used
outside are stored through the strides torch would give them.

The source reads like the tutorial on purpose: a header naming the fx nodes
covered, the mask explained once, one line per node.
"""

from __future__ import annotations

import math
import re
from string import Template

import torch

from retrograd.codegen import ops
from retrograd.codegen.layout import contiguous_strides, next_power_of_two
from retrograd.codegen.indexing import INDEXING, lower_indexing
from retrograd.ir import Buffer, Kernel

__all__ = ["generate_pointwise", "choose_block", "HELPERS"]

#: Small jit functions kernels call for math the interpreter lacks.
HELPERS = {
    "_maximum": '''
@triton.jit
def _maximum(a, b):
    # torch.maximum propagates NaN; tl.maximum need not.
    return tl.where((a > b) | (a != a), a, b)
''',
    "_minimum": '''
@triton.jit
def _minimum(a, b):
    return tl.where((a < b) | (a != a), a, b)
''',
    "_sigmoid": '''
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))
''',
    "_uniform": '''
@triton.jit
def _uniform(seed, offset):
    # Philox 4x32-10 (Salmon et al., SC'11) keyed by the seed at counter
    # ``offset``; the top 24 bits of the first word scaled by 2**-24: exact in
    # float32, so always below 1 (triton.language.random's 31 bits times 2**-31
    # round up to 1.0 in float32 for the largest words).
    c0 = offset.to(tl.uint32)
    zero = c0 * 0
    c1, c2, c3 = zero, zero, zero
    k0, k1 = zero + seed.to(tl.uint32), zero
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(0xCD9E8D57, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(0xD2511F53, _c0) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return (c0 >> 8).to(tl.float32) * 5.9604644775390625e-08
''',
    "_tanh": '''
@triton.jit
def _tanh(x):
    # No libdevice in the interpreter: tanh|x| = -m / (2 + m) with
    # m = expm1(-2|x|), by Kahan's trick so that it stays accurate near zero
    # in float64 too (a short Taylor polynomial is only fp32-accurate).
    y = -2.0 * tl.abs(x)
    u = tl.exp(y)
    m = tl.where(u == 1.0, y, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * y / tl.log(u)))
    t = -m / (2.0 + m)
    return tl.where(x < 0, -t, tl.where(x == 0, x, t))   # x == 0 keeps the sign of zero
''',
    "_expm1": '''
@triton.jit
def _expm1(x):
    # Kahan's trick: accurate near zero without libdevice. x / log(u) is near
    # 1, so dividing first keeps a large u from overflowing; an overflowed
    # exp(x) stays inf (inf / inf would be NaN).
    u = tl.exp(x)
    r = tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * (x / tl.log(u)))
    return tl.where(u == 1.0, x, tl.where(u == float("inf"), u, r))
''',
    "_log1p": '''
@triton.jit
def _log1p(x):
    # Kahan's trick likewise, dividing first; log1p(inf) is inf.
    u = 1.0 + x
    r = tl.log(u) * (x / (u - 1.0))
    return tl.where(u == 1.0, x, tl.where(u == float("inf"), u, r))
''',
    "_pow": '''
@triton.jit
def _pow(x, y):
    # x ** y = exp2(y * log2|x|), with C's pow for signs and special values
    # (what torch computes): a negative base, -0 included, keeps its sign for
    # an odd integer y; a finite negative base with a non-integer y is NaN
    # (-inf ** 0.5 is inf); x ** 0, 1 ** y and (-1) ** inf are 1, NaN or not.
    r = tl.exp2(y * tl.log2(tl.abs(x)))
    y_int = tl.floor(y) == y
    y_odd = y_int & (tl.floor(y * 0.5) * 2.0 != y)
    negative = (x < 0) | ((x == 0) & (1.0 / x < 0))   # 1 / -0 is -inf
    r = tl.where(negative & y_odd, -r, r)
    r = tl.where((x < 0) & (x > float("-inf")) & (y_int == 0), float("nan"), r)
    one = (y == 0) | (x == 1) | ((x == -1) & (tl.abs(y) == float("inf")))
    return tl.where(one, 1.0, r)
''',
    "_trunc": '''
@triton.jit
def _trunc(x):
    return tl.where(x < 0, tl.ceil(x), tl.floor(x))
''',
    "_remainder": '''
@triton.jit
def _remainder(a, b):
    # torch's remainder, for ints and floats alike: C's fmod (what % is in
    # Triton), moved to the divisor's sign. Exact, where a - floor(a / b) * b
    # is not (a tiny b, an infinite b).
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)
''',
    "_div_floor": '''
@triton.jit
def _div_floor(a, b):
    # torch's div_floor_floating: (a - fmod(a, b)) / b is exact where
    # floor(a / b) is not (1 // 0.1 is 9, not 10), and NaN for an infinite a;
    # a zero quotient takes the sign of a / b, and b == 0 gives IEEE's a / b.
    q = a / b
    mod = a % b
    div = (a - mod) / b
    div = tl.where((mod != 0) & ((b < 0) != (mod < 0)), div - 1.0, div)
    result = tl.floor(div)
    result = tl.where(div - result > 0.5, result + 1.0, result)
    negative = (q < 0) | ((q == 0) & (1.0 / q < 0))
    result = tl.where(div == 0, tl.where(negative, -0.0, 0.0), result)
    return tl.where(b == 0, q, result)
''',
    "_round_to_bf16": '''
@triton.jit
def _round_to_bf16(x):
    # float32 -> the nearest bfloat16 (ties to even), still held as float32.
    # Done on the bits because the interpreter's cast truncates.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
''',
}

#: Mantissa digits of the half types: torch's uniform draw for them is an
#: integer below 2**digits times 2**-digits (ATen's ``uniform_real``).
HALF_DIGITS = {torch.float16: 11, torch.bfloat16: 8}

KERNEL = Template('''\
"""$title

Generated by retrograd for graph $graph. Covers these fx nodes:
$covered
"""
import triton
import triton.language as tl
$helpers

@triton.jit
def $name(
$params
    n_elements,             # elements in the iteration space
    BLOCK: tl.constexpr,    # elements per program
):
    pid = tl.program_id(0)
    offsets = $offsets
    # the last block may run past the end: mask those lanes off
    mask = offsets < n_elements
$body


def launch($args):
    """Launch $name over $numel elements, $block per program."""
    grid = (triton.cdiv($numel, $block),)
    $name[grid]($args, $numel, BLOCK=$block)
''')


def choose_block(numel: int, interpreted: bool) -> int:
    """Elements per program: 1024 on GPUs; on the interpreter few, large blocks
    (each program instance costs ~1.5 ms there, see TRITON_ON_CPU.md)."""
    if interpreted:
        return max(16, min(1 << 16, next_power_of_two(numel)))
    return max(16, min(1024, next_power_of_two(numel)))




class _Writer:
    """Collects the body of one kernel: coordinates, loads, math, stores."""

    def __init__(self, kernel: Kernel, buffers: dict[str, Buffer]):
        self.kernel = kernel
        self.buffers = buffers
        self.group = {node.name: node for node in kernel.nodes}
        self.lines: list[str] = []
        self.coordinates: dict[tuple, str] = {}   # (shape, dim) -> variable
        self.loads: dict[tuple, str] = {}         # (buffer, shape) -> variable
        self.dtypes: dict[str, torch.dtype] = {}  # variable -> compute dtype
        self.vector: set[str] = set()             # variables holding a block
        self.needs_broadcast = False

    # -- indexing ---------------------------------------------------------
    def _coordinate(self, shape: tuple, dim: int) -> str:
        key = (shape, dim)
        if key not in self.coordinates:
            inner = math.prod(shape[dim + 1:])
            name = f"x{len(self.coordinates)}"
            text = "offsets" if inner == 1 else f"(offsets // {inner})"
            if dim > 0:
                text = f"{text} % {shape[dim]}"
            self.lines.append(f"    {name} = {text}  # dim {dim} of {tuple(shape)}")
            self.coordinates[key] = name
        return self.coordinates[key]

    def coordinate(self, shape, dim: int) -> str:
        """The variable holding coordinate ``dim`` of ``shape`` at each offset."""
        return self._coordinate(tuple(shape), dim)

    def indexed_load(self, buffer_name: str, index: str, valid: str | None,
                     cast_to: torch.dtype | None) -> str:
        """Load ``buffer_name`` at a computed ``index`` (indexing lowerings)."""
        buffer = self.buffers[buffer_name]
        variable = f"{buffer_name}_at{len(self.loads)}"
        self.loads[(buffer_name, index, valid)] = variable
        mask = "mask" if valid is None else f"mask & ({valid})"
        text = f"tl.load({buffer_name}_ptr + {index}, mask={mask}, other=0)"
        dtype = getattr(torch, buffer.dtype)
        compute = ops.compute_dtype(dtype)
        if cast_to is not None and cast_to != compute:
            compute = cast_to
        if compute != dtype:
            text += f".to({ops.triton_dtype(compute)})"
        self.lines.append(f"    {variable} = {text}")
        self.dtypes[variable] = compute
        self.vector.add(variable)
        return variable

    def index(self, shape, strides, consumer_shape) -> str:
        """Flat index of the element that lines up with the kernel's offsets."""
        shape, consumer_shape = tuple(shape), tuple(consumer_shape)
        if shape == consumer_shape and tuple(strides) == contiguous_strides(shape):
            return "offsets"
        terms = []
        lead = len(consumer_shape) - len(shape)
        for dim, (size, stride) in enumerate(zip(shape, strides)):
            if size == 1 or stride == 0:
                continue   # broadcast (or length-one) dimension
            coordinate = self._coordinate(consumer_shape, dim + lead)
            terms.append(coordinate if stride == 1 else f"{coordinate} * {stride}")
        if not terms:
            self.needs_broadcast = True
            return "broadcast"
        return " + ".join(terms)

    # -- operands -----------------------------------------------------------
    def operand(self, consumer, arg, cast_to: torch.dtype | None = None) -> str:
        if not hasattr(arg, "op"):             # a Python scalar
            if cast_to is not None and cast_to.is_floating_point and isinstance(arg, int) \
                    and not isinstance(arg, bool):
                return ops.literal(float(arg))
            return ops.literal(arg)
        name = self.kernel.aliases.get(arg.name, arg.name)
        if name in self.group:
            variable = name
        elif ops.is_fill(arg):
            return ops.literal(ops.fill_value(arg))
        else:
            variable = self._load(arg.name, consumer.meta["val"].shape)
        if cast_to is not None and self.dtypes[variable] != cast_to:
            return f"{variable}.to({ops.triton_dtype(cast_to)})"
        return variable

    def _load(self, buffer_name: str, consumer_shape) -> str:
        key = (buffer_name, tuple(consumer_shape))
        if key not in self.loads:
            buffer = self.buffers[buffer_name]
            index = self.index(buffer.shape, buffer.strides, consumer_shape)
            variable = f"{buffer_name}_{len(self.loads)}" if any(
                k[0] == buffer_name for k in self.loads) else f"{buffer_name}_in"
            dtype = getattr(torch, buffer.dtype)
            text = f"tl.load({buffer_name}_ptr + {index}, mask=mask)"
            if ops.compute_dtype(dtype) != dtype:
                text += ".to(tl.float32)"
            self.lines.append(f"    {variable} = {text}")
            self.loads[key] = variable
            self.dtypes[variable] = ops.compute_dtype(dtype)
            self.vector.add(variable)
        return self.loads[key]

    # -- nodes and stores -----------------------------------------------------
    def node(self, node) -> None:
        used: list[str] = []

        def operand(arg, cast_to=None):
            text = self.operand(node, arg, cast_to)
            used.append(text)
            return text

        if node.target in INDEXING:
            expression = lower_indexing(node, self)
            used.append(expression)
        elif ops.is_random(node):
            # counter offset + i of the stream keyed by the seed tensor's value
            expression = f"_uniform({operand(node.args[1])}, offsets + {int(node.args[2])})"
            digits = HALF_DIGITS.get(node.meta["val"].dtype)
            if digits:   # as torch draws them: k / 2**digits, so rounding never gives 1.0
                expression = f"tl.floor({expression} * {2.0 ** digits!r}) * {2.0 ** -digits!r}"
        else:
            expression = ops.lower(node, operand)
        dtype = ops.compute_dtype(node.meta["val"].dtype)
        tensor_dtypes = {self.dtypes[v] for v in self.dtypes if _mentions(used, v)}
        if dtype != torch.bool and tensor_dtypes - {dtype}:
            expression = f"({expression}).to({ops.triton_dtype(dtype)})"
        self.lines.append(f"    {node.name} = {expression}")
        self.dtypes[node.name] = dtype
        if any(_mentions(used, v) for v in self.vector) or "offsets" in expression \
                or "BLOCK" in expression:
            self.vector.add(node.name)

    def store(self, name: str) -> None:
        buffer = self.buffers[name]
        node = self.group[name]
        index = self.index(buffer.shape, buffer.strides, node.meta["val"].shape)
        value = name
        if name not in self.vector:
            value = f"tl.full([BLOCK], 0, {ops.triton_dtype(self.dtypes[name])}) + {value}"
        dtype = getattr(torch, buffer.dtype)
        if dtype == torch.bfloat16:
            value = f"_round_to_bf16({value}).to(tl.bfloat16)"
        elif dtype != self.dtypes[name]:
            value = f"{value}.to({ops.triton_dtype(dtype)})"
        self.lines.append(f"    tl.store({name}_ptr + {index}, {value}, mask=mask)")


def _mentions(texts: list[str], variable: str) -> bool:
    pattern = re.compile(rf"\b{re.escape(variable)}\b")
    return any(pattern.search(text) for text in texts)


def generate_pointwise(kernel: Kernel, buffers: dict[str, Buffer], block: int,
                       graph: str = "") -> str:
    """Triton source (kernel plus ``launch``) for a fused pointwise kernel."""
    writer = _Writer(kernel, buffers)
    for node in kernel.nodes:
        writer.node(node)
    for name in kernel.outputs:
        writer.store(name)
    body = list(writer.lines)
    if writer.needs_broadcast:
        body.insert(0, "    broadcast = tl.full([BLOCK], 0, tl.int32)"
                       "  # index of a broadcast scalar")
    body_text = "\n".join(body)
    helpers = [source for name, source in HELPERS.items() if re.search(rf"\b{name}\(", body_text)]
    args = kernel.inputs + kernel.outputs
    params = "\n".join(
        [f"    {name}_ptr,  # in: {_describe(buffers[name])}" for name in kernel.inputs]
        + [f"    {name}_ptr,  # out: {_describe(buffers[name])}" for name in kernel.outputs])
    offsets = "pid * BLOCK + tl.arange(0, BLOCK)"
    if _largest_index(kernel, buffers) >= 2 ** 31:
        offsets = "pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)"
    return KERNEL.substitute(
        title=f"{kernel.name}: {len(kernel.nodes)} pointwise ops fused into one kernel.",
        graph=graph or "?",
        covered="\n".join(f"    {_describe_node(node)}" for node in kernel.nodes),
        helpers="".join(helpers),
        name=kernel.name,
        params=params,
        offsets=offsets,
        body=body_text,
        args=", ".join(args),
        numel=kernel.numel,
        block=block,
    )


def _describe_node(node) -> str:
    """``mul_3 = aten.mul.Tensor(view_2, 0.5)``: the node as a line of Python."""
    def show(arg):
        return arg.name if hasattr(arg, "name") and hasattr(arg, "op") else repr(arg)
    args = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()
                                           if k not in ("layout", "device", "pin_memory")]
    return f"{node.name} = {node.target}({', '.join(args)})"


def _describe(buffer: Buffer) -> str:
    return f"{buffer.dtype}{list(buffer.shape)} strides {list(buffer.strides)}"


def _largest_index(kernel: Kernel, buffers: dict[str, Buffer]) -> int:
    spans = [kernel.numel]
    for name in kernel.inputs + kernel.outputs:
        buffer = buffers[name]
        spans.append(buffer.nbytes // max(1, buffer.logical_bytes // max(1, buffer.numel)))
    return max(spans)
