"""The fused linear + cross-entropy as Cut Cross-Entropy kernels, and when to use them.

``retrograd::linear_cross_entropy_cce`` and ``..._cce_backward`` take the
arguments of loss_ops' chunked ops, one for one (``chunk_rows`` is unused:
no chunk of logits is ever held), and compute the same values with the
Triton kernels of codegen/cce.py: the logits live in registers only. The
O(rows) work around them (ignore_index, class weights, the mean's divisor,
label smoothing's row sums, a z-loss's gradient) is loss_ops' own code.

passes/linear_cross_entropy.py asks ``choose`` (through ``OpSupport``)
which pair to write into the graph: with ``matmul_templates=True`` these
(so tests run them under the interpreter), with False or off CUDA the
chunked extern matmuls; on CUDA by default a bounded autotune times both
(forward and backward, a few block configurations) on random inputs of the
pattern's shapes and keeps the faster, recorded in the kernel cache
(runtime/tuning_cache.py) and in the pass's stats. The kernels read the
recorded configuration at run time.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional

import numpy
import torch

from retrograd import loss_ops
from retrograd.codegen.cce import ROUNDINGS, cce_source
from retrograd.codegen.layout import next_power_of_two
from retrograd.runtime import tuning_cache
from retrograd.runtime.device import interpreter_mode
from retrograd.runtime.loader import load_module, write_source

__all__ = ["linear_cross_entropy_cce", "linear_cross_entropy_cce_backward", "choose",
           "supported", "KIND"]

KIND = "cce_tuning"
BUDGET_SECONDS = 10.0
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONFIGS = ({"BLOCK_R": 64, "BLOCK_V": 64, "BLOCK_D": 32}, {"BLOCK_R": 128, "BLOCK_V": 64,
           "BLOCK_D": 32}, {"BLOCK_R": 64, "BLOCK_V": 128, "BLOCK_D": 64})


def supported(hidden_dtype: torch.dtype, logits_dtype: torch.dtype) -> str | None:
    """Why the kernels cannot serve these dtypes, or None."""
    if hidden_dtype not in DTYPES or logits_dtype not in DTYPES:
        return f"dtypes {hidden_dtype} -> {logits_dtype} (the kernels do float32/16-bit)"
    return None


def _kernels(interpreted: bool):
    return load_module(write_source("cce", cce_source()), interpreted)


def _key(hidden, weight, bias, logits_dtype) -> dict:
    device = hidden.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"rows": hidden.shape[0], "vocab": weight.shape[0], "width": weight.shape[1],
            "dtype": str(hidden.dtype), "logits": str(logits_dtype), "bias": bias is not None,
            "device": name}


def _config(hidden, weight, bias, logits_dtype, interpreted: bool) -> dict:
    """Blocks: under the interpreter few, large ones; on a GPU the autotune's
    recorded winner, else the first candidate."""
    if interpreted:
        def fit(size):
            return max(16, min(64, next_power_of_two(size)))
        return {"BLOCK_R": fit(hidden.shape[0]), "BLOCK_V": fit(weight.shape[0]),
                "BLOCK_D": fit(weight.shape[1])}
    record = tuning_cache.lookup(KIND, _key(hidden, weight, bias, logits_dtype))
    return dict(record["config"]) if record and record.get("config") else dict(CONFIGS[0])


@contextlib.contextmanager
def _launching(interpreted: bool):
    """Launch in or out of the interpreter; there, numpy stays quiet about the
    lanes a ``tl.where`` discards (as runtime/executor.py does)."""
    with interpreter_mode(interpreted), (numpy.errstate(all="ignore") if interpreted
                                         else contextlib.nullcontext()):
        yield


def _flags(hidden, logits_dtype, bias, softcap) -> dict:
    return {"HAS_BIAS": bias is not None, "ROUND_MM": ROUNDINGS[str(hidden.dtype)[6:]],
            "ROUND_LOGITS": ROUNDINGS[str(logits_dtype)[6:]], "SOFTCAP": float(softcap)}


@torch.library.custom_op("retrograd::linear_cross_entropy_cce", mutates_args=())
def linear_cross_entropy_cce(hidden: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor], target: torch.Tensor,
                             class_weight: Optional[torch.Tensor], reduction: int,
                             ignore_index: int, logits_dtype: torch.dtype, chunk_rows: int,
                             softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss_ops.linear_cross_entropy by the CCE forward kernel."""
    return _forward(hidden, weight, bias, target, class_weight, reduction, ignore_index,
                    logits_dtype, softcap)


def _forward(hidden, weight, bias, target, class_weight, reduction, ignore_index, logits_dtype,
             softcap, config=None):
    hidden, weight = hidden.contiguous(), weight.contiguous()
    rows, vocab, width = hidden.shape[0], weight.shape[0], weight.shape[1]
    interpreted = hidden.device.type != "cuda"
    config = config or _config(hidden, weight, bias, logits_dtype, interpreted)
    valid, safe = loss_ops._valid_targets(target, ignore_index)
    lse, picked, total = (torch.empty(rows, dtype=torch.float32, device=hidden.device)
                          for _ in range(3))
    grid = (-(-rows // config["BLOCK_R"]),)
    with _launching(interpreted):
        _kernels(interpreted).cce_forward[grid](
            hidden, weight, bias if bias is not None else hidden, safe.contiguous(), lse, picked,
            total, rows, vocab, width, **_flags(hidden, logits_dtype, bias, softcap), **config)
    row_weight = loss_ops._row_weights(valid, safe, class_weight, torch.float32)
    terms = torch.where(valid, row_weight * (lse - picked), 0.0)
    if reduction == loss_ops.MEAN:
        loss = terms.sum() / row_weight.sum()
    elif reduction == loss_ops.SUM:
        loss = terms.sum()
    else:
        loss = terms
    row_sums = total - vocab * lse
    return loss.to(logits_dtype), lse, row_sums.to(logits_dtype)


@linear_cross_entropy_cce.register_fake
def _(hidden, weight, bias, target, class_weight, reduction, ignore_index, logits_dtype,
      chunk_rows, softcap):
    rows = hidden.shape[0]
    shape = (rows,) if reduction not in (loss_ops.MEAN, loss_ops.SUM) else ()
    return (hidden.new_empty(shape, dtype=logits_dtype),
            hidden.new_empty((rows,), dtype=torch.float32),
            hidden.new_empty((rows,), dtype=logits_dtype))


@torch.library.custom_op("retrograd::linear_cross_entropy_cce_backward", mutates_args=())
def linear_cross_entropy_cce_backward(
        grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
        bias: Optional[torch.Tensor], target: torch.Tensor,
        class_weight: Optional[torch.Tensor], lse: torch.Tensor,
        row_grad: Optional[torch.Tensor], reduction: int,
        ignore_index: int, logits_dtype: torch.dtype, chunk_rows: int, softcap: float,
        weight_grad: bool, bias_grad: bool, z_grad: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss_ops.linear_cross_entropy_backward by the CCE backward kernel."""
    return _backward(grad_loss, hidden, weight, bias, target, class_weight, lse, row_grad,
                     reduction, ignore_index, logits_dtype, softcap, weight_grad, bias_grad,
                     z_grad)


def _backward(grad_loss, hidden, weight, bias, target, class_weight, lse, row_grad, reduction,
              ignore_index, logits_dtype, softcap, weight_grad, bias_grad, z_grad, config=None):
    hidden_c, weight_c = hidden.contiguous(), weight.contiguous()
    rows, vocab, width = hidden.shape[0], weight.shape[0], weight.shape[1]
    interpreted = hidden.device.type != "cuda"
    config = config or _config(hidden_c, weight_c, bias, logits_dtype, interpreted)
    valid, safe = loss_ops._valid_targets(target, ignore_index)
    row_weight = loss_ops._row_weights(valid, safe, class_weight, torch.float32)
    scale = grad_loss.float().expand(rows)
    if reduction == loss_ops.MEAN:
        scale = scale / row_weight.sum()
    scale = torch.where(valid, scale * row_weight, 0.0).contiguous()
    row_grad = torch.zeros_like(scale) if row_grad is None else row_grad.float().contiguous()
    coefficient = scale - vocab * row_grad
    if z_grad is not None:
        coefficient = coefficient + z_grad.float()
    device = hidden.device
    grad_hidden = torch.zeros(rows, width, dtype=torch.float32, device=device)
    grad_weight = torch.zeros((vocab, width) if weight_grad else (0,), dtype=torch.float32,
                              device=device)
    grad_bias = torch.zeros(vocab if bias_grad else 0, dtype=torch.float32, device=device)
    grid = (-(-rows // config["BLOCK_R"]), -(-vocab // config["BLOCK_V"]))
    with _launching(interpreted):
        _kernels(interpreted).cce_backward[grid](
            hidden_c, weight_c, bias if bias is not None else hidden_c, safe.contiguous(),
            lse.contiguous(), coefficient.contiguous(), row_grad, scale, grad_hidden,
            grad_weight if weight_grad else grad_hidden, grad_bias if bias_grad else lse,
            rows, vocab, width, **_flags(hidden, logits_dtype, bias, softcap),
            WEIGHT_GRAD=weight_grad, BIAS_GRAD=bias_grad, **config)
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), grad_bias.to(bias_dtype)


linear_cross_entropy_cce_backward.register_fake(loss_ops.backward_fake)


def _inputs(rows, vocab, width, dtype, has_bias, device):
    hidden = torch.randn(rows, width, dtype=dtype, device=device)
    weight = torch.randn(vocab, width, dtype=dtype, device=device) * width ** -0.5
    bias = torch.randn(vocab, dtype=dtype, device=device) if has_bias else None
    target = torch.randint(0, vocab, (rows,), device=device)
    return hidden, weight, bias, target


def autotune(rows, vocab, width, dtype, logits_dtype, has_bias, device, chunk_rows, *,
             timer, budget: float = BUDGET_SECONDS) -> tuple[bool, dict]:
    """(CCE?, the record): from the cache, else the chunked ops (forward and
    backward) against the CCE kernels with each of ``CONFIGS``, timed by
    ``timer`` (milliseconds) on random inputs of these shapes."""
    hidden, weight, bias, target = _inputs(rows, vocab, width, dtype, has_bias, device)
    key = _key(hidden, weight, bias, logits_dtype)
    cached = tuning_cache.lookup(KIND, key)
    if cached is not None:
        record = {k: v for k, v in cached.items() if k != "key"}
        return record["kernel"] == "cce", {**record, "cache": "hit"}
    common = (target, None, loss_ops.MEAN, -100, logits_dtype)
    one = torch.ones((), dtype=logits_dtype, device=device)

    def chunked():
        _, lse, _ = loss_ops.linear_cross_entropy(hidden, weight, bias, *common, chunk_rows, 0.0)
        loss_ops.linear_cross_entropy_backward(one, hidden, weight, bias, target, None, lse,
                                               None, loss_ops.MEAN, -100, logits_dtype,
                                               chunk_rows, 0.0, True, has_bias)

    def fused(config):
        _, lse, _ = _forward(hidden, weight, bias, *common, 0.0, config)
        _backward(one, hidden, weight, bias, target, None, lse, None, loss_ops.MEAN, -100,
                  logits_dtype, 0.0, True, has_bias, None, config)

    started = time.perf_counter()
    chunked_ms = float(timer(chunked))
    tried, stopped = [], None
    for config in CONFIGS:
        if time.perf_counter() - started > budget:
            stopped = f"time cap {budget}s reached after {len(tried)} configs"
            break
        milliseconds = timer(lambda config=config: fused(config))
        tried.append({"config": dict(config), "ms": round(float(milliseconds), 6)})
    best = min(tried, key=lambda entry: entry["ms"], default=None)
    use = best is not None and best["ms"] < chunked_ms
    record = {"kernel": "cce" if use else "chunked", "chunked_ms": round(chunked_ms, 6),
              "tried": tried, "config": best["config"] if use else None, "stopped": stopped}
    tuning_cache.store(KIND, key, record)
    return use, {**record, "cache": "miss"}


def _do_bench(function) -> float:
    import triton.testing   # local: only on CUDA
    return float(triton.testing.do_bench(function, warmup=3, rep=20))


def choose(options, rows: int, vocab: int, width: int, dtype: torch.dtype,
           logits_dtype: torch.dtype, has_bias: bool, device: torch.device,
           chunk_rows: int) -> tuple[bool, dict]:
    """The pass's question: CCE kernels or chunked extern matmuls, and why."""
    setting = options.matmul_templates
    if setting is False:
        return False, {"kernel": "chunked", "why": "matmul_templates=False"}
    reason = supported(dtype, logits_dtype)
    if reason is not None:
        return False, {"kernel": "chunked", "why": reason}
    if setting is True:
        return True, {"kernel": "cce", "why": "matmul_templates=True"}
    if device.type != "cuda":
        return False, {"kernel": "chunked",
                       "why": f"{device.type}: chunked extern matmuls are the default there"}
    if not all(isinstance(size, int) for size in (rows, vocab, width)):
        return False, {"kernel": "chunked", "why": "symbolic sizes: nothing to time"}
    return autotune(rows, vocab, width, dtype, logits_dtype, has_bias, device, chunk_rows,
                    timer=_do_bench)
