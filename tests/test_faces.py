"""The two faces as a user meets them: ``retrograd.compile`` and
``torch.compile(backend="retrograd")``.

Module-likeness, re-tracing on new signatures, arguments that are not float
tensors, ops codegen does not lower, dynamo's symbolic shapes, dumps and the
report, ``verify=True``, logging, and the errors a user can run into. Every
numeric check compares with eager PyTorch; on CPU the kernels run under
Triton's interpreter.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import retrograd
import retrograd.api
import retrograd.backend
import retrograd.codegen.ops
import retrograd.passes.cleanup
import torch
import torch.nn as nn
import torch.nn.functional as F
from checks import FACES, RetraceCounter, compile_with, record_graphs, relative_error
from retrograd.verify import VerificationError
from zoo import MLP, ZOO, SmallCNN, assert_parity, clone_inputs, training_step

pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_dump_env")

aten = torch.ops.aten


def _step(model, parameters_of, *inputs, entry=ZOO["mlp"]):
    return training_step(entry, model, parameters_of, inputs)


def _same(got, expected, tolerance: float = 1e-5) -> None:
    assert_parity({"value": got}, {"value": expected}, tolerance)


# -- module-likeness ------------------------------------------------------------------

@pytest.mark.parametrize("face", FACES)
def test_parameters_are_the_originals_and_an_optimizer_step_is_seen(face):
    torch.manual_seed(0)
    model = MLP()
    compiled = compile_with(face, model)
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]

    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    _step(compiled, model, x)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with torch.no_grad():
        _same(compiled(x), model(x))   # the compiled graph reads the updated weights


@pytest.mark.parametrize("face", FACES)
def test_train_and_eval_switch_batchnorm(face):
    """train(): batch statistics; eval(): running statistics, as in eager."""
    torch.manual_seed(0)
    model = SmallCNN()
    reference = copy.deepcopy(model)
    compiled = compile_with(face, model)
    images = torch.randn(2, 3, 8, 8)

    with torch.no_grad():
        trained = compiled(images)
        _same(trained, reference(images))
        assert compiled.eval() is compiled
        assert not model.training and not model.bn1.training
        reference.eval()
        evaluated = compiled(images)
        _same(evaluated, reference(images))
        assert relative_error(evaluated, trained) > 1e-3, "eval mode made no difference"
        compiled.train()
        _same(compiled(images), reference.train()(images))


@pytest.mark.parametrize("face", FACES)
def test_state_dict_round_trips(face):
    torch.manual_seed(0)
    model, other = MLP(), MLP()
    compiled = compile_with(face, model)
    x = torch.randn(4, 8)
    compiled(x)

    state = compiled.state_dict()
    assert set(state) == {f"_orig_mod.{key}" for key in model.state_dict()}
    for key, value in model.state_dict().items():
        assert state[f"_orig_mod.{key}"].data_ptr() == value.data_ptr()

    compiled.load_state_dict({f"_orig_mod.{k}": v for k, v in other.state_dict().items()})
    with torch.no_grad():
        _same(compiled(x), other(x))


def test_a_replaced_parameter_is_used():
    """The compiled graph holds the tensors it was traced with: replacing one
    (not updating it in place) must trace again, not run with the old one."""
    torch.manual_seed(0)
    model = MLP()
    compiled = retrograd.compile(model)
    x = torch.randn(4, 8)
    compiled(x)
    model.head.weight = nn.Parameter(torch.randn_like(model.head.weight))
    with torch.no_grad():
        _same(compiled(x), model(x))


# -- re-tracing -----------------------------------------------------------------------

@pytest.mark.parametrize("face", FACES)
def test_a_new_batch_size_traces_again(face, monkeypatch):
    counter = RetraceCounter(monkeypatch)
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    compiled = compile_with(face, model)
    for batch in (4, 6, 4):
        x = torch.randn(batch, 8, requires_grad=True)
        model.zero_grad()
        reference.zero_grad()
        assert_parity(_step(compiled, model, x), _step(reference, reference, x))
    if face == "standalone":
        assert counter.calls == 2
        assert len(compiled._cache.entries) == 2
    else:
        # dynamo recompiles the frame for batch 6 with a dynamic batch size; that
        # graph compiles once, symbolically, and serves 4 too
        assert counter.calls == 2


@pytest.mark.parametrize("face", FACES)
def test_a_new_dtype_traces_again(face, monkeypatch):
    counter = RetraceCounter(monkeypatch)

    def function(x, w):
        return torch.tanh(x @ w) * x.sigmoid()

    compiled = compile_with(face, function)
    torch.manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        x = torch.randn(4, 4, dtype=dtype, requires_grad=True)
        w = torch.randn(4, 4, dtype=dtype, requires_grad=True)
        got = compiled(x, w)
        assert got.dtype == dtype
        grads = torch.autograd.grad(got.square().sum(), (x, w))
        expected = function(x, w)
        expected_grads = torch.autograd.grad(expected.square().sum(), (x, w))
        _same(got, expected, tolerance)
        for a, b in zip(grads, expected_grads):
            _same(a, b, tolerance)
    assert counter.calls == 2


@pytest.mark.parametrize("face", FACES)
def test_python_numbers_are_baked_in_and_a_new_value_traces_again(face, monkeypatch):
    """A float and a bool argument: each new value compiles again (under
    torch.compile dynamo may pass the float as a tensor after a recompile)."""
    counter = RetraceCounter(monkeypatch)

    def function(x, scale: float, clip: bool):
        y = torch.sin(x) * scale
        return y.clamp(-0.5, 0.5) if clip else y

    compiled = compile_with(face, function)
    torch.manual_seed(0)
    x = torch.randn(3, 5, requires_grad=True)
    calls = [(2.0, True), (3.0, True), (0.5, True), (2.0, False), (2.0, True)]
    for scale, clip in calls:
        got = compiled(x, scale, clip)
        (grad,) = torch.autograd.grad(got.sum(), x)
        expected = function(x, scale, clip)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x)
        _same(got, expected)
        _same(grad, expected_grad)
    assert 4 <= counter.calls <= len(calls)
    if face == "standalone":
        assert counter.calls == 4   # the last call repeats the first signature


class TokenModel(nn.Module):
    """Embedding of integer token ids, then a GELU MLP."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.mlp = MLP(8, 16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(ids))


@pytest.mark.parametrize("face", FACES)
def test_integer_token_ids_are_data_not_constants(face, monkeypatch):
    """New ids of the same shape reuse the compiled graph and give new, right answers."""
    counter = RetraceCounter(monkeypatch)
    torch.manual_seed(0)
    model = TokenModel()
    reference = copy.deepcopy(model)
    compiled = compile_with(face, model)
    for _ in range(2):
        ids = torch.randint(0, 16, (2, 5))
        model.zero_grad()
        reference.zero_grad()
        assert_parity(_step(compiled, model, ids), _step(reference, reference, ids))
        assert model.embed.weight.grad.abs().sum() > 0
    assert counter.calls == 1


def test_outputs_keep_their_structure():
    def function(x):
        return {"sum": x.sum(0), "pair": (x.relu(), 3), "name": "x"}

    x = torch.randn(3, 4)
    got = retrograd.compile(function)(x)
    assert set(got) == {"sum", "pair", "name"} and got["name"] == "x" and got["pair"][1] == 3
    _same(got["sum"], x.sum(0))
    _same(got["pair"][0], x.relu())


# -- what codegen does not lower still runs ---------------------------------------------

UNLOWERED = {   # cumsum and advanced indexing were here until codegen lowered them
    "cummax": (lambda x: torch.cummax(x, dim=1).values.sin(), "aten.cummax.default"),
    "sort": (lambda x: torch.sort(x, dim=1).values * x, "aten.sort.default"),
    "topk": (lambda x: torch.topk(x, 2, dim=1).values.exp(), "aten.topk.default"),
}


@pytest.mark.parametrize("name", UNLOWERED)
def test_an_op_codegen_does_not_lower_runs_as_an_extern_call(name):
    function, op = UNLOWERED[name]
    compiled = retrograd.compile(function)
    torch.manual_seed(0)
    x = torch.randn(3, 6, requires_grad=True)
    got = compiled(x)
    (grad,) = torch.autograd.grad(got.square().sum(), x)
    expected = function(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    _same(got, expected)
    _same(grad, expected_grad)
    assert op in compiled.reports["forward"]["kernels"]["extern_ops"]
    assert compiled.reports["forward"]["kernels"]["triton"] >= 1


# -- dynamo's symbolic shapes -------------------------------------------------------------

def test_dynamo_symbolic_shapes_after_a_recompile(monkeypatch):
    """The second batch size makes dynamo mark the dimension dynamic and hand
    the backend a graph with SymInt sizes; every call must still be right.
    With ``dynamic=False`` that graph is compiled per concrete size (the
    default compiles it once, symbolically: test_dynamic_shapes.py)."""
    graphs = record_graphs(monkeypatch)
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="retrograd", options={"dynamic": False})
    for batch in (2, 3, 5, 7, 3):
        x = torch.randn(batch, 8, requires_grad=True)
        model.zero_grad()
        reference.zero_grad()
        assert_parity(_step(compiled, model, x), _step(reference, reference, x))

    dynamic = [graph for graph in graphs if _has_symbolic_sizes(graph.gm)]
    assert dynamic, "dynamo never handed over a graph with symbolic sizes"
    assert len(dynamic[0].compiled) == 3   # batch sizes 3, 5, 7, each once


def _has_symbolic_sizes(gm: torch.fx.GraphModule) -> bool:
    from retrograd.dynamic import is_symbolic
    return is_symbolic([node.meta.get("example_value") for node in gm.graph.nodes])


# -- dumps and the report -------------------------------------------------------------------

REPORT_KEYS = {
    "nodes": {"captured", "final"},
    "kernels": {"triton", "extern", "extern_ops"},
    "memory": {"saved_activation_bytes", "arena_bytes", "live_lower_bound_bytes",
               "unplanned_bytes", "predicted_peak_bytes", "program_peak_bytes",
               "measured_peak_bytes", "measured_peak_note"},
    "traffic": {"bytes_read", "bytes_written"},
    "recompute": {"nodes", "flops"},
}


def _check_report(report: dict) -> None:
    """Schema 2: the keys DESIGN.md fixes, with values of the right kinds."""
    assert report["schema"] == 4
    assert isinstance(report["ledger"], list) and "pareto" in report
    assert report["graph"] in ("forward", "backward")
    assert isinstance(report["graph_id"], str) and report["graph_id"]
    for section, keys in REPORT_KEYS.items():
        assert keys <= set(report[section]), (section, keys - set(report[section]))
    assert report["nodes"]["captured"] > 0 and report["nodes"]["final"] > 0
    assert report["kernels"]["triton"] > 0
    assert isinstance(report["kernels"]["extern_ops"], dict)
    assert report["traffic"]["bytes_read"] > 0 and report["traffic"]["bytes_written"] > 0
    assert isinstance(report["compile_seconds"], float) and report["compile_seconds"] >= 0
    names = [record["name"] for record in report["passes"]]
    assert {"cleanup", "checkpoint", "fusion"} <= set(names), names
    for record in report["passes"]:
        assert {"name", "seconds", "nodes_before", "nodes_after", "stats"} <= set(record)
        assert record["seconds"] >= 0 and isinstance(record["stats"], dict)
    for key, value in report["memory"].items():
        if key == "measured_peak_note":   # schema 4: words, how it was measured or why not
            assert isinstance(value, str) and value, value
            continue
        assert value is None or (isinstance(value, int) and value >= 0), (key, value)


def _check_dump(root) -> None:
    """``<root>/<graph_id>/`` for the forward and the backward, with every file."""
    folders = sorted(path for path in root.iterdir() if path.is_dir())
    graphs = set()
    for folder in folders:
        report = json.loads((folder / "report.json").read_text())
        _check_report(report)
        assert report["graph_id"] == folder.name
        graphs.add(report["graph"])
        stages = sorted(path.name for path in folder.glob("[0-9][0-9]_*"))
        assert stages and stages[0].startswith("00_") and stages[0].endswith(".py"), stages
        for expected in ("cleanup", "checkpoint", "fusion"):
            assert any(name[3:].startswith(expected) for name in stages), (expected, stages)
        compile(next(folder.glob("00_*.py")).read_text(), "graph", "exec")   # readable Python
        kernels = list((folder / "kernels").glob("*.py"))
        assert kernels and all("@triton.jit" in path.read_text() for path in kernels)
        assert "def run(" in (folder / "program.py").read_text()
        assert (folder / "memory_plan.txt").read_text().strip()
        assert "<html" in (folder / "index.html").read_text()
    assert graphs == {"forward", "backward"}


@pytest.mark.parametrize("face", FACES)
def test_dump_dir_writes_a_folder_per_graph(face, tmp_path):
    torch.manual_seed(0)
    model = MLP()
    _step(compile_with(face, model, dump_dir=str(tmp_path)), model, torch.randn(4, 8))
    _check_dump(tmp_path)


@pytest.mark.parametrize("face", FACES)
def test_the_environment_variable_alone_turns_dumps_on(face, tmp_path, monkeypatch):
    monkeypatch.setenv("RETROGRAD_DUMP", str(tmp_path))
    torch.manual_seed(0)
    model = MLP()
    _step(compile_with(face, model), model, torch.randn(4, 8))
    _check_dump(tmp_path)


def test_no_dump_without_dump_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = MLP()
    compiled = retrograd.compile(model)
    _step(compiled, model, torch.randn(4, 8))
    assert list(tmp_path.iterdir()) == []
    _check_report(json.loads(json.dumps(compiled.reports["backward"])))


# -- verify -------------------------------------------------------------------------------

@pytest.mark.parametrize("face", FACES)
def test_verify_passes_on_a_correct_pipeline(face):
    torch.manual_seed(0)
    model = SmallCNN()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    compiled = compile_with(face, model, verify=True)
    assert_parity(_step(compiled, model, x, entry=ZOO["cnn"]),
                  _step(reference, reference, x, entry=ZOO["cnn"]))


def _change_a_constant(run):
    """A cleanup that also changes the first float constant it finds (sabotage)."""

    def sabotaged(gm, ctx):
        stats = run(gm, ctx)
        for node in gm.graph.nodes:
            changed = tuple(a * 1.5 + 0.25 if isinstance(a, float) else a for a in node.args)
            if node.op == "call_function" and changed != node.args:
                node.args = changed
                break
        gm.recompile()
        return stats

    return sabotaged


@pytest.mark.parametrize("face", FACES)
def test_verify_names_the_pass_that_changed_the_numbers(face, monkeypatch):
    monkeypatch.setattr(retrograd.passes.cleanup, "run",
                        _change_a_constant(retrograd.passes.cleanup.run))
    torch.manual_seed(0)
    model = MLP()
    compiled = compile_with(face, model, verify=True)
    with pytest.raises(VerificationError, match="pass 'cleanup'"):
        _step(compiled, model, torch.randn(4, 8))


@pytest.mark.parametrize("face", FACES)
def test_verify_names_codegen_when_a_kernel_computes_wrongly(face, monkeypatch):
    """A lowering that emits ``a + b`` for ``a * b``: the passes are right, the
    generated kernel is not, so verify blames codegen."""
    wrong = lambda node, operand: f"{operand(node.args[0])} + {operand(node.args[1])}"  # noqa: E731
    monkeypatch.setitem(retrograd.codegen.ops.LOWERINGS, aten.mul.Tensor, wrong)
    torch.manual_seed(0)
    model = MLP()
    compiled = compile_with(face, model, verify=True)
    with pytest.raises(VerificationError, match="pass 'codegen'"):
        _step(compiled, model, torch.randn(4, 8))


# -- logging and errors --------------------------------------------------------------------

@pytest.mark.parametrize("face", FACES)
def test_the_logger_reports_each_compiled_graph(face, caplog):
    caplog.set_level(logging.INFO, logger="retrograd")
    torch.manual_seed(0)
    model = MLP()
    _step(compile_with(face, model), model, torch.randn(4, 8))
    messages = [r.getMessage() for r in caplog.records
                if r.name == "retrograd" and r.levelno == logging.INFO]
    summaries = [m for m in messages if "Triton kernels" in m]
    assert len(summaries) == 2, messages
    assert {m.split(":")[0].rsplit("-", 1)[1] for m in summaries} == {"forward", "backward"}
    assert all("extern calls" in m and "saved activations" in m and "bytes" in m
               for m in summaries)
    assert any("pass fusion" in m for m in messages)


@pytest.mark.parametrize("face", FACES)
def test_executor_triton_on_cpu_tensors_is_a_clear_error(face):
    compiled = compile_with(face, MLP(), executor="triton")
    with pytest.raises(ValueError, match="executor='triton' needs CUDA tensors.*interpret"):
        compiled(torch.randn(4, 8))


@pytest.mark.parametrize("face", FACES)
def test_an_unknown_option_names_the_known_ones(face):
    with pytest.raises((ValueError, torch._dynamo.exc.BackendCompilerFailed),
                       match="unknown option.*'bogus'.*memory_budget"):
        compile_with(face, MLP(), bogus=1)(torch.randn(4, 8))


def test_a_function_closing_over_a_tensor_that_requires_grad_is_refused():
    weight = torch.randn(8, 8, requires_grad=True)

    def function(x):
        return F.gelu(x @ weight)

    with pytest.raises(ValueError, match="closes over tensors that require grad.*\\(8, 8\\)"):
        retrograd.compile(function)(torch.randn(4, 8, requires_grad=True))
    with torch.no_grad():   # no gradient wanted: nothing is lost
        _same(retrograd.compile(function)(torch.ones(4, 8)), function(torch.ones(4, 8)))


def test_a_module_closing_over_a_tensor_that_requires_grad_is_refused():
    outside = torch.randn(4, requires_grad=True)

    class Closing(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 4)

        def forward(self, x):
            return self.linear(x) * outside

    with pytest.raises(ValueError, match="Closing.forward closes over tensors"):
        retrograd.compile(Closing())(torch.randn(4, 8))


def test_a_closed_over_constant_is_baked_in():
    """A tensor that needs no gradient (a mask, a scale) is a constant of the graph."""
    torch.manual_seed(0)
    scale = torch.rand(8) + 0.5
    mask = torch.rand(4, 8) > 0.3

    def function(x):
        return torch.where(mask, x * scale, -x)

    x = torch.randn(4, 8, requires_grad=True)
    reference_x = clone_inputs((x,))[0]
    got = retrograd.compile(function)(x)
    got.square().sum().backward()
    expected = function(reference_x)
    expected.square().sum().backward()
    _same(got, expected)
    _same(x.grad, reference_x.grad)
