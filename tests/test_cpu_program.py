"""The torch program (``executor="torch"``), what ``executor="auto"`` runs on a CPU.

Tests marked ``cpu_default`` see the real default (tests/conftest.py pins
"auto" to Triton's interpreter everywhere else). Numbers are compared with
eager; the program's text is checked for what the plan says (one comment per
kernel naming its fx nodes, deletes at last use); values fused kernels never
store are made from metadata, from the register they equal, or again.
"""

from __future__ import annotations

import copy

import pytest
import retrograd
import torch
from pass_helpers import (
    buffer,
    fuse,
    run_gm,
    seeded,  # noqa: F401  (autouse: each test from seed 0)
    trace,
)
from retrograd.codegen.torch_calls import torch_function
from retrograd.codegen.torch_program import generate_torch_program
from retrograd.ir import Kernel, Program
from retrograd.runtime.device import choose_executor
from retrograd.runtime.torch_program import TorchProgramExecutable
from zoo import ZOO, assert_parity, training_step

aten = torch.ops.aten


@pytest.mark.cpu_default
def test_auto_means_the_torch_program_on_cpu():
    assert choose_executor("auto", torch.device("cpu")) == "torch"
    assert choose_executor("torch", torch.device("cpu")) == "torch"
    assert choose_executor("interpret", torch.device("cpu")) == "interpret"


def test_tests_keep_the_interpreter_for_auto():
    """conftest's pin: tests of generated kernels keep running them."""
    assert choose_executor("auto", torch.device("cpu")) == "interpret"


@pytest.mark.cpu_default
@pytest.mark.parametrize("name", ["mlp", "cnn", "attention_block", "gpt2_tiny", "lora",
                                  "mlp_frozen"])
def test_zoo_step_matches_eager_with_the_default(name):
    entry = ZOO[name]
    model = entry.model()
    reference = copy.deepcopy(model)
    inputs = entry.inputs()
    compiled = retrograd.compile(model)
    expected = training_step(entry, reference, reference, inputs)
    got = training_step(entry, compiled, model, inputs)
    assert_parity(got, expected, tolerance=1e-5)
    for report in compiled.reports.values():
        [codegen] = [p for p in report["passes"] if p["name"] == "codegen"]
        assert codegen["stats"]["executor"] == "torch"
        assert codegen["stats"]["kernel_sources"] == 0


@pytest.mark.cpu_default
def test_dump_holds_the_program_one_comment_per_kernel(tmp_path):
    """The dump's program.py is the torch program: each kernel's comment names
    its fx nodes, values are deleted after their last use, and it runs alone."""
    entry = ZOO["mlp"]
    model = retrograd.compile(entry.model(), dump_dir=str(tmp_path))
    entry.run(model, entry.inputs()).backward()
    [path] = list(tmp_path.glob("*-backward/program.py"))
    text = path.read_text()
    assert "a torch program" in text and "kernels." not in text
    assert "triton" in text   # fused kernels keep their names in the comments
    import re
    comments = re.findall(r"^    # (\d+): (\w+) (\S+) \((.*)\)$", text, re.MULTILINE)
    assert comments and [int(c[0]) for c in comments] == list(range(len(comments)))
    for _, _, _, nodes in comments:   # every node named in a comment is assigned
        for node in nodes.split(", "):
            assert re.search(rf"^    {node}_? = ", text, re.MULTILINE), node
    assert "\n    del " in text
    from retrograd.program_bench import main
    namespace: dict = {}
    exec(compile(text.split('if __name__ == "__main__":')[0], str(path), "exec"),  # noqa: S102
         namespace)   # the recorded layouts, as `python program.py` reads them
    main(str(path), namespace["INPUTS"], namespace["CONSTANTS"], namespace["EXECUTOR"],
         argv=["--repeat", "1"])


def _program(gm, kernels, outputs, frees=None, aliases=None) -> Program:
    """A hand-built program over ``gm``'s nodes: one triton kernel per node list."""
    nodes = {node.name: node for node in gm.graph.nodes}
    buffers = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            role = "input" if node.op == "placeholder" else \
                "output" if node.name in outputs else "temporary"
            buffers[node.name] = buffer(node.name, tuple(value.shape), role,
                                        strides=tuple(value.stride()))
    made = [Kernel(f"kernel_{index}", "triton", [nodes[name] for name in names],
                   outputs=[name for name in names if name in outputs],
                   aliases=aliases or {})
            for index, names in enumerate(kernels)]
    inputs = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    return Program("unit", buffers, made, inputs, list(outputs), frees=frees or {})


def _name_of(gm, target) -> str:
    return next(n.name for n in gm.graph.nodes if n.target is target)


def test_a_fill_shaped_like_a_freed_value_is_made_from_its_metadata():
    x = torch.randn(3, 4)
    gm = trace(lambda x: torch.zeros_like(x), x)
    fill = _name_of(gm, aten.zeros_like.default)
    program = _program(gm, [[fill]], [fill], frees={-1: ["arg0_1"]})
    source = generate_torch_program(program)
    assert "rt.empty((3, 4), (4, 1), torch.float32)" in source
    [got] = TorchProgramExecutable(program, source)([x])
    assert torch.equal(got, torch.zeros(3, 4))


def test_a_view_kept_in_registers_is_read_from_its_register():
    x = torch.randn(3, 4)
    gm = trace(lambda x: x.sin().view(12) * 2, x)
    sin, view, mul = (_name_of(gm, op) for op in (aten.sin.default, aten.view.default,
                                                    aten.mul.Tensor))
    program = _program(gm, [[sin, mul]], [mul], aliases={view: sin})
    source = generate_torch_program(program)
    assert f"{view} = {sin}.reshape((12,))" in source
    [got] = TorchProgramExecutable(program, source)([x])
    torch.testing.assert_close(got, run_gm(gm, [x])[0])


def test_a_value_no_kernel_stored_is_computed_again_then_deleted():
    x = torch.randn(3, 4)
    gm = trace(lambda x: x.sin().view(12) * 2, x)
    sin, view, mul = (_name_of(gm, op) for op in (aten.sin.default, aten.view.default,
                                                    aten.mul.Tensor))
    program = _program(gm, [[mul]], [mul])
    source = generate_torch_program(program)
    assert source.count("# computed again") == 2   # the view, and the sine it views
    assert f"del {view}" in source or f"del {sin}, {view}" in source \
        or f"del {view}, {sin}" in source
    [got] = TorchProgramExecutable(program, source)([x])
    torch.testing.assert_close(got, run_gm(gm, [x])[0])


def test_inner_values_of_a_fused_kernel_die_at_their_last_use():
    """A fused chain holds at most two full-size values at once (what it reads
    and what it writes), as eager does; the fx executor kept them all."""
    program, _, _ = fuse(lambda x: x.sin().cos().exp().neg().abs().sqrt(), torch.randn(8))
    source = generate_torch_program(program)
    body = source.split("def run")[1]
    assigned = deleted = 0
    alive_most = 0
    for line in body.splitlines():
        line = line.strip()
        if " = torch." in line:
            assigned += 1
        elif line.startswith("del "):
            deleted += line.count(",") + 1
        alive_most = max(alive_most, assigned - deleted)
    assert alive_most <= 2 + 1   # plus the input, alive until its last reader


def test_inputs_get_the_planned_strides():
    program, _, _ = fuse(lambda x: x * 2, torch.randn(4, 3))
    x = torch.randn(3, 4).t()   # same shape, other strides
    [got] = TorchProgramExecutable(program, generate_torch_program(program))([x])
    torch.testing.assert_close(got, x * 2)


def test_a_value_a_view_reads_keeps_the_strides_it_was_traced_with():
    """A view was traced against the recorded strides: a value it reads keeps
    them in the torch program, whatever the plan says (torch_strides.py)."""
    program, _, _ = fuse(lambda x: ((x * 2).view(12).cumsum(0),), torch.randn(4, 3))
    [name] = program.kernels[0].outputs
    assert any(k.kind == "view" and name in k.inputs for k in program.kernels)
    program.buffers[name].strides = (1, 4)   # the plan wants it column-major
    source = generate_torch_program(program)
    assert "(1, 4)" not in source
    x = torch.randn(4, 3)
    [got] = TorchProgramExecutable(program, source)([x])
    torch.testing.assert_close(got, (x * 2).view(12).cumsum(0))


def test_torch_functions_stand_in_for_overloads_only_when_they_agree():
    gm = trace(lambda x: (x * 2).view(-1).sum([0], True), torch.randn(3, 4))
    by_target = {node.target: node for node in gm.graph.nodes}
    assert torch_function(by_target[aten.mul.Tensor]) == "torch.mul"
    assert torch_function(by_target[aten.sum.dim_IntList]) == "torch.sum"
    assert torch_function(by_target[aten.view.default]) is None   # no torch.view
    by_target[aten.mul.Tensor].meta.pop("val")
    node = by_target[aten.sum.dim_IntList]
    node.args[0].meta.pop("val")
    assert torch_function(node) is None   # nothing to check it on


def test_the_torch_executor_can_be_asked_for_by_name():
    x = torch.randn(5, 3, requires_grad=True)
    compiled = retrograd.compile(lambda x: (x.sin() * x).sum(), executor="torch")
    compiled(x).backward()
    expected = torch.autograd.grad((x.sin() * x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.cpu_default
def test_symbolic_programs_run_torch_calls_by_default_on_cpu():
    """After a second size, the symbolic program: torch calls on a CPU by
    default (was: Triton kernels compiled for a GPU that is not there)."""
    compiled = retrograd.compile(lambda x: (x.exp() * 0.5).sum())
    for size in (5, 7, 9):
        x = torch.randn(size, requires_grad=True)
        compiled(x).backward()
        torch.testing.assert_close(x.grad, x.detach().exp() * 0.5)
    symbolic = [r for r in compiled.reports.values() if r.get("symbolic")]
    assert symbolic and all(r["symbolic"]["executor"] == "torch" for r in symbolic)
    assert all(r["kernels"]["triton"] == 0 for r in symbolic)


def test_a_node_copied_into_a_later_kernel_is_read_not_deleted():
    """Fusion copies cheap nodes (scalars, fills) into each consumer's kernel;
    an earlier kernel's output of that name stays alive (was deleted by the
    later kernel as its own inner value: an UnboundLocalError at the return,
    gpt2_tiny with memory_budget=1.0)."""
    x = torch.randn(3, 4)
    def shared(x):
        s = x.sin()
        return s, s * 2
    gm = trace(shared, x)
    sin, mul = (_name_of(gm, op) for op in (aten.sin.default, aten.mul.Tensor))
    program = _program(gm, [[sin], [sin, mul]], [sin, mul])
    program.kernels[1].outputs = [mul]   # the copy of sin is not stored there
    got = TorchProgramExecutable(program, generate_torch_program(program))([x])
    torch.testing.assert_close(got, [x.sin(), x.sin() * 2])


@pytest.mark.cpu_default
def test_compile_step_with_adam_matches_an_eager_loop():
    """A whole training step (forward, backward, Adam, BatchNorm statistics)
    as one torch program; updates the plan writes over their input arrive
    as new tensors and are copied back."""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False),
                                   torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 3))

    def loss_of(model, x, y):
        return torch.nn.functional.cross_entropy(model(x), y)
    mine, eager = build(), build()
    optimizer = torch.optim.Adam(mine.parameters(), lr=0.01)
    reference = torch.optim.Adam(eager.parameters(), lr=0.01)
    step = retrograd.compile_step(mine, loss_of, optimizer)
    torch.manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
        loss = step(x, y)
        reference.zero_grad()
        expected = loss_of(eager, x, y)
        expected.backward()
        reference.step()
        torch.testing.assert_close(loss.detach(), expected.detach())
    for p, q in zip(mine.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(mine.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    [codegen] = [p for p in step.reports["step"]["passes"] if p["name"] == "codegen"]
    assert codegen["stats"]["executor"] == "torch"


@pytest.mark.cpu_default
def test_verify_compares_the_torch_program_too():
    entry = ZOO["attention_block"]
    model = retrograd.compile(entry.model(), verify=True)
    entry.run(model, entry.inputs()).backward()   # every stage within tolerance, or raises
