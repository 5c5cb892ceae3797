"""The checkpoint pass as AOTAutograd's partition_fn on real joint graphs:
its saved-activation figure against hand counts and eager autograd's saved
tensors, the split's gradients, and the figure in the report. (The plans
themselves, budgets and solvers: tests/test_checkpoint.py.)"""

from __future__ import annotations

import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

import retrograd
from retrograd.decompositions import decomposition_table
from retrograd.passes import checkpoint
from retrograd.passes.op_classes import is_view
from pass_helpers import aten, context
from pass_helpers import seeded  # noqa: F401  (autouse: each test from seed 0)


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
        ctx = context()
        ctx.num_fwd_outputs = kwargs["num_fwd_outputs"]
        (forward, backward), stats = checkpoint.run(joint, ctx)
        record.update(forward=forward, backward=backward, stats=stats,
                      num_fwd_outputs=kwargs["num_fwd_outputs"])
        return forward, backward

    compiled = aot_module_simplified(
        module, inputs, fw_compiler=lambda gm, _: make_boxed_func(gm),
        bw_compiler=lambda gm, _: make_boxed_func(gm), partition_fn=partition,
        decompositions=decomposition_table(full_table=True))
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
        while is_view(root):
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
