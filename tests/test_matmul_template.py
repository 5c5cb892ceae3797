"""Matmul templates with fused prologue/epilogue (passes/matmul_fusion.py,
codegen/matmul_template.py, compiler/matmul_choice.py) under Triton's interpreter.

Each test compiles a small function with ``matmul_templates=True`` (the CPU
default keeps the extern call), checks in the report that the template was
formed with the ops it should cover, and compares values and gradients with
float64 eager. Shapes are tiny and odd; one test shrinks the blocks so that
several tiles, a K loop and masked edges run.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import retrograd
from retrograd import matmul_choice
from retrograd.codegen import matmul_template
from retrograd.pipeline import OpSupport
from retrograd.runtime import tuning_cache
from checks import check_against_eager


def _templates(compiled, half: str) -> list[dict]:
    record = next(p for p in compiled.reports[half]["passes"] if p["name"] == "matmul_templates")
    return [c for c in record["stats"]["choices"] if c["chosen"] == "template"]


def _covered(compiled, half: str) -> list[list[str]]:
    return [choice["nodes"] for choice in _templates(compiled, half)]


def _inputs(*shapes):
    torch.manual_seed(0)
    return [torch.randn(*shape) for shape in shapes]


EPILOGUES = {
    "bias_relu": lambda x, w, b, r: F.relu(x @ w.t() + b),
    "bias_gelu": lambda x, w, b, r: F.gelu(x @ w.t() + b),
    "silu": lambda x, w, b, r: F.silu(x @ w.t()),
    "tanh": lambda x, w, b, r: torch.tanh(x @ w.t()),
    "residual_scale": lambda x, w, b, r: (x @ w.t()) * 0.125 + r,
}


@pytest.mark.parametrize("kind", sorted(EPILOGUES))
def test_each_epilogue_kind_forward(kind):
    fn = EPILOGUES[kind]
    x, w, b, r = _inputs((6, 5), (7, 5), (7,), (6, 7))
    compiled = check_against_eager(fn, x, w, b, r, grad=False, matmul_templates=True)
    [nodes] = _covered(compiled, "forward")
    assert nodes[0].startswith("mm") and len(nodes) > 1, nodes
    assert compiled.reports["forward"]["kernels"]["extern"] == 0


def test_mlp_forward_and_backward_with_prologues():
    """gelu MLP: the forward's epilogues; in the backward the incoming
    gradient's scale is each mm's prologue, once through a transpose."""
    def mlp(x, w1, b1, w2, r):
        return (F.gelu(x @ w1.t() + b1) @ w2.t()) * 0.5 + r
    compiled = check_against_eager(mlp, *_inputs((6, 5), (7, 5), (7,), (3, 7), (6, 3)),
                                   matmul_templates=True)
    assert len(_templates(compiled, "forward")) == 2
    backward = _covered(compiled, "backward")
    assert any("permute" in "".join(nodes) for nodes in backward), backward
    assert all(not nodes[0].startswith("mm") for nodes in backward), backward


def test_activation_backward_is_the_prologue():
    """The gradient through gelu, ``grad * gelu'(h)``, with ``grad`` coming
    in (a tangent): computed tile by tile inside both products that read
    it (``P @ W`` and ``P^T @ x``), never stored. (The min-cut saves
    ``gelu'(h)``, which the forward's template computes in its epilogue.)"""
    def layer(x, w):
        return F.gelu(x @ w.t())
    compiled = check_against_eager(layer, *_inputs((6, 5), (7, 5)), matmul_templates=True)
    [forward] = _covered(compiled, "forward")
    assert "exp" in forward and "erf" in forward, forward   # gelu and gelu'
    backward = _covered(compiled, "backward")
    assert len(backward) == 2 and all(nodes[0].startswith("mul") for nodes in backward)
    assert any("permute" in "".join(nodes) for nodes in backward), backward
    assert compiled.reports["backward"]["kernels"] == {**compiled.reports["backward"][
        "kernels"], "extern": 0, "triton": 2}


def test_activation_backward_as_the_epilogue_of_the_incoming_gradient():
    """Behind another layer the gradient through gelu is the epilogue of the
    product that makes the incoming gradient (stored once, read by two mm's)."""
    def mlp(x, w1, w2):
        return F.gelu(x @ w1.t()) @ w2.t()
    compiled = check_against_eager(mlp, *_inputs((6, 5), (7, 5), (3, 7)),
                                   matmul_templates=True)
    backward = _covered(compiled, "backward")
    assert any(nodes[0].startswith("mm") and any(n.startswith("erf") for n in nodes)
               for nodes in backward), backward


def test_transposed_left_operand_as_the_graph_has_it():
    def fn(x, y):
        return torch.relu(x.t() @ y)
    check_against_eager(fn, *_inputs((5, 6), (5, 7)), matmul_templates=True)


def test_odd_sizes_many_tiles_and_a_k_loop(monkeypatch):
    """Blocks of 16 over 37 x 33 (K 35): 9 tiles, 3 K steps, masked edges."""
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2,
             "num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(matmul_template, "default_config", lambda kernel, interpreted: small)

    def fn(x, w, b):
        return F.silu(x @ w.t() + b) * 2.0
    compiled = check_against_eager(fn, *_inputs((37, 35), (33, 35), (33,)),
                                   matmul_templates=True)
    assert _templates(compiled, "forward")


def test_product_read_elsewhere_is_still_stored():
    def fn(x, w):
        y = x @ w.t()
        return torch.relu(y), y.sum(0)
    compiled = check_against_eager(fn, *_inputs((6, 5), (7, 5)), grad=False,
                                   matmul_templates=True)
    assert _templates(compiled, "forward")


def test_half_precision_epilogue():
    def fn(x, w, b):
        return F.relu(x @ w.t() + b)
    x, w, b = (t.to(torch.bfloat16) for t in _inputs((6, 5), (7, 5), (7,)))
    compiled = check_against_eager(fn, x, w, b, grad=False, matmul_templates=True)
    assert _templates(compiled, "forward")


def test_cpu_default_keeps_the_extern_call_and_says_why():
    def fn(x, w):
        return torch.relu(x @ w.t())
    compiled = retrograd.compile(fn, executor="interpret")
    compiled(*_inputs((6, 5), (7, 5)))
    record = next(p for p in compiled.reports["forward"]["passes"]
                  if p["name"] == "matmul_templates")
    [choice] = record["stats"]["choices"]
    assert choice["chosen"] == "extern" and choice["why"].startswith("cpu")
    assert compiled.reports["forward"]["kernels"]["extern"] == 1


def test_option_is_validated():
    with pytest.raises(ValueError, match="matmul_templates"):
        retrograd.compile(lambda x: x, matmul_templates="yes")


class _Timer:
    """Stands in for do_bench: hands out the given milliseconds in order and
    counts calls (the CPU interpreter is no measure of speed; this checks the
    bookkeeping: what is tried, what wins, what is cached)."""

    def __init__(self, times):
        self.times, self.calls = list(times), 0

    def __call__(self, function) -> float:
        self.calls += 1
        return self.times.pop(0) if self.times else 99.0


def test_autotune_records_what_it_tried_and_a_second_compile_hits_the_cache(
        monkeypatch, tmp_path):
    monkeypatch.setenv("RETROGRAD_CACHE_DIR", str(tmp_path))
    timer = _Timer([5.0, 7.0, 3.0, 4.0])   # extern, then the configs in order
    choose = functools.partial(matmul_choice.autotune, timer=timer, interpreted=True)
    monkeypatch.setattr(OpSupport, "choose_matmul", staticmethod(choose), raising=False)

    def fn(x, w, b):
        return F.gelu(x @ w.t() + b)
    inputs = _inputs((40, 20), (36, 20), (36,))   # four candidate configs fit
    first = check_against_eager(fn, *inputs, grad=False)
    [record] = _templates(first, "forward")
    assert record["cache"] == "miss" and record["extern_ms"] == 5.0
    assert len(record["tried"]) >= 3
    assert [entry["ms"] for entry in record["tried"]][:3] == [7.0, 3.0, 4.0]
    assert record["config"] == record["tried"][1]["config"]   # the fastest
    calls = timer.calls
    assert calls == 1 + len(record["tried"])
    assert list(tmp_path.glob(f"{matmul_choice.KIND}_*.py"))

    second = check_against_eager(fn, *inputs, grad=False)
    [again] = _templates(second, "forward")
    assert again["cache"] == "hit" and again["config"] == record["config"]
    assert timer.calls == calls   # nothing timed again


def test_autotune_keeps_extern_when_it_is_faster(monkeypatch, tmp_path):
    monkeypatch.setenv("RETROGRAD_CACHE_DIR", str(tmp_path))
    choose = functools.partial(matmul_choice.autotune, timer=_Timer([1.0]), interpreted=True)
    monkeypatch.setattr(OpSupport, "choose_matmul", staticmethod(choose), raising=False)
    compiled = check_against_eager(lambda x, w: torch.relu(x @ w.t()),
                                   *_inputs((6, 5), (7, 5)), grad=False)
    record = next(p for p in compiled.reports["forward"]["passes"]
                  if p["name"] == "matmul_templates")
    [choice] = record["stats"]["choices"]
    assert choice["chosen"] == "extern" and choice["tried"] and choice["extern_ms"] == 1.0
    assert compiled.reports["forward"]["kernels"]["extern"] == 1


def test_a_damaged_tuning_record_is_a_miss(monkeypatch, tmp_path):
    monkeypatch.setenv("RETROGRAD_CACHE_DIR", str(tmp_path))
    key = {"kernel": "abc", "device": "cpu"}
    path = tuning_cache.store("matmul_tuning", key, {"chosen": "extern"})
    assert tuning_cache.lookup("matmul_tuning", key)["chosen"] == "extern"
    path.write_text("# retrograd\n__import__('os').system('false')\n")
    assert tuning_cache.lookup("matmul_tuning", key) is None
    assert tuning_cache.lookup("matmul_tuning", {**key, "device": "other"}) is None


def _padded(shape, strides, pad: int, fill: float):
    """A view with ``shape`` and ``strides`` inside storage with ``pad``
    elements of ``fill`` before and after it."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))
    storage = torch.full((pad + span + pad,), fill)
    return storage, storage.as_strided(shape, strides, pad), span


def test_template_reads_and_writes_nothing_out_of_bounds():
    """Blocks of 16 over a 37 x 33 product (K 35) with a transposed weight:
    inputs sit in NaN padding (a stray read would poison the product) and the
    outputs in sentinel padding that must survive (the interpreter checks no
    bounds, TRITON_ON_CPU.md)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from retrograd.codegen.matmul_template import generate_matmul
    from retrograd.decompositions import decomposition_table
    from retrograd.dump import Dumper
    from retrograd.options import Options
    from retrograd.passes import fusion, matmul_fusion
    from retrograd.pipeline import PassContext
    from retrograd.runtime.device import interpreter_mode
    from retrograd.runtime.loader import load_module, write_source

    def fn(x, w, b):
        y = x @ w.t()
        return torch.relu(y + b), y
    x, w, b = _inputs((37, 35), (33, 35), (33,))
    gm = make_fx(fn, tracing_mode="fake",
                 decomposition_table=decomposition_table(full_table=True))(x, w, b)
    ctx = PassContext(Options(matmul_templates=True), Dumper(None, []), OpSupport(), "unit")
    program, _ = fusion.run(gm, ctx)
    program, _ = matmul_fusion.run(program, ctx)
    [kernel] = [k for k in program.kernels if k.family == "matmul"]
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
    source = generate_matmul(kernel, program.buffers, True, "unit", config)
    module = load_module(write_source(kernel.name, source), interpreted=True)
    values = dict(zip(program.inputs, (x, w, b)))
    for view in program.kernels:
        if view.kind == "view":   # the transposed weight
            values[view.outputs[0]] = view.nodes[0].target(
                values[view.nodes[0].args[0].name], *view.nodes[0].args[1:])
    tensors, outputs = {}, {}
    for name in kernel.inputs:
        buffer = program.buffers[name]
        _, tensors[name], _ = _padded(buffer.shape, buffer.strides, 64, float("nan"))
        tensors[name].copy_(values[name])
    for name in kernel.outputs:
        buffer = program.buffers[name]
        outputs[name] = _padded(buffer.shape, buffer.strides, 64, -12345.0)
        tensors[name] = outputs[name][1]
    with interpreter_mode(True):
        module.launch(*(tensors[name] for name in kernel.inputs + kernel.outputs))
    for name, (storage, view, span) in outputs.items():
        assert bool((storage[:64] == -12345.0).all()), f"{name}: wrote before"
        assert bool((storage[64 + span:] == -12345.0).all()), f"{name}: wrote past"
    relu, product = fn(x, w, b)
    got = [outputs[name][1] for name in kernel.outputs]
    assert len(got) == 2   # the product is read outside: stored too
    for value in got:
        reference = product if bool((value < 0).any()) else relu
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("executor", ["torch", "fx"])
def test_template_kernels_run_in_the_other_executors(executor):
    """A template kernel's nodes (prologue, transposed operand, mm, an epilogue
    read through a reshape of the product) evaluate as torch calls too."""
    def fn(x, w1, b1, w2, r):
        return (F.gelu(x @ w1.t() + b1) @ w2.t()).view(2, 3, 3) * 0.5 + r.view(2, 3, 3)
    inputs = _inputs((6, 5), (7, 5), (7,), (3, 7), (6, 3))
    mine = [t.clone().requires_grad_() for t in inputs]
    wide = [t.double().requires_grad_() for t in inputs]
    compiled = retrograd.compile(fn, executor=executor, matmul_templates=True)
    out, ref = compiled(*mine), fn(*wide)
    upstream = torch.randn(out.shape)
    out.backward(upstream)
    ref.backward(upstream.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, expected in zip(mine, wide):
        torch.testing.assert_close(got.grad.double(), expected.grad, rtol=1e-5, atol=1e-5)
    assert len(_templates(compiled, "forward")) == 2


def test_compile_step_with_templates_matches_eager_sgd():
    """A whole training step (forward, backward, SGD update in one program)
    with templates: parameters after three steps as eager's."""
    import copy
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)

    def loss_fn(module, x, y):
        return F.mse_loss(module(x), y)
    step = retrograd.compile_step(model, loss_fn, optimizer, executor="interpret",
                                  matmul_templates=True)
    for _ in range(3):
        x, y = torch.randn(6, 5), torch.randn(6, 3)
        loss = step(x, y)
        reference_optimizer.zero_grad()
        expected = loss_fn(reference, x, y)
        expected.backward()
        reference_optimizer.step()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    [record] = [p["stats"] for report in step.reports.values() for p in report["passes"]
                if p["name"] == "matmul_templates"]
    assert record["templates"] >= 2, record


def test_inference_addmm_with_its_epilogue():
    """Without gradients F.linear stays ``addmm``: the bias joins the product
    before its one rounding (as BLAS adds it), then the epilogue; with a
    beta and alpha too."""
    def linear_relu(x, w, b):
        return F.relu(F.linear(x, w, b))

    def scaled(x, w, b):
        return torch.tanh(torch.addmm(b, x, w.t(), beta=0.5, alpha=2.0))
    for fn in (linear_relu, scaled):
        compiled = check_against_eager(fn, *_inputs((37, 35), (33, 35), (33,)), grad=False,
                                       matmul_templates=True)
        [nodes] = _covered(compiled, "forward")
        assert nodes[0].startswith("addmm"), nodes
        assert compiled.reports["forward"]["kernels"]["extern"] == 0


UNARY = [torch.relu, torch.tanh, torch.sigmoid, F.gelu, F.silu, torch.exp, lambda v: v * 0.75,
         lambda v: v.square(), lambda v: torch.clamp(v, -0.5, 0.5)]


@pytest.mark.parametrize("seed", range(6))
def test_random_operand_layouts_and_epilogue_chains(seed):
    """Random odd sizes, operands transposed or not as the graph has them, a
    random chain of two or three pointwise ops (with a broadcast add) on the
    product, values and gradients against float64 eager."""
    generator = torch.Generator().manual_seed(seed)
    m, n, k = (int(v) for v in torch.randint(3, 40, (3,), generator=generator))
    left_t, right_t = (bool(v) for v in torch.randint(0, 2, (2,), generator=generator))
    chain = [UNARY[int(i)] for i in torch.randint(0, len(UNARY), (3,), generator=generator)]
    cut = 2 + int(torch.randint(0, 2, (1,), generator=generator))

    def fn(a, b, c):
        y = (a.t() if left_t else a) @ (b.t() if right_t else b)
        for op in chain[:cut]:
            y = op(y) + c
        return y
    a = torch.randn((k, m) if left_t else (m, k), generator=generator)
    b = torch.randn((n, k) if right_t else (k, n), generator=generator) / k ** 0.5
    c = torch.randn(n, generator=generator)
    compiled = check_against_eager(fn, a, b, c, matmul_templates=True)
    assert _templates(compiled, "forward")
