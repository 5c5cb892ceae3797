"""Threads (issue 11, item 4): compiling and running from several threads.

Compilation is serialized by one process-wide lock (``retrograd.locking``);
interpreted launches are serialized by the interpreter's lock
(``runtime/device.py``), which also owns ``TRITON_INTERPRET``. These tests
compile and run from several threads at once and compare with eager, and
check that the environment ends as it began.
"""

from __future__ import annotations

import copy
import os
import threading
import time

import pytest
import retrograd
import torch
from checks import assert_close_floor
from retrograd.runtime.device import interpreter_mode
from torch import nn

TIMEOUT = 120   # seconds a thread may take before the test calls it hung


def run_threads(functions) -> list:
    """Run each function in its own thread, all released at once; their results.

    An exception in a thread is re-raised here (the first one), so a crash
    inside torch's tracer fails the test instead of vanishing with the thread.
    """
    barrier = threading.Barrier(len(functions))
    results: list = [None] * len(functions)
    errors: list = []

    def body(index, function):
        try:
            barrier.wait(timeout=TIMEOUT)
            results[index] = function()
        except BaseException as error:   # noqa: BLE001 -- reported below
            errors.append(error)
    threads = [threading.Thread(target=body, args=(i, f), daemon=True)
               for i, f in enumerate(functions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def _model(seed: int, width: int) -> nn.Module:
    """A small MLP; ``width`` differs per thread so the graphs differ."""
    torch.manual_seed(seed)
    activation = [nn.Tanh(), nn.GELU(), nn.Sigmoid(), nn.ReLU()][seed % 4]
    return nn.Sequential(nn.Linear(4, width), activation, nn.Linear(width, 3))


def _loss_and_grads(model: nn.Module, run, x: torch.Tensor):
    """(output, input gradient, parameter gradients) of ``run(x)`` with a weighted sum."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = run(x)
    (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


def _assert_same(got, ref) -> None:
    out, x_grad, grads = got
    ref_out, ref_x_grad, ref_grads = ref
    assert_close_floor(out, ref_out, 1e-5)
    assert_close_floor(x_grad, ref_x_grad, 1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close_floor(grad, ref_grad, 1e-5)


def _compile_and_check(face: str, seed: int):
    """Compile a fresh model on ``face`` in this thread; compare two calls with eager."""
    model = _model(seed, 4 + 2 * seed)
    if face == "standalone":
        compiled = retrograd.compile(model)
    else:
        compiled = torch.compile(model, backend="retrograd")
    for step in range(2):
        x = torch.randn(2 + step, 4, generator=torch.Generator().manual_seed(seed * 10 + step))
        with dynamo_beside_traces():
            got = _loss_and_grads(model, compiled, x)
        _assert_same(got, _loss_and_grads(model, model, x))
    return seed


def dynamo_beside_traces():
    """torch keeps its "fx tracing" flag process-wide: while one thread traces
    (retrograd, or any make_fx), entering a torch.compile'd function in
    another thread raises torch's "Detected that you are using FX to
    symbolically trace a dynamo-optimized function", with any backend. The
    workaround README gives: this dynamo option, set in each thread that
    calls torch.compile'd code (dynamo's option overrides are per thread)."""
    return torch._dynamo.config.patch(force_compile_during_fx_trace=True)


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_threads_compile_different_models_at_once(face, fresh_dynamo, no_dump_env):
    """Four threads compile four models at once; each equals eager, and a
    plain torch.compile in the main thread still works afterwards (before the
    compile lock, tracing crashed with ``CURRENT_PATCHER is None`` and left
    torch's tracer state broken)."""
    seeds = [0, 1, 2, 3]
    assert run_threads([lambda s=s: _compile_and_check(face, s) for s in seeds]) == seeds
    torch._dynamo.reset()
    assert _compile_and_check("torch.compile", 5) == 5


def test_threads_mixed_faces_at_once(fresh_dynamo, no_dump_env):
    """Both faces compiling at the same time, two threads each."""
    faces = ["standalone", "torch.compile", "standalone", "torch.compile"]
    run_threads([lambda f=f, s=s: _compile_and_check(f, s) for s, f in enumerate(faces)])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
@pytest.mark.parametrize("warm", [True, False], ids=["compiled_before", "first_call_racing"])
def test_threads_call_one_compiled_module(warm, face, device, fresh_dynamo, no_dump_env):
    """Four threads call one compiled module (forward and backward) with
    different inputs of one shape; each gets eager's output and input
    gradient. ``first_call_racing``: all four trigger the first compile."""
    model = _model(7, 6).to(device)
    for p in model.parameters():
        p.requires_grad_(False)   # gradients land per thread on the input only
    compiled = (retrograd.compile(model) if face == "standalone"
                else torch.compile(model, backend="retrograd"))
    inputs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)).to(device)
              for i in range(4)]
    if warm:   # forward and (lazily compiled) backward, for this signature
        compiled(inputs[0].clone().requires_grad_()).sum().backward()

    def call(x):
        def run():
            got = []
            for _ in range(3):
                x_in = x.clone().requires_grad_()
                with dynamo_beside_traces():
                    out = compiled(x_in)
                (out * out).sum().backward()
                got.append((out.detach(), x_in.grad))
            return got
        return run
    results = run_threads([call(x) for x in inputs])
    for x, got in zip(inputs, results):
        x_ref = x.clone().requires_grad_()
        out_ref = model(x_ref)
        (out_ref * out_ref).sum().backward()
        for out, grad in got:
            assert_close_floor(out, out_ref.detach(), 1e-5)
            assert_close_floor(grad, x_ref.grad, 1e-5)


def test_threads_call_one_compiled_module_parameter_grads(no_dump_env):
    """Concurrent calls accumulate parameter gradients as eager does: the sum
    over the threads' batches."""
    model = _model(8, 5)
    compiled = retrograd.compile(model)
    inputs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(20 + i))
              for i in range(4)]
    compiled(inputs[0]).sum().backward()
    model.zero_grad()
    run_threads([lambda x=x: compiled(x).pow(2).sum().backward() for x in inputs])
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for x in inputs:
        model(x).pow(2).sum().backward()
    for grad, p in zip(got, model.parameters()):
        assert_close_floor(grad, p.grad, 1e-5)


@pytest.mark.parametrize("initial", [None, "0", "1"], ids=["absent", "zero", "one"])
def test_threads_environment_ends_as_it_began(initial, monkeypatch, no_dump_env):
    """TRITON_INTERPRET is exactly what it was (absent, "0" or "1") after
    concurrent compiles and launches."""
    if initial is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", initial)
    model = _model(9, 7)
    compiled = retrograd.compile(model)

    def calls(seed):
        def run():
            for step in range(3):
                x = torch.randn(2 + (seed + step) % 2, 4)
                compiled(x).sum().backward()
        return run
    run_threads([calls(seed) for seed in range(4)])
    assert os.environ.get("TRITON_INTERPRET") == initial


@pytest.mark.parametrize("initial", [None, "0"], ids=["absent", "zero"])
def test_interpreter_mode_interleaved_threads(initial, monkeypatch):
    """Thread B enters interpreter_mode while thread A is inside and A leaves
    first: each sees the setting it asked for for as long as it is inside,
    and the variable ends as it began."""
    if initial is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", initial)
    a_inside, b_started = threading.Event(), threading.Event()
    seen: dict[str, list] = {"a": [], "b": []}

    def thread_a():
        with interpreter_mode(True):
            a_inside.set()
            b_started.wait(TIMEOUT)
            time.sleep(0.05)   # B tries to enter meanwhile
            seen["a"].append(os.environ.get("TRITON_INTERPRET"))

    def thread_b():
        a_inside.wait(TIMEOUT)
        b_started.set()
        with interpreter_mode(False):
            seen["b"].append(os.environ.get("TRITON_INTERPRET"))
            time.sleep(0.1)   # A leaves meanwhile (old code: before B)
            seen["b"].append(os.environ.get("TRITON_INTERPRET"))
    run_threads([thread_a, thread_b])
    assert seen == {"a": ["1"], "b": ["0", "0"]}
    assert os.environ.get("TRITON_INTERPRET") == initial


def test_recorded_module_reads_stay_in_their_thread():
    """The standalone face guards the module attributes a trace reads
    (guards.recording_module_reads). A read made in thread A while thread B
    wants to record too belongs to A's recording only (before: to whichever
    recording was opened last, so A's trace lost a guard and B got a false
    one). Recordings hold the compile lock, so B's opens after A's closes."""
    from retrograd.guards import recording_module_reads

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = 2.0
    module = Scaled()
    a_open, b_trying, a_closed = threading.Event(), threading.Event(), threading.Event()
    recorded: dict[str, dict] = {}

    def thread_a():
        with recording_module_reads() as reads:
            a_open.set()
            b_trying.wait(TIMEOUT)
            time.sleep(0.05)   # B tries to open its recording meanwhile
            module.scale   # noqa: B018 -- the read being recorded
            a_closed.set()
        recorded["a"] = dict(reads)

    def thread_b():
        a_open.wait(TIMEOUT)
        b_trying.set()
        with recording_module_reads() as reads:
            recorded["b_opened_after_a"] = a_closed.is_set()
        recorded["b"] = dict(reads)
    run_threads([thread_a, thread_b])
    assert [name for _, name, _ in recorded["a"].values()] == ["scale"]
    assert recorded["b"] == {} and recorded["b_opened_after_a"]
    assert "__getattribute__" not in vars(nn.Module)   # the wrapper is gone again


def test_threads_compile_step_at_once(no_dump_env):
    """Two threads compile and run ``compile_step`` for two models at once
    (one model per thread: a step updates its model in place); parameters
    after two steps equal eager SGD's."""
    def train(seed):
        def run():
            model = _model(seed, 5 + seed)
            reference = copy.deepcopy(model)   # torch's seed is process-wide
            compiled_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            eager_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
            loss_fn = lambda m, x: m(x).pow(2).mean()
            step = retrograd.compile_step(model, loss_fn, compiled_opt)
            for i in range(2):
                x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed + 10 * i))
                step(x)
                eager_opt.zero_grad()
                loss_fn(reference, x).backward()
                eager_opt.step()
            for got, ref in zip(model.parameters(), reference.parameters()):
                assert_close_floor(got.detach(), ref.detach(), 1e-5)
        return run
    run_threads([train(0), train(1)])


def test_interpreter_off_is_shared(monkeypatch):
    """Threads with the interpreter off (CUDA loads and launches) are inside
    together; the variable is "0" for both and ends absent."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    both_inside = threading.Barrier(2)
    seen = []

    def off():
        with interpreter_mode(False):
            both_inside.wait(timeout=10)   # a BrokenBarrierError if serialized
            seen.append(os.environ.get("TRITON_INTERPRET"))
            both_inside.wait(timeout=10)
    run_threads([off, off])
    assert seen == ["0", "0"]
    assert "TRITON_INTERPRET" not in os.environ


def test_interpreter_on_waits_for_threads_with_it_off(monkeypatch):
    """An interpreted run never overlaps a CUDA load or launch in another thread."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a_inside, a_leaving = threading.Event(), threading.Event()
    seen: dict[str, list] = {"a": [], "b": []}

    def thread_a():
        with interpreter_mode(False):
            a_inside.set()
            time.sleep(0.1)   # B asks for the interpreter meanwhile
            seen["a"].append(os.environ.get("TRITON_INTERPRET"))
            a_leaving.set()

    def thread_b():
        a_inside.wait(TIMEOUT)
        with interpreter_mode(True):
            seen["b"].append((a_leaving.is_set(), os.environ.get("TRITON_INTERPRET")))
    run_threads([thread_a, thread_b])
    assert seen == {"a": ["0"], "b": [(True, "1")]}
    assert os.environ["TRITON_INTERPRET"] == "0"


def test_interpreter_mode_nests_in_one_thread(monkeypatch):
    """The interpreter's holder may nest either mode; each level restores what it found."""
    monkeypatch.setenv("TRITON_INTERPRET", "yes")
    with interpreter_mode(True):
        with interpreter_mode(False):
            assert os.environ["TRITON_INTERPRET"] == "0"
            with interpreter_mode(True):
                assert os.environ["TRITON_INTERPRET"] == "1"
            assert os.environ["TRITON_INTERPRET"] == "0"
        assert os.environ["TRITON_INTERPRET"] == "1"
    with interpreter_mode(False), interpreter_mode(False):
        assert os.environ["TRITON_INTERPRET"] == "0"
    assert os.environ["TRITON_INTERPRET"] == "yes"
    inside_cuda = pytest.raises(RuntimeError, match="inside a CUDA load or launch")
    with interpreter_mode(False), inside_cuda, interpreter_mode(True):
        pass
    assert os.environ["TRITON_INTERPRET"] == "yes"
