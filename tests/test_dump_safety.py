"""Dump folders under hostile neighbours (compiler/dump.py): ``dump_dir`` may be
a shared folder and graph ids are predictable, so someone else can pre-create
a graph's folder, or plant links in it. No dump write may follow a link or
land in a folder another user can write; a victim's files stay untouched."""

from __future__ import annotations

import os
import stat
import types
import warnings

import pytest
from retrograd.dump import Dumper
from retrograd.pipeline import PassError, run_pass

GRAPH = "g0123456789-forward"
BEFORE = "the victim's own precious text\n"


@pytest.fixture
def victim(tmp_path):
    """A file of someone's that a dump must never write."""
    path = tmp_path / "victim" / "precious.txt"
    path.parent.mkdir()
    path.write_text(BEFORE)
    return path


@pytest.fixture
def root(tmp_path):
    """A shared dump folder, writable by everyone like /tmp (sticky)."""
    path = tmp_path / "shared_dumps"
    path.mkdir()
    os.chmod(path, 0o1777)
    return path


def regular_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_a_link_in_a_folder_others_can_write_is_never_followed(root, victim):
    folder = root / GRAPH
    folder.mkdir()
    os.chmod(folder, 0o777)                              # pre-created by someone else
    (folder / "report.json").symlink_to(victim)
    with pytest.warns(RuntimeWarning, match=str(folder)):
        dumper = Dumper(str(root), [GRAPH])
    dumper.write("report.json", "{}\n")
    assert victim.read_text() == BEFORE
    assert (folder / "report.json").is_symlink()         # their folder was left alone
    [fresh] = dumper.folders
    assert fresh != folder and fresh.parent == root and fresh.name.startswith(GRAPH)
    assert (fresh / "report.json").read_text() == "{}\n"
    assert not stat.S_IMODE(os.stat(fresh).st_mode) & (stat.S_IWGRP | stat.S_IWOTH)


def test_a_link_planted_in_our_own_folder_is_replaced_not_followed(root, victim):
    folder = root / GRAPH
    folder.mkdir(mode=0o755)
    (folder / "01_cleanup.py").symlink_to(victim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # our folder: no warning
        dumper = Dumper(str(root), [GRAPH])
        dumper.stage("captured", "x = 0\n")
        dumper.stage("cleanup", "x = 1\n")
    assert dumper.folders == [folder]
    assert victim.read_text() == BEFORE
    assert not (folder / "01_cleanup.py").is_symlink()
    assert (folder / "01_cleanup.py").read_text() == "x = 1\n"


def test_a_graph_folder_that_is_a_link_is_refused(root, victim):
    (root / GRAPH).symlink_to(victim.parent, target_is_directory=True)
    with pytest.warns(RuntimeWarning, match=str(root / GRAPH)):
        dumper = Dumper(str(root), [GRAPH])
    dumper.write("precious.txt", "overwritten\n")
    dumper.write("program.py", "def run(): pass\n")
    assert victim.read_text() == BEFORE
    assert regular_files(victim.parent) == ["precious.txt"]
    assert (dumper.folders[0] / "precious.txt").read_text() == "overwritten\n"


def test_a_kernels_folder_that_is_a_link_is_not_written_through(root, victim):
    folder = root / GRAPH
    folder.mkdir(mode=0o755)
    (folder / "kernels").symlink_to(victim.parent, target_is_directory=True)
    dumper = Dumper(str(root), [GRAPH])
    with pytest.warns(RuntimeWarning, match="cannot write the dump file"):
        dumper.write("kernels/precious.txt", "overwritten\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # no second warning
        dumper.write("kernels/other.py", "x = 2\n")
    assert victim.read_text() == BEFORE
    assert regular_files(victim.parent) == ["precious.txt"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a folder to another user needs root")
def test_a_graph_folder_another_user_owns_is_refused(root, victim):
    folder = root / GRAPH
    folder.mkdir(mode=0o755)
    os.chown(folder, os.getuid() + 4242, -1)
    with pytest.warns(RuntimeWarning, match="another user's"):
        dumper = Dumper(str(root), [GRAPH])
    dumper.write("report.json", "{}\n")
    assert dumper.folders[0] != folder and list(folder.iterdir()) == []


def test_the_failure_reproducer_does_not_follow_a_link(root, victim):
    folder = root / GRAPH
    folder.mkdir(mode=0o755)
    (folder / "failed_boom.txt").symlink_to(victim)
    ctx = types.SimpleNamespace(dumper=Dumper(str(root), [GRAPH]), graph_name=GRAPH)

    def boom(subject, ctx):
        raise ValueError("boom")
    with pytest.raises(PassError, match="boom"):
        run_pass("boom", boom, None, ctx, [])
    assert victim.read_text() == BEFORE
    written = folder / "failed_boom.txt"
    assert not written.is_symlink() and "ValueError: boom" in written.read_text()


def test_dumps_are_reused_across_runs_and_leave_no_temporary_files(tmp_path):
    old = os.umask(0o002)                                 # a group-writable umask
    try:
        for run in range(2):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                dumper = Dumper(str(tmp_path / "dumps"), [GRAPH])
                dumper.write("kernels/k0.py", f"run = {run}\n")
                dumper.write("program.py", f"run = {run}\n")
            assert dumper.folders == [tmp_path / "dumps" / GRAPH]
    finally:
        os.umask(old)
    folder = tmp_path / "dumps" / GRAPH
    assert regular_files(folder) == ["kernels/k0.py", "program.py"]
    assert (folder / "program.py").read_text() == "run = 1\n"


def test_a_write_that_fails_is_a_warning_not_an_error(tmp_path):
    dumper = Dumper(str(tmp_path), [GRAPH])
    (tmp_path / GRAPH / "report.json").mkdir()            # a folder where a file goes
    with pytest.warns(RuntimeWarning, match="report.json"):
        dumper.write("report.json", "{}\n")


def test_a_dump_root_that_cannot_be_made_is_a_warning(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    with pytest.warns(RuntimeWarning, match="cannot make a dump folder"):
        dumper = Dumper(str(blocker / "dumps"), [GRAPH])
    assert not dumper.enabled
    dumper.write("report.json", "{}\n")                   # a no-op, no error


def test_the_page_escapes_every_name_it_shows():
    """Graph, pass, kernel, value and file names, ops and source lines come from
    the user's code: the page shows them as text, never as markup."""
    from retrograd.dump_page import page
    from retrograd.memory_timeline import HELD, Interval, Step, Timeline

    evil = '<script>alert(1)</script>"'
    image = '<img src=x onerror="alert(2)">'
    steps = [Step(0, "triton", evil, (image,), ()), Step(1, "extern", image, (evil,), (0,))]
    timeline = Timeline(steps, {HELD: [Interval(evil, image, 64, 0, 1)],
                                "arenas held": [], "arena bytes in use": [],
                                "inputs still referenced": []})
    row = {"name": evil, "op": image, "shape": [2], "dtype": evil, "bytes": 8,
           "source": f"{evil}:1", "decision": "saved", "reason": image, "recompute_flops": 0}
    report = {"graph_id": evil, "graph": image, "nodes": {"captured": 1, "final": 1},
              "kernels": {"triton": 1, "extern": 1, "extern_ops": {image: 1}, "views": 0},
              "memory": {"saved_activation_bytes": 8, "arena_bytes": None},
              "compile_seconds": 0.1, "ledger": [row], "pareto": None,
              "passes": [{"name": evil, "nodes_before": 1, "nodes_after": 1, "seconds": 0.0,
                          "stats": {image: evil}}]}
    text = page(report, [(f"00_{evil}.py", evil), (f"01_{image}.py", image)], [evil], timeline)
    assert "<script" not in text and "<img" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;" in text
    assert 'href="kernels/&lt;script&gt;' in text      # links too: quotes cannot close them
