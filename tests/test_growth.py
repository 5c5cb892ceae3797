"""Bounded growth: a compiled object keeps at most ``max_programs`` programs
(least recently used released, one warning naming what changed), and a
released program is really freed: its executables, kernels' modules and
linecache entries go with it. The tests vary sizes to make signatures, so
they turn automatic dynamic shapes off (``dynamic=False``; see
test_dynamic_shapes.py for what it does)."""

from __future__ import annotations

import gc
import linecache
import warnings
import weakref

import pytest
import retrograd
import retrograd.backend
import retrograd.graph_compiler
import torch
from checks import assert_close, record_graphs
from retrograd.recompiles import describe_change
from retrograd.runtime import loader


@pytest.fixture
def executables(monkeypatch):
    """Weak references to every GeneratedExecutable built meanwhile."""
    made: list[weakref.ref] = []

    class Recorded(retrograd.graph_compiler.GeneratedExecutable):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(retrograd.graph_compiler, "GeneratedExecutable", Recorded)
    return made


def function(x):
    return (x * 2).sin().sum()


def _run(compiled, rows: int) -> None:
    x = torch.randn(rows, 4, dtype=torch.float64, requires_grad=True)
    reference = x.detach().clone().requires_grad_()
    got = compiled(x)
    got.backward()
    expected = function(reference)
    expected.backward()
    assert_close(got, expected, torch.float64)
    assert_close(x.grad, reference.grad, torch.float64, what="gradient")


def _programs(compiled) -> int:
    return sum(len(kept) for kept in compiled._cache.entries.values())


def test_standalone_keeps_max_programs_and_frees_the_rest(cache, executables):
    compiled = retrograd.compile(function, max_programs=3, dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rows in (2, 3, 4):
            _run(compiled, rows)
        assert not [w for w in caught if "max_programs" in str(w.message)]
        first = [ref for ref in executables if ref() is not None]
        first_paths = {str(path) for ref in first for path in ref().paths.values()}
        first_functions = _generated_functions(first_paths)
        for rows in (5, 6, 7):
            _run(compiled, rows)
            assert _programs(compiled) == 3
    limit = [str(w.message) for w in caught if "max_programs" in str(w.message)]
    assert len(limit) == 1, limit   # warned once
    assert "input 0 shape (4, 4) -> (5, 4)" in limit[0]
    assert "dynamic=None" in limit[0] and "function" in limit[0]
    kept_rows = [key[0][1][0] for key in compiled._cache.entries]
    assert kept_rows == [5, 6, 7]
    gc.collect()
    assert first and all(ref() is None for ref in first), "a released program is still alive"
    _assert_modules_released(first_paths, first_functions, executables)
    _run(compiled, 2)      # released: compiles again, still right
    assert [key[0][1][0] for key in compiled._cache.entries] == [6, 7, 2]


def _generated_functions(paths: set[str]) -> dict[str, list[weakref.ref]]:
    """Weak references to the functions of the loaded modules of ``paths``
    (their globals hold the kernels: alive while Triton's caches hold them)."""
    found: dict[str, list[weakref.ref]] = {}
    for (path, _), module in list(loader._LOADED.items()):
        if path in paths:
            found.setdefault(path, []).extend(
                weakref.ref(value.__wrapped__) for value in vars(module).values()
                if hasattr(value, "__retrograd_handle__"))
    return found


def _assert_modules_released(paths: set[str], functions: dict, executables: list) -> None:
    """The generated modules of released programs are gone, with what Triton
    and linecache kept of them, except those a live program shares."""
    live = {str(path) for ref in executables if ref() is not None
            for path in ref().paths.values()}
    released = paths - live
    assert released
    loader.load_module(loader.write_source("probe", "VALUE = 1\n"), False)  # sweeps
    gc.collect()
    assert not [key for key in loader._LOADED if key[0] in released]
    assert not released & set(linecache.cache)
    assert all(path in linecache.cache for path in live)   # Triton still reads those
    kept = [path for path in released for ref in functions.get(path, ()) if ref() is not None]
    assert not kept, f"Triton's caches or ours still hold {kept}"


def test_a_used_program_is_not_the_one_released(cache):
    compiled = retrograd.compile(function, max_programs=2, executor="fx", dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rows in (2, 3, 2, 4):   # 2 used again: 3 is the least recently used
            _run(compiled, rows)
    assert [key[0][1][0] for key in compiled._cache.entries] == [2, 4]


def test_describe_change_names_the_nearest_signature():
    def key(rows, dtype=torch.float32, grad=True):
        return (("tensor", (rows, 8), (8, 1), dtype, torch.device("cpu"), True),
                ("value", "int", 3), ("grad", grad))
    assert describe_change(key(5), [key(4)]) == "input 0 shape (4, 8) -> (5, 8)"
    # the nearest kept signature is the one with the fewest differences
    change = describe_change(key(4, torch.float64), [key(3), key(4)])
    assert change == "input 0 dtype torch.float32 -> torch.float64"
    assert describe_change(key(4, grad=False), [key(4)]) == "grad mode True -> False"


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_max_programs_must_be_a_positive_whole_number(bad):
    with pytest.raises(ValueError, match="max_programs"):
        retrograd.compile(function, max_programs=bad)


def test_torch_compile_face_keeps_max_programs(cache, fresh_dynamo, monkeypatch, executables):
    """Dynamo marks the batch size dynamic after a recompile and hands one
    graph many sizes: that graph keeps at most max_programs of them."""
    graphs = record_graphs(monkeypatch)
    compiled = torch.compile(function, backend="retrograd", options={"max_programs": 2,
                                                                       "dynamic": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rows in (2, 3, 5, 7, 8):
            _run(compiled, rows)
            assert all(len(graph.compiled) <= 2 for graph in graphs)
    dynamic = [graph for graph in graphs if len(graph.compilers) == 2]
    assert dynamic, "no graph was handed several sizes"
    assert all(list(graph.compiled) == list(graph.compilers) for graph in graphs)
    limit = [str(w.message) for w in caught if "max_programs" in str(w.message)]
    assert len(limit) == 1 and "input" in limit[0] and "-> (7, 4)" in limit[0], limit
    gc.collect()
    alive = sum(ref() is not None for ref in executables)
    assert alive <= 2 * sum(len(graph.compiled) for graph in graphs)   # forward + backward


def _process_wide(cache) -> dict[str, int]:
    """What process-wide caches hold of generated code in ``cache``."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit
    folder = str(cache)
    return {"loaded": sum(path.startswith(folder) for path, _ in list(loader._LOADED.keys())),
            "linecache": sum(name.startswith(folder) for name in list(linecache.cache)),
            "triton registry": sum(name.startswith("retrograd_generated.")
                                   for name in jit._triton_jit_function_registry),
            "interpreter rewrites": sum(
                getattr(function, "__module__", "").startswith("retrograd_generated.")
                for function in interpreter.InterpretedFunction.rewritten_fn)}


def test_many_signatures_leave_process_wide_caches_flat(cache):
    """Eight signatures through a two-program bound: what the process keeps
    after the fourth signature bounds what it keeps after every later one."""
    compiled = retrograd.compile(function, max_programs=2, dynamic=False)
    counts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rows in range(2, 10):
            _run(compiled, rows)
            gc.collect()
            counts.append(_process_wide(cache))
    assert _programs(compiled) == 2
    for name in counts[0]:
        assert max(count[name] for count in counts[4:]) <= counts[3][name], (name, counts)
