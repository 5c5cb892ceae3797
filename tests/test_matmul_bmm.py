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


def test_epilogue_that_writes_the_product_transposed():
    """``(w @ v).transpose(1, 2).reshape(...)``, attention's merge of heads:
    the copy into the transposed layout is the bmm's epilogue (the template
    visits its elements in the product's order); in the backward the same
    for the gradient's copies, through an mm too."""
    def fn(w, v, p):
        return torch.matmul(w, v).transpose(1, 2).reshape(2, 5, 12) @ p
    compiled = check_against_eager(fn, *_inputs((2, 3, 5, 4), (2, 3, 4, 4), (12, 6)),
                                   matmul_templates=True)
    assert _covered(compiled, "forward") == [["bmm", "clone"]]
    assert any(nodes[0].startswith("mm") and nodes[1].startswith("clone")
               for nodes in _covered(compiled, "backward"))


def test_zoo_attention_block_forward_and_backward_with_bmm_templates():
    """The zoo's decomposed attention: ``weights @ v`` and two of the
    backward's bmms become templates (their epilogue the copy into the
    heads-merged layout); loss and every gradient as a float64 run's."""
    import copy

    import retrograd
    from zoo import ZOO, clone_inputs, errors, training_step
    entry = ZOO["attention_block"]
    torch.manual_seed(0)
    model, inputs = entry.model(), entry.inputs()
    truth_model = copy.deepcopy(model).double()
    truth = training_step(entry, truth_model, truth_model, clone_inputs(inputs, torch.float64))
    compiled = retrograd.compile(model, executor="interpret", matmul_templates=True)
    got = training_step(entry, compiled, model, inputs)
    worst = {name: error for name, error in errors(got, truth).items() if not error < 1e-5}
    assert not worst, worst
    batched = {half: [nodes for nodes in _covered(compiled, half) if nodes[0].startswith("bmm")]
               for half in ("forward", "backward")}
    assert len(batched["forward"]) == 1 and len(batched["backward"]) == 2, batched


@pytest.mark.parametrize("kind", ["residual", "baddbmm_relu"])
def test_the_cuda_choice_times_the_extern_bmm_against_the_template(kind, monkeypatch, tmp_path):
    """matmul_choice's autotune (CUDA's path) with a timer that runs what it
    times: the extern path (torch.bmm / baddbmm, then the epilogue kernel)
    runs, the template wins on the stand-in times, the record says so."""
    import functools

    from retrograd import matmul_choice
    from retrograd.pipeline import OpSupport
    monkeypatch.setenv("RETROGRAD_CACHE_DIR", str(tmp_path))
    times = iter([5.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])

    def timer(function):
        function()
        return next(times)
    choose = functools.partial(matmul_choice.autotune, timer=timer, interpreted=True)
    monkeypatch.setattr(OpSupport, "choose_matmul", staticmethod(choose), raising=False)
    fn, shapes = EPILOGUES[kind]
    compiled = check_against_eager(fn, *_inputs(*shapes), grad=False)
    [record] = _choices(compiled, "forward")["choices"]
    assert record["chosen"] == "template" and record["extern_ms"] == 5.0, record
    assert record["config"] == record["tried"][0]["config"] and record["cache"] == "miss"


@pytest.mark.parametrize("order", [(0, 2, 1, 3), (3, 1, 0, 2), (1, 0, 3, 2)])
def test_permuted_epilogue_reads_its_other_inputs_in_its_own_order(order):
    """The product viewed 4-D and permuted, plus a residual laid out as the
    permuted value: the residual is loaded at the remapped index."""
    shape = [(2, 3, 5, 7)[d] for d in order]

    def fn(x, y, r):
        return torch.bmm(x, y).view(2, 3, 5, 7).permute(order) * 2 + r
    compiled = check_against_eager(fn, *_inputs((6, 5, 4), (6, 4, 7), shape),
                                   matmul_templates=True)
    [nodes] = _covered(compiled, "forward")
    assert nodes[0] == "bmm" and "add" in nodes, nodes


def test_a_batch_past_the_grid_limit_stays_extern():
    """CUDA's grid dimension 1 takes 65535 programs: a larger batch keeps the
    extern bmm, and the report says why."""
    def fn(x, y):
        return torch.bmm(x, y) * 2
    compiled = check_against_eager(fn, *_inputs((65536, 1, 2), (65536, 2, 1)), grad=False,
                                   matmul_templates=True)
    [reason] = _choices(compiled, "forward")["left_extern"]
    assert "a batch of 65536 products" in reason, reason


def test_int64_indexing_counts_an_operand_spread_by_its_batch_stride():
    """A small operand whose batch stride reaches past 2**31 elements: the
    template must index in int64 though no product is that large."""
    from types import SimpleNamespace

    from retrograd.ir import Buffer
    spread = Buffer("a", (2, 4, 4), (2 ** 31, 4, 1), "float32")
    kernel = SimpleNamespace(inputs=["a"], outputs=[])
    assert matmul_template._largest(kernel, {"a": spread}, 2, 4, 4, 4) > 2 ** 31
    dense = Buffer("a", (2, 4, 4), (16, 4, 1), "float32")
    assert matmul_template._largest(kernel, {"a": dense}, 2, 4, 4, 4) == 32
