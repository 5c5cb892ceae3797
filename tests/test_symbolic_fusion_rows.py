"""Row-wise fused reductions as size-generic kernels in symbolic programs
(issue 14 item 4): softmax and log-softmax with their backward, layer and
RMS norms forward and backward, each one kernel (``sized_rows_*``) whose row
count and row length are launch arguments, checked against eager (float64)
at sizes never traced, rows and row length both varying."""

from __future__ import annotations

import pytest
import retrograd
import torch
from checks import assert_close
from torch.fx.experimental.proxy_tensor import make_fx

pytestmark = pytest.mark.usefixtures("cache")

aten = torch.ops.aten


def _fused(function, *examples):
    """``function`` traced with every size symbolic, then fused."""
    from retrograd.symbolic_fusion import fuse_pointwise
    gm = make_fx(function, tracing_mode="symbolic")(*examples)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return fuse_pointwise(gm, "interpret")


def _targets(gm) -> list[str]:
    return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
            if n.op == "call_function" and "sym_size" not in str(n.target)
            and n.target.__name__ != "getitem"]


def softmax_forward(x):
    return aten._softmax(x * 0.5, -1, False)


def softmax_backward(g, y):
    return aten._softmax_backward_data(g, y, -1, g.dtype)


def log_softmax_forward(x):
    return aten._log_softmax(x, -1, False)


def log_softmax_backward(g, y):
    return aten._log_softmax_backward_data(g + 1.0, y, -1, g.dtype)


@pytest.mark.parametrize("function, inputs", [
    (softmax_forward, 1), (softmax_backward, 2), (log_softmax_forward, 1),
    (log_softmax_backward, 2)])
def test_softmax_family_is_one_kernel_for_every_size(function, inputs):
    x64 = lambda *shape: torch.randn(*shape, dtype=torch.float64)
    gm, kernels = _fused(function, *[x64(3, 5) for _ in range(inputs)])
    names = _targets(gm)
    assert kernels == 1 and len(names) == 1 and names[0].startswith("sized_rows_"), names
    for rows, length in ((2, 5), (7, 13), (4, 1100)):   # never traced; 1100 > one block
        tensors = [x64(rows, length) * 4 for _ in range(inputs)]
        if inputs == 2:   # a softmax output as the saved y (its log for log_softmax)
            tensors[1] = tensors[1].softmax(-1)
            tensors[1] = tensors[1].log() if function is log_softmax_backward else tensors[1]
        assert_close(gm(*tensors), function(*tensors), torch.float64)


def masked_softmax(scores, keep):
    """As attention's: scale, a [T, T] mask filled with -inf, softmax decomposed."""
    scores = torch.where(keep, scores / 2.0, torch.tensor(float("-inf")))
    shifted = scores - scores.amax(-1, keepdim=True)
    e = shifted.exp()
    return e / e.sum(-1, keepdim=True)


def test_a_decomposed_masked_softmax_is_one_kernel_with_a_broadcast_mask():
    keep = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    gm, kernels = _fused(masked_softmax, torch.randn(2, 2, 4, 4), keep)
    assert kernels == 1, gm.code
    (call,) = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "").startswith(
        "sized_rows_amax")]
    assert "keep_1_inner" in call.target.source   # the mask's broadcast index
    for batch, tokens in ((3, 4), (1, 6)):
        keep = torch.tril(torch.ones(tokens, tokens, dtype=torch.bool))
        scores = torch.randn(batch, 2, tokens, tokens)
        assert_close(gm(scores, keep), masked_softmax(scores, keep), torch.float32)


class Norms(torch.nn.Module):
    """A layer norm and an RMS norm (both affine) with a product between."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.layer = torch.nn.LayerNorm(width, dtype=torch.float64)
        self.rms = torch.nn.RMSNorm(width, eps=1e-6, dtype=torch.float64)
        self.linear = torch.nn.Linear(width, width, dtype=torch.float64)
        with torch.no_grad():
            for norm in (self.layer, self.rms):
                norm.weight.uniform_(0.5, 1.5)
            self.layer.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.rms(self.linear(self.layer(x))).sin()


def _kernel_files(folder, half: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f"s*-{half}/kernels/sized_rows_*.py"))


def test_layer_and_rms_norm_forward_and_backward_run_as_row_kernels(tmp_path, cache):
    torch.manual_seed(0)
    model, reference = Norms(), Norms()
    reference.load_state_dict(model.state_dict())
    compiled = retrograd.compile(model, executor="interpret", dump_dir=str(tmp_path))
    for batch in (2, 3, 5, 11):   # 2: static; 3: symbolic; 5, 11: never traced
        x = torch.randn(batch, 4, 6, dtype=torch.float64, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        got, want = compiled(x), reference(x2)
        weights = torch.linspace(0.5, 1.5, got.numel(), dtype=torch.float64).view(got.shape)
        (got * weights).sum().backward()
        (want * weights).sum().backward()
        assert_close(got, want, torch.float64)
        assert_close(x.grad, x2.grad, torch.float64, what="input gradient")
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            assert_close(a.grad, b.grad, torch.float64, what=f"{name} gradient")
        model.zero_grad()
        reference.zero_grad()
        files = sorted(p.name for p in cache.rglob("sized_rows_*"))
        if batch == 3:
            traced = files
        assert batch < 3 or files == traced   # one kernel file serves every size
    assert traced and "symbolic" in compiled.reports["forward"]
    forward, backward = _kernel_files(tmp_path, "forward"), _kernel_files(tmp_path, "backward")
    # the layer norm's var_mean and the RMS norm's mean, each with the pointwise around it
    assert [f.split("_")[2] for f in forward] == ["mean", "var"], forward
    assert len(backward) >= 2, backward
    for half in ("forward", "backward"):
        ops = compiled.reports[half]["kernels"]["extern_ops"]
        assert not {"aten.var_mean.correction", "aten.mean.dim", "aten.rsqrt.default",
                    "aten.sum.dim_IntList"} & set(ops), ops


def centred_exp(x, w):
    h = x.mm(w)
    return (h - h.mean(-1, keepdim=True)).exp().mm(w.t()).sum()


def exp_and_scaled(x, w):
    """Two outputs: exp(h) needs no reduction, h * sum(h) needs one; if exp(h)
    were stored in the first loop over h's slot, the second would read it."""
    h = x.mm(w)
    first, second = h.exp(), h * h.sum(-1, keepdim=True)
    return (first.mm(w.t()) * 2 + second.mm(w.t())).sum()


@pytest.mark.parametrize("function", [centred_exp, exp_and_scaled])
def test_a_group_writes_an_output_over_its_dying_input_safely(function):
    """A row kernel's full-shape output may take its dying input's arena slot:
    stores happen in the last loop only, after every reduction read the row."""
    from retrograd.symbolic_runner import ArenaRunner
    gm, kernels = _fused(function, torch.randn(4, 6), torch.randn(6, 8))
    assert kernels >= 1
    runner = ArenaRunner(gm)
    overs = [v.over for v in runner.planner.values.values() if v.node.startswith("getitem")]
    assert "mm" in overs, overs   # a kernel output over the product it reads
    w = torch.randn(6, 8)
    for rows in (5, 33):
        x = torch.randn(rows, 6)
        assert_close(runner([x, w]), function(x, w), torch.float32)


def sum_then_overwrite(x, b):
    s = b.sum(-1, keepdim=True)   # reads b before the copy below writes it
    b.copy_(x)
    return x * s


def test_a_group_is_never_moved_past_a_write_to_what_it_reads():
    """A node reading none of a group stays before the group's kernel, unless
    it writes a tensor: ``b.copy_`` between b's row sum and its reader."""
    gm, _ = _fused(sum_then_overwrite, torch.randn(3, 5), torch.randn(3, 5))
    for rows in (4, 6):
        x, b = torch.randn(rows, 5), torch.randn(rows, 5)
        want = sum_then_overwrite(x.clone(), b.clone())
        assert_close(gm(x, b), want, torch.float32)
