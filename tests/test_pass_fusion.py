"""The fusion pass on small graphs: what joins one kernel, what stays extern
or apart, fills, views, and random graphs (acyclic, correct). Each program is
also run with torch ops against its graph."""

from __future__ import annotations

import random

import pytest
import torch

from checks import assert_topological
from pass_helpers import aten, assert_program_matches, fuse, kernel_of, triton_kernels
from pass_helpers import seeded  # noqa: F401  (autouse: each test from seed 0)


def test_fusion_chain_becomes_one_kernel():
    x = torch.randn(4, 5)
    program, stats, gm = fuse(lambda x: ((x * 2 + 1).tanh().sigmoid() - 0.5).exp(), x)
    [kernel] = program.kernels
    assert kernel.kind == "triton"
    assert kernel.node_names == [n.name for n in gm.graph.nodes if n.op == "call_function"]
    [output] = program.outputs
    assert kernel.outputs == [output]                    # no intermediate is stored
    assert stats["triton_kernels"] == 1
    assert stats["pointwise_ops"] == stats["pointwise_ops_in_triton"] == 6
    assert [b.role for b in program.buffers.values()] == ["input", "output"]
    assert_program_matches(program, gm, [x])


def test_fusion_keeps_matmul_extern():
    x, w = torch.randn(3, 4), torch.randn(4, 5)
    program, stats, gm = fuse(lambda x, w: (x.exp() @ w).sigmoid() * 2, x, w)
    kinds = [k.kind for k in program.kernels]
    assert kinds == ["triton", "extern", "triton"]
    assert kernel_of(program, "mm").op == "aten.mm.default"
    assert stats["extern_ops"] == {"aten.mm.default": 1}
    assert stats["pointwise_ops_extern"] == {}
    assert_topological(program)
    assert_program_matches(program, gm, [x, w])


def test_fusion_does_not_read_its_own_output_through_a_permute():
    """add reads exp through a permute: a different element order, so exp must
    be stored by one kernel and read by another."""
    x, y = torch.randn(3, 4), torch.randn(4, 3)
    program, _, gm = fuse(lambda x, y: x.exp().permute(1, 0) + y, x, y)
    exp_kernel, add_kernel = kernel_of(program, "exp"), kernel_of(program, "add")
    assert exp_kernel is not add_kernel
    assert "exp" in exp_kernel.outputs
    assert "permute" in add_kernel.inputs
    assert program.buffers["permute"].role == "view"
    assert program.buffers["permute"].view_of == "exp"
    assert_topological(program)
    assert_program_matches(program, gm, [x, y])


def test_fusion_permute_of_own_value_read_with_the_value_itself():
    """b = a + a.t() reads a both as a register and through memory: b cannot
    join a's kernel (it would read a before every program has written it)."""
    x = torch.randn(5, 5)
    program, _, gm = fuse(lambda x: (lambda a: a + a.t())(x.exp()), x)
    assert kernel_of(program, "exp") is not kernel_of(program, "add")
    assert_topological(program)
    assert_program_matches(program, gm, [x])


def test_fusion_keeps_a_reshape_between_pointwise_ops_in_one_kernel():
    x = torch.randn(3, 4)
    program, stats, gm = fuse(lambda x: (x.exp().view(12) * 2).view(4, 3).sin(), x)
    [kernel] = triton_kernels(program)
    assert [n.target for n in kernel.nodes] == [aten.exp.default, aten.mul.Tensor,
                                                aten.sin.default]
    assert kernel.outputs == ["sin"]      # exp and mul stay in registers
    assert set(kernel.aliases) == {"view", "view_1"}
    assert program.kernels_of("view") == []
    assert_program_matches(program, gm, [x])


def test_fusion_reshape_of_an_output_value_is_a_view_of_the_stored_base():
    x = torch.randn(3, 4)
    program, _, gm = fuse(lambda x: (lambda v: (v * 2, v))(x.exp().view(12)), x)
    [kernel] = triton_kernels(program)
    assert "exp" in kernel.outputs
    assert program.buffers["view"].view_of == "exp"
    assert_program_matches(program, gm, [x])


def test_fusion_no_cycle_through_an_extern_op():
    """a -> mm -> b, and b also reads a: putting b in a's kernel would make that
    kernel both feed mm and wait for it."""
    x, w = torch.randn(4, 4), torch.randn(4, 4)

    def fn(x, w):
        a = x.exp()
        return (a + a @ w).sigmoid()
    program, _, gm = fuse(fn, x, w)
    a_kernel, b_kernel = kernel_of(program, "exp"), kernel_of(program, "add")
    assert a_kernel is not b_kernel
    assert kernel_of(program, "sigmoid") is b_kernel
    order = [k.name for k in program.kernels]
    assert order.index(a_kernel.name) < order.index(kernel_of(program, "mm").name) \
        < order.index(b_kernel.name)
    assert_topological(program)
    assert_program_matches(program, gm, [x, w])


def test_fusion_inlines_fills():
    x = torch.randn(3, 4)
    program, _, gm = fuse(lambda x: torch.full_like(x, 2.0) * x + torch.zeros(3, 4), x)
    [kernel] = program.kernels
    assert {n.target for n in kernel.nodes} >= {aten.full_like.default, aten.zeros.default}
    assert kernel.inputs == [program.inputs[0]]
    assert "full_like" not in program.buffers and "zeros" not in program.buffers
    assert_program_matches(program, gm, [x])


def test_fusion_fill_read_only_for_its_shape_does_not_store_its_argument():
    """full_like(d) needs d's shape, not its values: d stays in registers."""
    x = torch.randn(3, 4)

    def fn(x):
        d = (x * 3).clamp(-1, 1)
        return torch.where(d > 0, d, torch.full_like(d, 0.25))
    program, _, gm = fuse(fn, x)
    [kernel] = program.kernels
    assert kernel.outputs == ["where"]
    assert_program_matches(program, gm, [x])


def test_fusion_materializes_a_fill_an_extern_reads():
    x, w = torch.randn(3, 4), torch.randn(4, 2)
    program, _, gm = fuse(lambda x, w: torch.ones_like(x) @ w + x.sum(), x, w)
    fill_kernel = kernel_of(program, "ones_like")
    assert fill_kernel.kind == "triton" and fill_kernel.outputs == ["ones_like"]
    assert fill_kernel.inputs == []
    assert_topological(program)
    assert_program_matches(program, gm, [x, w])


def test_fusion_separates_different_element_counts():
    x, y = torch.randn(3, 4), torch.randn(4)
    program, _, gm = fuse(lambda x, y: (x.exp() * 2, y.sin() + 1), x, y)
    assert kernel_of(program, "exp") is not kernel_of(program, "sin")
    assert kernel_of(program, "exp").numel == 12 and kernel_of(program, "sin").numel == 4
    assert_program_matches(program, gm, [x, y])


def test_fusion_siblings_reading_one_input_share_a_kernel():
    x = torch.randn(4, 5)
    program, _, _ = fuse(lambda x: x.exp() * x.sin(), x)
    assert len(triton_kernels(program)) == 1


def test_fusion_does_not_join_kernels_over_a_shared_number():
    """Two chains that share only a 0-dim input (compile_step's learning rate)
    stay apart: joining them saves one load and holds the first chain's inputs
    until the second's are ready (every gradient until the last, in a step)."""
    x, y, lr = torch.randn(4, 5), torch.randn(4, 5), torch.tensor(0.1)
    program, _, gm = fuse(lambda x, y, lr: (lr * x, (lr * y).sin()), x, y, lr)
    assert kernel_of(program, "mul") is not kernel_of(program, "mul_1")
    assert_program_matches(program, gm, [x, y, lr])


def _random_graph_function(seed: int):
    """A function of pointwise ops, reshapes, permutes and matmuls over square
    tensors, chosen by ``seed``: fusion's invariants must hold for all of them."""
    rng = random.Random(seed)

    def fn(x, w):
        values = [x, w]
        for _ in range(rng.randint(4, 10)):
            kind = rng.choice(["unary", "unary", "binary", "binary", "mm", "permute", "view"])
            a, b = rng.choice(values), rng.choice(values)
            if kind == "unary":
                values.append(rng.choice([torch.sin, torch.tanh, torch.sigmoid,
                                          lambda t: t * 0.5])(a))
            elif kind == "binary":
                values.append(rng.choice([torch.add, torch.mul, torch.sub, torch.maximum])(a, b))
            elif kind == "mm":
                values.append(a @ b)
            elif kind == "permute":
                values.append(a.t())
            else:
                values.append(a.reshape(16).reshape(4, 4))
        return tuple(values[2:][-3:])
    return fn


@pytest.mark.parametrize("seed", range(12))
def test_fusion_random_graphs_stay_acyclic_and_correct(seed):
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    program, stats, gm = fuse(_random_graph_function(seed), x, w)
    assert_topological(program)
    program.validate()
    for kernel in triton_kernels(program):
        # one iteration space per kernel, and no kernel reads what it writes
        assert not set(kernel.inputs) & set(kernel.outputs)
        bases = {program.buffers[n].view_of or n for n in kernel.inputs}
        assert not bases & set(kernel.outputs)
    assert stats["pointwise_ops_in_triton"] == stats["pointwise_ops"]
    assert_program_matches(program, gm, [x, w])


def test_fusion_sets_each_kernel_family():
    """Fusion says what each kernel computes (ir.Family), so codegen picks its
    generator without scanning nodes: pointwise, indexing (a gather), reduction,
    scatter, extern, view."""
    from retrograd.ir import Family, Kind
    x, w = torch.randn(4, 6), torch.randn(6, 3)
    index = torch.tensor([[2, 0], [1, 1], [0, 0], [5, 5]])

    def fn(x, w, index):
        y = (x * 2).sin()                                        # reduction's prologue
        g = torch.gather(y, 1, index) * 3                        # indexing
        s = y.sum(dim=1)                                         # reduction
        z = torch.zeros(4, 6).scatter_add(1, index, g)           # scatter
        return (y @ w).t(), s, z, (w + 1).exp()                  # extern, view, pointwise
    program, _, gm = fuse(fn, x, w, index, decompose=True)
    families = {k.family for k in program.kernels}
    assert {Family.POINTWISE, Family.INDEXING, Family.REDUCTION, Family.SCATTER,
            Family.EXTERN, Family.VIEW} <= families, families
    for kernel in program.kernels:
        assert isinstance(kernel.kind, Kind) and isinstance(kernel.family, Family)
        assert (kernel.kind == Kind.TRITON) == (kernel.family not in (Family.EXTERN,
                                                                        Family.VIEW))
    assert_program_matches(program, gm, [x, w, index])


def test_ir_refuses_unknown_kinds_and_roles():
    from retrograd.ir import Buffer, Kernel
    with pytest.raises(ValueError):
        Kernel("k", "cuda", [])
    with pytest.raises(ValueError):
        Buffer("b", (2,), (1,), "float32", role="scratch")
    assert Kernel("k", "extern", []).family == "extern"
