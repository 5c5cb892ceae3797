"""Offload, the third choice beside save and recompute (passes/offload.py).

On the CPU the "device" copy and the host copy are both CPU tensors, so
these tests check what is device-independent: values and gradients against
eager on both faces and compile_step, the graph the pass writes (copy out,
prefetch, reload), the report (saved bytes on the device fall by the
offloaded bytes, the ledger says "offloaded" and why), the option's checks,
and the bandwidth model's choices. Speed needs a GPU: not measured here.
"""

from __future__ import annotations

import pytest
import retrograd
import torch
import torch.nn.functional as F
from checks import (
    assert_close,
    check_against_eager,
    compile_with,
    eager_step,
    record_graphs,
    relative_error,
)
from retrograd.options import Options
from retrograd.passes.planning import offload as model
from retrograd.passes.planning.patterns import PatternError
from retrograd.runtime import offload as copies
from retrograd.runtime.device import device_of
from torch import nn


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def _offload_stats(report: dict) -> dict:
    return next(p["stats"] for p in report["passes"] if p["name"] == "offload")


def _run(face: str, monkeypatch, x, **options):
    """Forward and backward of ``_mlp`` through ``face``: (output, the
    module's gradients, the forward report)."""
    graphs = record_graphs(monkeypatch)
    net = _mlp()
    compiled = compile_with(face, net, **options)
    out = compiled(x)
    out.sum().backward()
    report = compiled.reports["forward"] if face == "standalone" else graphs[-1].reports["forward"]
    return out, [p.grad for p in net.parameters()], report


def test_offloaded_activations_give_eager_values_and_gradients():
    """Both tanh outputs (what the min-cut saves) cross as host copies."""
    torch.manual_seed(1)
    x, weight = torch.randn(4, 8), torch.randn(16, 8)
    compiled = check_against_eager(lambda x, w: torch.tanh(x @ w.t()).sin() @ w, x, weight,
                                   offload=["tanh"])
    stats = _offload_stats(compiled.reports["forward"])
    assert stats["offloaded"] == ["tanh"] and stats["offloaded_bytes"] == 4 * 16 * 4
    assert copies.pending() == 0   # every prefetched copy was reloaded


@pytest.mark.parametrize("face", ["standalone", "torch.compile"])
def test_both_faces_match_eager_and_report_the_offload(face, monkeypatch, fresh_dynamo):
    """Numbers as eager's; the device's saved bytes fall by exactly the
    offloaded bytes; the ledger rows say offloaded, with the pattern."""
    x = torch.randn(4, 8)
    reference = _mlp()
    expected = reference(x)
    expected.sum().backward()
    _, _, before = _run(face, monkeypatch, x, executor="fx")
    out, grads, report = _run(face, monkeypatch, x, offload=["tanh"])
    assert_close(out, expected, torch.float32)
    for got, want in zip(grads, [p.grad for p in reference.parameters()], strict=True):
        assert_close(got, want, torch.float32, "gradient")
    stats = _offload_stats(report)
    assert sorted(stats["offloaded"]) == ["tanh", "tanh_1"]
    assert stats["offloaded_bytes"] == 2 * 4 * 16 * 4
    assert report["memory"]["saved_activation_bytes"] == \
        before["memory"]["saved_activation_bytes"] - stats["offloaded_bytes"]
    rows = {row["name"]: row for row in report["ledger"]}
    for name in ("tanh", "tanh_1"):
        assert (rows[name]["decision"], rows[name]["reason"]) == ("offloaded", "offload=tanh")
    saved = sum(row["bytes"] for row in rows.values() if row["decision"] == "saved")
    assert saved == report["memory"]["saved_activation_bytes"]


def test_verify_checks_every_stage_with_offload():
    """verify=True runs the halves and programs with the copies (synchronous
    there) and finds no stage that changes the numbers."""
    net = _mlp()
    compiled = retrograd.compile(net, offload=["addmm", "tanh"], verify=True)
    compiled(torch.randn(4, 8)).sum().backward()
    assert _offload_stats(compiled.reports["backward"])["offloaded"]


def test_the_forward_frees_the_device_copy_and_the_backward_reads_it_back(tmp_path):
    """The forward's program returns the host copy (not the activation) and
    frees the activation; the backward prefetches then reloads it before
    its first reader, which reads the reloaded value."""
    compiled = retrograd.compile(_mlp(), offload=["tanh"], dump_dir=str(tmp_path))
    compiled(torch.randn(4, 8)).sum().backward()
    forward = next(tmp_path.glob("*-forward/program.py")).read_text()
    backward = next(tmp_path.glob("*-backward/program.py")).read_text()
    returned = forward.rsplit("return [", 1)[1]
    assert "offload_tanh" in returned and " tanh," not in returned and " tanh]" not in returned
    assert forward.count("torch.ops.retrograd.offload.default(") == 2
    for name in ("tanh", "tanh_1"):
        prefetch = backward.index(f"prefetch_{name} = torch.ops.retrograd.prefetch")
        reload = backward.index(f"reload_{name} = torch.ops.retrograd.reload")
        first_reader = backward.index(f"reload_{name})", reload + 1)   # read by a kernel
        assert prefetch < reload < first_reader


def test_compile_step_with_offload_matches_an_eager_loop():
    compiled_model, eager_model = _mlp(), _mlp()
    loss = lambda m, x, y: F.cross_entropy(m(x), y)
    compiled_opt = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.1)
    step = retrograd.compile_step(compiled_model, loss, compiled_opt, offload=["tanh"])
    torch.manual_seed(2)
    for _ in range(2):
        x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
        got = step(x, y)
        want = eager_step(eager_model, eager_opt, loss, x, y)
        assert relative_error(got.detach(), want.detach()) < 1e-5
    for p, q in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        assert relative_error(p.detach(), q.detach()) < 1e-5
    report = step.reports["step"]
    stats = _offload_stats(report)
    assert sorted(stats["offloaded"]) == ["tanh", "tanh_1"]
    rows = {row["name"]: row["decision"] for row in report["ledger"]}
    assert rows["tanh"] == rows["tanh_1"] == "offloaded"
    checkpoint = next(p["stats"] for p in report["passes"] if p["name"] == "checkpoint")
    assert report["memory"]["saved_activation_bytes"] == \
        checkpoint["saved_activation_bytes"] - stats["offloaded_bytes"]


def test_a_named_value_the_min_cut_would_recompute_is_saved_and_offloaded():
    """offload= implies save=: ``sin`` (cheap, recomputed by default) is
    saved, on the host."""
    torch.manual_seed(3)
    def fn(x):
        y = x.sin()
        return (y * y.exp()).sum()
    default = retrograd.compile(fn, executor="fx")
    default(torch.randn(8, requires_grad=True)).backward()
    assert not any(row["name"] == "sin" and row["decision"] == "saved"
                   for row in default.reports["forward"]["ledger"])
    compiled = check_against_eager(fn, torch.randn(8), offload=["sin"])
    assert "sin" in _offload_stats(compiled.reports["forward"])["offloaded"]


def test_on_the_cpu_nothing_is_offloaded_by_default():
    compiled = retrograd.compile(_mlp(), executor="fx")
    compiled(torch.randn(4, 8)).sum().backward()
    report = compiled.reports["forward"]
    stats = _offload_stats(report)
    assert stats["offloaded"] == [] and stats["choice"] == "auto (bandwidth model)"
    assert all(row["decision"] != "offloaded" for row in report["ledger"])


def test_disabling_the_pass_turns_it_off():
    compiled = retrograd.compile(_mlp(), executor="fx", disable=["offload"])
    compiled(torch.randn(4, 8)).sum().backward()
    assert all(p["name"] != "offload" for p in compiled.reports["forward"]["passes"])


def test_a_value_that_cannot_be_offloaded_is_kept_and_said_why():
    """A saved view (the transpose of x @ w) is not offloaded: its base holds
    the storage, and a copy of the view would free nothing."""
    torch.manual_seed(4)
    fn = lambda x, w: (x @ w).t().sin().sum()
    compiled = retrograd.compile(fn, executor="fx", offload=["permute", "mm"])
    compiled(torch.randn(4, 8), torch.randn(8, 6, requires_grad=True)).backward()
    stats = _offload_stats(compiled.reports["forward"])
    assert stats["offloaded"] == []
    assert "a view (its base holds the storage)" in stats["kept"].values()


# -- the option -----------------------------------------------------------------
def test_a_typo_in_an_offload_pattern_is_refused_with_close_names():
    compiled = retrograd.compile(_mlp(), executor="fx", offload=["tanhh"])
    with pytest.raises(PatternError, match=r"offload pattern 'tanhh'.*'tanh'"):
        compiled(torch.randn(4, 8))


@pytest.mark.parametrize("options, message", [
    ({"offload": ["mm"], "recompute": ["aten.mm.default"]}, "both offload and recompute"),
    ({"offload": [3]}, "op names or fx node names"),
    ({"offload": ["tanh"], "disable": ["offload"]}, "disable names the offload pass"),
])
def test_bad_offload_options_are_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        Options.from_mapping(options)


def test_one_string_is_one_pattern():
    assert Options(offload="tanh").offload == ("tanh",)


# -- the bandwidth model ----------------------------------------------------------
MIB = 1 << 20


def _candidate(name, mib, ready=0.0, deadline=1.0, dear=True) -> model.Candidate:
    return model.Candidate(name, mib * MIB, ready, deadline, dear)


def test_the_model_offloads_large_dear_values_whose_copies_hide():
    copy = model.copy_seconds(64 * MIB)   # ~2.7 ms each way
    big = _candidate("big", 64, ready=0.0, deadline=2 * copy)
    cheap = _candidate("cheap", 64, dear=False)
    small = _candidate("small", 0.5)
    late = _candidate("late", 64, ready=10 * copy)   # copy out past the forward's end
    chosen = model.choose([big, cheap, small, late], forward_seconds=3 * copy)
    assert [c.name for c in chosen] == ["big"]


def test_the_model_shares_one_link_among_the_copies():
    """Two copies that each hide alone do not hide together: one is kept."""
    copy = model.copy_seconds(64 * MIB)
    first = _candidate("a", 64, deadline=1.5 * copy)
    second = _candidate("b", 64, deadline=1.5 * copy)
    assert model.feasible([first], 2 * copy) and model.feasible([second], 2 * copy)
    assert not model.feasible([first, second], 2 * copy)
    assert len(model.choose([first, second], 2 * copy)) == 1


def test_copies_back_start_as_late_as_the_link_allows():
    copy = model.copy_seconds(64 * MIB)
    starts = model.latest_starts([_candidate("a", 64, deadline=5 * copy),
                                  _candidate("b", 64, deadline=5.5 * copy)])
    assert starts["b"] == pytest.approx(4.5 * copy)
    assert starts["a"] == pytest.approx(3.5 * copy)   # must end before b's copy starts


def test_a_program_on_a_device_is_not_run_on_the_host_of_its_offloaded_inputs():
    """A backward's first inputs may be host copies: the device is the first
    input not on the CPU (meta stands in for CUDA here)."""
    host, device = torch.zeros(2), torch.zeros(2, device="meta")
    assert device_of([host, 3, device]) == torch.device("meta")
    assert device_of([host]) == torch.device("cpu")


def test_the_automatic_choice_offloads_dear_values_where_the_model_hides_the_copy(monkeypatch):
    """The CUDA path of the pass, on the CPU: with the graph taken for a CUDA
    one and a link fast enough for these tiny tensors, the matrix products'
    outputs (dear) are offloaded and the tanh outputs (cheap) are not."""
    from retrograd.passes import offload as offload_pass
    monkeypatch.setattr(offload_pass, "_on_cuda", lambda items: True)
    monkeypatch.setattr(model, "MIN_BYTES", 0)
    monkeypatch.setattr(model, "PCIE_BYTES", 1e18)
    torch.manual_seed(5)
    inputs = torch.randn(4, 8), torch.randn(8, 16), torch.randn(16, 4), torch.randn(4, 4)
    fn = lambda x, a, b, c: ((x @ a).sin() @ b).tanh() @ c
    compiled = check_against_eager(fn, *inputs)
    stats = _offload_stats(compiled.reports["forward"])
    # x @ a is read late in the backward; tanh is saved too but cheap to recompute
    assert stats["offloaded"] == ["mm"] and stats["choice"] == "auto (bandwidth model)"
    assert stats["reasons"]["mm"].startswith("auto: dear to recompute (1024 FLOPs)")
    monkeypatch.setattr(model, "PCIE_BYTES", 1.0)   # a copy that never hides: nothing
    compiled = check_against_eager(fn, *inputs)
    assert _offload_stats(compiled.reports["forward"])["offloaded"] == []


def test_a_named_op_that_does_not_cross_to_the_backward_is_said_so():
    """In a tanh network the backward reads the tanh outputs, not the
    products: offload=["addmm"] offloads nothing and says why."""
    compiled = retrograd.compile(_mlp(), executor="fx", offload=["addmm"])
    compiled(torch.randn(4, 8)).sum().backward()
    stats = _offload_stats(compiled.reports["forward"])
    assert stats["offloaded"] == []
    assert set(stats["kept"]) == {"addmm", "addmm_1", "addmm_2"}
    assert set(stats["kept"].values()) == {
        "not saved for the backward (recomputed there, or not read)"}


@pytest.mark.gpu
def test_on_cuda_the_device_holds_less_between_forward_and_backward():
    """The CUDA path (pinned memory, side stream, prefetch): eager's
    gradients, and the bytes held between forward and backward fall by the
    offloaded bytes (measured by the caching allocator, not the report)."""
    torch.manual_seed(0)
    x = torch.randn(512, 256, device="cuda")
    reference = _wide("cuda")
    reference(x).sum().backward()
    held, grads = {}, {}
    for name, options in (("kept", {"disable": ["offload"]}), ("offloaded", {"offload": ["mm",
                                                                                      "addmm"]})):
        net = _wide("cuda")
        compiled = retrograd.compile(net, **options)
        compiled(x).sum().backward()   # compiles both halves
        net.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = compiled(x)
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")   # a malloc frees the blocks whose copies ended
        held[name] = torch.cuda.memory_allocated() - before
        out.sum().backward()
        grads[name] = [p.grad for p in net.parameters()]
        stats = _offload_stats(compiled.reports["forward"]) if name == "offloaded" else None
    assert stats["offloaded_bytes"] > 0 and copies.pending() == 0
    assert held["offloaded"] <= held["kept"] - stats["offloaded_bytes"]
    for got in grads.values():
        for mine, want in zip(got, [p.grad for p in reference.parameters()], strict=True):
            assert_close(mine, want, torch.float32, "gradient")


def _wide(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(),
                         nn.Linear(1024, 8)).to(device)


@pytest.mark.parametrize("name", ["cnn", "attention_block",
                                  pytest.param("gpt2_tiny", marks=pytest.mark.slow),
                                  pytest.param("lora", marks=pytest.mark.slow)])
def test_the_automatic_choice_keeps_the_zoo_right(name, monkeypatch):
    """The CUDA choice on CPU graphs of every kind (convolutions, batch norm,
    attention, embeddings, LoRA): with a link fast enough to offload whatever
    is dear, the model's walk over every node runs and the numbers stay
    eager's (fx executor: the passes' graphs, run with torch ops)."""
    import copy

    from retrograd.passes import offload as offload_pass
    from zoo import ZOO, assert_parity, training_step
    monkeypatch.setattr(offload_pass, "_on_cuda", lambda items: True)
    monkeypatch.setattr(model, "MIN_BYTES", 0)
    monkeypatch.setattr(model, "PCIE_BYTES", 1e18)
    entry = ZOO[name]
    torch.manual_seed(0)
    net, inputs = entry.model(), entry.inputs()
    reference = copy.deepcopy(net)
    compiled = retrograd.compile(net, executor="fx")
    got = training_step(entry, compiled, net, inputs)
    assert_parity(got, training_step(entry, reference, reference, inputs), tolerance=1e-5)
    stats = _offload_stats(compiled.reports["forward"])
    assert stats["offloaded"], stats
    assert all(reason.startswith("auto: dear") for reason in stats["reasons"].values())
    assert copies.pending() == 0


def test_the_ledger_says_why_a_named_value_stayed_on_the_device():
    """A value the user also gets back cannot leave the device: its ledger
    row stays saved and says why."""
    torch.manual_seed(6)

    def fn(x, w):
        hidden = torch.tanh(x @ w)
        return hidden, (hidden * hidden).sum()

    compiled = retrograd.compile(fn, executor="fx", offload=["tanh"])
    _, loss = compiled(torch.randn(4, 8), torch.randn(8, 6, requires_grad=True))
    loss.backward()
    row = next(r for r in compiled.reports["forward"]["ledger"] if r["name"] == "tanh")
    assert row["decision"] == "saved"
    assert row["reason"].endswith("; not offloaded: returned to the caller too")


def test_explain_counts_offloaded_values_apart(tmp_path, capsys):
    """``retrograd explain``: offloaded rows are neither saved on the device
    nor recomputed; the header gives their count and bytes."""
    from retrograd import cli
    from retrograd.explain import group
    compiled = retrograd.compile(_mlp(), executor="fx", offload=["tanh"], dump_dir=str(tmp_path))
    compiled(torch.randn(4, 8)).sum().backward()
    report = compiled.reports["forward"]
    _, totals = group(report["ledger"])
    assert (totals["offloaded"], totals["offloaded_bytes"]) == (2, 2 * 4 * 16 * 4)
    assert totals["saved_bytes"] == report["memory"]["saved_activation_bytes"]
    assert totals["recomputed"] == sum(r["decision"] == "recomputed" for r in report["ledger"])
    cli.main(["explain", str(tmp_path)])
    assert "2 offloaded to host memory (512 bytes)" in capsys.readouterr().out


def test_reload_returns_the_copy_its_prefetch_made():
    """The ops alone: offload gives a separate contiguous host copy;
    prefetch's token names its copy until reload takes it (while the token
    is alive, so reload found it by the token, not by the fallback)."""
    x = torch.randn(6, 4).t()   # strided
    ops = torch.ops.retrograd
    host = ops.offload.default(x, True)
    assert host.is_contiguous() and host.untyped_storage().data_ptr() != \
        x.untyped_storage().data_ptr() and torch.equal(host, x)
    token = ops.prefetch.default(host, list(x.shape), list(x.stride()), x.device, None, True)
    assert copies.pending() == 1
    back = ops.reload.default(host, token, list(x.shape), list(x.stride()), x.device)
    assert copies.pending() == 0 and token is not None
    assert torch.equal(back, x) and back.stride() == x.stride()
    assert back.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()


def test_offloaded_convolution_activations_keep_the_cnn_right():
    """The layout pass lays a CNN's saved activations out channels-last for
    the backward; offloaded ones cross contiguous and come back in the
    strides the backward was planned with (generated kernels, interpreter)."""
    import copy

    from zoo import ZOO, assert_parity, training_step
    entry = ZOO["cnn"]
    torch.manual_seed(0)
    net, inputs = entry.model(), entry.inputs()
    reference = copy.deepcopy(net)
    compiled = retrograd.compile(net, executor="interpret", offload=["relu"])
    got = training_step(entry, compiled, net, inputs)
    assert_parity(got, training_step(entry, reference, reference, inputs), tolerance=1e-5)
    assert sorted(_offload_stats(compiled.reports["forward"])["offloaded"]) == ["relu", "relu_1"]
