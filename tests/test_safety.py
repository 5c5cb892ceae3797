"""Safety under interruption and threads (issue 11), in this process.

Each attack of the issue, done for real; where another file already does it,
this one names it instead of repeating it:

- garbage, non-UTF-8 and altered bytecode in a real cache, then a fresh
  process: ``test_loader.py::test_a_poisoned_cache_heals_in_a_fresh_process``,
  and ``test_safety_processes.py`` (same-length garbage, truncation, after a
  killed writer);
- links planted in a dump folder, target untouched: ``test_dump_safety.py``
  (a shared root, our own folder, a linked graph folder, a linked kernels
  folder, the failure reproducer);
- a compile interrupted by ``KeyboardInterrupt`` (item 6): here;
- one compiled object hammered from threads with different shapes while
  ``max_programs`` evicts, and threads racing on a first call: here;
- a killed compiling subprocess and RSS over thousands of steps:
  ``test_safety_processes.py``.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings

import pytest
import retrograd
import retrograd.backend
import retrograd.locking
import retrograd.step
import retrograd.trace_cache
import torch
from checks import assert_close_floor
from retrograd.passes import cleanup, fusion
from test_threads import dynamo_beside_traces, run_threads
from torch import nn


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch, no_dump_env):
    monkeypatch.setenv("RETROGRAD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh())


def _compiled(face: str, model: nn.Module, **options):
    if face == "standalone":
        return retrograd.compile(model, **options)
    return torch.compile(model, backend="retrograd", options=options or None)


# -- item 6: a compile interrupted midway ----------------------------------------------

def _lock_is_free(lock) -> bool:
    """Whether another thread can take ``lock`` now (a re-entrant lock always
    gives itself to the thread holding it, so ask from a new thread)."""
    answer: list[bool] = []

    def probe():
        taken = lock.acquire(blocking=False)
        answer.append(taken)
        if taken:
            lock.release()
    thread = threading.Thread(target=probe)
    thread.start()
    thread.join(30)
    return answer == [True]


def _assert_process_state_clean(environment_before: str | None) -> None:
    """Nothing a compile sets up while it runs is left behind."""
    from retrograd.runtime.device import _GATE
    from torch._dynamo.convert_frame import compile_lock
    from torch._guards import TracingContext
    assert _lock_is_free(retrograd.locking._LOCK), "retrograd's compile lock is still held"
    assert _lock_is_free(compile_lock), "dynamo's compile lock is still held"
    assert os.environ.get("TRITON_INTERPRET") == environment_before
    assert (_GATE.owner, _GATE.shared, _GATE.waiting) == (None, {}, 0)
    assert "__getattribute__" not in vars(nn.Module), "guards' recording hook left in place"
    assert not torch.fx._symbolic_trace._is_fx_tracing_flag
    assert TracingContext.try_get() is None
    for key in (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY):
        assert torch._C._get_dispatch_mode(key) is None
    assert not torch.overrides._get_current_function_mode_stack()


def _interrupt(monkeypatch, module, nth: int) -> list[int]:
    """Make pass ``module``'s ``run`` raise KeyboardInterrupt on its ``nth`` call
    (PassSpec looks the function up in its module at each run)."""
    calls: list[int] = []
    original = module.run

    def interrupted(subject, ctx):
        calls.append(1)
        if len(calls) == nth:
            raise KeyboardInterrupt
        return original(subject, ctx)
    monkeypatch.setattr(module, "run", interrupted)
    return calls


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
@pytest.mark.parametrize("where", [(cleanup, 1), (fusion, 2)],
                         ids=["joint_stage", "lazy_backward"])
def test_an_interrupted_compile_leaves_nothing_behind(face, where, monkeypatch, fresh_dynamo):
    """KeyboardInterrupt inside a pass (the joint stage, or the backward that
    AOTAutograd compiles at the first backward call): the locks are free, the
    environment and torch's tracing state as before, dynamo usable, and the
    next call of the same compiled object compiles and equals eager."""
    before = os.environ.get("TRITON_INTERPRET")
    model, x = _model(), torch.randn(2, 4)
    compiled = _compiled(face, model)
    calls = _interrupt(monkeypatch, *where)
    with pytest.raises(KeyboardInterrupt):
        compiled(x).sum().backward()
    assert len(calls) == where[1]
    monkeypatch.undo()
    _assert_process_state_clean(before)
    model.zero_grad()
    out = compiled(x)
    out.sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)
    expected.sum().backward()
    assert_close_floor(out.detach(), expected.detach(), 1e-5)
    for grad, p in zip(got, model.parameters()):
        assert_close_floor(grad, p.grad, 1e-5)
    plain = torch.compile(lambda t: t.sin() * 2, backend="eager")
    assert torch.equal(plain(x), x.sin() * 2)


def _step_both(step, eager, loss_fn, reference, x) -> None:
    """One compiled step and one eager step on ``reference``; the losses agree."""
    loss = step(x)
    eager.zero_grad()
    expected = loss_fn(reference, x)
    expected.backward()
    eager.step()
    assert_close_floor(loss, expected.detach(), 1e-5)


def test_an_interrupted_compile_step_trains_as_eager_next_time(monkeypatch):
    """compile_step interrupted inside its pipeline: clean state, and the next
    step compiles and updates parameters and Adam's state as eager does."""
    before = os.environ.get("TRITON_INTERPRET")
    model = _model(1)
    reference = copy.deepcopy(model)
    loss_fn = lambda m, x: m(x).pow(2).mean()
    step = retrograd.compile_step(model, loss_fn, torch.optim.Adam(model.parameters(), lr=0.1))
    eager = torch.optim.Adam(reference.parameters(), lr=0.1)
    _interrupt(monkeypatch, fusion, 1)
    x = torch.randn(3, 4)
    with pytest.raises(KeyboardInterrupt):
        step(x)
    monkeypatch.undo()
    _assert_process_state_clean(before)
    for _ in range(2):
        _step_both(step, eager, loss_fn, reference, x)
    for got, ref in zip(model.parameters(), reference.parameters(), strict=True):
        assert_close_floor(got.detach(), ref.detach(), 1e-5)


# -- threads: first calls racing, and eviction while others run ------------------------

@pytest.fixture
def compiles(monkeypatch) -> list[int]:
    """One item per graph compiled by either face or per compile_step program."""
    made: list[int] = []

    def counted(original):
        def compile_counted(*args, **kwargs):
            made.append(threading.get_ident())
            return original(*args, **kwargs)
        return compile_counted
    for module in (retrograd.trace_cache, retrograd.backend):
        monkeypatch.setattr(module, "compile_graph", counted(module.compile_graph))
    monkeypatch.setattr(retrograd.step.Step, "_compile", counted(retrograd.step.Step._compile))
    return made


class _Tupled(nn.Module):
    """The model with a tuple output, as dynamo hands graphs to a backend."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return (self.model(x),)


@pytest.mark.parametrize("face", ["standalone", "backend", "compile_step"])
def test_threads_making_one_first_call_compile_it_once(face, compiles, fresh_dynamo):
    """Four threads make the first call of one signature at once: one compiles,
    the others wait and use its program (before, each compiled it in turn).
    ``backend``: the object retrograd's backend hands dynamo, called directly
    (dynamo itself compiles a frame once per thread racing on its first call,
    so through torch.compile each thread would get its own graph object)."""
    model = _model(2)
    for p in model.parameters():
        p.requires_grad_(face == "compile_step")
    if face == "compile_step":   # no optimizer: gradients accumulate in .grad
        step = retrograd.compile_step(model, lambda m, x: m(x).sum())
        call = lambda x: step(x)
    elif face == "backend":
        gm = torch.fx.symbolic_trace(_Tupled(model))
        call = retrograd.backend.retrograd_backend(gm, [torch.randn(3, 4)])
    else:
        compiled = _compiled(face, model)
        call = lambda x: compiled(x)

    def run(seed):
        def body():
            with dynamo_beside_traces():
                return call(torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)))
        return body
    run_threads([run(seed) for seed in range(4)])
    assert len(compiles) == 1


class _Paused(nn.Module):
    """A linear layer whose first forward (the trace's) stops until told."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.tracing, self.proceed = threading.Event(), threading.Event()

    def forward(self, x):
        if not self.tracing.is_set():
            self.tracing.set()
            assert self.proceed.wait(60)
        return self.linear(x).tanh()


def test_a_call_made_while_another_thread_traces_reuses_its_program(compiles):
    """A second thread calls while the first traces, when AOTAutograd has
    swapped the module's parameters for its own: the key it makes then names
    those stand-ins, so it is made again under the compile lock; the call
    reuses the first thread's program (before: a second compile, under a key
    no later call matches) and equals eager."""
    model = _Paused()
    compiled = retrograd.compile(model)
    x = torch.randn(3, 4)
    results: dict[str, torch.Tensor] = {}
    first = threading.Thread(target=lambda: results.update(first=compiled(x)))
    first.start()
    assert model.tracing.wait(60)
    second = threading.Thread(target=lambda: results.update(second=compiled(x)))
    second.start()
    second.join(1.0)   # it makes its key, misses and waits for the compile lock
    model.proceed.set()
    first.join(120)
    second.join(120)
    assert set(results) == {"first", "second"}
    assert len(compiles) == 1
    expected = model(x)
    for got in results.values():
        assert_close_floor(got.detach(), expected.detach(), 1e-5)


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_one_model_hammered_from_threads_with_different_shapes(face, compiles, fresh_dynamo):
    """Three threads call one compiled model, each cycling twice through its own
    three batch sizes, with ``max_programs=2``: programs are compiled while
    others run and evicted while others may still run theirs. Every output
    and input gradient equals eager's; at most two programs stay kept."""
    model = _model(3)
    for p in model.parameters():
        p.requires_grad_(False)   # gradients land per call on the input
    compiled = _compiled(face, model, max_programs=2, dynamic=False)   # evictions
    sizes = {thread: [1 + thread, 4 + thread, 7 + thread] for thread in range(3)}

    def hammer(thread):
        def body():
            results = []
            for rows in sizes[thread] * 2:
                x = torch.randn(rows, 4, generator=torch.Generator().manual_seed(rows),
                                requires_grad=True)
                with dynamo_beside_traces():
                    out = compiled(x)
                (grad,) = torch.autograd.grad((out * out).sum(), x)
                results.append((x.detach(), out.detach(), grad))
            return results
        return body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the max_programs warning, from any thread
        every = run_threads([hammer(thread) for thread in sizes])
    for x, out, grad in (item for results in every for item in results):
        x_ref = x.clone().requires_grad_()
        expected = model(x_ref)
        (expected * expected).sum().backward()
        assert_close_floor(out, expected.detach(), 1e-5)
        assert_close_floor(grad, x_ref.grad, 1e-5)
    assert len(compiles) > 9   # nine signatures, and some compiled again after eviction
    if face == "standalone":
        assert sum(map(len, compiled._cache.entries.values())) <= 2


# -- compile_step keeps at most max_programs ---------------------------------------------

def test_compile_step_keeps_max_programs_and_warns_once(compiles):
    """A step called with ever-new batch sizes keeps at most ``max_programs``
    programs (least recently used released, compiled again when called), warns
    once naming what changed, and still trains as eager. ``dynamic=False``:
    sizes specialize (by default the second size compiles one symbolic step)."""
    model = _model(4)
    reference = copy.deepcopy(model)
    loss_fn = lambda m, x: m(x).pow(2).mean()
    step = retrograd.compile_step(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1),
                                  max_programs=2, dynamic=False)
    eager = torch.optim.SGD(reference.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rows in (2, 3, 4, 2, 4):
            x = torch.randn(rows, 4, generator=torch.Generator().manual_seed(rows))
            _step_both(step, eager, loss_fn, reference, x)
    limit = [w for w in caught if "max_programs=2" in str(w.message)]
    assert len(limit) == 1 and "shape (3, 4) -> (4, 4)" in str(limit[0].message)
    assert len(step.entries) == 2 and len(step.reached) <= 2
    assert len(compiles) == 4   # 2, 3, 4, then 2 again (released); 4 was kept
    for got, ref in zip(model.parameters(), reference.parameters(), strict=True):
        assert_close_floor(got.detach(), ref.detach(), 1e-5)
