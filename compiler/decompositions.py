"""The decomposition table: which ATen ops the joint graph is written in.

Start from PyTorch's core ATen decompositions (what every backend may
assume) and also decompose the composite ops whose parts codegen fuses
well: dropout into a uniform draw and a comparison (so the mask comes from
codegen's counter-based generator), GELU into erf and products, layer norm
and softmax into reductions and pointwise math, batch norm into the same.
What remains for codegen is a small set: pointwise math (docs/ops.md lists
every lowered op), reductions, matrix products, convolutions, indexing and
RNG. The torch program (``executor="torch"``, the CPU default) keeps a few
of those composites whole instead (``TORCH_WHOLE``): it runs each op as one
torch call, so fewer, fused calls are what make it fast.

Some of PyTorch's core decompositions are written for inference and export
and are wrong in a training joint graph, where AOTAutograd pairs a
decomposed forward with the op's own derivative formula. Those are left out
(``EXCLUDED``, each with its reason); ``tests/test_decompositions.py`` runs
every entry against the op it replaces on PyTorch's OpInfo samples, all
outputs compared, so the next such entry fails there.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch._decomp

from retrograd.locking import compiling
from retrograd.runtime.device import choose_executor, device_of

__all__ = ["decomposition_table", "traced_right", "EXCLUDED", "FIXED", "AUTOGRAD_FIXES",
           "HELD", "TORCH_REPLACED", "TORCH_WHOLE", "table_for"]

aten = torch.ops.aten

EXTRA = [
    aten.gelu, aten.native_layer_norm, aten._softmax, aten._log_softmax,
    aten._native_batch_norm_legit_functional, aten._native_batch_norm_legit_no_training,
    aten.native_batch_norm,   # what compile_step's functionalized trace reaches
    # what the no_training decomposition calls: mutable by its schema (it
    # writes running stats when training), so it must not reach the graph
    aten._native_batch_norm_legit,
    aten.native_group_norm, aten.hardswish, aten.hardsigmoid, aten.silu, aten.mish,
    aten.elu, aten.leaky_relu, aten.softplus, aten.native_dropout,
]


def _seed(device) -> torch.Tensor:
    """One draw from torch's generator: the key of a uniform stream."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)


def _rand_like(x, *, dtype=None, layout=None, device=None, pin_memory=None,
               memory_format=None):
    dtype, device = dtype or x.dtype, device or x.device
    like = x if (dtype, torch.device(device)) == (x.dtype, x.device) else \
        torch.zeros(x.shape, dtype=dtype, device=device)
    return torch.ops.retrograd.uniform(like, _seed(device), 0)


def _rand(size, *, generator=None, dtype=None, layout=None, device=None, pin_memory=None):
    if generator is not None:   # a generator of the caller's: leave it to torch
        return NotImplemented
    like = torch.zeros(size, dtype=dtype or torch.get_default_dtype(), device=device)
    return torch.ops.retrograd.uniform(like, _seed(like.device), 0)


#: Uniform draws become a seed and a pure function of it (retrograd/rng.py),
#: so that checkpoint placement can recompute them -- a dropout mask -- in
#: the backward instead of saving them.
RANDOM = {aten.rand_like.default: _rand_like, aten.rand.default: _rand}


def _multilabel_margin_loss_forward(input, target, reduction: int):
    """``aten.multilabel_margin_loss_forward`` as torch's decomposition writes
    it, with the padding after each row's -1 terminator masked out of the loss
    (torch 2.13 counts it as more copies of the first target)."""
    orig_shape = input.shape
    input, target = torch.atleast_2d(input), torch.atleast_2d(target)
    dim = input.shape[1]
    idx = torch.arange(dim, device=target.device)
    end = torch.amin(torch.where(target == -1, idx, dim), dim=-1, keepdim=True)
    listed = idx < end                                   # (N, dim): j-th target is real
    u = torch.gather(input, -1, torch.where(listed, target, 0))
    is_target = torch.any(idx == torch.where(listed, target, -1).unsqueeze(-1), dim=1)
    z = (1.0 - u.T.unsqueeze(-1) + input).clamp_min(0) / dim   # (j, N, dim)
    z = torch.where(is_target | ~listed.T.unsqueeze(-1), 0, z)
    if reduction == 1:
        z = z.sum(dim=(0, -1)).mean()
    elif reduction == 2:
        z = z.sum()
    else:
        z = z.sum(dim=(0, -1))
    return z, is_target.to(input.dtype).reshape(orig_shape)


def _soft_margin_loss_backward(grad_output, input, target, reduction: int):
    """``-y * sigmoid(-y * x)``: PyTorch's decomposition writes
    ``y * (sigmoid(y * x) - 1)``, which cancels in float32 where ``y * x`` is
    large (a gradient of ~1e-8 came out ~10% off)."""
    grad = -target * grad_output * torch.sigmoid(-target * input)
    return grad / input.numel() if reduction == 1 else grad


#: Core decompositions replaced by right ones.
FIXED = {aten.soft_margin_loss_backward.default: _soft_margin_loss_backward}


#: Decompositions that PyTorch registers at the Autograd dispatch key (they
#: run while any graph is traced, before the table is consulted) and that are
#: wrong; replaced by fixed ones while retrograd traces (``traced_right``).
AUTOGRAD_FIXES = {
    aten.multilabel_margin_loss_forward.default: _multilabel_margin_loss_forward,
}


@contextlib.contextmanager
def traced_right():
    """Trace with ``AUTOGRAD_FIXES`` in place of PyTorch's Autograd-key
    decompositions; PyTorch's own are put back on exit. The kernels live on
    the op objects, so the swap is process-wide while it lasts: it holds the
    compile lock (``locking.compiling``) throughout, so no other retrograd
    or dynamo trace (which would see the swapped kernels) runs meanwhile."""
    with compiling():
        key = torch._C.DispatchKey.Autograd
        saved = {op: op.py_kernels.get(key) for op in AUTOGRAD_FIXES}
        try:
            for op, fixed in AUTOGRAD_FIXES.items():
                op.py_kernels[key] = fixed
                op._dispatch_cache.clear()
            yield
        finally:
            for op, kernel in saved.items():
                if kernel is None:
                    op.py_kernels.pop(key, None)
                else:
                    op.py_kernels[key] = kernel
                op._dispatch_cache.clear()


#: Core decompositions that are wrong for training, and why.
EXCLUDED = {
    # Returns the attention probabilities (B x H x T x T) where the op's
    # derivative formula (``_scaled_dot_product_flash_attention_for_cpu_backward``)
    # expects the logsumexp (B x H x T): every gradient of SDPA came out wrong,
    # and the O(T^2) probabilities were saved. The fused op stays whole and
    # runs as an extern call, saving its O(T) logsumexp (Inductor excludes it too).
    aten._scaled_dot_product_flash_attention_for_cpu.default:
        "returns attention probabilities where the backward expects the logsumexp",
    # Counts the padding after a target list's -1 terminator as targets
    # (torch 2.13); the fixed version is in AUTOGRAD_FIXES.
    aten.multilabel_margin_loss_forward.default:
        "counts targets after the -1 terminator",
}


#: Ops the table holds back while tracing, so that the joint graph shows the
#: linear + cross-entropy pattern whole (passes/linear_cross_entropy.py);
#: ``loss_ops.restore``, a required pipeline step, decomposes every one the
#: pattern did not take with this table's own entry (``full_table``).
HELD = {aten._log_softmax.default, aten._log_softmax_backward_data.default,
        aten.nll_loss_forward.default, aten.nll_loss_backward.default,
        aten.logsumexp.default}   # a z-loss beside the cross-entropy (matching/z_loss.py)


#: Ops kept whole when the graph runs as the torch program (``executor="torch"``,
#: what ``"auto"`` runs on a CPU): there each decomposed op is a torch call of a
#: few microseconds, and these fused ATen kernels replace 8-15 calls each (GELU's
#: derivative, layer norm's backward). Only ops whose keeping leaves the saved
#: bytes unchanged: the forward ops the plan recomputes in the backward stay
#: decomposed, since an extern op with several outputs is not recomputed
#: (``native_layer_norm`` whole saved its output: mlp 512 -> 672 bytes).
#: The backward ops read what their decomposition reads (GELU's input; the
#: norm's input, mean and rstd), so the plan saves the same values.
TORCH_WHOLE = {aten.gelu.default, aten.gelu_backward.default,
               aten.native_layer_norm_backward.default,
               aten._softmax_backward_data.default}   # attention's softmax: 1 call, not 4
# not ReLU's threshold_backward: whole, the layout pass no longer gave the
# CNN's convolution backward channels-last operands (step peak 31,116 -> 31,628)


def _batch_norm_backward_whole(grad, input, weight, running_mean, running_var, save_mean,
                               save_invstd, train, eps, output_mask):
    """Batch norm's backward kept whole for the torch program (one call, not
    ~20), without the running statistics when training: the op ignores them
    then (it reads ``save_mean``/``save_invstd``), but as operands they made
    the plan save a copy of each (the forward updates them in place): cnn
    4,304 -> 4,368 saved bytes. Traced as the op itself (``NotImplemented``)
    once they are gone, or in eval mode."""
    if train and (running_mean is not None or running_var is not None):
        return aten.native_batch_norm_backward.default(
            grad, input, weight, None, None, save_mean, save_invstd, train, eps, output_mask)
    return NotImplemented


#: Entries the torch program's table replaces (``TORCH_WHOLE``'s reasons;
#: what each changes is in its docstring).
TORCH_REPLACED = {aten.native_batch_norm_backward.default: _batch_norm_backward_whole}


def table_for(requested: str, tensors) -> dict:
    """The table to trace with when ``requested`` (an executor option) runs on
    ``tensors``: ``executor="torch"`` keeps ``TORCH_WHOLE`` whole; the
    interpreter and Triton keep every decomposition (codegen fuses them)."""
    try:
        executor = choose_executor(requested, device_of(tensors))
    except ValueError:   # refused: the compiler says why, with its own message
        executor = None
    return decomposition_table(executor=executor)


@functools.lru_cache(maxsize=None)
def decomposition_table(full_table: bool = False, executor: str | None = None) -> dict:
    """What retrograd traces with; ``full_table`` also holds the HELD ops' entries;
    ``executor="torch"`` leaves out the ``TORCH_WHOLE`` ops' (see ``table_for``)."""
    import retrograd.rng  # noqa: F401  (registers retrograd::uniform)
    table = dict(torch._decomp.core_aten_decompositions())
    table.update(torch._decomp.get_decompositions(EXTRA))
    table.update(RANDOM)
    table.update(FIXED)
    for op in EXCLUDED:
        table.pop(op, None)
    if not full_table:
        for op in HELD:
            table.pop(op, None)
    if executor == "torch":
        for op in TORCH_WHOLE:
            table.pop(op, None)
        table.update(TORCH_REPLACED)
    return table
