"""``retrograd.grad`` / ``retrograd.value_and_grad`` and the dead_gradient pass.

End to end: only the requested gradients are computed (no weight gradient
for an input-gradient / saliency call, none for an argument outside
``argnums``, nothing through the tangents of auxiliary outputs), results
match eager, errors are ValueErrors that name the problem, and a compiled
graph is reused for new values of the same signature.

Unit: the pass on joint graphs from ``retrograd.capture.joint_graph`` and on
small hand-traced ones, run before and after with ``retrograd.verify.run_graph``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import retrograd
from retrograd.capture import joint_graph
from retrograd.dump import Dumper
from retrograd.options import Options
from retrograd.passes import dead_gradient
from retrograd.passes.dead_gradient import GradientSpec
from retrograd.pipeline import OpSupport, PassContext
from retrograd.verify import run_graph

from checks import relative_error
from zoo import ZOO

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _seed(no_dump_env):
    torch.manual_seed(0)


def _pass_stats(reports: dict, half: str = "backward") -> dict:
    (record,) = [p for p in reports[half]["passes"] if p["name"] == "dead_gradient"]
    return record["stats"]


def _eager_grads(function, args: tuple, argnums: tuple[int, ...]):
    """torch.autograd on fresh leaves: the reference, without touching any .grad."""
    leaves = [a.detach().clone().requires_grad_(True) if i in argnums else a
              for i, a in enumerate(args)]
    loss = function(*leaves)
    return loss, torch.autograd.grad(loss, [leaves[i] for i in argnums])


# -- reading the backward graph from the dump ------------------------------------------

_LINE = re.compile(r'^\s+(\w+)(?::\s*"\w+\[([^\]]*)\]\[[^\]]*\]")?\s*=\s*(.+)$')
_ARG = re.compile(r'(\w+):\s*"\w+\[([^\]]*)\]')


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def backward_nodes(dump_dir: Path) -> list[dict]:
    """The backward graph after the checkpoint split (``NN_checkpoint.py`` of the
    backward folder): for each node its name, op, shape (None for tuples), call
    text, and whether it is computed from a tangent."""
    (folder,) = [f for f in Path(dump_dir).iterdir() if f.name.endswith("-backward")]
    (path,) = folder.glob("*_checkpoint.py")
    text = path.read_text().split("# ---- backward ----", 1)[1]
    start = text.index("def forward(")
    end = text.index("):\n", start)
    signature = text[start:end]
    known = {name for name, _ in _ARG.findall(signature)}
    derived = {name for name in known if name.startswith("tangents")}
    assert derived, signature
    nodes = []
    for line in text[end + 3:].splitlines():
        match = _LINE.match(line)
        if not match or line.strip().startswith("return"):
            continue
        name, shape, rhs = match.groups()
        rhs = rhs.split(";  ")[0]
        uses = set(re.findall(r"\b\w+\b", rhs)) & known
        op = re.search(r"torch\.ops\.(\w+\.\w+\.\w+)\(", rhs)
        known.add(name)
        if uses & derived:
            derived.add(name)
        nodes.append({"name": name, "op": op.group(1) if op else None, "call": rhs,
                      "shape": None if shape is None else _shape(shape),
                      "from_tangent": name in derived})
    assert nodes, f"no nodes parsed from {path}"
    return nodes


def weight_shaped(nodes: list[dict], model: nn.Module) -> list[str]:
    """Nodes computed from a tangent whose shape is a parameter's (a weight gradient)."""
    shapes = {tuple(p.shape) for p in model.parameters()}
    return [f"{n['name']}: {n['op']} {n['shape']}" for n in nodes
            if n["from_tangent"] and n["shape"] in shapes]


# -- 1. input gradients of zoo models: no weight gradient anywhere --------------------------

#: (zoo model, input shape chosen so no activation has a parameter's shape, mode,
#:  backward extern ops: only those the input gradient needs)
INPUT_GRADIENT_CASES = {
    "mlp": ((5, 8), "train", {"aten.mm.default": 3}),   # one mm per Linear
    "attention_block": ((2, 6, 16), "train",
                        {"aten.mm.default": 4, "aten.bmm.default": 4}),
    "cnn": ((2, 3, 8, 8), "eval", {"aten.convolution_backward.default": 2,
                                   "aten.mm.default": 1}),
}


@pytest.mark.parametrize("name", sorted(INPUT_GRADIENT_CASES))
def test_input_gradient_computes_no_weight_gradient(name, tmp_path):
    shape, mode, extern = INPUT_GRADIENT_CASES[name]
    model = ZOO[name].model()
    model.train(mode == "train")
    x = torch.randn(shape)
    g = retrograd.grad(lambda x: model(x).sum(), dump_dir=str(tmp_path))
    got = g(x)
    _, (expected,) = _eager_grads(lambda x: model(x).sum(), (x,), (0,))
    assert relative_error(got, expected) < 1e-5
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())   # constants, not frozen

    report = g.reports["backward"]
    assert report["kernels"]["extern_ops"] == extern
    (fusion,) = [p for p in report["passes"] if p["name"] == "fusion"]
    assert fusion["stats"]["extern_ops"] == extern
    stats = _pass_stats(g.reports)
    # the model's parameters are lifted into the graph (grad() finds the module
    # the lambda closes over); dead_gradient removes every one of their gradients
    assert stats["unwanted_gradients"] == len(list(model.parameters()))
    assert stats["zero_tangents"] == 0

    nodes = backward_nodes(tmp_path)
    assert not weight_shaped(nodes, model)
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() >= 2}
    for node in nodes:
        if node["op"] in ("aten.mm.default", "aten.bmm.default"):
            assert node["shape"] not in weights, node
        if node["op"] == "aten.convolution_backward.default":   # grad_input only
            assert node["call"].rstrip(")").endswith("[True, False, False]"), node["call"]
    matmuls = sum(n["op"] == "aten.mm.default" for n in nodes)
    assert matmuls == sum(isinstance(m, nn.Linear) for m in model.modules())


def test_weight_gradient_detector_sees_a_full_backward(tmp_path):
    """The checks above can fail: the training face's backward of the same MLP
    computes every weight gradient, and the reading of the dump finds them."""
    model = ZOO["mlp"].model()
    compiled = retrograd.compile(model, dump_dir=str(tmp_path))
    compiled(torch.randn(5, 8, requires_grad=True)).sum().backward()
    assert compiled.reports["backward"]["kernels"]["extern_ops"] == {"aten.mm.default": 6}
    found = weight_shaped(backward_nodes(tmp_path), model)
    for parameter in ("(16, 8)", "(8, 16)", "(4, 8)"):
        assert any(f"aten.mm.default {parameter}" in line for line in found), found


# -- 2. a subset of parameters: LoRA adapters ---------------------------------------------

@pytest.mark.parametrize("base_requires_grad", [False, True])
def test_adapter_gradients_as_a_dict(base_requires_grad):
    base = nn.Parameter(torch.randn(6, 8), requires_grad=base_requires_grad)
    adapter = {"B": torch.randn(6, 2), "A": 0.3 * torch.randn(2, 8)}   # insertion order kept
    x = torch.randn(5, 8)

    def f(adapter, x):
        hidden = x @ base.T + (x @ adapter["A"].T) @ adapter["B"].T
        return hidden.tanh().square().sum()

    got = retrograd.grad(f)(adapter, x)
    expected = torch.func.grad(f)(adapter, x)
    assert isinstance(got, dict) and list(got) == list(adapter)
    for key in adapter:
        assert got[key].shape == adapter[key].shape
        assert relative_error(got[key], expected[key]) < 1e-5, key
    assert base.grad is None
    assert all(not a.requires_grad and a.grad is None for a in adapter.values())

    both = retrograd.grad(f, argnums=(0, 1))(adapter, x)
    assert isinstance(both, tuple) and len(both) == 2
    got_adapter, got_x = both
    expected_adapter, expected_x = torch.func.grad(f, argnums=(0, 1))(adapter, x)
    assert list(got_adapter) == list(adapter)
    for key in adapter:
        assert relative_error(got_adapter[key], expected_adapter[key]) < 1e-5, key
    assert relative_error(got_x, expected_x) < 1e-5
    assert base.grad is None


def test_argnums_tuple_of_one_returns_a_tuple():
    x, y = torch.randn(3), torch.randn(3)
    got = retrograd.grad(lambda x, y: (x * y).sin().sum(), argnums=(1,))(x, y)
    assert isinstance(got, tuple) and len(got) == 1
    assert relative_error(got[0], x * (x * y).cos()) < 1e-5
    neg = retrograd.grad(lambda x, y: (x * y).sin().sum(), argnums=-1)(x, y)
    assert relative_error(neg, x * (x * y).cos()) < 1e-5


# -- 3. auxiliary outputs: value_and_grad(has_aux=True) ----------------------------------

class Classifier(nn.Module):
    """The zoo's MLP with a cross-entropy loss; returns (loss, logits)."""

    def __init__(self):
        super().__init__()
        self.body = ZOO["mlp"].model()

    def forward(self, x, labels):
        logits = self.body(x)
        return F.cross_entropy(logits, labels), logits


def test_value_and_grad_with_aux_matches_eager():
    model = Classifier()
    x, labels = torch.randn(5, 8), torch.randint(0, 4, (5,))
    g = retrograd.value_and_grad(lambda x, labels: model(x, labels), has_aux=True)
    (loss, logits), gx = g(x, labels)

    leaf = x.clone().requires_grad_(True)
    expected_loss, expected_logits = model(leaf, labels)
    (expected_gx,) = torch.autograd.grad(expected_loss, leaf)
    assert relative_error(loss, expected_loss) < 1e-5
    assert loss.shape == () and not loss.requires_grad
    assert relative_error(logits, expected_logits) < 1e-5
    assert relative_error(gx, expected_gx) < 1e-5
    assert all(p.grad is None for p in model.parameters())

    stats = _pass_stats(g.reports)
    assert stats["zero_tangents"] >= 1   # the logits' tangent
    assert stats["nodes_removed"] >= 1   # the sum with it
    assert stats["unwanted_gradients"] == len(list(model.parameters()))   # lifted, dropped

    only_grad = retrograd.grad(lambda x, labels: model(x, labels), has_aux=True)
    got_gx, aux = only_grad(x, labels)
    assert relative_error(got_gx, expected_gx) < 1e-5
    assert relative_error(aux, expected_logits) < 1e-5


def test_aux_tangent_removed_when_its_sum_is_the_gradient():
    """The sum of the loss's and the aux's contributions is the gradient output
    itself: ``x + 0 -> x`` must reach the graph's output."""
    def f(x):
        return x.sin().sum(), x.cos() * 3

    x = torch.randn(6)
    g = retrograd.value_and_grad(f, has_aux=True)
    (value, aux), gx = g(x)
    assert relative_error(gx, x.cos()) < 1e-5
    assert relative_error(value, x.sin().sum()) < 1e-5
    assert relative_error(aux, x.cos() * 3) < 1e-5
    stats = _pass_stats(g.reports)
    assert stats["zero_tangents"] == 1
    assert stats["nodes_removed"] >= 3   # tangent * 3, * -sin(x), the add


def test_aux_zero_tangents_under_verify():
    """verify=True checks the passes with the aux tangents at zero, as promised."""
    def f(x):
        return (x.sin() * x).sum(), x.exp()

    x = torch.randn(4, 3)
    (value, aux), gx = retrograd.value_and_grad(f, has_aux=True, verify=True)(x)
    expected = torch.func.grad(lambda x: f(x)[0])(x)
    assert relative_error(gx, expected) < 1e-5


# -- 4. gradients nobody asked for -----------------------------------------------------------

def test_unwanted_gradient_is_never_computed():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, 5, requires_grad=True)

    def f(x, w):
        return (x @ w).tanh().sum()

    g = retrograd.grad(f, argnums=0)
    got = g(x, w)
    _, (expected,) = _eager_grads(f, (x, w), (0,))
    assert relative_error(got, expected) < 1e-5
    stats = _pass_stats(g.reports)
    assert stats["unwanted_gradients"] == 1
    assert stats["gradient_bytes_never_computed"] == w.numel() * w.element_size()
    assert stats["nodes_removed"] >= 1
    assert g.reports["backward"]["kernels"]["extern_ops"] == {"aten.mm.default": 1}
    assert x.grad is None and w.grad is None


def test_both_arguments_wanted_computes_both():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, 5, requires_grad=True)

    def f(x, w):
        return (x @ w).tanh().sum()

    g = retrograd.grad(f, argnums=(0, 1))
    got_x, got_w = g(x, w)
    _, (expected_x, expected_w) = _eager_grads(f, (x, w), (0, 1))
    assert relative_error(got_x, expected_x) < 1e-5
    assert relative_error(got_w, expected_w) < 1e-5
    stats = _pass_stats(g.reports)
    assert stats["unwanted_gradients"] == 0 and stats["gradient_bytes_never_computed"] == 0
    assert g.reports["backward"]["kernels"]["extern_ops"] == {"aten.mm.default": 2}


# -- 5. the pass on joint graphs ----------------------------------------------------------------

def _ctx(num_fwd_outputs: int, **spec) -> PassContext:
    return PassContext(Options(), Dumper(None, []), OpSupport(), "t",
                       gradients=GradientSpec(**spec), num_fwd_outputs=num_fwd_outputs)


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _outputs(gm) -> list:
    return list(next(n for n in gm.graph.nodes if n.op == "output").args[0])


def _random_like(values) -> list:
    return [torch.randn(v.shape, dtype=v.dtype) for v in values]


def _joint(module: nn.Module, *inputs):
    joint, joint_inputs, count = joint_graph(module, inputs)
    primals, tangents = joint_inputs
    return joint, _random_like(primals), _random_like(tangents), count


def _same(got: list, expected: list) -> None:
    """Equal output by output, exactly (NaN matching NaN); a None (no gradient)
    only where the other side has None too: a vanished gradient is a failure."""
    assert len(got) == len(expected), f"{len(got)} outputs, expected {len(expected)}"
    for index, (a, b) in enumerate(zip(got, expected)):
        if a is None or b is None:
            assert a is None and b is None, f"output {index}: {a!r} against {b!r}"
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_same_fails_a_gradient_present_on_one_side_only():
    """The helper the tests below rely on: None faces None, or it fails."""
    _same([None, torch.ones(2)], [None, torch.ones(2)])
    with pytest.raises(AssertionError, match="output 0"):
        _same([None, torch.ones(2)], [torch.zeros(3), torch.ones(2)])
    with pytest.raises(AssertionError, match="output 1"):
        _same([None, torch.ones(2)], [None, None])
    with pytest.raises(AssertionError):
        _same([torch.ones(2)], [torch.ones(2), None])


class MatmulBranch(nn.Module):
    """A loss of x alone, and an output through view, mm, expand (a sum in the
    backward) and mul that touches x and w."""

    def forward(self, x, w):
        loss = (x * x).sum()
        mixed = (x.view(2, 4) @ w).unsqueeze(0).expand(3, 2, 5) * 3.0
        return loss, mixed.sum(dim=(1, 2))


def test_zero_tangent_flows_through_mul_mm_views_and_sums():
    x, w = torch.randn(8, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    joint, primals, tangents, count = _joint(MatmulBranch(), x, w)
    assert _targets(joint).count(aten.mm.default) == 3   # forward, grad x, grad w
    assert _targets(joint).count(aten.add.Tensor) == 2
    zero = [tangents[0], torch.zeros_like(tangents[1])]
    before = run_graph(joint, primals + zero)

    stats = dead_gradient.run(joint, _ctx(count, zero_tangents=(1,))).stats
    joint.graph.lint()
    assert stats["zero_tangents"] == 1
    assert stats["nodes_removed"] >= 5
    assert stats["gradient_bytes_never_computed"] == w.numel() * w.element_size()
    assert _targets(joint).count(aten.mm.default) == 1   # the forward's
    tangent = [n for n in joint.graph.nodes if n.name == "tangents_2"][0]
    assert not tangent.users
    grad_x, grad_w = _outputs(joint)[count:]
    assert grad_w.target is aten.full.default and grad_w.args[1] == 0   # a zero fill
    assert _targets(joint).count(aten.add.Tensor) == 1   # only x * x's two terms remain
    assert grad_x.target is aten.add.Tensor and all(a.target is aten.mul.Tensor
                                                      for a in grad_x.args)

    after = run_graph(joint, primals + zero)
    _same(after, before)
    assert torch.count_nonzero(after[-1]) == 0 and after[-1].shape == w.shape
    # the real second tangent is never read: any value gives the same result
    _same(run_graph(joint, primals + tangents), before)
    torch.testing.assert_close(after[count], 2 * primals[0] * zero[0], rtol=1e-6, atol=0)


class TwoOutputs(nn.Module):
    def forward(self, x):
        return x.sin(), x.cos()


def test_sum_with_a_zero_term_is_the_other_term():
    joint, primals, tangents, count = _joint(TwoOutputs(), torch.randn(6, requires_grad=True))
    adds = _targets(joint).count(aten.add.Tensor)
    (grad,) = _outputs(joint)[count:]
    assert grad.target is aten.add.Tensor
    zero = [tangents[0], torch.zeros_like(tangents[1])]
    before = run_graph(joint, primals + zero)

    stats = dead_gradient.run(joint, _ctx(count, live_tangents=(0,))).stats
    joint.graph.lint()
    assert stats["zero_tangents"] == 1 and stats["nodes_removed"] >= 3
    assert _targets(joint).count(aten.add.Tensor) == adds - 1
    (grad,) = _outputs(joint)[count:]
    assert grad.target is aten.mul.Tensor   # tangents_1 * cos(x), no longer + 0
    _same(run_graph(joint, primals + zero), before)


class Shared(nn.Module):
    def forward(self, x, w):
        return (x * w).sum(), (x.exp() * w).sum()


def test_unwanted_gradient_becomes_none_and_wanted_are_unchanged():
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    joint, primals, tangents, count = _joint(Shared(), x, w)
    before = run_graph(joint, primals + tangents)
    stats = dead_gradient.run(joint, _ctx(count, wanted=(0,))).stats
    joint.graph.lint()
    assert stats == {"nodes_removed": stats["nodes_removed"],
                     "gradient_bytes_never_computed": w.numel() * w.element_size(),
                     "unwanted_gradients": 1, "zero_tangents": 0}
    assert stats["nodes_removed"] >= 1
    assert _outputs(joint)[count + 1] is None
    after = run_graph(joint, primals + tangents)
    assert after[count + 1] is None
    _same(after[:count + 1], before[:count + 1])   # both tangents live: x's grad exact


def test_no_spec_changes_nothing():
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    joint, primals, tangents, count = _joint(Shared(), x, w)
    code = joint.code
    before = run_graph(joint, primals + tangents)
    stats = dead_gradient.run(joint, _ctx(count)).stats
    assert stats == {"nodes_removed": 0, "gradient_bytes_never_computed": 0,
                     "unwanted_gradients": 0, "zero_tangents": 0}
    assert joint.code == code
    _same(run_graph(joint, primals + tangents), before)


def _hand_joint(function, shapes):
    """A joint graph traced by hand: placeholders named primals_* / tangents_*,
    outputs (forward output, gradient)."""
    def joint(primals_1, tangents_1, tangents_2):
        return function(primals_1, tangents_1, tangents_2)
    inputs = [torch.randn(s) for s in shapes]
    gm = make_fx(joint)(*inputs)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.startswith("tangents") for n in names] == [False, True, True], names
    return gm, inputs


@pytest.mark.parametrize("case", ["x / zero", "zero + 1", "1 - zero", "zero - x",
                                  "broadcast zero + x", "x - zero"])
def test_hand_built_graphs_keep_their_values(case):
    """Only what is zero for every input value counts as zero."""
    bodies = {
        "x / zero": lambda p, t1, t2: (p.sin(), t1 * p + p / t2),
        "zero + 1": lambda p, t1, t2: (p.sin(), (t1 * p + (t2 + 1.0) * 2).exp()),
        "1 - zero": lambda p, t1, t2: (p.sin(), t1 * p + torch.rsub(t2, 1.0)),
        "zero - x": lambda p, t1, t2: (p.sin(), (t2 * 3) - t1 * p),
        "broadcast zero + x": lambda p, t1, t2: (p.sin(), (t2 * 2 + t1 * p[0]).sum(0)),
        "x - zero": lambda p, t1, t2: (p.sin(), t1 * p - t2 * p),
    }
    shapes = [(2, 3), (2, 3), (4, 2, 3) if case.startswith("broadcast") else (2, 3)]
    gm, (p, t1, t2) = _hand_joint(bodies[case], shapes)
    inputs = [p, t1, torch.zeros_like(t2)]
    before = run_graph(gm, inputs)
    stats = dead_gradient.run(gm, _ctx(1, zero_tangents=(1,))).stats
    gm.graph.lint()
    after = run_graph(gm, inputs)
    _same(after, before)
    (grad,) = _outputs(gm)[1:]
    assert grad.target is not aten.full.default
    if case == "x / zero":
        assert aten.div.Tensor in _targets(gm)   # p / 0 is inf, not a zero
        assert torch.isinf(after[1]).any()
    if case == "x - zero":
        assert stats["nodes_removed"] == 2 and grad.target is aten.mul.Tensor   # t2 * p, -
    if case == "zero + 1":
        torch.testing.assert_close(after[1], (t1 * p + 2).exp())


def test_entirely_zero_gradient_is_a_fill():
    gm, (p, t1, t2) = _hand_joint(lambda p, t1, t2: (p.sin(), (t2 * p.cos()).view(6).view(2, 3)),
                                  [(2, 3)] * 3)
    stats = dead_gradient.run(gm, _ctx(1, zero_tangents=(1,))).stats
    (grad,) = _outputs(gm)[1:]
    assert grad.target is aten.full.default
    assert stats["gradient_bytes_never_computed"] == p.numel() * p.element_size()
    assert _targets(gm) == [aten.sin.default, aten.full.default]
    out = run_graph(gm, [p, t1, t2])   # the nonzero tangent is never read
    assert torch.equal(out[1], torch.zeros(2, 3))


# -- 6. errors ---------------------------------------------------------------------------------

def _loss(x):
    return x.sin().sum()


ERRORS = {
    "argnums out of range": (lambda: retrograd.grad(_loss, argnums=1)(torch.randn(3)),
                             r"argnums 1 is out of range for 1 positional argument"),
    "negative argnums out of range": (lambda: retrograd.grad(_loss, argnums=-2)(torch.randn(3)),
                                      r"argnums -2 is out of range"),
    "argnums a float": (lambda: retrograd.grad(_loss, argnums=1.5),
                        r"argnums=1\.5 must be an int or a non-empty tuple of ints"),
    "argnums None": (lambda: retrograd.grad(_loss, argnums=None),
                     r"argnums=None must be an int"),
    "argnums a string": (lambda: retrograd.grad(_loss, argnums="0"),
                         r"argnums='0' must be an int"),
    "argnums empty": (lambda: retrograd.grad(_loss, argnums=()), r"argnums=\(\) must be"),
    "argnums a bool": (lambda: retrograd.value_and_grad(_loss, argnums=True),
                       r"argnums=True must be an int"),
    "integer argument": (lambda: retrograd.grad(lambda x: x.float().sum())(torch.arange(3)),
                         r"must hold floating point tensors to differentiate, got Tensor of "
                         r"torch\.int64"),
    "python number argument": (lambda: retrograd.grad(lambda x: x * 2)(2.0),
                               r"must hold floating point tensors to differentiate, got float"),
    "integer leaf in a dict": (
        lambda: retrograd.grad(lambda d: d["a"].sum())({"a": torch.randn(2),
                                                         "n": torch.ones(2, dtype=torch.long)}),
        r"floating point tensors .* torch\.int64"),
    "non-scalar loss": (lambda: retrograd.grad(lambda x: x.sin())(torch.randn(3)),
                        r"must return a scalar floating point loss, got \(3,\)"),
    "non-scalar loss with aux": (
        lambda: retrograd.grad(lambda x: (x.sin(), x), has_aux=True)(torch.randn(3)),
        r"scalar floating point loss \(first of \(loss, aux\)\), got \(3,\)"),
    "integer loss": (lambda: retrograd.grad(lambda x: x.argmax())(torch.randn(3)),
                     r"must return a scalar floating point loss"),
    "aux not a pair": (lambda: retrograd.grad(_loss, has_aux=True)(torch.randn(3)),
                       r"has_aux=True the function must return a pair \(loss, aux\)"),
    "loss of constants only": (lambda: retrograd.grad(lambda x: torch.ones(()) * 2)(torch.randn(3)),
                               r"does not depend on the differentiated arguments"),
    "loss of another argument": (
        lambda: retrograd.grad(lambda x, y: (y * 2).sum())(torch.randn(3), torch.randn(3)),
        r"does not depend on the differentiated arguments"),
    "loss of another argument that requires grad": (
        lambda: retrograd.grad(lambda x, y: (y * 2).sum())(
            torch.randn(3), torch.randn(3, requires_grad=True)),
        r"does not depend on the differentiated arguments"),
    "loss of a closed-over parameter": (
        lambda: retrograd.grad(lambda x, w=nn.Parameter(torch.randn(3)): (w * 2).sum())(
            torch.randn(3)),
        r"does not depend on the differentiated arguments"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_value_errors_naming_the_problem(case):
    call, message = ERRORS[case]
    with pytest.raises(ValueError, match=r"^retrograd\.grad: .*" + message):
        call()


# -- 7. the compiled graph is reused ------------------------------------------------------------

def test_new_values_reuse_the_graph_and_new_shapes_retrace():
    model = ZOO["mlp"].model()
    g = retrograd.grad(lambda x: model(x).square().sum())
    x = torch.randn(5, 8)
    first = g(x)
    report = g.reports
    assert len(g._cache.entries) == 1

    for _ in range(2):
        x = torch.randn(5, 8)
        got = g(x)
        _, (expected,) = _eager_grads(lambda x: model(x).square().sum(), (x,), (0,))
        assert relative_error(got, expected) < 1e-5
        assert g.reports is report and len(g._cache.entries) == 1
    assert not torch.equal(got, first)

    x = torch.randn(3, 8)
    got = g(x)
    _, (expected,) = _eager_grads(lambda x: model(x).square().sum(), (x,), (0,))
    assert relative_error(got, expected) < 1e-5
    assert len(g._cache.entries) == 2 and g.reports is not report
    g(torch.randn(5, 8))
    assert g.reports is report and len(g._cache.entries) == 2
    assert all(p.grad is None for p in model.parameters())


def test_reuse_sees_closed_over_parameters_updated_in_place():
    """Forward and backward read the live parameters: an optimizer step between
    calls changes both (AOTAutograd compiles the backward from a deep copy)."""
    model = nn.Linear(4, 3)
    g = retrograd.grad(lambda x: model(x).square().sum())
    x = torch.randn(2, 4)
    g(x)
    with torch.no_grad():
        model.weight.mul_(-2.0)
        model.bias.add_(1.0)
    got = g(x)
    assert len(g._cache.entries) == 1
    expected = torch.func.grad(lambda x: model(x).square().sum())(x)
    assert relative_error(got, expected) < 1e-5


def test_batch_norm_in_training_mode():
    """grad() lifts the module the function closes over: BatchNorm's running
    statistics are written back as in eager, the input gradient matches, no
    weight gradient is computed (convolution backward asks for grad_input
    only), and switching to eval mode traces again."""
    import copy
    torch.manual_seed(0)
    model = ZOO["cnn"].model().train()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    g = retrograd.grad(lambda x: model(x).sum())
    got = g(x)
    _, (expected,) = _eager_grads(lambda x: reference(x).sum(), (x,), (0,))
    assert relative_error(got, expected) < 1e-5
    for mine, theirs in zip(model.buffers(), reference.buffers()):
        assert torch.equal(mine, theirs) if not mine.is_floating_point() \
            else relative_error(mine, theirs) < 1e-6
    assert int(model.bn1.num_batches_tracked) == 1
    stats = _pass_stats(g.reports)
    assert stats["unwanted_gradients"] == len(list(model.parameters()))
    cleanup = next(p for p in g.reports["backward"]["passes"] if p["name"] == "cleanup")
    assert cleanup["stats"]["masked_results_dropped"] >= 2
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    reference.eval()
    _, (expected,) = _eager_grads(lambda x: reference(x).sum(), (x,), (0,))
    assert relative_error(g(x), expected) < 1e-5
    assert len(g._cache.entries) == 2


def test_closed_over_modules_are_found_by_name():
    from retrograd.reach import reachable_modules
    outer = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    other = nn.Linear(2, 2)

    def uses_both(x, scale=other):
        return outer(x).sum() + scale(x).sum()
    found = reachable_modules(uses_both)
    assert found == [outer, other] or found == [other, outer]
    assert reachable_modules(lambda x: x.sum()) == []
    assert reachable_modules(outer.forward) == [outer]


# -- 8. modules reached through containers and objects ------------------------------------------

class Trainer:
    """A plain object holding a model, as training loops do."""

    def __init__(self, model: nn.Module):
        self.model = model


def _loss_through(holder):
    """A loss that reaches the model only through ``holder``."""
    if isinstance(holder, dict):
        return lambda x: holder["enc"](x).square().sum()
    if isinstance(holder, list):
        return lambda x: holder[0](x).square().sum()
    return lambda x: holder.model(x).square().sum()


@pytest.mark.parametrize("holder", ["dict", "list", "attribute"])
def test_a_module_reached_through_a_container_is_lifted(holder):
    """A replaced parameter and an in-place update (an optimizer step) of a
    model held in a dict, a list or a plain object's attribute give the right
    gradient: its parameters are graph inputs, not constants of the trace."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    held = {"dict": {"enc": model}, "list": [model], "attribute": Trainer(model)}[holder]
    loss = _loss_through(held)
    g = retrograd.grad(loss, executor="fx")
    x = torch.randn(5, 4)

    def check():
        expected = torch.func.grad(loss)(x)
        assert relative_error(g(x), expected) < 1e-5

    check()
    model[0].weight = nn.Parameter(torch.randn(3, 4))
    check()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().sum().backward()
    optimizer.step()
    check()
    assert _pass_stats(g.reports)["unwanted_gradients"] == len(list(model.parameters()))


def test_a_module_swapped_in_the_container_is_used():
    torch.manual_seed(0)
    models = {"enc": nn.Linear(4, 2)}

    def loss(x):
        return models["enc"](x).sin().sum()

    g = retrograd.grad(loss, executor="fx")
    x = torch.randn(3, 4)
    g(x)
    models["enc"] = nn.Linear(4, 2)
    assert relative_error(g(x), torch.func.grad(loss)(x)) < 1e-5


def test_reachable_modules_follow_containers_objects_and_helpers():
    from retrograd.reach import reachable_modules
    first, second, third = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    nested = {"a": [(first,)]}
    trainer = Trainer(second)

    def helper(x):
        return third(x)

    def function(x):
        return nested["a"][0][0](x) + trainer.model(x) + helper(x) + F.relu(x)

    found = reachable_modules(function)
    assert sorted(map(id, found)) == sorted(map(id, (first, second, third)))
    assert reachable_modules(function, depth=1) == []
    whole = nn.Sequential(first, second)
    assert reachable_modules(lambda x: whole(x) + first(x)) == [whole]   # outermost only
