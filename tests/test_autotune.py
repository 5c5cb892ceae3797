"""Autotuning of pointwise and reduction block sizes (runtime/autotune.py,
compiler/kernel_tuning.py).

On a CPU the tuning runs only when forced (``autotune=True``): its wall
times under the interpreter mean nothing, so these tests check the
mechanism -- every candidate runs and must be exact, the winner is what the
program runs, the record says what was tried, a second compile reads the
cache -- with a timer the test controls where the winner matters.
"""

from __future__ import annotations

import re

import pytest
import retrograd
import torch
from checks import assert_close
from retrograd import kernel_tuning
from retrograd.runtime import autotune


def test_tune_keeps_the_fastest_exact_candidate_and_caches_it(cache):
    times = {1: 3.0, 2: 1.0, 3: 0.5, 4: 2.0}
    calls = []

    def measure(config):
        calls.append(config["n"])
        return times[config["n"]], [7 if config["n"] != 3 else 8]   # 3 is fast and wrong
    candidates = [{"n": n} for n in (1, 2, 3, 4)]
    record = autotune.tune("test_tuning", {"kernel": "k"}, candidates, measure,
                           lambda a, b: a == b)
    assert record["config"] == {"n": 2} and record["cache"] == "miss"
    assert [entry["config"]["n"] for entry in record["tried"]] == [1, 2, 4]
    assert record["rejected"] == [{"config": {"n": 3},
                                   "why": "outputs differ from the default's"}]
    again = autotune.tune("test_tuning", {"kernel": "k"}, candidates, measure,
                          lambda a, b: a == b)
    assert again["cache"] == "hit" and again["config"] == {"n": 2}
    assert calls == [1, 2, 3, 4], "a cache hit measures nothing"


def test_tune_stops_at_its_time_budget(cache):
    record = autotune.tune("test_tuning", {"kernel": "budget"}, [{"n": 1}, {"n": 2}],
                           lambda config: (1.0, None), lambda a, b: True, budget=0.0)
    assert record["config"] == {"n": 1} and len(record["tried"]) == 1
    assert record["stopped"] == "time cap 0.0s reached after 1 configs"


def test_candidates_stay_within_the_kernel():
    assert kernel_tuning.pointwise_candidates(1024, 1 << 20) == [
        {"block": b} for b in (1024, 256, 512, 2048, 4096)]
    assert kernel_tuning.pointwise_candidates(64, 50) == [{"block": b} for b in (64, 16, 32)]
    assert kernel_tuning.reduction_candidates(4, 32, 4, 32) == [
        {"rows": 4, "r_block": 32}, {"rows": 2, "r_block": 32}, {"rows": 4, "r_block": 16}]
    # a GPU rule's 4 x 1024 tile: doubled once, never past 8192 elements
    assert kernel_tuning.reduction_candidates(4, 1024, 1 << 16, 1 << 16) == [
        {"rows": a, "r_block": b} for a, b in ((4, 1024), (8, 1024), (2, 1024), (4, 2048),
                                               (4, 512))]
    assert {"rows": 16, "r_block": 1024} not in kernel_tuning.reduction_candidates(
        8, 1024, 1 << 16, 1 << 16)


def test_warps_cross_the_blocks_within_the_tile_and_the_bound():
    blocks = kernel_tuning.pointwise_candidates(1024, 1 << 20)
    crossed = kernel_tuning.with_warps(blocks, lambda c: c["block"])
    assert crossed[:4] == [{"block": 1024, "num_warps": w} for w in (4, 1, 2, 8)]
    assert crossed[4:8] == [{"block": b, "num_warps": 4} for b in (256, 512, 2048, 4096)]
    assert len(crossed) == 20 == kernel_tuning.MAX_CANDIDATES
    assert len({tuple(sorted(c.items())) for c in crossed}) == 20
    # a 16-element block: at most one thread per element, Triton's default 4 kept
    small = kernel_tuning.with_warps([{"block": 64}, {"block": 16}], lambda c: c["block"])
    assert small == [{"block": 64, "num_warps": w} for w in (4, 1, 2)] + [
        {"block": 16, "num_warps": 4}, {"block": 16, "num_warps": 1}]
    tiles = kernel_tuning.with_warps(kernel_tuning.reduction_candidates(4, 32, 4, 32),
                                     lambda c: c["rows"] * c["r_block"])
    assert {"rows": 4, "r_block": 32, "num_warps": 8} not in tiles   # 256 threads, 128 elements
    assert {"rows": 4, "r_block": 32, "num_warps": 2} in tiles


def _function(x, w):
    return torch.relu(x * w + 1).sum(dim=1), w.cos() * 3


def _codegen(compiled) -> dict:
    report = compiled.reports["forward"]
    return next(p for p in report["passes"] if p["name"] == "codegen")["stats"]


def test_not_tuned_on_cpu_by_default(cache):
    compiled = retrograd.compile(_function, executor="interpret")
    compiled(torch.randn(4, 8), torch.randn(8))
    summary = _codegen(compiled)["autotune"]
    assert summary["enabled"] is False and summary["kernels"] == {}
    assert summary["reason"].startswith("cpu: tuned only on CUDA by default")


def test_forced_autotune_runs_exact_candidates_and_a_second_compile_hits_the_cache(cache):
    x, w = torch.randn(8, 32), torch.randn(32)
    first = retrograd.compile(_function, executor="interpret", autotune=True)
    for got, want in zip(first(x, w), _function(x, w)):
        assert_close(got, want, torch.float32)
    records = _codegen(first)["autotune"]["kernels"]
    assert records, "no kernel was tuned"
    families = {"block" in r["config"] for r in records.values()}
    assert families == {True, False}, "a pointwise and a reduction kernel are tuned"
    for name, record in records.items():
        assert record["cache"] == "miss" and record["rejected"] == [], name
        assert len(record["tried"]) >= 2 and record["stopped"] is None, name
    second = retrograd.compile(_function, executor="interpret", autotune=True)
    second(x, w)
    again = _codegen(second)["autotune"]["kernels"]
    assert {name: r["cache"] for name, r in again.items()} == {name: "hit" for name in records}
    assert {n: r["config"] for n, r in again.items()} == {n: r["config"]
                                                         for n, r in records.items()}


def test_the_winner_is_what_the_program_runs(cache, monkeypatch, tmp_path):
    """Times that make the smallest block fastest: the program's kernel is
    written with it, and still computes eager's numbers."""
    original = kernel_tuning.Tuner._measure

    def measure(self, kernel, source, tensors):
        _, outputs = original(self, kernel, source, tensors)
        return float(re.search(r"BLOCK=(\d+)[,)]", source).group(1)), outputs
    monkeypatch.setattr(kernel_tuning.Tuner, "_measure", measure)
    x, w = torch.randn(8, 40), torch.randn(40)
    compiled = retrograd.compile(lambda x, w: (x * w).exp() - 1, executor="interpret",
                                 autotune=True, dump_dir=str(tmp_path / "dump"))
    assert_close(compiled(x, w), (x * w).exp() - 1, torch.float32)
    [(name, record)] = _codegen(compiled)["autotune"]["kernels"].items()
    block = record["config"]["block"]
    assert block == min(entry["config"]["block"] for entry in record["tried"])
    assert block != record["default"]["block"]
    sources = [p.read_text() for p in (tmp_path / "dump").rglob("*.py") if name in p.name]
    assert sources and all(re.search(f"BLOCK={block}[,)]", text) for text in sources), sources


def _launched_warps(monkeypatch) -> list[tuple[str, object]]:
    """(kernel, num_warps) of every launch Triton's interpreter receives."""
    from triton.runtime.interpreter import InterpretedFunction
    launches, run = [], InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn.__name__, kwargs.get("num_warps")))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", recording)
    return launches


def test_the_chosen_num_warps_reaches_the_launch_the_cache_and_the_report(cache, monkeypatch):
    """A timer that prefers two warps: every tuned kernel (pointwise and
    reduction) is launched with ``num_warps=2``, the record says so, a second
    compile reads it from the cache, and the numbers stay eager's."""
    original = kernel_tuning.Tuner._measure

    def measure(self, kernel, source, tensors):
        _, outputs = original(self, kernel, source, tensors)
        return (1.0 if "num_warps=2)" in source else 2.0), outputs
    monkeypatch.setattr(kernel_tuning.Tuner, "_measure", measure)
    launches = _launched_warps(monkeypatch)
    x, w = torch.randn(4, 128), torch.randn(128)   # tiles of 128 and 512: two warps fit
    for attempt in ("miss", "hit"):
        compiled = retrograd.compile(_function, executor="interpret", autotune=True)
        compiled(x, w)
        launches.clear()
        for got, want in zip(compiled(x, w), _function(x, w)):
            assert_close(got, want, torch.float32)
        records = _codegen(compiled)["autotune"]["kernels"]
        assert len(records) == 2 and {r["cache"] for r in records.values()} == {attempt}
        assert all(r["config"]["num_warps"] == 2 for r in records.values()), records
        assert sorted(launches) == sorted((name, 2) for name in records), launches
    stored = [p.read_text() for p in cache.rglob("block_tuning_*.py")]
    assert len(stored) == 2 and all("'num_warps': 2" in text for text in stored)


def test_untuned_kernels_launch_with_tritons_default_warps(cache, monkeypatch):
    launches = _launched_warps(monkeypatch)
    compiled = retrograd.compile(_function, executor="interpret", autotune=False)
    compiled(torch.randn(4, 8), torch.randn(8))
    assert launches and {warps for _, warps in launches} == {None}


def test_a_kernel_that_differs_only_in_names_reads_the_same_record(cache):
    """Another program whose kernel computes the same thing under other names
    (one repeated block of a model, another graph) is not tuned again."""
    x, m = torch.randn(6, 5), torch.randn(5, 7)
    first = retrograd.compile(lambda a: (a.exp() * 2).sum(1), executor="interpret",
                              autotune=True)
    first(x @ m)
    second = retrograd.compile(lambda x, m: ((x @ m).exp() * 2).sum(1), executor="interpret",
                               autotune=True)
    assert_close(second(x, m), ((x @ m).exp() * 2).sum(1), torch.float32)
    [before] = _codegen(first)["autotune"]["kernels"].values()
    [after] = _codegen(second)["autotune"]["kernels"].values()
    assert (before["cache"], after["cache"]) == ("miss", "hit")
    assert after["config"] == before["config"]


def test_the_program_budget_leaves_later_kernels_at_the_rule(cache, monkeypatch):
    monkeypatch.setattr(kernel_tuning, "PROGRAM_BUDGET_SECONDS", 0.0)
    compiled = retrograd.compile(_function, executor="interpret", autotune=True)
    compiled(torch.randn(4, 8), torch.randn(8))
    records = _codegen(compiled)["autotune"]["kernels"]
    assert records and all(r["skipped"] == "the program's tuning budget (0.0s) is spent"
                           for r in records.values())


def test_a_failing_candidate_is_rejected_with_its_error(cache):
    def measure(config):
        if config["n"] == 2:
            raise RuntimeError("out of resources: shared memory")
        return float(config["n"]), [1]
    record = autotune.tune("test_tuning", {"kernel": "fails"}, [{"n": 1}, {"n": 2}, {"n": 3}],
                           measure, lambda a, b: a == b)
    assert record["config"] == {"n": 1}
    assert record["rejected"] == [{"config": {"n": 2}, "why": "failed: RuntimeError: out of "
                                                              "resources: shared memory"}]


@pytest.mark.gpu
def test_gpu_autotune_is_on_by_default_exact_and_cached(cache):
    x, w = torch.randn(64, 1000, device="cuda"), torch.randn(1000, device="cuda")
    first = retrograd.compile(_function)
    for got, want in zip(first(x, w), _function(x, w)):
        assert_close(got, want, torch.float32)
    summary = _codegen(first)["autotune"]
    assert summary["enabled"] and summary["kernels"]
    assert all(r["cache"] == "miss" and r["rejected"] == [] for r in summary["kernels"].values())
    assert all(r["config"]["num_warps"] in kernel_tuning.WARPS
               for r in summary["kernels"].values()), "each winner names its warps"
    second = retrograd.compile(_function)
    second(x, w)
    assert all(r["cache"] == "hit" for r in _codegen(second)["autotune"]["kernels"].values())
