"""The saved-tensor ledger (report schema 2) and ``retrograd explain``.

The ledger's saved rows must add up to ``memory.saved_activation_bytes`` on
the zoo through both faces, name the user's source line (a line of the tiny
model below), and ``retrograd explain`` must group a real dump by line.
Compiles use ``executor="fx"`` where codegen is beside the point: the ledger
comes from the checkpoint pass, before codegen.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import retrograd
import torch
from retrograd import cli
from torch import nn

from tests.checks import compile_with
from tests.hf_zoo import HF_ZOO
from tests.zoo import ZOO

FACES = ("standalone", "torch.compile")
THIS_FILE = str(Path(__file__).resolve())


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        hidden = self.fc1(x)  # ledger: the first matmul
        return self.fc2(hidden * torch.tanh(hidden))  # ledger: tanh and the second matmul


def _line(marker: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(number for number, text in enumerate(lines, 1)
                if f"# ledger: {marker}" in text)


def _reports(dump: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(dump.glob("*/report.json"))]


def _run(face: str, model, inputs, dump: Path, call=None, **options):
    compiled = compile_with(face, model, dump_dir=str(dump), **options)
    output = call(compiled, *inputs) if call else compiled(*inputs)
    return output


def _check_adds_up(reports: list[dict]) -> None:
    with_ledger = [r for r in reports if r["ledger"] is not None]
    assert with_ledger, "no report has a ledger"
    for report in with_ledger:
        assert report["schema"] == 4
        saved = [row for row in report["ledger"] if row["decision"] == "saved"]
        assert sum(row["bytes"] for row in saved) == report["memory"]["saved_activation_bytes"]
        assert len(saved) == next(p for p in report["passes"] if p["name"] == "checkpoint")[
            "stats"]["saved_activation_values"]
        recomputed = [row for row in report["ledger"] if row["decision"] == "recomputed"]
        assert sum(row["recompute_flops"] for row in recomputed) == report["recompute"]["flops"]
        for row in report["ledger"]:
            assert set(row) == {"name", "op", "shape", "dtype", "bytes", "source", "decision",
                                "reason", "recompute_flops"}
            assert row["reason"]


@pytest.mark.parametrize("face", FACES)
def test_source_lines_point_into_this_file(face, tmp_path):
    torch.manual_seed(0)
    _run(face, TwoLayers(), (torch.randn(4, 8, requires_grad=True),), tmp_path,
         executor="fx").sum().backward()
    [report] = [r for r in _reports(tmp_path) if r["graph"] == "forward"]
    _check_adds_up([report])
    rows = {row["name"]: row for row in report["ledger"]}
    first = next(row for row in rows.values() if row["op"] == "aten.addmm.default"
                 and row["shape"] == [4, 16])
    assert first["decision"] == "saved" and first["bytes"] == 4 * 16 * 4
    assert first["source"] == f"{THIS_FILE}:{_line('the first matmul')}"
    assert first["reason"].startswith("min-cut: not recomputable")
    tanh = next(row for row in rows.values() if row["op"] == "aten.tanh.default")
    assert tanh["source"] == f"{THIS_FILE}:{_line('tanh and the second matmul')}"


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_ledger_adds_up_on_the_zoo(face, name, tmp_path):
    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.model()
    compiled = compile_with(face, model, dump_dir=str(tmp_path), executor="fx")
    entry.run(compiled, entry.inputs()).backward()
    reports = _reports(tmp_path)
    _check_adds_up(reports)
    sources = [row["source"] for r in reports if r["ledger"] for row in r["ledger"]]
    assert any(source is not None for source in sources)


def test_ledger_adds_up_on_a_transformer(tmp_path):
    entry = HF_ZOO["llama"]
    model = entry.model()
    compiled = retrograd.compile(model, dump_dir=str(tmp_path), executor="fx")
    compiled(**entry.batch()).loss.backward()
    reports = _reports(tmp_path)
    _check_adds_up(reports)
    sources = {row["source"] for r in reports if r["ledger"] for row in r["ledger"]}
    assert any(s and "modeling_llama.py" in s for s in sources), sources


def test_reasons_name_the_pattern_and_the_budget(tmp_path):
    torch.manual_seed(0)
    inputs = (torch.randn(4, 8, requires_grad=True),)
    model = TwoLayers()
    _run("standalone", model, inputs, tmp_path / "save", executor="fx",
         save=["tanh"]).sum().backward()
    [report] = [r for r in _reports(tmp_path / "save") if r["graph"] == "forward"]
    tanh = next(row for row in report["ledger"] if row["op"] == "aten.tanh.default")
    assert (tanh["decision"], tanh["reason"]) == ("saved", "save=tanh")
    _run("standalone", model, inputs, tmp_path / "budget", executor="fx",
         memory_budget=0.01).sum().backward()
    [report] = [r for r in _reports(tmp_path / "budget") if r["graph"] == "forward"]
    assert all(row["reason"].startswith("budget: memory_budget=0.01")
               for row in report["ledger"]), report["ledger"]
    _check_adds_up([report])


def test_ledger_adds_up_in_compile_step():
    torch.manual_seed(0)
    model = TwoLayers()
    step = retrograd.compile_step(model, lambda m, x: m(x).square().sum(),
                                  torch.optim.SGD(model.parameters(), lr=0.1), executor="fx")
    step(torch.randn(4, 8))
    report = step.reports["step"]
    _check_adds_up([report])
    assert {row["decision"] for row in report["ledger"]} == {"saved", "recomputed"}
    sources = [row["source"] for row in report["ledger"]]
    assert any(source is not None and source.startswith(f"{THIS_FILE}:") for source in sources), \
        sources


def test_recording_puts_the_user_line_on_traced_nodes():
    """How ``compile_step``'s trace carries sources (compiler/step.py traces
    ``recording(function)``)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from retrograd.provenance import recording, source_of

    def function(x):
        return torch.sin(x) * 2  # ledger: traced by make_fx

    traced = make_fx(recording(function))(torch.randn(3))
    sin = next(n for n in traced.graph.nodes if n.target is torch.ops.aten.sin.default)
    assert source_of(sin.meta.get("stack_trace")) == f"{THIS_FILE}:{_line('traced by make_fx')}"


@pytest.fixture(scope="module")
def mlp_dump(tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("dump")
    entry = ZOO["mlp"]
    torch.manual_seed(0)
    compiled = retrograd.compile(entry.model(), dump_dir=str(dump), executor="fx")
    entry.run(compiled, entry.inputs()).backward()
    return dump


def test_explain_groups_a_real_dump_by_source_line(mlp_dump, capsys):
    assert cli.main(["explain", str(mlp_dump)]) == 0
    text = capsys.readouterr().out
    [report] = [r for r in _reports(mlp_dump) if r["graph"] == "forward"]
    saved = report["memory"]["saved_activation_bytes"]
    assert f"= memory.saved_activation_bytes {saved})" in text
    total = next(line for line in text.splitlines() if line.startswith("total"))
    assert int(total.split()[1].replace(",", "")) == saved
    assert "zoo.py:" in text
    assert cli.main(["explain", str(mlp_dump), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    [graph] = parsed.values()
    assert graph["totals"]["saved_bytes"] == saved
    sizes = [g["saved_bytes"] for g in graph["groups"]]
    assert sizes == sorted(sizes, reverse=True)
    assert sum(g["saved"] + g["recomputed"] for g in graph["groups"]) == len(graph["ledger"])


def test_explain_pareto_marks_todays_plan(mlp_dump, capsys):
    assert cli.main(["explain", str(mlp_dump), "--pareto"]) == 0
    text = capsys.readouterr().out
    marked = [line for line in text.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and "today's plan (memory_budget=None)" in marked[0]
    [report] = [r for r in _reports(mlp_dump) if r["graph"] == "forward"]
    points = report["pareto"]["points"]
    assert len(points) >= 2
    # the frontier: more saved bytes, less recompute cost, a larger budget picks it
    for a, b in itertools.pairwise(points):
        assert a["saved_bytes"] < b["saved_bytes"]
        assert a["recompute_cost"] > b["recompute_cost"]
        assert a["memory_budget"] <= b["memory_budget"]
    assert points[-1]["recompute_flops"] == 0
    current = report["pareto"]["current"]
    assert current["saved_bytes"] == report["memory"]["saved_activation_bytes"]
    index = (next(mlp_dump.glob("*-forward")) / "index.html").read_text()
    assert "Saved for the backward, by source line" in index and "<circle" in index


def test_explain_says_what_is_missing(tmp_path, capsys):
    assert cli.main(["explain", str(tmp_path / "nowhere")]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["explain", str(tmp_path)]) == 1
    assert "no report with a saved-tensor ledger" in capsys.readouterr().err


def test_packages_of_the_base_interpreter_are_the_users_in_a_venv():
    """In a venv made with ``--system-site-packages``, transformers may live in
    the base interpreter's site-packages, under its standard library folder:
    its frames are still the user's (ledger sources name modeling_*.py), while
    the standard library's are not."""
    import sysconfig
    from retrograd.errors import _is_library
    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    assert not _is_library(f"{base['purelib']}/transformers/models/llama/modeling_llama.py")
    assert _is_library(sysconfig.get_paths()["stdlib"] + "/functools.py")
