"""Random numbers as a deterministic function of a seed: ``retrograd::uniform``.

``torch.rand_like(x)`` draws from torch's generator, so recomputing it gives
other numbers: a dropout mask cannot be recomputed in the backward and must
be saved (one byte per element, for every dropout). retrograd's
decompositions write every uniform draw as two nodes instead:

    seed = aten.randint(0, 2**31 - 1, [])     # one draw from torch's generator
    u = retrograd.uniform(like, seed, offset)  # Philox 4x32-10 of (seed, offset + i)

The seed node is random (never recomputed, saved: 8 bytes); ``uniform`` is a
pure function of it, so checkpoint placement may recompute it -- and the
mask -- in the backward, where the same seed gives the same numbers. This is
the counter-based RNG of JAX and of AOTAutograd's functionalized RNG (Salmon
et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), here on CPU
too.

The eager implementation below (torch ops, used by the ``fx`` and torch
program executors and by ``verify``) computes exactly what the generated
Triton helper ``_uniform`` computes: the top 24 bits of Philox's first word
times 2**-24, rounded down to ``k / 2**digits`` for half precision, as torch
draws them. ``philox_uniform`` (numpy) is the reference it is tested against.

CUDA graphs. Every op here reads the seed as a tensor on the draw's device
and runs there: no ``.item()``, no host copy, so a captured graph replays it
(runtime/cudagraphs.py). The seed itself comes from ``aten.randint`` on that
device; on CUDA, torch's generator reads its seed and offset from device
tensors while a graph is captured, and each replay advances the offset, so
every replay draws a new seed (torch's graph-safe Philox state).
"""

from __future__ import annotations

import numpy
import torch

__all__ = ["CHUNK", "HALF_DIGITS", "philox_uniform", "philox_uniform_tensor", "uniform"]

#: Mantissa bits of the half-precision uniforms torch draws (k / 2**digits).
HALF_DIGITS = {torch.float16: 11, torch.bfloat16: 8}

_MASK = numpy.uint64(0xFFFFFFFF)


def _mulhi(a: int, b: numpy.ndarray) -> numpy.ndarray:
    return ((numpy.uint64(a) * b.astype(numpy.uint64)) >> numpy.uint64(32)).astype(numpy.uint32)


def _mullo(a: int, b: numpy.ndarray) -> numpy.ndarray:
    return ((numpy.uint64(a) * b.astype(numpy.uint64)) & _MASK).astype(numpy.uint32)


def philox_uniform(seed: int, counters: numpy.ndarray) -> numpy.ndarray:
    """Uniform float32 in [0, 1) at each 32-bit counter, keyed by ``seed``."""
    c0 = counters.astype(numpy.uint32)
    c1 = numpy.zeros_like(c0)
    c2 = numpy.zeros_like(c0)
    c3 = numpy.zeros_like(c0)
    k0, k1 = seed & 0xFFFFFFFF, 0
    for _ in range(10):
        old0, old2 = c0, c2
        c0 = _mulhi(0xCD9E8D57, old2) ^ c1 ^ numpy.uint32(k0)
        c2 = _mulhi(0xD2511F53, old0) ^ c3 ^ numpy.uint32(k1)
        c1 = _mullo(0xCD9E8D57, old2)
        c3 = _mullo(0xD2511F53, old0)
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return (c0 >> numpy.uint32(8)).astype(numpy.float32) * numpy.float32(2.0 ** -24)


_WORD = 0xFFFFFFFF

#: Elements drawn per pass of ``uniform``: Philox in int64 torch ops holds
#: about eight int64 temporaries per element, so a whole dropout input at once
#: would hold 64 bytes per element (a GPT-2 activation's dropout: gigabytes);
#: in chunks the transient is at most ~4 MiB whatever the size.
CHUNK = 1 << 16


def _multiply(constant: int, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``constant * word`` in int64 tensors: the
    product of two 32-bit words overflows int64, so ``word`` is split in
    16-bit halves whose partial products (< 2**48) do not. In place where a
    temporary dies, so at most three are alive besides ``word``."""
    partial_low = (word & 0xFFFF).mul_(constant)
    partial_high = (word >> 16).mul_(constant)
    middle = (partial_high & 0xFFFF).bitwise_left_shift_(16).add_(partial_low)
    del partial_low
    high = partial_high.bitwise_right_shift_(16).add_(middle >> 32).bitwise_and_(_WORD)
    return high, middle.bitwise_and_(_WORD)


def philox_uniform_tensor(seed: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """``philox_uniform`` in torch ops on ``counters``' device, keyed by the
    0-dim ``seed`` tensor without reading it on the host (graph-safe)."""
    c0 = counters.to(torch.int64, copy=True).bitwise_and_(_WORD)
    c1, c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0), torch.zeros_like(c0)
    k0 = seed.to(device=c0.device, dtype=torch.int64) & _WORD
    k1 = torch.zeros_like(k0)
    for _ in range(10):
        # each old word dies as soon as its last use is done: at most seven
        # element-sized tensors are alive (four words, a multiply's three)
        high2, low2 = _multiply(0xD2511F53, c0)
        del c0
        new2 = high2.bitwise_xor_(c3).bitwise_xor_(k1)
        c3 = low2
        del high2, low2
        high0, c1_next = _multiply(0xCD9E8D57, c2)
        c0 = high0.bitwise_xor_(c1).bitwise_xor_(k0)
        c1, c2 = c1_next, new2
        del high0, c1_next, new2
        k0 = (k0 + 0x9E3779B9) & _WORD
        k1 = (k1 + 0xBB67AE85) & _WORD
    return (c0 >> 8).to(torch.float32).mul_(2.0 ** -24)


@torch.library.custom_op("retrograd::uniform", mutates_args=())
def uniform(like: torch.Tensor, seed: torch.Tensor, offset: int) -> torch.Tensor:
    """Uniform [0, 1) shaped like ``like`` (its dtype and device; contiguous),
    element ``i`` from counter ``offset + i`` of the stream keyed by ``seed``;
    drawn ``CHUNK`` elements at a time into the result."""
    count = like.numel()
    values = torch.empty(count, dtype=like.dtype, device=like.device)
    digits = HALF_DIGITS.get(like.dtype)
    for start in range(0, count, CHUNK):
        stop = min(count, start + CHUNK)
        counters = torch.arange(offset + start, offset + stop, dtype=torch.int64,
                                device=like.device)
        drawn = philox_uniform_tensor(seed, counters)
        if digits:
            drawn = torch.floor(drawn * 2.0 ** digits) * 2.0 ** -digits
        values[start:stop] = drawn
    return values.reshape(like.shape)


@uniform.register_fake
def _(like: torch.Tensor, seed: torch.Tensor, offset: int) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)
