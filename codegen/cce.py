"""Triton source of the Cut Cross-Entropy kernels (Wijmans et al., 2024).

The fused linear + cross-entropy (passes/linear_cross_entropy.py) never
holds the ``rows x V`` logits. Its chunked form (compiler/loss_ops.py) still
writes each chunk's logits to memory; these kernels do not even that: a
logits tile lives in registers only.

- ``cce_forward``: one program per ``BLOCK_R`` rows walks the vocabulary in
  ``BLOCK_V`` columns; each tile is ``h @ W^T`` over ``D`` in ``BLOCK_D``
  steps (``tl.dot``, float32 accumulator), plus the bias, rounded as eager
  rounds it (to the operands' dtype, then to the logits' dtype), soft-capped
  if asked; an online logsumexp (running max and rescaled sum), the target's
  logit and the row's sum of logits (label smoothing) accumulate across
  tiles. Per row it writes three float32 numbers.
- ``cce_backward``: one program per (row block, vocabulary block) recomputes
  its tile, forms the logits' gradient ``softmax * coef + row_grad - scale *
  onehot`` (times ``1 - tanh^2`` through a soft cap) from the saved
  logsumexp, rounds it as eager does before its products, and adds
  ``g @ W`` into ``grad_hidden``, ``g^T @ h`` into ``grad_W`` and the
  column sums into ``grad_b`` with ``tl.atomic_add`` (float32), one ``D``
  block at a time.

The per-row scalars (``coef``, ``scale``, ``row_grad``: ignore_index, class
weights, the mean's divisor, label smoothing, a z-loss) are O(rows) and
computed in torch by the caller, with loss_ops' formulas. Under the
interpreter float32 products are exact float32 (``input_precision="ieee"``
on GPUs too, matching torch's default of no TF32); half tiles are upcast.
"""

from __future__ import annotations

from retrograd.codegen.common import HELPERS

__all__ = ["cce_source", "ROUNDINGS"]

#: How a value is rounded, by dtype name: 0 float32 (nothing), 1 bfloat16, 2 float16.
ROUNDINGS = {"float32": 0, "bfloat16": 1, "float16": 2}

# triton.language.standard's combine functions, by reference only: the
# interpreter reduces with numpy then, and a call would fail where triton was
# imported without TRITON_INTERPRET (codegen/reduction_kinds.py): tl.sum and tl.max are
# such calls
_KERNELS = '''
@triton.jit
def _round(x, HOW: tl.constexpr):
    # float32 -> the dtype HOW names (0 none, 1 bfloat16, 2 float16), held as float32
    if HOW == 1:
        x = _round_to_bf16(x)
    elif HOW == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, R, V, D,
                 HAS_BIAS: tl.constexpr, ROUND_MM: tl.constexpr, ROUND_LOGITS: tl.constexpr,
                 SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    # the tile logits[rows, cols] = h[rows] @ W[cols]^T + b[cols], as eager rounds it;
    # returns (logits, tanh(logits / SOFTCAP)), the second only meaningful with a cap
    acc = tl.full([BLOCK_R, BLOCK_V], 0.0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_ptr + rows[:, None] * D + rd[None, :],
                    mask=(rows[:, None] < R) & (rd[None, :] < D), other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols[None, :] * D + rd[:, None],
                    mask=(cols[None, :] < V) & (rd[:, None] < D), other=0.0).to(tl.float32)
        acc += tl.dot(h, w, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    logits = _round(_round(acc, ROUND_MM), ROUND_LOGITS)
    tanh = logits
    if SOFTCAP != 0.0:
        tanh = _tanh(logits / SOFTCAP)
        logits = tanh * SOFTCAP
    return logits, tanh


@triton.jit
def cce_forward(h_ptr, w_ptr, b_ptr, target_ptr, lse_ptr, picked_ptr, total_ptr, R, V, D,
                HAS_BIAS: tl.constexpr, ROUND_MM: tl.constexpr, ROUND_LOGITS: tl.constexpr,
                SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr):
    # rows pid * BLOCK_R ...: their logsumexp, target logit and sum of logits
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    target = tl.load(target_ptr + rows, mask=row_ok, other=0)
    running_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    running_sum = tl.full([BLOCK_R], 0.0, tl.float32)
    picked = tl.full([BLOCK_R], 0.0, tl.float32)
    total = tl.full([BLOCK_R], 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        logits, tanh = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, R, V, D, HAS_BIAS,
                                    ROUND_MM, ROUND_LOGITS, SOFTCAP, BLOCK_R, BLOCK_V, BLOCK_D)
        col_ok = cols[None, :] < V
        masked = tl.where(col_ok, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.reduce(masked, 1, tl.standard._elementwise_max))
        running_sum = running_sum * tl.exp(running_max - new_max) \\
            + tl.reduce(tl.exp(masked - new_max[:, None]), 1, tl.standard._sum_combine)
        running_max = new_max
        hit = cols[None, :] == target[:, None]
        picked += tl.reduce(tl.where(hit, logits, 0.0), 1, tl.standard._sum_combine)
        total += tl.reduce(tl.where(col_ok, logits, 0.0), 1, tl.standard._sum_combine)
    tl.store(lse_ptr + rows, running_max + tl.log(running_sum), mask=row_ok)
    tl.store(picked_ptr + rows, picked, mask=row_ok)
    tl.store(total_ptr + rows, total, mask=row_ok)


@triton.jit
def cce_backward(h_ptr, w_ptr, b_ptr, target_ptr, lse_ptr, coef_ptr, row_grad_ptr, scale_ptr,
                 grad_h_ptr, grad_w_ptr, grad_b_ptr, R, V, D,
                 HAS_BIAS: tl.constexpr, ROUND_MM: tl.constexpr, ROUND_LOGITS: tl.constexpr,
                 SOFTCAP: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # the tile (rows, cols) of the logits' gradient, never stored: its products
    # are added into grad_h, grad_w and grad_b (float32) atomically
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < R
    col_ok = cols < V
    logits, tanh = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, R, V, D, HAS_BIAS,
                                ROUND_MM, ROUND_LOGITS, SOFTCAP, BLOCK_R, BLOCK_V, BLOCK_D)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    row_grad = tl.load(row_grad_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_ok, other=0)
    grad = tl.exp(logits - lse[:, None]) * coef[:, None] + row_grad[:, None]
    grad = grad - tl.where(cols[None, :] == target[:, None], scale[:, None], 0.0)
    if SOFTCAP != 0.0:
        grad = grad * (1.0 - tanh * tanh)
    grad = tl.where(row_ok[:, None] & col_ok[None, :], grad, 0.0)
    grad = _round(_round(grad, ROUND_LOGITS), ROUND_MM)   # as eager casts it back
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        w = tl.load(w_ptr + cols[:, None] * D + rd[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        tl.atomic_add(grad_h_ptr + rows[:, None] * D + rd[None, :],
                      tl.dot(grad, w, input_precision="ieee"),
                      mask=row_ok[:, None] & d_ok[None, :])
        if WEIGHT_GRAD:
            h = tl.load(h_ptr + rows[:, None] * D + rd[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            tl.atomic_add(grad_w_ptr + cols[:, None] * D + rd[None, :],
                          tl.dot(tl.trans(grad), h, input_precision="ieee"),
                          mask=col_ok[:, None] & d_ok[None, :])
    if BIAS_GRAD:
        tl.atomic_add(grad_b_ptr + cols, tl.reduce(grad, 0, tl.standard._sum_combine), mask=col_ok)
'''


def cce_source() -> str:
    """The kernels' module source (loaded through the kernel cache, as generated code is)."""
    return ('"""Cut Cross-Entropy kernels, generated by retrograd (codegen/cce.py)."""\n'
            "import triton\nimport triton.language as tl\n"
            + HELPERS["_round_to_bf16"] + HELPERS["_tanh"] + _KERNELS)
