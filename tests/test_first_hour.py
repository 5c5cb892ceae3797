"""A new user's first hour: ``retrograd --version``, ``retrograd env``,
``retrograd summary`` on a dump folder or one graph folder, ``dir(retrograd)``,
and the package metadata an sdist carries."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import retrograd
import torch
from retrograd import cli

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"retrograd {retrograd.__version__}"


def test_version_is_one_value_for_package_and_metadata():
    tomllib = pytest.importorskip("tomllib")
    text = (ROOT / "pyproject.toml").read_text()
    project = tomllib.loads(text)["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert 'version = { attr = "retrograd.__version__" }' in text
    assert re.fullmatch(r"\d+\.\d+\.\d+", retrograd.__version__)
    assert project["license"] == "BSD-3-Clause" and (ROOT / "LICENSE").is_file()


def test_env_prints_versions_like_collect_env(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    assert fields["PyTorch version"] == torch.__version__
    assert fields["retrograd version"].startswith(retrograd.__version__)
    assert fields["Is CUDA available"] == str(torch.cuda.is_available())
    import triton
    assert fields["Triton version"] == triton.__version__
    assert fields["Python version"].startswith(sys.version.split()[0])
    for name in ("OS", "CPU", "GPU models", "CUDA used to build PyTorch"):
        assert fields[name]


def test_env_names_the_commit_in_a_git_checkout(tmp_path):
    from retrograd.environment import git_commit
    assert git_commit(tmp_path) is None            # not a checkout: no commit claimed
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    assert git_commit(ROOT).startswith(f"git {head}")


def test_dir_lists_the_lazy_public_names():
    names = dir(retrograd)
    for name in retrograd.__all__:
        assert name in names
    assert "__version__" in names and "annotations" not in names


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dump")
    model = retrograd.compile(torch.nn.Linear(4, 3), dump_dir=str(folder))
    model(torch.randn(2, 4)).sum().backward()
    return folder


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines()[1:] if line.strip()]


def test_summary_of_a_dump_folder_and_of_one_graph_folder(dump, capsys):
    assert cli.main(["summary", str(dump)]) == 0
    every = _lines(capsys.readouterr().out)
    assert len(every) == 2                          # forward and backward
    graph = next(path for path in dump.iterdir() if (path / "report.json").is_file())
    assert cli.main(["summary", str(graph)]) == 0
    one = _lines(capsys.readouterr().out)
    assert len(one) == 1 and one[0].split()[0] == graph.name


def test_summary_says_no_such_directory(tmp_path, capsys):
    missing = tmp_path / "dumsp"
    assert cli.main(["summary", str(missing)]) == 1
    assert f"no such directory: {missing}" in capsys.readouterr().err
    assert cli.main(["summary", str(tmp_path)]) == 1    # exists, holds no report
    assert "no report.json" in capsys.readouterr().err


def test_sdist_carries_what_the_tests_read(tmp_path):
    """Built from the committed tree: the sdist holds the tests and every file
    they read (README, docs, examples, benchmarks, .ci/run) and the LICENSE."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("needs a git checkout to take the committed tree from")
    source = tmp_path / "source"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    program = f"from setuptools.build_meta import build_sdist; print(build_sdist({str(tmp_path)!r}))"
    built = subprocess.run([sys.executable, "-c", program], cwd=source, capture_output=True,
                           text=True, check=True).stdout.split()[-1]
    import tarfile
    with tarfile.open(tmp_path / built) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for name in ("LICENSE", "README.md", "BENCHMARKS.md", ".ci/run", "docs/ops.md",
                 "examples/quickstart.py", "benchmarks/memory.py", "tests/conftest.py",
                 "tests/test_first_hour.py", "tests/zoo.py", "compiler/cli.py"):
        assert name in names, name


# -- save= / recompute= patterns that name nothing -------------------------------------

def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))


def _train(face: str, **options) -> dict:
    """One step of the MLP through ``face``; the standalone reports (or {})."""
    model, x = _mlp(), torch.randn(3, 4)
    if face == "standalone":
        compiled = retrograd.compile(model, **options)
        compiled(x).sum().backward()
        return compiled.reports
    if face == "torch.compile":
        torch._dynamo.reset()
        torch.compile(model, backend="retrograd", options=options)(x).sum().backward()
        return {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    retrograd.compile_step(model, lambda m, x: m(x).sum(), optimizer, **options)(x)
    return {}


@pytest.mark.parametrize("face", ["standalone", "torch.compile", "compile_step"])
def test_a_typo_in_save_is_a_value_error_with_close_matches(face):
    with pytest.raises(ValueError, match=r"save pattern 'adddmm' matches no op or node.*"
                                         r"close matches: 'addmm'"):
        _train(face, save=["adddmm"])


def test_a_typo_in_recompute_is_refused_too():
    with pytest.raises(ValueError, match=r"recompute pattern 'mull_2'.*close matches: 'mul_2'"):
        _train("standalone", recompute=["mull_2"])


@pytest.mark.parametrize("face", ["standalone", "compile_step"])
def test_backward_ops_and_forward_node_names_are_accepted(face, recwarn):
    """``mm`` occurs only in the backward (the forward's products are addmm);
    ``addmm_1`` and ``mul_2`` are nodes of the forward."""
    reports = _train(face, save=["mm", "addmm_1"], recompute=["mul_2"])
    if reports:
        assert "aten.mm.default" not in reports["forward"]["kernels"]["extern_ops"]
        assert "aten.mm.default" in reports["backward"]["kernels"]["extern_ops"]
    assert not [w for w in recwarn if "pattern" in str(w.message)]


def test_a_real_op_the_graph_lacks_is_a_warning_not_an_error():
    """GELU is decomposed before the checkpoint pass sees the graph, and under
    torch.compile a graph break may put an op in another graph."""
    with pytest.warns(UserWarning, match=r"save pattern 'gelu' matches no node.*does not hold"):
        _train("standalone", save=["gelu"])


def test_interpreter_cost_script_measures_every_variant(tmp_path):
    """benchmarks/interpreter_cost.py (BENCHMARKS.md's CPU interpreter figures)
    still runs: one step of the MLP per variant, environment recorded."""
    out = tmp_path / "cost.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "interpreter_cost.py"),
                    "--models", "mlp", "--warmup", "0", "--repeats", "1", "--out", str(out)],
                   check=True, capture_output=True, timeout=600,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})   # it measures the CPU
    import json
    result = json.loads(out.read_text())
    [row] = result["rows"]
    assert row["retrograd"]["triton_kernels"] > 0 and row["eager"]["triton_kernels"] is None
    for variant in ("eager", "retrograd fx", "retrograd"):
        assert row[variant]["median_s"] > 0
    assert result["environment"]["torch"] == torch.__version__


def test_pattern_check_on_a_hand_built_graph():
    """``patterns.check`` alone: node names, ops in every spelling, a real op
    the graph lacks (warning), typos and attribute names (errors)."""
    from retrograd.passes.planning import patterns
    graph = torch.fx.Graph()
    x = graph.placeholder("primals_1")
    product = graph.call_function(torch.ops.aten.mm.default, (x, x))
    graph.output(graph.call_function(torch.ops.aten.relu.default, (product,)))
    for pattern in ("mm", "aten.mm", "aten.mm.default", "relu", product.name, "primals_1"):
        patterns.check(graph, (pattern,), (), "g")
    with pytest.warns(UserWarning, match="'aten.bmm' matches no node of graph g"):
        patterns.check(graph, (), ("aten.bmm",), "g")
    for typo, close in (("mn", "'mm'"), ("relux", "'relu'"), ("__class__", None)):
        with pytest.raises(patterns.PatternError) as caught:
            patterns.check(graph, (typo,), (), "g")
        assert isinstance(caught.value, ValueError) and f"'{typo}'" in str(caught.value)
        assert close is None or f"close matches: {close}" in str(caught.value)


def test_an_op_pattern_survives_a_graph_break_under_torch_compile():
    """Under torch.compile a graph break puts ``addmm`` in the first graph
    only: the second graph warns, nothing is refused, gradients match eager."""
    linear = _mlp()[0]

    def function(x):
        y = linear(x)
        torch._dynamo.graph_break()
        return (y.relu() * 2).sum()

    x = torch.randn(3, 4)
    function(x).backward()
    expected = linear.weight.grad.clone()
    linear.weight.grad = None
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="save pattern 'addmm' matches no node"):
        torch.compile(function, backend="retrograd", options={"save": ["addmm"]})(x).backward()
    torch.testing.assert_close(linear.weight.grad, expected)
