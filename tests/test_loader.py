"""The kernel cache (runtime/loader.py): where it lives, who may write it, and
that what gets imported is exactly what was generated."""

from __future__ import annotations

import multiprocessing
import os
import stat
import sys

import pytest
from retrograd.runtime import loader


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder (not created yet) named by RETROGRAD_CACHE_DIR."""
    folder = tmp_path / "cache" / "retrograd"
    monkeypatch.setenv("RETROGRAD_CACHE_DIR", str(folder))
    return folder


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_cache_dir_honours_the_environment_variable(cache):
    assert not cache.exists()
    assert loader.cache_dir() == cache
    assert cache.is_dir()
    path = loader.write_source("probe", "VALUE = 1\n")
    assert path.parent == cache


def test_cache_dir_defaults_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("RETROGRAD_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loader.cache_dir() == tmp_path / "xdg" / "retrograd"


def test_cache_dir_is_created_owner_only(cache):
    loader.cache_dir()
    assert mode_of(cache) == 0o700


def test_cached_files_are_owner_only(cache):
    path = loader.write_source("probe", "VALUE = 2\n")
    assert mode_of(path) == 0o600


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777, 0o720], ids=oct)
def test_a_folder_others_can_write_is_refused(cache, mode):
    cache.mkdir(parents=True)
    os.chmod(cache, mode)
    with pytest.raises(PermissionError) as error:
        loader.cache_dir()
    message = str(error.value)
    assert str(cache) in message
    assert "writable by other users" in message and "chmod 700" in message
    with pytest.raises(PermissionError):
        loader.write_source("probe", "VALUE = 3\n")
    assert list(cache.iterdir()) == []           # nothing was written there


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a folder to another user needs root")
def test_a_folder_another_user_owns_is_refused(cache):
    cache.mkdir(parents=True, mode=0o700)
    os.chown(cache, os.getuid() + 4242, -1)
    with pytest.raises(PermissionError, match="belongs to another user"):
        loader.cache_dir()


def test_a_folder_others_can_only_read_is_accepted(cache):
    cache.mkdir(parents=True)
    os.chmod(cache, 0o755)
    assert loader.cache_dir() == cache


def test_same_source_same_path_and_different_source_different_path(cache):
    first = loader.write_source("kernel", "VALUE = 4\n")
    again = loader.write_source("kernel", "VALUE = 4\n")
    other = loader.write_source("kernel", "VALUE = 5\n")
    renamed = loader.write_source("other_kernel", "VALUE = 4\n")
    assert first == again
    assert other != first
    assert renamed != first and renamed.name.startswith("other_kernel_")
    assert loader.source_key("VALUE = 4\n") in first.name
    assert first.read_text() == "VALUE = 4\n"


def test_the_key_depends_on_versions(cache, monkeypatch):
    before = loader.source_key("VALUE = 6\n")
    monkeypatch.setattr(loader, "_versions", lambda: "python 9 torch 9 triton 9")
    assert loader.source_key("VALUE = 6\n") != before


@pytest.mark.parametrize("damage", ["tampered", "truncated", "empty"])
def test_a_file_that_does_not_match_its_key_is_rewritten_before_loading(cache, damage):
    source = f"VALUE = 'genuine {damage}'\nPADDING = {'x' * 200!r}\n"
    path = loader.write_source("victim", source)
    if damage == "tampered":
        path.write_text(f"VALUE = 'evil {damage}'\n")
    elif damage == "truncated":
        path.write_text(source[: len(source) // 2])
    else:
        path.write_text("")
    assert path.read_text() != source
    again = loader.write_source("victim", source)
    assert again == path
    assert path.read_text() == source
    module = loader.load_module(path, interpreted=False)
    assert module.VALUE == f"genuine {damage}"


def test_writes_leave_no_temporary_files(cache):
    for index in range(5):
        loader.write_source("probe", f"VALUE = {index}\n")
        loader.write_source("probe", f"VALUE = {index}\n")
    names = sorted(path.name for path in cache.iterdir())
    assert len(names) == 5
    assert not [name for name in names if name.endswith(".tmp") or name.startswith(".")]


def test_load_module_imports_the_file_once_per_mode(cache):
    path = loader.write_source("loaded", "import os\nFLAG = os.environ.get('TRITON_INTERPRET')\n")
    plain = loader.load_module(path, interpreted=False)
    interpreted = loader.load_module(path, interpreted=True)
    assert plain.FLAG == "0" and interpreted.FLAG == "1"
    assert loader.load_module(path, interpreted=True) is interpreted


# ---------------------------------------------------------------- concurrent writers
SOURCES = 16
LINES = 20_000      # ~0.5 MB a source: a non-atomic write is visible half done


def concurrent_source(index: int) -> str:
    body = "".join(f"# line {line} of source {index}: {'=' * 12}\n" for line in range(LINES))
    return f"INDEX = {index}\n{body}LAST = {index}\n"


def concurrent_writer(folder: str, barrier, results) -> None:
    """Write every source, read each back at once, then import one."""
    os.environ["RETROGRAD_CACHE_DIR"] = folder
    sources = [concurrent_source(index) for index in range(SOURCES)]
    barrier.wait()
    bad = []
    for index, source in enumerate(sources):
        path = loader.write_source("race", source)
        if path.read_text() != source:
            bad.append(index)
    module = loader.load_module(loader.write_source("race", sources[-1]), False)
    results.put(("writer", bad, (module.INDEX, module.LAST)))


def concurrent_reader(folder: str, barrier, results) -> None:
    """Poll the paths the sources will have: a file that exists must be whole."""
    os.environ["RETROGRAD_CACHE_DIR"] = folder
    sources = [concurrent_source(index) for index in range(SOURCES)]
    paths = [loader.cache_dir() / f"race_{loader.source_key(s)}.py" for s in sources]
    barrier.wait()
    pending, bad = set(range(SOURCES)), []
    while pending:
        for index in sorted(pending):
            try:
                text = paths[index].read_text()
            except FileNotFoundError:
                continue
            if text == sources[index]:
                pending.discard(index)
            else:
                bad.append(index)
    results.put(("reader", bad, None))


def test_concurrent_writers_never_show_a_partial_file(cache):
    cache.mkdir(parents=True, mode=0o700)
    context = multiprocessing.get_context("spawn")
    roles = [concurrent_writer, concurrent_writer, concurrent_reader]
    barrier, results = context.Barrier(len(roles)), context.Queue()
    processes = [context.Process(target=role, args=(str(cache), barrier, results))
                 for role in roles]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for role, bad, loaded in outcomes:
        assert bad == [], f"{role} saw partial files for sources {sorted(set(bad))}"
        if role == "writer":
            assert loaded == (SOURCES - 1, SOURCES - 1)
    files = [path for path in cache.iterdir() if path.suffix == ".py"]
    assert len(files) == SOURCES
    for path in files:
        text = path.read_text()
        index = int(text.split("\n", 1)[0].removeprefix("INDEX = "))
        assert text == concurrent_source(index)
    assert not [path for path in cache.iterdir() if path.suffix == ".tmp"]


# ---------------------------------------------------------------- hostile cache files
GENUINE = "VALUE = 'genuine'\n\ndef answer():\n    return 'genuine answer'\n"


def fresh_process(monkeypatch) -> None:
    """Forget every module loaded so far, as a new process would."""
    monkeypatch.setattr(loader, "_LOADED", {})


def test_a_cached_file_that_is_not_utf8_is_rebuilt(cache):
    path = loader.write_source("binary", GENUINE)
    path.write_bytes(b"VALUE = '\xff\xfe\x80 not utf-8'\n")
    assert loader.write_source("binary", GENUINE) == path
    assert path.read_text() == GENUINE
    assert loader.load_module(path, interpreted=False).VALUE == "genuine"


def pyc_header(path) -> bytes:
    """A bytecode header that matches ``path``'s mtime and size, as importlib checks."""
    import importlib.util
    info = os.stat(path)
    return (importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little")
            + (int(info.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
            + (info.st_size & 0xFFFFFFFF).to_bytes(4, "little"))


def plant_pyc(path, body: bytes) -> None:
    import importlib.util
    pyc = importlib.util.cache_from_source(str(path))
    os.makedirs(os.path.dirname(pyc), exist_ok=True)
    with open(pyc, "wb") as file:
        file.write(pyc_header(path) + body)


def test_a_corrupt_pyc_is_ignored(cache, monkeypatch):
    path = loader.write_source("corrupt", GENUINE)
    plant_pyc(path, b"\x00garbage, not marshal data\xff" * 4)
    fresh_process(monkeypatch)
    assert loader.write_source("corrupt", GENUINE) == path
    assert loader.load_module(path, interpreted=False).VALUE == "genuine"


def test_an_altered_pyc_is_never_run(cache, monkeypatch, tmp_path):
    import marshal
    marker = tmp_path / "evil_ran"
    path = loader.write_source("altered", GENUINE)
    evil = compile(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                   "VALUE = 'evil'\n", str(path), "exec")
    plant_pyc(path, marshal.dumps(evil))
    fresh_process(monkeypatch)
    module = loader.load_module(loader.write_source("altered", GENUINE), interpreted=False)
    assert module.VALUE == "genuine"
    assert not marker.exists()


def test_loading_writes_no_bytecode(cache, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    path = loader.write_source("nobytecode", GENUINE)
    loader.load_module(path, interpreted=False)
    assert not (cache / "__pycache__").exists()


def test_a_file_changed_between_write_and_load_is_rebuilt_not_run(cache):
    path = loader.write_source("swapped", GENUINE)
    path.write_text("VALUE = 'evil'\n")
    assert loader.load_module(path, interpreted=False).VALUE == "genuine"
    assert path.read_text() == GENUINE


def test_an_unknown_file_that_does_not_match_its_name_is_an_error(cache):
    path = loader.write_source("stranger", GENUINE)
    path.write_text("VALUE = 'evil'\n")
    loader._WRITTEN.pop(str(path))
    with pytest.raises(RuntimeError, match="does not match the hash") as error:
        loader.load_module(path, interpreted=False)
    assert str(path) in str(error.value)


def test_getsource_gives_the_verified_text_even_if_the_file_changes(cache):
    import inspect
    path = loader.write_source("inspected", GENUINE)
    module = loader.load_module(path, interpreted=False)
    path.write_text("VALUE = 'evil'\n\ndef answer():\n    return 'evil answer'\n")
    assert "genuine answer" in inspect.getsource(module.answer)


def test_a_symlink_in_the_cache_is_replaced_and_its_target_untouched(cache, tmp_path):
    victim = tmp_path / "victim.py"
    victim.write_text(GENUINE)                      # same bytes: the link would pass a hash
    path = loader.cache_dir() / f"linked_{loader.source_key(GENUINE)}.py"
    path.symlink_to(victim)
    assert loader.write_source("linked", GENUINE) == path
    assert not path.is_symlink() and path.read_text() == GENUINE
    path.write_text("VALUE = 'changed later'\n")
    assert victim.read_text() == GENUINE


def test_a_cached_file_others_can_write_is_rebuilt(cache):
    path = loader.write_source("shared", GENUINE)
    os.chmod(path, 0o666)
    loader.write_source("shared", GENUINE)
    assert mode_of(path) == 0o600


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a file to another user needs root")
def test_a_cached_file_another_user_owns_is_rebuilt(cache):
    path = loader.write_source("foreign", GENUINE)
    os.chown(path, os.getuid() + 4242, -1)
    loader.write_source("foreign", GENUINE)
    assert os.stat(path).st_uid == os.getuid()


KERNEL = '''import triton
import triton.language as tl


@triton.jit
def double(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2, mask=mask)
'''


def test_a_triton_kernel_runs_from_the_verified_text(cache):
    import inspect

    import torch
    path = loader.write_source("kernel_double", KERNEL)
    module = loader.load_module(path, interpreted=True)
    path.write_text(KERNEL.replace("* 2", "* 3"))       # a later change must not matter
    assert "* 2" in inspect.getsource(module.double.fn)
    x = torch.arange(10, dtype=torch.float32)
    out = torch.empty_like(x)
    from retrograd.runtime.device import interpreter_mode
    with interpreter_mode(True):
        module.double[(1,)](x, out, 10, BLOCK=16)
    assert torch.equal(out, x * 2)


FRESH_RUN = """
import torch, retrograd
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
x = torch.randn(2, 4)
model(x).sum().backward()
eager = [p.grad.clone() for p in model.parameters()]
model.zero_grad()
retrograd.compile(model, executor="interpret")(x).sum().backward()  # kernels: cached files
assert all(torch.allclose(p.grad, e) for p, e in zip(model.parameters(), eager))
print("ok")
"""


def test_a_poisoned_cache_heals_in_a_fresh_process(cache, tmp_path):
    """Compile once, then damage every cached file for real (bytes that are not
    UTF-8, corrupt bytecode, bytecode altered to run other code) and run again
    in a new process: it must compile, match eager and never run the planted code."""
    import marshal
    import subprocess
    environment = dict(os.environ, RETROGRAD_CACHE_DIR=str(cache))
    exec(FRESH_RUN, {})  # noqa: S102 -- the first run, in this process to save time
    files = sorted(cache.glob("*.py"))
    assert len(files) >= 3
    marker = tmp_path / "evil_ran"
    evil = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    for path in files[1:]:
        plant_pyc(path, marshal.dumps(compile(evil, str(path), "exec")))
    plant_pyc(files[-1], b"\x00corrupt\xff" * 8)
    files[0].write_bytes(b"# \xff\xfe not utf-8\n")
    second = subprocess.run([sys.executable, "-c", FRESH_RUN], env=environment,
                            capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0 and "ok" in second.stdout, second.stderr
    assert not marker.exists()
    files[0].read_text(encoding="utf-8")                # rebuilt


def test_a_fifo_planted_in_the_cache_neither_hangs_nor_is_read(cache):
    import threading
    path = loader.cache_dir() / f"piped_{loader.source_key(GENUINE)}.py"
    os.mkfifo(path)
    done = []
    worker = threading.Thread(target=lambda: done.append(loader.write_source("piped", GENUINE)),
                              daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert done == [path], "write_source blocked on a FIFO"
    assert stat.S_ISREG(os.lstat(path).st_mode) and path.read_text() == GENUINE


def test_a_folder_where_a_cached_file_goes_is_a_clear_error(cache):
    path = loader.cache_dir() / f"folder_{loader.source_key(GENUINE)}.py"
    path.mkdir()
    with pytest.raises(RuntimeError, match="is a folder where a cached file goes") as error:
        loader.write_source("folder", GENUINE)
    assert str(path) in str(error.value)
