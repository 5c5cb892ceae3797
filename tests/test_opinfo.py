"""PyTorch's OpInfo database against retrograd, forward and backward.

For every OpInfo whose op is, or decomposes into, aten ops that codegen
claims to lower (``retrograd.codegen.lowered_ops()``), a few of its float32
CPU sample inputs run through ``retrograd.compile`` (the whole pipeline:
capture, decompositions, passes, generated Triton under the interpreter) and
through eager PyTorch, and the two must agree (``test_opinfo``):

- every output: exact for integer and boolean outputs; for floats the same
  NaN and inf positions and ``||got - ref|| / ||ref|| < 1e-4`` on the rest
  (where float32 eager is itself far from the float64 result, retrograd may
  differ from eager as long as it is as close to float64, see ``_compare``);
- the gradient of every differentiable tensor input, for one random upstream
  gradient (``randn_like`` of each float output) shared by both runs;
- at least one sample of each OpInfo ran a generated Triton kernel
  (``kernels.triton`` of the forward or backward report), so a claim that
  silently falls back to extern calls fails here.

The function under test is a closure over the sample's non-tensor arguments
(retrograd specializes on them anyway) taking the tensors positionally.
Samples with zero-size or large (> MAX_NUMEL elements) tensors, complex
tensors, samples that eager itself rejects (forward or backward) and the few
retrograd does not take by design (UNSUPPORTED) are left out; an OpInfo with
no usable sample is skipped with the reasons. OpInfos whose op has no float32
support (the bitwise ops) run their integer samples instead.

OpInfo samples are finite, so ``test_opinfo_special_values`` also runs the
elementwise OpInfos forward on every pair of special values (infinities, NaN,
signed zeros, huge and tiny numbers), element by element.

Runtime: each sample compiles a forward and a backward graph (~0.3 s each)
and launches a few interpreted kernels, so samples are capped per OpInfo
(MAX_SAMPLES), picked spread over the OpInfo's list for variety.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.utils._pytree as pytree

# (the OpInfo database imports expecttest: a test dependency in pyproject.toml)
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.opinfo.core import BinaryUfuncInfo, UnaryUfuncInfo

import retrograd

TOLERANCE = 1e-4
MAX_SAMPLES = 3
MAX_NUMEL = 20000
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
    "nn.functional.pad",
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


def _id(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def _param(op):
    reason = XFAIL.get((op.name, op.variant_test_name))
    marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
    return pytest.param(op, id=_id(op), marks=marks)


# ---------------------------------------------------------------- samples
def _sample_dtype(op) -> torch.dtype | None:
    """float32 where the op supports it, else the first integer type it does."""
    supported = op.supported_dtypes("cpu")
    return next((dtype for dtype in (torch.float32, torch.int64, torch.int32, torch.bool)
                 if dtype in supported), None)


def _tensors(sample) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves((sample.input, sample.args, sample.kwargs))
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _boolean_index(sample) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in sample.args[0])


#: Samples outside what retrograd compiles by design: OpInfo name -> (test, reason).
UNSUPPORTED = {
    "index_put": (_boolean_index, ("boolean mask index: its shape depends on the data "
                                   "(nonzero), and capture is static-shape")),
}


def _unusable(op, sample) -> str | None:
    """Why a sample is left out, or None."""
    tensors = _tensors(sample)
    if not tensors:
        return "no tensor argument"
    if any(t.is_complex() for t in tensors):
        return "complex tensor"
    if any(t.numel() == 0 for t in tensors):
        return "zero-size tensor"
    if any(t.numel() > MAX_NUMEL for t in tensors):
        return f"more than {MAX_NUMEL} elements"
    if op.name in UNSUPPORTED and UNSUPPORTED[op.name][0](sample):
        return UNSUPPORTED[op.name][1]
    function, tensors = _closure(op, sample)
    try:   # eager must take it, forward and backward, or there is nothing to compare
        outputs = _outputs(function(*tensors))
        _run(function, tensors, [torch.ones_like(o) if o.is_floating_point() and o.requires_grad
                                 else None for o in outputs])
    except Exception as exc:
        return f"eager raises {type(exc).__name__}"
    return None


def _spread(n: int) -> list[int]:
    """0..n-1, starting with the first, last and middle, then bisecting: the
    first few picks span the OpInfo's list (its samples go small to large, plain
    to keyword-heavy)."""
    order, seen = [], set()
    for index in itertools.chain([0, n - 1, n // 2],
                                 (i * n // d for d in (4, 8, 16) for i in range(1, d))):
        if 0 <= index < n and index not in seen:
            seen.add(index)
            order.append(index)
    return order + [i for i in range(n) if i not in seen]


def _closure(op, sample):
    """``op(input, *args, **kwargs)`` as a function of the sample's tensors only."""
    leaves, spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

    def function(*tensors):
        filled = list(constants)
        for slot, tensor in zip(slots, tensors):
            filled[slot] = tensor
        value, args, kwargs = pytree.tree_unflatten(filled, spec)
        return op.op(value, *args, **kwargs)

    return function, [leaves[i] for i in slots]


def _describe(sample) -> str:
    def show(value):
        if isinstance(value, torch.Tensor):
            return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(show(v) for v in value) + "]"
        return repr(value)
    parts = [show(sample.input)] + [show(a) for a in sample.args] + [
        f"{k}={show(v)}" for k, v in sample.kwargs.items()]
    return "(" + ", ".join(parts) + ")"


# ---------------------------------------------------------------- comparison
def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` over the finite elements of ``ref``."""
    got, ref = got.detach().double(), ref.detach().double()
    finite = ref.isfinite()
    scale = ref[finite].norm().item()
    return (got[finite] - ref[finite]).norm().item() / (scale if scale > 0 else 1.0)


def _compare(what: str, got, ref, precise=None) -> None:
    """Exact for integers and booleans; for floats the same NaN and inf
    positions and a relative error under TOLERANCE on the finite rest.

    ``precise()`` gives the same value computed in float64 (or None). Some
    results are ill-conditioned -- the gradient of a layer norm over two
    elements is mostly rounding noise -- so float32 eager is itself far from
    the truth: where retrograd and eager disagree, retrograd still passes if
    it is no further from the float64 value than eager is (a factor of 3, as
    Inductor's accuracy checks allow).
    """
    if ref is None:   # eager's gradient is None: retrograd's must be None or zero
        assert got is None or not bool(got.any()), f"{what}: eager has no value, got {got}"
        return
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != eager's {ref.dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not ref.is_floating_point():
        assert torch.equal(got, ref), f"{what}: values differ\n got {got}\n ref {ref}"
        return
    assert torch.equal(got.isnan(), ref.isnan()), \
        f"{what}: NaN positions differ\n got {got}\n ref {ref}"
    infinite = ref.isinf()
    assert torch.equal(got[infinite], ref[infinite]), f"{what}: infinities differ"
    assert bool(got[ref.isfinite()].isfinite().all()), f"{what}: a finite value became inf or NaN"
    error = _relative_error(got, ref)
    if error < TOLERANCE:
        return
    detail = ""
    exact = precise() if precise is not None else None
    if exact is not None:
        ours, eager = _relative_error(got, exact), _relative_error(ref, exact)
        if ours <= max(TOLERANCE, 3 * eager):
            return
        detail = f" (against float64: retrograd {ours:.3g}, eager {eager:.3g})"
    raise AssertionError(f"{what}: relative error {error:.3g} >= {TOLERANCE:g}{detail}\n"
                         f" got {got}\n ref {ref}")


def _outputs(result) -> list:
    return [leaf for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]


def _run(function, tensors, upstream):
    """Outputs of ``function(*tensors)`` and the gradients of the inputs that
    require grad, for the given upstream gradients (one per float output)."""
    outputs = _outputs(function(*tensors))
    wrt = [t for t in tensors if t.requires_grad]
    pairs = [(o, g) for o, g in zip(outputs, upstream) if g is not None and o.requires_grad]
    grads = [None] * len(wrt)
    if wrt and pairs:
        grads = list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                         allow_unused=True))
    return [o.detach() for o in outputs], grads


def _float64_run(function, tensors, upstream):
    """``_run`` with float32 tensors (inputs and upstream) as float64; None if
    the op refuses float64 or changes its output structure."""
    def widen(t):
        if t is None or t.dtype != torch.float32:
            return t
        return t.detach().double().requires_grad_(t.requires_grad)
    try:
        outputs, grads = _run(function, [widen(t) for t in tensors], [widen(g) for g in upstream])
    except Exception:
        return None
    return outputs, grads


def _check_sample(op, sample) -> dict:
    """Compile, run and compare one sample; returns the compiled function's reports."""
    function, tensors = _closure(op, sample)
    reference = _outputs(function(*tensors))
    upstream = [torch.randn_like(o) if o.is_floating_point() and o.requires_grad else None
                for o in reference]
    ref_outputs, ref_grads = _run(function, tensors, upstream)
    compiled = retrograd.compile(function, executor="interpret")
    got_outputs, got_grads = _run(compiled, tensors, upstream)
    cache = []

    def precise(kind: int, index: int):
        def value():
            if not cache:
                cache.append(_float64_run(function, tensors, upstream))
            return None if cache[0] is None else cache[0][kind][index]
        return value

    assert len(got_outputs) == len(ref_outputs), \
        f"{len(got_outputs)} outputs, eager has {len(ref_outputs)}"
    for index, (got, ref) in enumerate(zip(got_outputs, ref_outputs)):
        _compare(f"output {index}", got, ref, precise(0, index))
    positions = [i for i, t in enumerate(tensors) if t.requires_grad]
    for index, (position, got, ref) in enumerate(zip(positions, got_grads, ref_grads)):
        _compare(f"gradient of tensor input {position}", got, ref, precise(1, index))
    return compiled.reports


# ---------------------------------------------------------------- the test
@pytest.mark.parametrize("op", [_param(op) for op in OPINFOS])
def test_opinfo(op):
    torch.manual_seed(0)
    dtype = _sample_dtype(op)
    if dtype is None:
        pytest.skip(f"{op.name} supports none of float32, int64, int32, bool on CPU")
    requires_grad = op.supports_autograd and dtype.is_floating_point
    samples = list(itertools.islice(op.sample_inputs("cpu", dtype, requires_grad=requires_grad),
                                    MAX_CONSIDERED))
    reasons: dict[str, int] = {}
    chosen = []
    for index in _spread(len(samples)):
        if len(chosen) == MAX_SAMPLES:
            break
        sample = samples[index]
        reason = _unusable(op, sample)
        if reason is None:
            chosen.append(sample)
        else:
            reasons[reason] = reasons.get(reason, 0) + 1
    if not chosen:
        pytest.skip(f"no usable sample of {len(samples)}: {reasons}")
    triton, extern = 0, {}
    for sample in chosen:
        try:
            reports = _check_sample(op, sample)
        except Exception as exc:
            raise AssertionError(f"{op.name} on sample {_describe(sample)}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        for report in reports.values():
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
    samples = [s for s in samples if _tensors(s) and all(t.dtype == torch.float32
                                                         for t in _tensors(s))]
    if not samples:
        return None
    sample = max(samples, key=lambda s: len(_tensors(s)))
    values = torch.tensor(SPECIAL_VALUES)
    count = len(_tensors(sample))
    grids = iter([values.repeat_interleave(len(values) ** (count - 1 - k)).repeat(len(values) ** k)
                  for k in range(count)])
    return sample.transform(lambda t: next(grids) if isinstance(t, torch.Tensor) else t)


@pytest.mark.parametrize("op", ELEMENTWISE, ids=_id)
def test_opinfo_special_values(op):
    """Forward only, each element against eager: same NaNs, same infinities
    (with their signs), relative error under TOLERANCE elsewhere."""
    sample = _special_sample(op)
    if sample is None:
        pytest.skip("no all-float32 sample")
    function, tensors = _closure(op, sample)
    try:
        ref = _outputs(function(*tensors))
    except Exception as exc:
        pytest.skip(f"eager raises {type(exc).__name__} on special values")
    compiled = retrograd.compile(function, executor="interpret")
    got = _outputs(compiled(*tensors))
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
