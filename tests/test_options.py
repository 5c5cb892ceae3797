"""Options: one set of names for both faces, and clear errors for bad ones."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import retrograd
from retrograd.backend import retrograd_backend
from retrograd.options import EXECUTORS, Options
from retrograd.pipeline import PIPELINE, pass_names

KNOWN = ["memory_budget", "dump_dir", "executor", "disable", "verify", "save", "recompute", "offload",
         "data_dependent", "max_programs", "dynamic", "recompile_limit", "matmul_templates",
         "cudagraphs", "autotune"]


def test_known_options():
    assert Options.known() == KNOWN


def test_defaults():
    options = Options.from_mapping({})
    assert options == Options(memory_budget=None, dump_dir=None, executor="auto", disable=(),
                              verify=False)


@pytest.mark.parametrize("value", ["dynamo", "", None, True])
def test_bad_data_dependent_names_the_choices(value):
    with pytest.raises(ValueError, match=r"data_dependent=.*'split', 'error'"):
        Options.from_mapping({"data_dependent": value})


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Options().executor = "fx"


@pytest.mark.parametrize("unknown", [{"foo": 1}, {"memory_budgets": 0.5},
                                     {"foo": 1, "bar": 2, "executor": "fx"}])
def test_unknown_options_name_the_known_ones(unknown):
    with pytest.raises(ValueError) as error:
        Options.from_mapping(unknown)
    message = str(error.value)
    for name in set(unknown) - set(KNOWN):
        assert repr(name) in message
    for name in KNOWN:
        assert name in message


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -0.25, "x", "0.5", True, float("nan"),
                                   float("inf"), [0.5]], ids=repr)
def test_bad_memory_budget(value):
    with pytest.raises(ValueError, match="memory_budget") as error:
        Options.from_mapping({"memory_budget": value})
    assert repr(value) in str(error.value)


@pytest.mark.parametrize("value", [None, 1, 1.0, 0.5, 1e-6])
def test_good_memory_budget(value):
    assert Options.from_mapping({"memory_budget": value}).memory_budget == value


@pytest.mark.parametrize("value", ["gpu", "cuda", "AUTO", "", None])
def test_bad_executor(value):
    with pytest.raises(ValueError, match="executor") as error:
        Options.from_mapping({"executor": value})
    for name in EXECUTORS:
        assert name in str(error.value)


@pytest.mark.parametrize("value", EXECUTORS)
def test_good_executors(value):
    assert Options.from_mapping({"executor": value}).executor == value


@pytest.mark.parametrize("value", [["nope"], "nope", ["cleanup", "dce"]])
def test_disable_naming_an_unknown_pass(value):
    with pytest.raises(ValueError, match="disable") as error:
        Options.from_mapping({"disable": value})
    message = str(error.value)
    assert "nope" in message or "dce" in message
    for name in pass_names():
        assert name in message


@pytest.mark.parametrize("name", ["fusion", "checkpoint"])
def test_disabling_a_required_pass(name):
    with pytest.raises(ValueError, match="disable") as error:
        Options.from_mapping({"disable": [name]})
    assert repr(name) in str(error.value)


@pytest.mark.parametrize("value, expected", [("cleanup", ("cleanup",)),
                                             (["cleanup", "buffer_reuse"],
                                              ("cleanup", "buffer_reuse")),
                                             ((), ())])
def test_disable_accepts_a_name_or_a_list(value, expected):
    assert Options.from_mapping({"disable": value}).disable == expected


@pytest.mark.parametrize("option, value", [("verify", "yes"), ("verify", 1),
                                           ("dump_dir", 123), ("dump_dir", ["a"])])
def test_other_bad_values(option, value):
    with pytest.raises(ValueError, match=option):
        Options.from_mapping({option: value})


def test_retrograd_dump_fills_dump_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RETROGRAD_DUMP", str(tmp_path / "env"))
    assert Options.from_mapping({}).dump_dir == str(tmp_path / "env")
    assert Options.from_mapping({"dump_dir": None}).dump_dir == str(tmp_path / "env")
    # an explicit dump_dir wins over the environment
    assert Options.from_mapping({"dump_dir": str(tmp_path / "mine")}).dump_dir \
        == str(tmp_path / "mine")
    monkeypatch.delenv("RETROGRAD_DUMP")
    assert Options.from_mapping({}).dump_dir is None
    monkeypatch.setenv("RETROGRAD_DUMP", "")
    assert Options.from_mapping({}).dump_dir is None


def test_retrograd_dump_turns_dumping_on_without_code_changes(monkeypatch, tmp_path):
    monkeypatch.setenv("RETROGRAD_DUMP", str(tmp_path))
    compiled = retrograd.compile(lambda x: torch.sigmoid(x) * 2, executor="fx")
    with torch.no_grad():
        compiled(torch.randn(3, 4))
    [folder] = [path for path in tmp_path.iterdir() if path.is_dir()]
    report = json.loads((folder / "report.json").read_text())
    assert report["graph"] == "forward"
    assert report["graph_id"] == compiled.reports["forward"]["graph_id"]


# ---------------------------------------------------------------- both faces
def test_standalone_face_rejects_an_unknown_option():
    with pytest.raises(ValueError, match="'foo'") as error:
        retrograd.compile(lambda x: x + 1, foo=1)
    assert all(name in str(error.value) for name in KNOWN)
    with pytest.raises(ValueError, match="'foo'"):
        retrograd.compile(torch.nn.Linear(2, 2), foo=1)
    with pytest.raises(ValueError, match="'foo'"):     # the decorator form, too
        retrograd.compile(foo=1)


def test_standalone_face_rejects_a_bad_value():
    with pytest.raises(ValueError, match="memory_budget"):
        retrograd.compile(lambda x: x + 1, memory_budget=0)
    with pytest.raises(ValueError, match="executor"):
        retrograd.compile(lambda x: x + 1, executor="gpu")


def _inner_error(error: BaseException) -> BaseException:
    """Dynamo wraps a backend's exception in BackendCompilerFailed."""
    return getattr(error, "inner_exception", None) or error.__cause__ or error


@pytest.mark.parametrize("options, pattern", [({"foo": 1}, "'foo'"),
                                              ({"memory_budget": 1.5}, "memory_budget"),
                                              ({"disable": ["fusion"]}, "disable")])
def test_torch_compile_face_rejects_bad_options_when_called(fresh_dynamo, options, pattern):
    module = torch.nn.Linear(3, 3)
    compiled = torch.compile(module, backend="retrograd", options=options)
    with pytest.raises(Exception) as error:
        compiled(torch.randn(2, 3))
    inner = _inner_error(error.value)
    assert isinstance(inner, ValueError), repr(error.value)
    assert pattern in str(inner)
    assert pattern in str(error.value)
    if "foo" in options:
        assert all(name in str(error.value) for name in KNOWN)


def test_backend_function_rejects_stray_arguments():
    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    with pytest.raises(ValueError, match="options="):
        retrograd_backend(gm, [torch.randn(2)], executor="fx")
    with pytest.raises(ValueError, match="mode"):
        retrograd_backend(gm, [torch.randn(2)], mode="fastest")
    assert retrograd_backend(gm, [torch.randn(2)], options={"executor": "fx"}) is not None
