"""The kernel cache on disk stays bounded: a size cap with least recently used
eviction (disk_cache.py), and ``retrograd cache info|clear``, which touch
retrograd's own files only."""

from __future__ import annotations

import os
import time

import pytest

from retrograd import cli
from retrograd.runtime import disk_cache, loader


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RETROGRAD_CACHE_DIR", str(folder))
    monkeypatch.delenv(disk_cache.ENVIRONMENT, raising=False)
    monkeypatch.setattr(loader, "_WRITTEN", type(loader._WRITTEN)())   # a fresh process
    return loader.cache_dir()


def _source(index: int, size: int = 1000) -> str:
    return f"VALUE = {index}\n# {'x' * size}\n"


def _age(path, seconds_ago: float) -> None:
    stamp = time.time() - seconds_ago
    os.utime(path, (stamp, stamp))


def test_info_names_folder_files_bytes_cap_oldest_newest(cache, capsys):
    old = loader.write_source("kernel_a", _source(1))
    new = loader.write_source("kernel_b", _source(2, 50))
    _age(old, 3600)
    assert cli.main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(cache) in out and "files   2" in out
    assert f"{old.stat().st_size + new.stat().st_size:,}" in out
    assert f"{1024 * 2**20:,}" in out   # the default cap
    assert "oldest  " in out and old.name in out.split("oldest")[1].split("\n")[0]
    assert new.name in out.split("newest")[1]


def test_clear_removes_our_files_only(cache, tmp_path, capsys):
    ours = [loader.write_source(f"kernel_{i}", _source(i)) for i in range(3)]
    stale = cache / f".kernel_9_{'0' * 24}_abc123.tmp"
    stale.write_text("half written")
    _age(stale, 2 * disk_cache.STALE_TEMPORARY_SECONDS)
    fresh = cache / f".kernel_8_{'1' * 24}_def456.tmp"   # a writer may be busy with it
    fresh.write_text("being written")
    foreign = cache / "notes.py"
    foreign.write_text("mine")
    victim = tmp_path / "victim.py"
    victim.write_text("keep me")
    link = cache / f"linked_{'2' * 24}.py"
    link.symlink_to(victim)
    folder_like_ours = cache / f"folder_{'3' * 24}.py"
    folder_like_ours.mkdir()
    assert cli.main(["cache", "clear", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "removed 4 files" in out and all(path.name in out for path in ours)
    assert not any(path.exists() for path in ours + [stale])
    assert fresh.exists() and foreign.exists() and folder_like_ours.is_dir()
    assert link.is_symlink() and victim.read_text() == "keep me"


def test_the_cap_evicts_the_least_recently_used(cache, monkeypatch):
    monkeypatch.setenv(disk_cache.ENVIRONMENT, str(8 / 1024))   # 8 KiB
    first = [loader.write_source(f"kernel_{i}", _source(i)) for i in range(6)]
    for age, path in enumerate(reversed(first)):
        _age(path, 1000 + 100 * age)     # kernel_0 oldest
    monkeypatch.setattr(loader, "_WRITTEN", type(loader._WRITTEN)())   # another process
    assert loader.write_source("kernel_0", _source(0)) == first[0]   # reused: used now
    for i in range(6, 9):
        loader.write_source(f"kernel_{i}", _source(i))
    files = disk_cache.cache_files(cache)
    assert sum(file.size for file in files) <= 8 * 1024
    names = {file.path.name for file in files}
    assert first[0].name in names          # used recently, kept
    assert first[1].name not in names      # least recently used, evicted
    # an evicted file wanted again is simply written again
    assert loader.load_module(loader.write_source("kernel_1", _source(1)), False).VALUE == 1


def test_a_write_under_the_cap_does_not_look_at_the_folder(cache, monkeypatch):
    loader.write_source("kernel_first", _source(0))     # the first write looks once
    looked = []
    monkeypatch.setattr(disk_cache, "cache_files",
                        lambda folder: looked.append(folder) or [])
    loader.write_source("kernel_second", _source(1))
    assert looked == []


@pytest.mark.parametrize("value", ["lots", "-5", "nan", "inf"])
def test_a_bad_cap_is_a_clear_error(cache, monkeypatch, capsys, value):
    monkeypatch.setenv(disk_cache.ENVIRONMENT, value)
    with pytest.raises(ValueError, match=disk_cache.ENVIRONMENT):
        disk_cache.max_bytes()
    assert cli.main(["cache", "info"]) == 2
    assert disk_cache.ENVIRONMENT in capsys.readouterr().err


def test_cap_zero_turns_it_off(cache, monkeypatch):
    monkeypatch.setenv(disk_cache.ENVIRONMENT, "0")
    assert disk_cache.max_bytes() is None


def test_a_file_another_process_evicted_first_is_no_error(cache, monkeypatch):
    kept = loader.write_source("kernel_kept", _source(0))
    gone = loader.write_source("kernel_gone", _source(1))
    listed = disk_cache.cache_files(cache)
    gone.unlink()                      # another process got there between scan and unlink
    monkeypatch.setattr(disk_cache, "cache_files", lambda folder: listed)
    removed, _ = disk_cache.evict(cache, cap=1)
    assert [file.path for file in removed] == [kept]
