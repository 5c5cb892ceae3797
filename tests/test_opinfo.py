"""PyTorch's OpInfo database against retrograd, forward and backward.

For every OpInfo whose op is, or decomposes into, aten ops that codegen
claims to lower (``retrograd.codegen.lowered_ops()``), a few of its float32
CPU sample inputs run through ``retrograd.compile`` (the whole pipeline:
capture, decompositions, passes, generated Triton under the interpreter) and
through eager PyTorch, and the two must agree (``test_opinfo``):

- every output: exact for integer and boolean outputs; for floats the same
  NaN and inf positions and ``||got - ref|| / ||ref|| < 1e-4`` on the rest
  (where float32 eager is itself far from the float64 result, retrograd may
  differ from eager as long as it is as close to float64, see
  ``opinfo_harness.compare``);
- the gradient of every differentiable tensor input, for one random upstream
  gradient (``randn_like`` of each float output) shared by both runs;
- at least one sample of each OpInfo ran a generated Triton kernel
  (``kernels.triton`` of the forward or backward report), so a claim that
  silently falls back to extern calls fails here.

The function under test is a closure over the sample's non-tensor arguments
(retrograd specializes on them anyway) taking the tensors positionally.
Samples with zero-size or large (> ``opinfo_harness.MAX_NUMEL`` elements) tensors, complex
tensors, samples that eager itself rejects (forward or backward) and the few
retrograd does not take by design (UNSUPPORTED) are left out; an OpInfo with
no usable sample is skipped with the reasons. OpInfos whose op has no float32
support (the bitwise ops) run their integer samples instead.

OpInfo samples are finite, so ``test_opinfo_special_values`` also runs the
elementwise OpInfos forward on every pair of special values (infinities, NaN,
signed zeros, huge and tiny numbers), element by element.

Beyond this list, ``test_opinfo_database_sample`` draws 25 OpInfos of the
whole database (every one with a float32 backward) with a seed from the date
or ``RETROGRAD_OPINFO_SEED`` (printed in the test id) and runs one sample of
each through both faces: it fails on a wrong value or gradient and on an
internal crash (a clean UnsupportedError and extern-only runs are fine).
``benchmarks/opinfo_sweep.py`` runs the whole database (docs/opinfo.md).
The comparison and sample helpers live in ``opinfo_harness.py``.

Runtime: each sample compiles a forward and a backward graph (~0.3 s each)
and launches a few interpreted kernels, so samples are capped per OpInfo
(MAX_SAMPLES), picked spread over the OpInfo's list for variety.
"""

from __future__ import annotations

import datetime
import itertools
import os
import random

import pytest
import torch

# (the OpInfo database imports expecttest: a test dependency in pyproject.toml)
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.opinfo.core import BinaryUfuncInfo, UnaryUfuncInfo

import opinfo_harness as harness
import retrograd

TOLERANCE = harness.TOLERANCE
MAX_SAMPLES = 3
#: samples considered per OpInfo (max_pool2d alone has 1440)
MAX_CONSIDERED = 400

#: (OpInfo name, variant) -> why it is expected to fail (none at present).
XFAIL: dict[tuple[str, str], str] = {}

#: OpInfos whose op is, or decomposes into, ops listed by ``lowered_ops()``.
NAMES = [
    # arithmetic
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "neg", "reciprocal",
    "pow", "float_power", "square", "remainder", "abs", "sign", "sgn", "clone", "lerp",
    "addcmul", "addcdiv", "xlogy",
    # unary math
    "exp", "exp2", "expm1", "log", "log2", "log1p", "sqrt", "rsqrt", "sigmoid", "tanh", "erf",
    "sin", "cos", "floor", "ceil", "trunc",
    # clamps, min/max, selection
    "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "max", "min", "where",
    "masked_fill", "nan_to_num",
    # comparisons and logic
    "eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf",
    "logical_and", "logical_or", "logical_xor", "logical_not",
    "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not",
    # fills
    "zeros_like", "ones_like", "full_like", "fill",
    # activations
    "nn.functional.relu", "nn.functional.gelu", "nn.functional.silu", "nn.functional.elu",
    "nn.functional.leaky_relu", "nn.functional.softplus", "nn.functional.hardswish",
    "nn.functional.hardsigmoid", "nn.functional.mish", "nn.functional.glu",
    # reductions
    "sum", "mean", "amax", "amin", "prod", "var", "var_mean", "std", "std_mean",
    "argmax", "argmin", "any", "all", "logsumexp",
    # normalizations and losses
    "softmax", "log_softmax", "nn.functional.softmin", "nn.functional.layer_norm",
    "nn.functional.rms_norm", "nn.functional.group_norm", "nn.functional.batch_norm",
    "nn.functional.cross_entropy", "nn.functional.mse_loss",
    # indexing and scatter
    "nn.functional.embedding", "gather", "index_select", "cat", "stack",
    "select_scatter", "slice_scatter", "scatter", "scatter_add", "index_put",
    "nn.functional.pad", "flip", "__getitem__",
    # scans
    "cumsum",
    # pooling
    "nn.functional.max_pool2d", "nn.functional.avg_pool2d",
]

#: Variants that exercise something else (complex math, other padding modes,
#: a path that needs cuDNN).
SKIP_VARIANTS = {("nn.functional.silu", "complex"), ("nn.functional.pad", "reflect"),
                 ("nn.functional.pad", "replicate"), ("nn.functional.pad", "replicate_negative"),
                 ("nn.functional.pad", "circular"), ("nn.functional.batch_norm", "without_cudnn")}


def _opinfos() -> list:
    wanted = set(NAMES)
    found = [op for op in op_db if op.name in wanted
             and (op.name, op.variant_test_name) not in SKIP_VARIANTS]
    missing = wanted - {op.name for op in found}
    if "nn.functional.rms_norm" in missing:   # older torch has no OpInfo for it
        missing.discard("nn.functional.rms_norm")
    assert not missing, f"no OpInfo named {sorted(missing)}"
    return sorted(found, key=lambda op: (NAMES.index(op.name), op.variant_test_name))


OPINFOS = _opinfos()


def _param(op):
    reason = XFAIL.get((op.name, op.variant_test_name))
    marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
    return pytest.param(op, id=harness.op_id(op), marks=marks)


# ---------------------------------------------------------------- samples
def _sample_dtype(op) -> torch.dtype | None:
    """float32 where the op supports it, else the first integer type it does."""
    supported = op.supported_dtypes("cpu")
    return next((dtype for dtype in (torch.float32, torch.int64, torch.int32, torch.bool)
                 if dtype in supported), None)


def _boolean_index(sample) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in sample.args[0])


#: Samples outside what retrograd compiles by design: OpInfo name -> (test, reason).
UNSUPPORTED = {
    "index_put": (_boolean_index, ("boolean mask index: its shape depends on the data "
                                   "(nonzero), and capture is static-shape")),
}


def _unsupported(op, sample) -> str | None:
    if op.name in UNSUPPORTED and UNSUPPORTED[op.name][0](sample):
        return UNSUPPORTED[op.name][1]
    return None


# ---------------------------------------------------------------- the test
@pytest.mark.parametrize("op", [_param(op) for op in OPINFOS])
def test_opinfo(op):
    torch.manual_seed(0)
    dtype = _sample_dtype(op)
    if dtype is None:
        pytest.skip(f"{op.name} supports none of float32, int64, int32, bool on CPU")
    chosen, reasons = harness.pick_samples(op, MAX_SAMPLES, dtype, MAX_CONSIDERED, _unsupported)
    if not chosen:
        pytest.skip(f"no usable sample: {reasons}")
    triton, extern = 0, set()
    for sample in chosen:
        try:
            reports = harness.check_sample(op, sample)
        except Exception as exc:
            raise AssertionError(f"{op.name} on sample {harness.describe(sample)}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        for report in reports:
            triton += report["kernels"]["triton"]
            extern.update(report["kernels"]["extern_ops"])
    assert triton >= 1, (f"{op.name}: no sample ran a generated Triton kernel "
                         f"(extern ops: {sorted(extern)})")


# ---------------------------------------------------------------- special values
#: What the elementwise ops below see: every pair of these, so binary ops meet
#: inf against zero, NaN against one, -0 against odd powers, and so on. OpInfo
#: samples are finite; these reach the branches that math built from
#: primitives gets wrong (pow's signs, expm1 overflowing to inf / inf).
SPECIAL_VALUES = [float("-inf"), -100.0, -3.5, -2.0, -1.0, -0.5, -1e-30, -0.0, 0.0, 1e-30,
                  0.5, 1.0, 2.0, 3.5, 100.0, float("inf"), float("nan")]

ELEMENTWISE = [op for op in OPINFOS if isinstance(op, (UnaryUfuncInfo, BinaryUfuncInfo))
               and _sample_dtype(op) == torch.float32]


def _special_sample(op):
    """The OpInfo's sample with the most tensors (its scalars and keywords kept),
    each tensor replaced by a 1-D grid of SPECIAL_VALUES: the first tensor
    varies slowest, so two tensors meet every pair."""
    samples = list(itertools.islice(op.sample_inputs("cpu", torch.float32), 20))
    samples = [s for s in samples if harness.tensors_of(s) and all(t.dtype == torch.float32
                                                         for t in harness.tensors_of(s))]
    if not samples:
        return None
    sample = max(samples, key=lambda s: len(harness.tensors_of(s)))
    values = torch.tensor(SPECIAL_VALUES)
    count = len(harness.tensors_of(sample))
    grids = iter([values.repeat_interleave(len(values) ** (count - 1 - k)).repeat(len(values) ** k)
                  for k in range(count)])
    return sample.transform(lambda t: next(grids) if isinstance(t, torch.Tensor) else t)


@pytest.mark.parametrize("op", ELEMENTWISE, ids=harness.op_id)
def test_opinfo_special_values(op):
    """Forward only, each element against eager: same NaNs, same infinities
    (with their signs), relative error under TOLERANCE elsewhere."""
    sample = _special_sample(op)
    if sample is None:
        pytest.skip("no all-float32 sample")
    function, tensors = harness.closure(op, sample)
    try:
        ref = harness.outputs_of(function(*tensors))
    except Exception as exc:
        pytest.skip(f"eager raises {type(exc).__name__} on special values")
    compiled = retrograd.compile(function, executor="interpret")
    got = harness.outputs_of(compiled(*tensors))
    for index, (g, r) in enumerate(zip(got, ref)):
        assert g.dtype == r.dtype and g.shape == r.shape
        if not r.is_floating_point():
            wrong = g != r
        else:
            same = (g == r) | (g.isnan() & r.isnan())
            close = (g - r).abs() <= TOLERANCE * r.abs()
            wrong = ~(same | (close & r.isfinite()))
        if bool(wrong.any()):
            where = wrong.nonzero().flatten()[:8].tolist()
            cases = [(tuple(t[i].item() for t in tensors), g[i].item(), r[i].item())
                     for i in where]
            raise AssertionError(f"{op.name} output {index}: {int(wrong.sum())} of {r.numel()} "
                                 f"differ; (inputs, got, eager): {cases}")
    assert compiled.reports["forward"]["kernels"]["triton"] >= 1


# ---------------------------------------------------------------- the whole database
#: OpInfos whose gradient retrograd gets wrong today, with why: the rotating
#: sample below lets them fail (docs/opinfo.md lists them as wrong).
KNOWN_WRONG: dict[str, str] = {}
ROTATION_SIZE = 25


def _rotation_seed() -> int:
    """RETROGRAD_OPINFO_SEED, else today's date (YYYYMMDD): a new sample each day."""
    value = os.environ.get("RETROGRAD_OPINFO_SEED")
    return int(value) if value else int(datetime.date.today().strftime("%Y%m%d"))


ROTATION_SEED = _rotation_seed()


def _rotation() -> list:
    """ROTATION_SIZE OpInfos of the whole database (every one with a float32
    backward), drawn with ROTATION_SEED; the id carries the seed to rerun it."""
    ops = random.Random(ROTATION_SEED).sample(harness.autograd_opinfos(), ROTATION_SIZE)
    params = []
    for op in sorted(ops, key=harness.op_id):
        reason = KNOWN_WRONG.get(harness.op_id(op))
        # not strict: whether a drawn sample hits the cancellation depends on the seed
        marks = [pytest.mark.xfail(reason=reason, strict=False)] if reason else []
        params.append(pytest.param(op, id=f"seed{ROTATION_SEED}-{harness.op_id(op)}",
                                   marks=marks))
    return params


@pytest.mark.parametrize("op", _rotation())
def test_opinfo_database_sample(op, fresh_dynamo):
    """One sample through both faces: right values and gradients, or
    retrograd's own UnsupportedError, or extern calls only; never a wrong
    number, never an internal crash (benchmarks/opinfo_sweep.py runs them all)."""
    verdict = harness.classify(op, count=1, seed=ROTATION_SEED)
    assert verdict.status not in ("wrong", "crash"), \
        f"{verdict.op}: {verdict.status}: {verdict.detail} (RETROGRAD_OPINFO_SEED={ROTATION_SEED})"


#: OpInfos that crashed inside retrograd once: a higher-order op (with_effects)
#: reached the wrapper, a max pool's unread values, a fill read by a pool backward,
#: a data-dependent shape, a sparse argument, complex half outputs.
REGRESSIONS = ["linalg.tensorsolve", "max_pool2d_with_indices_backward", "tensor_split",
               "sparse.sampled_addmm", "chalf"]


@pytest.mark.parametrize("name", REGRESSIONS)
def test_opinfo_former_crashes(name, fresh_dynamo):
    op = next(op for op in harness.autograd_opinfos() if harness.op_id(op) == name)
    verdict = harness.classify(op, count=2)
    assert verdict.status in ("pass", "extern-only", "xfail"), f"{verdict.status}: {verdict.detail}"
    if verdict.status == "xfail":
        assert "UnsupportedError" in verdict.detail


def test_higher_order_op_runs_as_extern_call():
    """linalg.solve checks its result with an effectful op: AOTAutograd wraps it
    in the ``with_effects`` higher-order op, which runs (and is counted) as an
    extern call."""
    a = torch.randn(2, 3, 6, requires_grad=True)
    b = torch.randn(2, 3, requires_grad=True)
    compiled = retrograd.compile(torch.linalg.tensorsolve, executor="interpret")
    compiled(a, b).sum().backward()
    assert compiled.reports["forward"]["kernels"]["extern_ops"].get("with_effects") == 1
    expected = torch.autograd.grad(torch.linalg.tensorsolve(a, b).sum(), [a, b])
    torch.testing.assert_close([a.grad, b.grad], list(expected))


def test_torch_compile_face_runs_data_dependent_graphs_in_eager(fresh_dynamo):
    """The index_put OpInfo with a boolean mask reaches retrograd whole from
    dynamo; its ATen decomposition needs ``nonzero`` of the mask, which a
    static trace cannot follow: the graph runs in eager PyTorch
    (backend.EagerGraph), right, with a warning naming the op and a report
    that counts no Triton kernel."""
    from torch.testing._internal.opinfo.core import SampleInput
    op = next(op for op in harness.autograd_opinfos() if harness.op_id(op) == "index_put")
    sample = SampleInput(torch.randn(5, 5, requires_grad=True),
                         args=([torch.tensor([True, False, True, False, True])],
                               torch.randn(5, requires_grad=True)),
                         kwargs={"accumulate": True})
    with pytest.warns(UserWarning, match=r"aten\.nonzero.*runs in eager PyTorch"):
        reports = harness.check_sample(op, sample, "torch.compile")
    assert reports and all(report["kernels"]["triton"] == 0 for report in reports)


def test_gather_of_a_zero_dim_value():
    """Cleanup moves gathers through pointwise ops by their dimension; a 0-dim
    gather (scatter_reduce's backward on 0-dim samples) has none to move along
    (it divided by the rank, zero)."""
    x = torch.tensor(1.5, requires_grad=True)
    index = torch.tensor(0)
    compiled = retrograd.compile(lambda x, i: torch.gather(x * 2 - 1, 0, i) ** 2,
                                 executor="interpret")
    value = compiled(x, index)
    (grad,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(value.detach(), torch.tensor(4.0))
    torch.testing.assert_close(grad, torch.tensor(8.0))
