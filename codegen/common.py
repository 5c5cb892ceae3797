"""What the kernel writers share: the jit helpers generated code may call,
and the text that describes nodes and buffers in a kernel's header.

``pointwise.py``, ``reduction.py``, ``pooling.py`` and ``scatter.py`` all
write kernels with these; they used to import them from ``pointwise.py`` by
private name.
"""

from __future__ import annotations

import re

from retrograd.ir import Buffer

__all__ = ["HELPERS", "describe", "describe_node", "mentions"]

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


def describe_node(node) -> str:
    """``mul_3 = aten.mul.Tensor(view_2, 0.5)``: the node as a line of Python."""
    def show(arg):
        return arg.name if hasattr(arg, "name") and hasattr(arg, "op") else repr(arg)
    args = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()
                                           if k not in ("layout", "device", "pin_memory")]
    return f"{node.name} = {node.target}({', '.join(args)})"


def describe(buffer: Buffer) -> str:
    """``float32[4, 8] strides [8, 1]``: a kernel parameter's comment."""
    return f"{buffer.dtype}{list(buffer.shape)} strides {list(buffer.strides)}"


def mentions(texts: list[str], variable: str) -> bool:
    """Whether ``variable`` occurs as a whole word in one of ``texts``."""
    pattern = re.compile(rf"\b{re.escape(variable)}\b")
    return any(pattern.search(text) for text in texts)
