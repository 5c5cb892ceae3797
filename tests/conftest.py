"""Shared pytest setup.

- ``gpu`` tests are skipped without CUDA.
- ``fresh_dynamo``: a test that uses torch.compile starts and ends with an
  empty dynamo cache, so recompile counts and backends never leak between tests.
- ``cache``: a fresh, empty kernel cache folder (``RETROGRAD_CACHE_DIR``)
  for the test; files whose every test needs one name it in ``pytestmark``.
- ``symbolic_graphs``: the list of every ``backend.SymbolicGraph`` the
  torch.compile face makes during the test (its symbolic programs).
- ``no_dump_env``: the user's ``RETROGRAD_DUMP`` must not turn dumping on
  behind a test's back (tests that want dumps set it themselves).
- ``kernels_on_cpu`` (every test): ``executor="auto"`` keeps running the
  generated Triton kernels in Triton's interpreter on CPU, as the tests of
  kernels expect; users get the torch program there. Tests of that default
  are marked ``cpu_default`` (tests/test_cpu_program.py).
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker itself: item.keywords also holds parameter ids ("gpu")
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETROGRAD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def symbolic_graphs(monkeypatch) -> list:
    import retrograd.backend
    made = []
    original = retrograd.backend.SymbolicGraph.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(retrograd.backend.SymbolicGraph, "__init__", init)
    return made


@pytest.fixture
def no_dump_env(monkeypatch):
    monkeypatch.delenv("RETROGRAD_DUMP", raising=False)


@pytest.fixture
def one_arena_per_busy_period(monkeypatch):
    """Keep buffer_reuse's windows at busy periods (no peak-driven cuts), for
    unit tests of the offset planner on programs small enough that the window
    search would otherwise cut them apart (it is tested on its own)."""
    from retrograd.passes.planning import windows
    monkeypatch.setattr(windows, "split_windows", lambda base, found, size: (found, []))


@pytest.fixture(autouse=True)
def kernels_on_cpu(request, monkeypatch):
    """``executor="auto"`` means the interpreter on CPU in tests, unless marked
    ``cpu_default`` (runtime/device.py::CPU_AUTO)."""
    if request.node.get_closest_marker("cpu_default") is None:
        from retrograd.runtime import device
        monkeypatch.setattr(device, "CPU_AUTO", "interpret")
