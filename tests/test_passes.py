"""Each pass on small graphs: cleanup, fusion, checkpoint, buffer_reuse.

Graphs come from ``make_fx`` of tiny functions in fake mode (every node has
``meta["val"]``), from AOTAutograd's real joint graph (checkpoint), or are
built by hand (the Program IR for buffer_reuse). Passes run with the same
``PassContext`` the pipeline builds. Where a pass rewrites a graph, the
rewritten graph is also run on real inputs and compared with the original.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.fx as fx
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified
from torch.fx.experimental.proxy_tensor import make_fx

import retrograd
from retrograd.decompositions import decomposition_table
from retrograd.dump import Dumper
from retrograd.ir import Buffer, Kernel, Program
from retrograd.options import Options
from retrograd.passes import buffer_reuse, checkpoint, cleanup, fusion
from retrograd.pipeline import OpSupport, PassContext
from retrograd.runtime.executor import FxExecutable
from checks import assert_topological

aten = torch.ops.aten


# ---------------------------------------------------------------- helpers
def context(name: str = "unit") -> PassContext:
    return PassContext(Options(), Dumper(None, []), OpSupport(), name)


def trace(fn, *inputs, decompose: bool = False) -> fx.GraphModule:
    """``fn`` as an fx graph of aten ops with fake values, returning a tuple."""
    def tupled(*args):
        result = fn(*args)
        return result if isinstance(result, tuple) else (result,)
    table = decomposition_table() if decompose else None
    return make_fx(tupled, tracing_mode="fake", decomposition_table=table)(*inputs)


def targets(gm: fx.GraphModule) -> list:
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


def run_gm(gm: fx.GraphModule, inputs) -> list:
    with torch.no_grad():
        return list(gm(*inputs))


def fuse(fn, *inputs, decompose: bool = False) -> tuple[Program, dict, fx.GraphModule]:
    gm = trace(fn, *inputs, decompose=decompose)
    program, stats = fusion.run(gm, context())
    return program, stats, gm





def assert_program_matches(program: Program, gm: fx.GraphModule, inputs) -> None:
    """The program's kernels, evaluated with torch ops, give the graph's results."""
    got = FxExecutable(program)(list(inputs))
    ref = run_gm(gm, inputs)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def triton_kernels(program: Program) -> list[Kernel]:
    return program.kernels_of("triton")


def kernel_of(program: Program, node_name: str) -> Kernel:
    [kernel] = [k for k in program.kernels if node_name in k.node_names]
    return kernel


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


# ================================================================ cleanup
def test_cleanup_removes_dead_nodes():
    def fn(x):
        unused = torch.sin(x) * 3          # noqa: F841  dead: two nodes
        return torch.exp(x)
    gm = trace(fn, torch.randn(3, 4))
    assert aten.sin.default in targets(gm)
    stats = cleanup.run(gm, context())
    assert targets(gm) == [aten.exp.default]
    assert stats["dead_nodes_removed"] == 2
    x = torch.randn(3, 4)
    torch.testing.assert_close(run_gm(gm, [x])[0], x.exp())


def test_cleanup_merges_duplicate_pure_ops():
    def fn(x, y):
        return torch.exp(x) * torch.exp(x) + torch.add(x, y) - torch.add(x, y)
    x, y = torch.randn(3, 4), torch.randn(4)
    gm = trace(fn, x, y)
    assert targets(gm).count(aten.exp.default) == 2
    stats = cleanup.run(gm, context())
    assert targets(gm).count(aten.exp.default) == 1
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    adds_of_inputs = [n for n in gm.graph.nodes if n.target == aten.add.Tensor
                      and list(n.args) == placeholders]
    assert len(adds_of_inputs) == 1
    assert stats["common_subexpressions_merged"] == 2
    [mul] = [n for n in gm.graph.nodes if n.target == aten.mul.Tensor]
    assert mul.args[0] is mul.args[1]
    torch.testing.assert_close(run_gm(gm, [x, y])[0], fn(x, y))


def test_cleanup_keeps_ops_that_differ_in_arguments():
    def fn(x):
        return (x + 1, x + 2, torch.sum(x, [0]), torch.sum(x, [1]), x * 0.0, x * -0.0)
    gm = trace(fn, torch.randn(3, 3))
    before = len(targets(gm))
    stats = cleanup.run(gm, context())
    assert len(targets(gm)) == before
    assert stats["common_subexpressions_merged"] == 0


def test_cleanup_does_not_merge_int_and_float_scalars():
    """1 == 1.0 in Python, but x + 1 stays int64 where x + 1.0 becomes float32."""
    def fn(x):
        return x + 1, x + 1.0, x + True, x + 1
    gm = trace(fn, torch.randint(0, 5, (3,)))
    stats = cleanup.run(gm, context())
    assert stats["common_subexpressions_merged"] == 1     # only the second x + 1
    x = torch.randint(0, 5, (3,))
    got = run_gm(gm, [x])
    for a, b in zip(got, fn(x)):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


def test_cleanup_merges_nan_literals():
    def fn(x):
        return torch.add(x, float("nan")) + torch.add(x, float("nan"))
    gm = trace(fn, torch.randn(3))
    assert cleanup.run(gm, context())["common_subexpressions_merged"] == 1


def test_cleanup_never_merges_random_ops():
    def fn(x):
        a = torch.rand(3, 4) + x
        b = torch.rand(3, 4) + x
        c = aten.native_dropout(x, 0.5, True)[0]
        d = aten.native_dropout(x, 0.5, True)[0]
        return a, b, c, d
    gm = trace(fn, torch.randn(3, 4))
    cleanup.run(gm, context())
    assert targets(gm).count(aten.rand.default) == 2
    assert targets(gm).count(aten.native_dropout.default) == 2
    # and the adds that read different random tensors stay two adds
    assert targets(gm).count(aten.add.Tensor) == 2
    a, b, c, d = run_gm(gm, [torch.ones(3, 4)])
    assert not torch.equal(a, b)
    assert not torch.equal(c, d)


def test_cleanup_removes_no_op_views_only():
    def fn(x):
        same = x.view(3, 4)                    # no-op
        reshaped = x.view(4, 3)                # not a no-op
        return torch.exp(same) + 1, torch.sin(reshaped)
    x = torch.randn(3, 4)
    gm = trace(fn, x)
    assert targets(gm).count(aten.view.default) == 2
    stats = cleanup.run(gm, context())
    assert stats["no_op_views_removed"] == 1
    [view] = [n for n in gm.graph.nodes if n.target == aten.view.default]
    assert list(view.args[1]) == [4, 3]
    [exp] = [n for n in gm.graph.nodes if n.target == aten.exp.default]
    assert exp.args[0].op == "placeholder"
    for a, b in zip(run_gm(gm, [x]), fn(x)):
        torch.testing.assert_close(a, b)


def test_cleanup_keeps_a_view_that_is_an_output():
    gm = trace(lambda x: (x.view(3, 4), x.exp()), torch.randn(3, 4))
    stats = cleanup.run(gm, context())
    assert stats["no_op_views_removed"] == 0
    assert aten.view.default in targets(gm)


def test_cleanup_then_view_removal_enables_cse():
    """exp(view(x)) and exp(x) are one value once the no-op view is gone."""
    gm = trace(lambda x: torch.exp(x.view(3, 4)) + torch.exp(x), torch.randn(3, 4))
    stats = cleanup.run(gm, context())
    assert targets(gm) == [aten.exp.default, aten.add.Tensor]
    assert stats == {"dead_nodes_removed": 0, "common_subexpressions_merged": 1,
                     "no_op_views_removed": 1, "matmuls_transposed": 0,
                     "masked_results_dropped": 0, "gathers_pushed": 0}


def test_cleanup_removes_views_that_undo_each_other():
    gm = trace(lambda x: torch.exp(x.permute(1, 0).permute(1, 0)), torch.randn(3, 4))
    cleanup.run(gm, context())
    assert targets(gm) == [aten.exp.default]


def test_cleanup_writes_a_transposed_product_transposed():
    a, b = torch.randn(3, 5), torch.randn(5, 4)
    gm = trace(lambda a, b: (a @ b).permute(1, 0), a, b)
    stats = cleanup.run(gm, context())
    assert stats["matmuls_transposed"] == 1
    [product] = [n for n in gm.graph.nodes if n.target is aten.mm.default]
    assert product.meta["val"].shape == (4, 3) and product.meta["val"].is_contiguous()
    torch.testing.assert_close(gm(a, b)[0], (a @ b).t())


def test_cleanup_gathers_the_logits_not_the_log_softmax():
    """Cross-entropy's gather moves through log-softmax's pointwise ops (their
    other operands are row values): it reads the logits, and the log-softmax
    is no longer needed in memory for it. Same values."""
    import torch.nn.functional as F
    logits, target = torch.randn(6, 10), torch.randint(0, 10, (6,))
    gm = trace(lambda x, t: F.cross_entropy(x, t, reduction="none"), logits, target,
               decompose=True)
    expected = run_gm(gm, [logits, target])
    stats = cleanup.run(gm, context())
    assert stats["gathers_pushed"] == 2
    [gather] = [n for n in gm.graph.nodes if n.target is aten.gather.default]
    assert gather.args[0].op == "placeholder"
    torch.testing.assert_close(run_gm(gm, [logits, target]), expected)


def test_cleanup_keeps_a_gather_whose_source_varies_along_the_dimension():
    x, y, index = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4, 2))
    gm = trace(lambda x, y, i: torch.gather(x * y, 1, i), x, y, index)
    expected = run_gm(gm, [x, y, index])
    assert cleanup.run(gm, context())["gathers_pushed"] == 0
    torch.testing.assert_close(run_gm(gm, [x, y, index]), expected)
    # a row operand, but the index is narrower along another dimension: kept too
    gm = trace(lambda x, r, i: torch.gather(x - r, 1, i), x, torch.randn(4, 1),
               torch.randint(0, 5, (3, 2)))
    assert cleanup.run(gm, context())["gathers_pushed"] == 0


# ================================================================ fusion
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


# ================================================================ checkpoint
class Tupled(torch.nn.Module):
    """AOTAutograd's simplified entry wants tuple outputs."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return (self.inner(*args),)


class TinyLinearTanh(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 16, bias=False)

    def forward(self, x):
        return (torch.tanh(self.linear(x)) * 2,)


def split_with_checkpoint(module: torch.nn.Module, inputs: list):
    """Run the checkpoint pass as AOTAutograd's partition_fn on the real joint
    graph; returns the compiled callable and what the pass returned."""
    record = {}

    def partition(joint, joint_inputs, **kwargs):
        record["joint_placeholders"] = [n.name for n in joint.graph.nodes
                                        if n.op == "placeholder"]
        (forward, backward), stats = checkpoint.run(joint, context(), joint_inputs, **kwargs)
        record.update(forward=forward, backward=backward, stats=stats,
                      num_fwd_outputs=kwargs["num_fwd_outputs"])
        return forward, backward

    compiled = aot_module_simplified(
        module, inputs, fw_compiler=lambda gm, _: make_boxed_func(gm),
        bw_compiler=lambda gm, _: make_boxed_func(gm), partition_fn=partition,
        decompositions=decomposition_table())
    return compiled, record


def eager_saved_activation_bytes(fn, inputs, keep_alive) -> int:
    """Bytes of distinct storages eager autograd saves, inputs and parameters left out."""
    owned = {t.untyped_storage().data_ptr() for t in keep_alive}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*inputs)
    return sum(saved.values())


def test_checkpoint_saved_activation_bytes_by_hand():
    """tanh(x @ W.T) * 2: the backward needs tanh's output (4x16 float32 = 256
    bytes), x and W.T; the last two are an input and a view of a parameter."""
    module = TinyLinearTanh()
    x = torch.randn(4, 8, requires_grad=True)
    compiled, record = split_with_checkpoint(module, [x])
    stats = record["stats"]
    assert stats["saved_activation_bytes"] == 4 * 16 * 4
    assert stats["saved_activation_values"] == 1
    assert stats["recomputed_nodes"] == 0
    # the saved set does include a view of the weight, which costs nothing
    forward = {n.name: n for n in record["forward"].graph.nodes}
    saved = [n.name for n in record["backward"].graph.nodes
             if n.op == "placeholder" and not n.name.startswith("tangents")]
    assert any(forward[name].target == aten.permute.default for name in saved)
    assert stats["saved_input_bytes"] == 4 * 8 * 4 + 16 * 8 * 4
    assert stats["saved_activation_bytes"] == eager_saved_activation_bytes(
        module, [x], [x, module.linear.weight])


def test_checkpoint_bytes_equal_the_sum_over_saved_non_input_values():
    """Count from the forward graph's extra outputs (what it hands the backward),
    an independent route to the same figure."""
    module = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(),
                                 torch.nn.Linear(12, 12), torch.nn.Sigmoid())
    x = torch.randn(5, 6, requires_grad=True)
    _, record = split_with_checkpoint(Tupled(module), [x])
    forward = record["forward"]
    output = next(n for n in forward.graph.nodes if n.op == "output")
    handed_over = output.args[0][record["num_fwd_outputs"]:]
    distinct, expected = set(), 0
    for node in handed_over:
        root = node
        while fusion.is_view(root):
            root = root.args[0]
        if root.op == "placeholder" or node in distinct:
            continue
        distinct.add(node)
        val = node.meta["val"]
        expected += val.numel() * val.element_size()
    assert expected > 0
    assert record["stats"]["saved_activation_bytes"] == expected


def test_checkpoint_split_computes_the_gradients():
    module = TinyLinearTanh()
    x = torch.randn(4, 8, requires_grad=True)
    compiled, record = split_with_checkpoint(module, [x])
    [out] = compiled(x)
    out.backward(torch.ones_like(out))
    got = (x.grad.clone(), module.linear.weight.grad.clone())
    x.grad = None
    module.linear.weight.grad = None
    module(x)[0].backward(torch.ones(4, 16))
    torch.testing.assert_close(got[0], x.grad)
    torch.testing.assert_close(got[1], module.linear.weight.grad)


def test_checkpoint_inputs_only_save_no_activation_bytes():
    class Product(torch.nn.Module):
        def forward(self, x, y):
            return (x * y,)
    x, y = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    _, record = split_with_checkpoint(Product(), [x, y])
    assert record["stats"]["saved_activation_bytes"] == 0
    assert record["stats"]["saved_input_bytes"] == 2 * 12 * 4


def test_checkpoint_figure_reaches_the_report():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    expected = eager_saved_activation_bytes(module, [x], [x, *module.parameters()])
    assert expected == 5 * 16 * 4      # tanh's output, nothing else
    compiled = retrograd.compile(module, executor="fx")
    compiled(x).sum().backward()
    for half in ("forward", "backward"):
        assert compiled.reports[half]["memory"]["saved_activation_bytes"] == expected


# ================================================================ buffer_reuse
def buffer(name, shape, role="temporary", view_of=None, strides=None, dtype="float32"):
    if strides is None:
        strides, running = [], 1
        for size in reversed(shape):
            strides.insert(0, running)
            running *= size
    return Buffer(name, tuple(shape), tuple(strides), dtype, role, view_of)


def hand_built_program() -> Program:
    """
    0 triton k0:  a      -> t0        (t0: 16 floats, 64 bytes)
    1 view   v0:  t0     -> v         (a view of t0)
    2 triton k1:  a      -> t1        (t1: 32 floats, 128 bytes)
    3 extern k2:  v, t1  -> out       (a program output)
    4 triton k3:  out    -> t2        (t2: 8 halves, 16 bytes)
    5 triton k4:  t2, a  -> out2      (a program output)
    """
    buffers = {
        "a": buffer("a", (16,), "input"),
        "t0": buffer("t0", (4, 4)),
        "v": buffer("v", (4, 4), "view", view_of="t0", strides=(1, 4)),
        "t1": buffer("t1", (32,)),
        "out": buffer("out", (4, 4), "output"),
        "t2": buffer("t2", (8,), dtype="float16"),
        "out2": buffer("out2", (8,), "output"),
    }
    kernels = [
        Kernel("k0", "triton", [], ["a"], ["t0"]),
        Kernel("v0", "view", [], ["t0"], ["v"]),
        Kernel("k1", "triton", [], ["a"], ["t1"]),
        Kernel("k2", "extern", [], ["v", "t1"], ["out"]),
        Kernel("k3", "triton", [], ["out"], ["t2"]),
        Kernel("k4", "triton", [], ["t2", "a"], ["out2"]),
    ]
    return Program("hand", buffers, kernels, inputs=["a"], outputs=["out", "out2"])


def test_buffer_reuse_lifetimes_on_a_hand_built_program():
    program = hand_built_program()
    program.validate()
    spans = buffer_reuse.lifetimes(program)
    assert spans["a"] == (-1, 5)
    assert spans["t0"] == (0, 3)        # its view is read by kernel 3
    assert spans["v"] == (1, 3)
    assert spans["t1"] == (2, 3)
    assert spans["t2"] == (4, 5)
    assert spans["out"][1] == spans["out2"][1] == len(program.kernels)


def test_buffer_reuse_frees_after_last_use_and_never_outputs():
    program = hand_built_program()
    stats = buffer_reuse.run(program, context())
    assert program.frees == {3: ["t0", "t1", "v"], 5: ["a", "t2"]}
    freed = [name for names in program.frees.values() for name in names]
    assert "out" not in freed and "out2" not in freed
    assert len(freed) == len(set(freed))
    # nothing is freed before a kernel that still reads it (or a view of it)
    for index, names in program.frees.items():
        for later in program.kernels[index + 1:]:
            readers = set(later.inputs) | {program.buffers[n].view_of for n in later.inputs}
            assert not readers & set(names), (index, later.name)
    assert program.buffers["t0"].first_use == 0 and program.buffers["t0"].last_use == 3
    assert stats["temporaries"] == 3
    assert stats["bytes_without_reuse"] == 64 + 128 + 16


def test_buffer_reuse_live_lower_bound():
    """Live temporary bytes per kernel: 64, 64, 192, 192, 16, 16 -> 192. Were
    the view not keeping t0 alive, kernel 2 would see 128 only."""
    program = hand_built_program()
    stats = buffer_reuse.run(program, context())
    assert stats["live_lower_bound_bytes"] == 192
    assert buffer_reuse.live_lower_bound(program, buffer_reuse.lifetimes(program)) == 192


@pytest.mark.usefixtures("one_arena_per_busy_period")
def test_buffer_reuse_live_bound_uses_the_storage_a_strided_buffer_spans():
    program = Program(
        "strided",
        {"a": buffer("a", (4,), "input"),
         "t": buffer("t", (4, 100), strides=(1, 0)),      # expanded: 4 floats of storage
         "u": buffer("u", (3, 2), strides=(4, 1)),        # spans 3*4-2 = 10 floats
         "o": buffer("o", (4,), "output")},
        [Kernel("k0", "triton", [], ["a"], ["t"]),
         Kernel("k1", "triton", [], ["t"], ["u"]),
         Kernel("k2", "triton", [], ["u"], ["o"])],
        inputs=["a"], outputs=["o"])
    assert program.buffers["t"].nbytes == 16
    assert program.buffers["u"].nbytes == 40
    # t and u are alive together at k1; sizes round up to the arena's 16-byte alignment
    assert buffer_reuse.run(program, context())["live_lower_bound_bytes"] == 16 + 48


def test_buffer_reuse_outputs_that_are_inputs_or_repeated():
    program = Program(
        "passthrough",
        {"a": buffer("a", (4,), "input"), "t": buffer("t", (4,)),
         "o": buffer("o", (4,), "output")},
        [Kernel("k0", "triton", [], ["a"], ["t"]), Kernel("k1", "triton", [], ["t"], ["o"])],
        inputs=["a"], outputs=["o", "a", "o", 3])
    buffer_reuse.run(program, context())
    freed = [name for names in program.frees.values() for name in names]
    assert freed == ["t"]
    assert program.frees == {1: ["t"]}


def test_buffer_reuse_frees_an_unused_input_on_entry():
    program = Program(
        "unused",
        {"a": buffer("a", (4,), "input"), "b": buffer("b", (4,), "input"),
         "o": buffer("o", (4,), "output")},
        [Kernel("k0", "triton", [], ["a"], ["o"])], inputs=["a", "b"], outputs=["o"])
    buffer_reuse.run(program, context())
    assert program.frees == {-1: ["b"], 0: ["a"]}


def test_buffer_reuse_on_a_fused_program_runs_correctly():
    """The frees it plans, executed: every value still exists when read."""
    x, w = torch.randn(4, 4), torch.randn(4, 4)

    def fn(x, w):
        a = x.exp()
        b = (a + a @ w).sigmoid()
        return b.t() * 2, b.view(16)
    program, _, gm = fuse(fn, x, w)
    buffer_reuse.run(program, context())
    outputs = {name for name in program.outputs if isinstance(name, str)}
    for index, names in program.frees.items():
        assert not set(names) & outputs
        for name in names:
            spans = buffer_reuse.lifetimes(program)
            assert spans[name][1] == index
    assert_program_matches(program, gm, [x, w])


# ================================================================ layout
def _convolution_program():
    """relu -> conv -> relu: the conv's input and output are generated temporaries."""
    import torch.nn.functional as F
    x, k = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)

    def fn(x, k):
        return (F.conv2d(x.relu(), k, padding=1).relu() * 2,)
    return fuse(fn, x, k), (x, k)


def test_layout_makes_convolution_activations_channels_last():
    from retrograd.codegen import generate_sources
    from retrograd.passes import layout
    from retrograd.runtime.executor import GeneratedExecutable
    (program, _, gm), inputs = _convolution_program()
    stats = layout.run(program, context())
    [conv] = [k for k in program.kernels if k.op == "aten.convolution.default"]
    source, result = conv.inputs[0], conv.outputs[0]
    for name in (source, result):
        assert program.buffers[name].strides == layout.channels_last_strides(
            program.buffers[name].shape)
    assert stats == {"convolutions": 1, "channels_last_buffers": 2, "buffers": [source, result]}
    assert program.buffers[program.outputs[0]].strides == (144, 36, 6, 1)   # outputs keep theirs
    buffer_reuse.run(program, context())
    assert_program_matches(program, gm, inputs)
    kernels, wrapper = generate_sources(program, interpreted=True)
    got = GeneratedExecutable(program, wrapper, kernels, True)(list(inputs))
    torch.testing.assert_close(got[0], run_gm(gm, inputs)[0])
    # torch returned the channels-last result the plan predicts: nothing was copied
    assert f"{result} = rt.layout({result}, (2, 4, 6, 6), (144, 1, 24, 4))" in wrapper
    real = torch.ops.aten.convolution(inputs[0].relu().contiguous(
        memory_format=torch.channels_last), inputs[1], None, [1, 1], [1, 1], [1, 1], False,
        [0, 0], 1)
    assert real.stride() == (144, 1, 24, 4)


def test_layout_leaves_buffers_a_view_reads():
    import torch.nn.functional as F
    from retrograd.passes import layout
    x, k, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(108, 5)

    def fn(x, k, w):
        h = x.relu()    # read by the convolution and, through a view, by a product
        return (F.conv2d(h, k, padding=1), h.flatten(1) @ w)
    program, _, gm = fuse(fn, x, k, w)
    assert any(k.kind == "view" and "relu" in k.inputs for k in program.kernels)
    assert layout.run(program, context())["channels_last_buffers"] == 0
    assert_program_matches(program, gm, [x, k, w])


# ================================================================ updates in place
def _update_program() -> Program:
    """k0: x -> g; update: p, g -> new_p; k2 (extern): p, x -> y. The update
    comes before the last reader of the old p, in fusion's order."""
    buffers = {"p": buffer("p", (8,), "input"), "x": buffer("x", (8,), "input"),
               "g": buffer("g", (8,)), "new_p": buffer("new_p", (8,), "output"),
               "y": buffer("y", (8,), "output")}
    kernels = [Kernel("pointwise_g", "triton", [], ["x"], ["g"]),
               Kernel("pointwise_update", "triton", [], ["p", "g"], ["new_p"]),
               Kernel("extern_use", "extern", [], ["p", "x"], ["y"])]
    program = Program("update", buffers, kernels, inputs=["p", "x"], outputs=["new_p", "y"])
    program.updates = {"new_p": "p"}
    return program


def test_schedule_runs_readers_of_an_updated_input_before_its_update():
    from retrograd.passes import schedule
    program = _update_program()
    schedule.run(program, context())
    order = [k.name for k in program.kernels]
    assert order.index("extern_use") < order.index("pointwise_update")
    stats = buffer_reuse.run(program, context())
    assert stats["updates_in_place"] == 1 and program.buffers["new_p"].reuses == "p"
    # p stays referenced until the update has written over it
    freed_at = next(i for i, names in program.frees.items() if "p" in names)
    assert freed_at == order.index("pointwise_update")


def test_an_update_before_a_later_reader_stays_out_of_place():
    program = _update_program()             # fusion's order, not rescheduled
    stats = buffer_reuse.run(program, context())
    assert stats["updates_in_place"] == 0 and stats["updates_out_of_place"] == 1
    assert program.buffers["new_p"].reuses is None


# ================================================================ the fx executor
def test_fx_executor_fills_need_only_the_shape_of_what_they_are_like():
    """A fill inlined where the value it is shaped like is not (yet, or any
    more) in memory is made from metadata: nothing is recomputed."""
    from retrograd.runtime.executor import _evaluate
    gm = trace(lambda x: (torch.zeros_like(x.sin()),), torch.randn(3, 4))
    fill = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.zeros_like.default)
    env: dict = {}
    value = _evaluate(fill, env)
    assert torch.equal(value, torch.zeros(3, 4)) and env == {}


def test_fx_executor_reads_an_in_register_view_from_its_register():
    from retrograd.runtime.executor import _evaluate
    gm = trace(lambda x: (x.sin().view(12) * 2,), torch.randn(3, 4))
    view = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.view.default)
    mul = next(iter(view.users))
    sin = view.args[0]
    env = {"sin_register": torch.arange(12.0).view(3, 4)}
    got = _evaluate(mul, env, {view.name: "sin_register"})
    assert torch.equal(got, torch.arange(12.0) * 2) and sin.name not in env


def test_schedule_reports_fusion_outputs_held_across_the_peak():
    """k0 (two nodes fused) writes a and b; a is read only at the end, so it is
    held across the peak at k1, where c is made: reported, with its bytes."""
    from retrograd.passes import schedule
    buffers = {"x": buffer("x", (4,), "input"), "a": buffer("a", (4,)), "b": buffer("b", (4,)),
               "c": buffer("c", (64,)), "out": buffer("out", (4,), "output")}
    kernels = [Kernel("pointwise_ab", "triton", ["node a", "node b"], ["x"], ["a", "b"]),
               Kernel("pointwise_c", "triton", ["node c"], ["b"], ["c"]),
               Kernel("reduction_out", "triton", ["node out"], ["a", "c"], ["out"])]
    program = Program("held", buffers, kernels, inputs=["x"], outputs=["out"])
    assert schedule.held_by_fusion(program) == [
        {"kernel": "pointwise_ab", "buffer": "a", "bytes": 16}]
    stats = schedule.run(program, context())
    assert stats["peak_held_by_fusion_bytes"] == 16
    program.kernels[0].nodes = ["node a"]          # not a fusion: nothing to report
    assert schedule.held_by_fusion(program) == []
