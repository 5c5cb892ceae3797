"""Batched matmul templates (``aten.bmm``/``aten.baddbmm``, the batch as grid
dimension 1) with fused prologue and epilogue, under Triton's interpreter.

As in test_matmul_template.py: ``matmul_templates=True`` forces the template
(the CPU default keeps the extern call), the report says which nodes it
covers, and values and gradients are compared with float64 eager. Shapes
are tiny and odd; one test shrinks the blocks so that several tiles, a K
loop, masked edges and several products run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from checks import check_against_eager
from retrograd.codegen import matmul_template


def _choices(compiled, half: str) -> dict:
    return next(p for p in compiled.reports[half]["passes"]
                if p["name"] == "matmul_templates")["stats"]


def _covered(compiled, half: str) -> list[list[str]]:
    return [c["nodes"] for c in _choices(compiled, half)["choices"] if c["chosen"] == "template"]


def _inputs(*shapes):
    torch.manual_seed(0)
    return [torch.randn(*shape) for shape in shapes]


X, Y, BIAS, RESIDUAL = (3, 5, 6), (3, 6, 7), (7,), (3, 5, 7)

#: name -> (function, its inputs' shapes); each input is used (each gets a gradient).
EPILOGUES = {
    "scale_bias_gelu": (lambda x, y, b: F.gelu(torch.bmm(x, y) * 0.5 + b), (X, Y, BIAS)),
    "residual": (lambda x, y, r: torch.bmm(x, y) + r, (X, Y, RESIDUAL)),
    "baddbmm_relu": (lambda x, y, r: torch.relu(torch.baddbmm(r, x, y, beta=0.5, alpha=2.0)),
                     (X, Y, RESIDUAL)),
    "baddbmm_broadcast_bias": (lambda x, y, b: torch.tanh(torch.baddbmm(b, x, y)), (X, Y, BIAS)),
    "matmul_4d_scale": (lambda x, y: (x.view(3, 1, 5, 6) @ y.view(3, 1, 6, 7)) * 0.125, (X, Y)),
}


@pytest.mark.parametrize("kind", sorted(EPILOGUES))
def test_each_bmm_epilogue_forward_and_backward(kind):
    fn, shapes = EPILOGUES[kind]
    compiled = check_against_eager(fn, *_inputs(*shapes), matmul_templates=True)
    [nodes] = _covered(compiled, "forward")
    assert nodes[0].split("_")[0] in ("bmm", "baddbmm") and len(nodes) > 1, nodes
    assert compiled.reports["forward"]["kernels"]["extern"] == 0


def test_transposed_left_operand_is_a_prologue():
    """``bmm((x * 2)^T, y)``: the scale computed tile by tile, read through
    the transpose of the last two dimensions, never stored."""
    def fn(x, y):
        return torch.relu(torch.bmm((x * 2).transpose(1, 2), y))
    compiled = check_against_eager(fn, *_inputs((2, 6, 5), (2, 6, 7)), matmul_templates=True)
    [nodes] = _covered(compiled, "forward")
    assert nodes[0].startswith("mul") and any(n.startswith("permute") for n in nodes), nodes


def test_gelu_is_the_prologue_forward_and_its_backward_the_epilogue():
    """``bmm(gelu(h), w)``: forward, gelu computed tile by tile as the left
    operand; backward, ``(grad @ w^T) * gelu'(h)`` is one kernel."""
    def fn(h, w):
        return torch.bmm(F.gelu(h), w)
    compiled = check_against_eager(fn, *_inputs((2, 5, 6), (2, 6, 3)), matmul_templates=True)
    [forward] = _covered(compiled, "forward")
    assert forward[-1] == "bmm" and "erf" in forward, forward
    [backward] = _covered(compiled, "backward")
    assert backward[0].startswith("bmm") and "erf" in backward and "exp" in backward, backward


def test_odd_sizes_many_tiles_k_loop_and_batches(monkeypatch):
    """Blocks of 16 over 3 products of 37 x 33 (K 35): 9 tiles each, 3 K steps."""
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2,
             "num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(matmul_template, "default_config", lambda kernel, interpreted: small)

    def fn(x, y, r):
        return torch.bmm(x, y) * 0.5 + r
    compiled = check_against_eager(fn, *_inputs((3, 37, 35), (3, 35, 33), (3, 37, 33)),
                                   matmul_templates=True)
    assert len(_covered(compiled, "forward")) == 1


def test_broadcast_operand_over_the_batch():
    """A right operand expanded over the batch (batch stride 0)."""
    def fn(x, w):
        return torch.sigmoid(torch.bmm(x, w.expand(4, 6, 3)))
    check_against_eager(fn, *_inputs((4, 5, 6), (1, 6, 3)), matmul_templates=True)


def test_half_precision_bmm_epilogue():
    def fn(x, y):
        return F.silu(torch.bmm(x, y))
    x, y = (t.to(torch.bfloat16) for t in _inputs((2, 5, 8), (2, 8, 6)))
    compiled = check_against_eager(fn, x, y, grad=False, matmul_templates=True)
    assert len(_covered(compiled, "forward")) == 1


def test_the_source_puts_the_batch_on_grid_dimension_one(tmp_path):
    import retrograd
    fn, shapes = EPILOGUES["residual"]
    compiled = retrograd.compile(fn, executor="interpret", matmul_templates=True,
                                 dump_dir=str(tmp_path))
    compiled(*_inputs(*shapes))
    [source] = [p.read_text() for p in tmp_path.rglob("matmul_*.py")]
    assert "bid = tl.program_id(1)" in source and "grid = (1, 3)" in source, source


def test_cpu_default_keeps_the_extern_bmm():
    import retrograd
    fn, shapes = EPILOGUES["residual"]
    compiled = retrograd.compile(fn, executor="interpret")
    compiled(*_inputs(*shapes))
    [choice] = _choices(compiled, "forward")["choices"]
    assert choice["chosen"] == "extern" and choice["why"].startswith("cpu:"), choice
