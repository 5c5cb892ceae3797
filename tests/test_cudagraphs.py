"""CUDA graphs over the arena (runtime/cudagraphs.py), tested without a GPU.

No graph exists on a CPU, so these tests check what does not need the
driver: the decision and its reasons in the report; that a program's run
is capture-safe (no host sync, the same allocations every call, all of them
the plan's: ``runtime/capture_check.py``); that the static-slot logic gives
eager's numbers when one program object is called with inputs at new
addresses, with a CPU stand-in for the graph (``StandIn``: a capture that
computes nothing, a replay that writes into the captured outputs); and that
retrograd's uniform draws read their seed as a tensor. The tests marked
``gpu`` capture real graphs (skipped without CUDA).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy
import pytest
import retrograd
import retrograd.rng
import torch
import torch.nn.functional as F
from checks import assert_close, eager_step
from retrograd.runtime import cudagraphs
from retrograd.runtime.arena import Allocator
from retrograd.runtime.capture_check import CaptureChecker, expected_allocations


class StandIn:
    """The graph backend's contract on a CPU: ``capture`` records and computes
    nothing (the inputs it wrote are restored, its outputs poisoned with NaN),
    ``replay`` runs the program again on the same slots and writes each
    result into the captured output, as a replay writes the same addresses."""

    def __init__(self, device):
        self.device = device

    def warm_up(self, function):
        return function()

    def capture(self, function, slots):
        saved = [s.clone() if isinstance(s, torch.Tensor) else None for s in slots]
        outputs = function()
        inputs = {s.untyped_storage().data_ptr() for s in slots if isinstance(s, torch.Tensor)}
        for slot, value in zip(slots, saved):
            if value is not None:
                slot.copy_(value)
        for output in outputs:
            if isinstance(output, torch.Tensor) and output.is_floating_point() and \
                    output.untyped_storage().data_ptr() not in inputs:
                output.fill_(float("nan"))

        def replay():
            for static, value in zip(outputs, function()):
                if isinstance(static, torch.Tensor) and value.data_ptr() != static.data_ptr():
                    static.copy_(value)
        return replay, outputs

    @staticmethod
    def replay(graph):
        graph()


def test_the_stand_in_has_the_cuda_backend_s_methods():
    """The real backend cannot run here: at least its calls take what the
    stand-in's take (capture once took no slots)."""
    import inspect
    for name in ("warm_up", "capture", "replay"):
        real, stand_in = getattr(cudagraphs.CudaGraphs, name), getattr(StandIn, name)
        assert list(inspect.signature(real).parameters) == \
            list(inspect.signature(stand_in).parameters), name


@pytest.fixture
def stand_in(monkeypatch):
    """Programs on the CPU are 'captured' with ``StandIn``; yields the list of
    CapturedExecutables made."""
    made = []

    class Recorded(cudagraphs.CapturedExecutable):
        def __init__(self, *args):
            super().__init__(*args)
            self.first_args = None
            made.append(self)

        def __call__(self, args):
            if self.first_args is None:
                self.first_args = list(args)
            return super().__call__(args)
    monkeypatch.setattr(cudagraphs, "capture_blockers", lambda *args, **kwargs: [])
    monkeypatch.setattr(cudagraphs, "CudaGraphs", StandIn)
    monkeypatch.setattr(cudagraphs, "CapturedExecutable", Recorded)
    return made


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _mse(model, x, y):
    return F.mse_loss(model(x), y)


# -- the seed is a tensor -----------------------------------------------------------

@pytest.mark.parametrize("seed,offset", [(0, 0), (123456789, 7), (2**31 - 2, 2**32 - 5)])
def test_uniform_matches_the_philox_reference(seed, offset):
    like = torch.empty(6, 7)
    got = torch.ops.retrograd.uniform(like, torch.tensor(seed), offset)
    counters = numpy.arange(offset, offset + like.numel(), dtype=numpy.int64) & 0xFFFFFFFF
    want = torch.from_numpy(retrograd.rng.philox_uniform(seed, counters)).reshape(6, 7)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_reads_its_seed_as_a_tensor_without_a_host_sync(dtype):
    """The eager draw (fx and torch executors, verify) read the seed with
    ``int(seed)``: a sync a graph capture forbids, frozen on replay."""
    like, seed = torch.empty(5, 3, dtype=dtype), torch.tensor(42)
    with CaptureChecker("cpu", [like, seed]) as check:
        values = torch.ops.retrograd.uniform(like, seed, 0)
    assert check.syncs == [] and check.strays == []
    assert values.dtype == dtype and bool((values >= 0).all() and (values < 1).all())


# -- the decision ----------------------------------------------------------------

def _report(compiled) -> dict:
    return compiled.reports["forward"]


def _codegen(report: dict) -> dict:
    return next(p for p in report["passes"] if p["name"] == "codegen")["stats"]


def test_cpu_programs_are_not_captured_and_the_report_says_why():
    compiled = retrograd.compile(lambda x: (x * 2).sin().sum())
    compiled(torch.randn(4, 4, requires_grad=True)).backward()
    graphs = _codegen(_report(compiled))["cudagraphs"]
    assert graphs["enabled"] is False
    assert graphs["reasons"] == ["tensors on cpu: CUDA graphs need CUDA tensors"]


def test_cudagraphs_false_is_reported_and_true_on_cpu_warns():
    compiled = retrograd.compile(lambda x: x.exp(), cudagraphs=False)
    compiled(torch.randn(3))
    assert _codegen(_report(compiled))["cudagraphs"]["reasons"] == ["option cudagraphs=False"]
    with pytest.warns(UserWarning, match="cudagraphs=True.*tensors on cpu"):
        retrograd.compile(lambda x: x.exp(), cudagraphs=True)(torch.randn(3))


def _fake_cuda_program(function, *shapes):
    """A program-shaped object whose nodes were traced on fake CUDA tensors
    (which a CPU-only build can make, with a shape environment for ``.item()``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with mode:
        inputs = [torch.empty(shape, device="cuda") for shape in shapes]
    graph = make_fx(function, tracing_mode="real")(*inputs)
    nodes = [n for n in graph.graph.nodes if n.op == "call_function"]
    program = SimpleNamespace(buffers={}, inputs=[], kernels=[SimpleNamespace(nodes=nodes)],
                              name="fake")
    return program, mode


@pytest.mark.parametrize("function,expected", [
    (lambda x: x * x.sum().item(), [("aten._local_scalar_dense (node _local_scalar_dense) "
                                     "reads a tensor value on the host (a sync)")]),
    (lambda x: x.cpu() + 1, [("aten._to_copy (node _to_copy) makes a tensor on cpu in a "
                              "program on cuda:0"),
                             "aten.add (node add) makes a tensor on cpu in a program on cuda:0"]),
    (lambda x: x.sin().exp() * torch.tensor(2.0), []),   # a 0-dim CPU constant: a scalar
])
def test_capture_blockers_name_the_op_and_node(function, expected):
    program, _ = _fake_cuda_program(function, (4,))
    assert cudagraphs.capture_blockers(program, torch.device("cuda:0"), "triton") == expected


@pytest.mark.parametrize("op,expected", [
    ("_c10d_functional.all_reduce", "is a collective"),
    ("retrograd.offload", "offloads to host memory allocated per call"),
])
def test_collectives_and_host_offload_are_blockers(op, expected):
    import retrograd.runtime.offload  # noqa: F401 (registers retrograd::offload)
    namespace, name = op.split(".")
    target = getattr(getattr(torch.ops, namespace), name).default
    node = SimpleNamespace(target=target, name="n", kwargs={}, meta={})
    program = SimpleNamespace(buffers={}, inputs=[], kernels=[SimpleNamespace(nodes=[node])])
    assert cudagraphs.capture_blockers(program, torch.device("cuda:0"), "triton") == [
        f"{op} (node n) {expected}" + (" (not captured: untested with NCCL)"
                                       if "collective" in expected else "")]


def test_a_dynamic_size_and_a_cpu_input_are_blockers():
    program, mode = _fake_cuda_program(lambda x: x.exp(), (4,))
    size = mode.shape_env.create_unbacked_symint()
    program.buffers = {"buf": SimpleNamespace(shape=(size, 4))}
    program.inputs = ["batch", "step"]
    reasons = cudagraphs.capture_blockers(program, torch.device("cuda:0"), "torch",
                                          [torch.empty(2, 2), torch.tensor(3.0)])
    assert reasons == ["input 0 (batch) is on cpu", "input 1 (step) is on cpu",
                       f"buffer buf has a dynamic size ({size}, 4)"]


def test_interpreter_and_fx_programs_are_not_captured():
    program = SimpleNamespace(buffers={}, inputs=[], kernels=[])
    for executor in ("fx", "interpret"):
        reasons = cudagraphs.capture_blockers(program, torch.device("cuda:0"), executor)
        assert reasons and f"executor={executor!r}" in reasons[0]


# -- static slots, with the CPU stand-in ------------------------------------------------

def _status(made, name: str) -> dict:
    found = [c.status for c in made if c.program.name.endswith(name)]
    assert len(found) == 1, [c.program.name for c in made]
    return found[0]


@pytest.mark.parametrize("executor", ["interpret", "torch"])
def test_replays_give_eager_numbers_with_inputs_at_new_addresses(stand_in, executor):
    torch.manual_seed(0)
    weight = torch.randn(8, 6, requires_grad=True)
    function = lambda x, w: (x @ w).tanh() * 2
    compiled = retrograd.compile(function, executor=executor)
    kept = []   # every call's input stays alive: each is at a new address
    for call in range(4):
        x = torch.randn(4, 8, requires_grad=True)
        kept.append(x)
        out = compiled(x, weight)
        upstream = torch.randn(4, 6)
        out.backward(upstream)
        x64, w64 = x.detach().double().requires_grad_(), weight.detach().double()
        w64.requires_grad_()
        reference = function(x64, w64)
        reference.backward(upstream.double())
        assert_close(out, reference, torch.float32, f"call {call}")
        assert_close(x.grad, x64.grad, torch.float32, f"call {call}: grad of x")
        kept.append(out)
    forward = _status(stand_in, "forward")
    assert (forward["captures"], forward["replays"], forward["plain_calls"]) == (1, 3, 0)
    assert forward["copied_inputs"] == 2    # x at calls 3 and 4; the weight never moved
    assert _status(stand_in, "backward")["replays"] == 3


def test_outputs_are_fresh_tensors_and_a_moved_static_input_recaptures(stand_in):
    function = lambda x, w: (x * w).sin()
    compiled = retrograd.compile(function, executor="torch")
    weight, inputs = torch.randn(5), [torch.randn(5) for _ in range(5)]
    outputs = [compiled(inputs[0], weight), compiled(inputs[1], weight)]
    kept = outputs[1].clone()
    outputs.append(compiled(inputs[2], weight))
    assert torch.equal(outputs[1], kept), "a replay overwrote an earlier call's output"
    assert outputs[1].data_ptr() != outputs[2].data_ptr()
    moved = weight.clone()
    outputs += [compiled(inputs[3], moved), compiled(inputs[4], moved)]
    for x, out in zip(inputs, outputs):
        assert torch.equal(out, function(x, weight))
    status = _status(stand_in, "forward")
    assert (status["captures"], status["replays"]) == (2, 4)


def test_compile_step_replays_the_whole_step_writing_parameters_in_place(stand_in):
    model, twin = _mlp(), _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    step = retrograd.compile_step(model, _mse, optimizer, executor="torch")
    addresses = [p.data_ptr() for p in model.parameters()]
    batches = [(torch.randn(4, 8), torch.randn(4, 4)) for _ in range(4)]
    for number, batch in enumerate(batches):
        loss = step(*batch)
        reference = eager_step(twin, twin_optimizer, _mse, *batch)
        assert_close(loss, reference, torch.float32, f"step {number}: loss", 1e-5)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert_close(p.detach(), q.detach(), torch.float32, f"step {number}", 1e-5)
    assert [p.data_ptr() for p in model.parameters()] == addresses
    status = _status(stand_in, "step")
    assert (status["captures"], status["replays"], status["plain_calls"]) == (1, 3, 0)
    # only the batch's two tensors are copied at steps 3 and 4: parameters, Adam's
    # state and the hyperparameters are read and written where they are
    assert status["copied_inputs"] == 4


def test_parameters_that_move_are_written_through_private_slots(stand_in):
    """Parameters given new storage after the capture (``p.data = ...``) are
    demoted to private slots: the graph is captured again, its in-place
    updates land in the slots and are copied back into the parameters."""
    model, twin = _mlp(), _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    step = retrograd.compile_step(model, _mse, optimizer, executor="interpret")
    for number in range(5):
        if number == 3:
            for p in model.parameters():
                p.data = p.data.clone()
        batch = (torch.randn(4, 8), torch.randn(4, 4))
        loss = step(*batch)
        reference = eager_step(twin, twin_optimizer, _mse, *batch)
        assert_close(loss, reference, torch.float32, f"step {number}: loss", 1e-5)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert_close(p.detach(), q.detach(), torch.float32, f"step {number}", 1e-5)
    status = _status(stand_in, "step")
    assert (status["captures"], status["replays"]) == (2, 4)


def test_the_torch_compile_face_trains_like_eager_through_replays(stand_in):
    model, twin = _mlp(), _mlp()
    compiled = torch.compile(model, backend="retrograd", options={"executor": "torch"})
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    for number in range(4):
        batch = (torch.randn(4, 8), torch.randn(4, 4))
        got, want = (eager_step(network, optimizer, _mse, *batch)
                     for network, optimizer in zip((compiled, twin), optimizers))
        assert_close(got.detach(), want.detach(), torch.float32, f"step {number}", 1e-5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), torch.float32, "parameter", 1e-5)
    assert sorted(c.status["replays"] for c in stand_in) == [3, 3]   # forward, backward


def test_a_captured_executable_can_be_copied(stand_in):
    """``copy`` builds the object before its attributes: the passthrough to
    the wrapped executable must not recurse then."""
    compiled = retrograd.compile(lambda x: x * 3, executor="torch")
    compiled(torch.randn(2))
    [captured] = stand_in
    twin = copy.copy(captured)
    assert twin.executable is captured.executable and twin.paths == captured.paths


def test_a_call_that_does_not_fit_the_slots_runs_without_and_says_why(stand_in):
    compiled = retrograd.compile(lambda x: x * 3, executor="torch")
    for _ in range(3):
        compiled(torch.randn(2))
    [captured] = stand_in
    strided = torch.arange(4.0)[::2]   # the captured slot is contiguous
    [out] = captured([strided])
    assert torch.equal(out, torch.tensor([0.0, 6.0]))
    status = captured.status
    assert status["plain_calls"] == 1 and "differ in layout" in status["reason"]


def test_a_failed_capture_warns_and_runs_without(stand_in, monkeypatch):
    def refuse(self, function, slots):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(StandIn, "capture", refuse)
    compiled = retrograd.compile(lambda x: x.cos() + 1, executor="torch")
    compiled(torch.randn(3))
    with pytest.warns(UserWarning, match="without a CUDA graph: capture failed: RuntimeError"):
        out = compiled(torch.ones(3))
    assert torch.equal(out, torch.ones(3).cos() + 1)
    assert torch.equal(compiled(torch.zeros(3)), torch.full((3,), 2.0))
    status = _status(stand_in, "forward")
    assert status["state"] == "off" and status["plain_calls"] == 2


# -- the program's run is capture-safe ------------------------------------------------

def test_a_generated_program_run_is_capture_safe(stand_in):
    """The wrapper with its Triton launches stubbed (device work with fixed
    pointers) under the checker: no host sync, nothing off the device, and
    exactly the storages the plan names (its arenas and the buffers it
    leaves to torch's allocator), the same ones on every call."""
    model = _mlp()
    step = retrograd.compile_step(model, _mse, torch.optim.SGD(model.parameters(), lr=0.1,
                                                               momentum=0.9),
                                  executor="interpret")
    step(torch.randn(4, 8), torch.randn(4, 4))
    captured = stand_in[0]
    executable, program = captured.executable, captured.program
    assert program.arenas, "the plan should use an arena"
    stubs = SimpleNamespace(**{k.name: (lambda *buffers: None)
                               for k in program.kernels if k.kind == "triton"})
    runs = []
    for _ in range(2):
        arguments = [a.clone() if isinstance(a, torch.Tensor) else a
                     for a in captured.first_args]
        with CaptureChecker("cpu", arguments) as check:
            executable.run(list(arguments), stubs, Allocator(torch.device("cpu"),
                                                             program.constants))
        assert check.syncs == [] and check.strays == []
        assert len(check.allocations) == expected_allocations(program), check.allocations
        runs.append(check.allocations)
    assert runs[0] == runs[1]
    arena_bytes = sorted(w.nbytes for w in program.arenas)
    made = sorted(n for op, n in runs[0] if op == "aten::empty.memory_format")
    assert all(n in made for n in arena_bytes)


# -- on a GPU (skipped without CUDA) ---------------------------------------------------

def _captured(step) -> dict:
    return step.entries[step.last][0].status


@pytest.mark.gpu
def test_gpu_uniform_replayed_reads_the_seed_tensor_each_replay():
    like, seed = torch.empty(1000, device="cuda"), torch.tensor(5, device="cuda")
    torch.ops.retrograd.uniform(like, seed, 0)   # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        values = torch.ops.retrograd.uniform(like, seed, 0)
    for key in (5, 6, 2**31 - 2):
        seed.fill_(key)
        graph.replay()
        reference = torch.ops.retrograd.uniform(torch.empty(1000), torch.tensor(key), 0)
        assert torch.equal(values.cpu(), reference)


@pytest.mark.gpu
def test_gpu_compile_step_with_graphs_matches_without():
    model, twin = _mlp().cuda(), _mlp().cuda()
    steps = [retrograd.compile_step(m, _mse, torch.optim.AdamW(m.parameters(), lr=1e-2),
                                    cudagraphs=flag)
             for m, flag in ((model, None), (twin, False))]
    for number in range(5):
        batch = (torch.randn(4, 8, device="cuda"), torch.randn(4, 4, device="cuda"))
        losses = [step(*batch) for step in steps]
        assert_close(losses[0], losses[1], torch.float32, f"step {number}", 1e-5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), torch.float32, "parameter", 1e-5)
    status = _captured(steps[0])
    assert (status["state"], status["captures"], status["replays"]) == ("captured", 1, 4)
    assert status["plain_calls"] == 0 and status["copied_inputs"] == 2 * 3
    assert not hasattr(steps[1].entries[steps[1].last][0], "status")   # never wrapped


@pytest.mark.gpu
@pytest.mark.parametrize("draw", ["dropout", "rand_like"])
def test_gpu_replays_draw_new_random_numbers(draw):
    function = ((lambda x: F.dropout(x, 0.5, training=True)) if draw == "dropout" else
                (lambda x: torch.rand_like(x) + x))
    compiled = retrograd.compile(function)
    x = torch.ones(4096, device="cuda")
    results = [compiled(x).clone() for _ in range(4)]   # warm-up, capture, two replays
    for first in range(4):
        for second in range(first + 1, 4):
            assert not torch.equal(results[first], results[second]), (first, second)
    if draw == "dropout":
        for result in results:
            kept = (result != 0).float().mean().item()
            assert 0.45 < kept < 0.55 and set(result.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.gpu
def test_gpu_torch_compile_face_trains_like_eager():
    model, twin = _mlp().cuda(), _mlp().cuda()
    compiled = torch.compile(model, backend="retrograd")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    for number in range(4):
        batch = (torch.randn(4, 8, device="cuda"), torch.randn(4, 4, device="cuda"))
        got, want = (eager_step(network, optimizer, _mse, *batch)
                     for network, optimizer in zip((compiled, twin), optimizers))
        assert_close(got.detach(), want.detach(), torch.float32, f"step {number}", 1e-5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), torch.float32, "parameter", 1e-5)
