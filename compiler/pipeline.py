"""The pass pipeline: ``PIPELINE``, one declared list of every pass and the
stages it runs in, and the instrumentation around each pass (timing, node
counts, lint, dumps, verify, error context).

Every pass is ``run(subject, ctx) -> ir.PassResult(subject, stats)`` (as
torch.fx's ``PassManager`` / ``PassResult``; tinygrad's one linear list of
named rewrites is the model for the list). ``graph_compiler.GraphCompiler``
runs the stages on one captured graph through AOTAutograd's hooks;
``disable`` is checked against the list (options.py). Passes stay pure
functions; everything around them lives here, in the manner of MLIR's pass
manager instrumentation.
"""

from __future__ import annotations

import enum
import inspect
import logging
import traceback
from dataclasses import dataclass, field
from time import perf_counter
from types import ModuleType
from typing import Any, Callable, Sequence

import torch.fx as fx

from retrograd import cce_ops, extern_scratch, loss_ops, matmul_choice
from retrograd.codegen import indexing as codegen_indexing
from retrograd.codegen import ops as codegen_ops
from retrograd.codegen import pooling as codegen_pooling
from retrograd.codegen import reduction as codegen_reduction
from retrograd.codegen import reduction_split as codegen_reduction_split
from retrograd.codegen import scan as codegen_scan
from retrograd.codegen import scatter as codegen_scatter
from retrograd.dump import Dumper, count_nodes, subject_text
from retrograd.ir import CodegenSupport, PassResult, Program
from retrograd.options import Options
from retrograd.passes import (buffer_reuse, checkpoint, cleanup, dead_gradient, fusion, layout,
                              linear_cross_entropy, matmul_fusion, offload, schedule,
                              tied_gradients)
from retrograd.passes.dead_gradient import GradientSpec
from retrograd.report import PassRecord
from retrograd.runtime import offload as offload_ops  # noqa: F401  registers the copy ops

__all__ = ["PassError", "PassSpec", "PIPELINE", "Stage", "OpSupport",
           "PassContext", "pass_names", "required_passes", "passes_for", "run_pass"]

log = logging.getLogger("retrograd")


class PassError(RuntimeError):
    """A pass raised; the message names the pass and graph, the cause is chained."""


class OpSupport:
    """What codegen can lower, told to the passes (``ir.CodegenSupport``;
    passes never import codegen)."""

    is_fill = staticmethod(codegen_ops.is_fill)
    is_generator = staticmethod(codegen_ops.is_generator)
    reads_shape_only = staticmethod(codegen_ops.reads_shape_only)
    reads_by_index = staticmethod(codegen_indexing.reads_by_index)
    can_scatter = staticmethod(codegen_scatter.can_scatter)
    can_pool = staticmethod(codegen_pooling.can_pool)
    can_scan = staticmethod(codegen_scan.can_scan)
    can_reduce = staticmethod(codegen_reduction.can_reduce)
    describe_reduction = staticmethod(codegen_reduction.describe_reduction)
    reduction_scratch = staticmethod(codegen_reduction_split.scratch_buffers)
    choose_matmul = staticmethod(matmul_choice.choose)   # template or extern (CUDA autotune)
    choose_cce = staticmethod(cce_ops.choose)   # CCE kernels or chunked extern matmuls
    extern_scratch = staticmethod(extern_scratch.node_scratch)   # probed, for the ledger

    @staticmethod
    def can_lower(node) -> bool:
        """A pointwise op, or an op reading through computed indices."""
        return codegen_ops.can_lower(node) or codegen_indexing.reads_by_index(node)


@dataclass
class PassContext:
    """What a pass is given beside its subject."""

    options: Options
    dumper: Dumper
    op_support: CodegenSupport
    graph_name: str
    log: logging.Logger = log
    gradients: GradientSpec | None = None   # what the caller needs (dead_gradient)
    num_fwd_outputs: int | None = None      # joint stage and forward half: the user outputs
    seed: str | None = None                 # step stage: the loss cotangent's placeholder
    updates: dict[int, int] = field(default_factory=dict)   # step: output -> input positions
    # joint stage: groups of primal positions that are one tensor (tied weights)
    tied_primals: tuple[tuple[int, ...], ...] = ()
    # backward half: strides the forward gave the saved activations (passes/layout.py)
    input_layouts: dict[str, tuple[int, ...]] = field(default_factory=dict)


class Stage(enum.StrEnum):
    """Which graph a pass runs on."""

    JOINT = "joint"          # AOTAutograd's joint forward+backward graph (partition_fn)
    INFERENCE = "inference"  # a forward alone, when no gradient is needed
    STEP = "step"            # compile_step's whole training step, one graph
    HALF = "half"            # each program: forward, backward, inference or step


@dataclass(frozen=True)
class PassSpec:
    """One entry of the pipeline: the name ``disable`` uses, the pass's module
    and function (``run(subject, ctx) -> PassResult``, looked up at each run,
    so a pass patched in its module is the one that runs), the stages it runs
    in, and whether no program can be built without it."""

    name: str
    module: ModuleType
    stages: tuple[Stage, ...]
    function: str = "run"
    required: bool = False

    @property
    def run(self) -> Callable[[Any, PassContext], PassResult]:
        return getattr(self.module, self.function)

    @property
    def contract(self) -> str:
        """The ``Requires:`` and ``Ensures:`` lines of the pass's docstring."""
        doc = inspect.getdoc(self.module) or ""
        items: list[str] = []
        for line in doc.splitlines():
            if line.startswith(("Requires:", "Ensures:")):
                items.append(line.strip())
            elif items and line.startswith("  ") and not items[-1].endswith("\n"):
                items[-1] += " " + line.strip()   # a wrapped continuation line
            elif items:
                items[-1] += "\n"
        return " ".join(item.strip() for item in items)


#: The pipeline, in order: every pass retrograd runs, and where. A stage runs
#: the entries that name it, top to bottom; checkpoint has one entry per
#: stage it runs in (the joint graph is split in two; a step stays one graph).
PIPELINE: tuple[PassSpec, ...] = (
    PassSpec("dead_gradient", dead_gradient, (Stage.JOINT,)),
    PassSpec("tied_gradients", tied_gradients, (Stage.JOINT,)),
    PassSpec("linear_cross_entropy", linear_cross_entropy,
             (Stage.JOINT, Stage.INFERENCE, Stage.STEP)),
    PassSpec("restore_decompositions", loss_ops, (Stage.JOINT, Stage.INFERENCE, Stage.STEP),
             "restore", required=True),
    PassSpec("cleanup", cleanup, (Stage.JOINT, Stage.INFERENCE, Stage.STEP)),
    PassSpec("checkpoint", checkpoint, (Stage.JOINT,), required=True),
    PassSpec("checkpoint", checkpoint, (Stage.STEP,), "rematerialize", required=True),
    PassSpec("offload", offload, (Stage.JOINT,)),
    PassSpec("offload", offload, (Stage.STEP,), "offload_step"),
    PassSpec("fusion", fusion, (Stage.HALF,), required=True),
    PassSpec("matmul_templates", matmul_fusion, (Stage.HALF,)),
    PassSpec("layout", layout, (Stage.HALF,)),
    PassSpec("schedule", schedule, (Stage.HALF,)),
    PassSpec("buffer_reuse", buffer_reuse, (Stage.HALF,)),
)


def pass_names() -> tuple[str, ...]:
    """Every pass a user may name in ``disable``, in pipeline order."""
    return tuple(dict.fromkeys(spec.name for spec in PIPELINE))


def required_passes() -> tuple[str, ...]:
    """Passes without which no program can be built: disabling them is an error."""
    return tuple(dict.fromkeys(spec.name for spec in PIPELINE if spec.required))


def passes_for(stage: Stage, disable: Sequence[str] = ()) -> list[PassSpec]:
    """The passes ``stage`` runs, in order, less the disabled ones."""
    return [spec for spec in PIPELINE if stage in spec.stages
            and (spec.required or spec.name not in disable)]


def run_pass(name: str, function: Callable, subject: Any, ctx: PassContext,
             records: list[PassRecord]) -> Any:
    """Run one pass with timing, lint, a record, a dump, and error context."""
    before = count_nodes(subject)
    start = perf_counter()
    try:
        result = function(subject, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"a pass returns ir.PassResult(subject, stats), not "
                            f"{type(result).__name__}")
        new_subject, stats = result
        _lint(new_subject)
    except Exception as exc:
        if getattr(exc, "user_error", False):   # about the user's options, not the pass
            raise
        _reproducer(ctx, name, subject, exc)
        raise PassError(f"retrograd: pass {name!r} failed on graph {ctx.graph_name}: "
                        f"{type(exc).__name__}: {exc}") from exc
    record = PassRecord(name, round(perf_counter() - start, 6), before,
                        count_nodes(new_subject), stats)
    records.append(record)
    log.info("%s: pass %s: %d -> %d nodes in %.3fs %s", ctx.graph_name, name,
             record.nodes_before, record.nodes_after, record.seconds, stats)
    ctx.dumper.stage(name, subject_text(new_subject),
                     ".py" if not isinstance(new_subject, Program) else ".txt")
    return new_subject


def _lint(subject: Any) -> None:
    if isinstance(subject, fx.GraphModule):
        subject.graph.lint()
    elif isinstance(subject, tuple):
        for part in subject:
            _lint(part)
    elif isinstance(subject, Program):
        subject.validate()


def _reproducer(ctx: PassContext, name: str, subject: Any, exc: BaseException) -> None:
    """On failure, leave the failing pass's input graph and the traceback in the dump."""
    text = subject_text(subject) if isinstance(subject, (fx.GraphModule, Program, tuple)) \
        else ""
    ctx.dumper.write(f"failed_{name}.txt",
                     f"# input of pass {name!r} that raised\n{text}\n\n"
                     + "".join(traceback.format_exception(exc)))
