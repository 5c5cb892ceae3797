"""One frozen ``Options`` object, the same names in both faces.

Both ``torch.compile(..., options={...})`` and ``retrograd.compile(fn, **options)``
end here, so an unknown name or a bad value fails the same way: a
``ValueError`` that names the option, the value and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

__all__ = ["Options", "EXECUTORS"]

EXECUTORS = ("auto", "triton", "interpret", "fx", "torch")

#: ``data_dependent``: hand such code to dynamo, or refuse it.
DATA_DEPENDENT_CHOICES = ("split", "error")

def _op_key(pattern: str) -> str:
    """An op pattern without its namespace and default overload."""
    pattern = pattern[len("aten."):] if pattern.startswith("aten.") else pattern
    return pattern[:-len(".default")] if pattern.endswith(".default") else pattern


@dataclass(frozen=True)
class Options:
    """Compiler options.

    Attributes:
        memory_budget: None saves the least bytes that cheap recompute allows;
            a float in (0, 1] caps saved activations at that fraction of the
            save-everything plan.
        dump_dir: write pass-by-pass dumps there (``RETROGRAD_DUMP`` does the
            same without code changes).
        executor: "auto" (Triton on CUDA; on CPU the torch program),
            "triton", "interpret" (the Triton kernels in Triton's
            interpreter, on CPU: slow, for testing kernels), "torch" (the
            optimized program written out once as straight-line torch calls,
            any device), or "fx" (the optimized graph evaluated node by node
            with torch ops, which isolates codegen from the passes).
        disable: names of passes to skip, for debugging.
        verify: run the graph after every pass on the example inputs and name
            the first pass that changes the numbers.
        save: ops or values never recomputed in the backward: an aten op
            ("mm", "aten.mm", "aten.mm.default") or an fx node name
            ("addmm_3"), in the spirit of JAX's ``save_only_these_names``.
        recompute: ops or values never saved for the backward (recomputed
            from what is saved); same patterns as ``save``.
        offload: ops or values saved in host memory between forward and
            backward (copied out after their last forward use, back before
            their first backward use; saved, never recomputed); same patterns
            as ``save``. Empty (the default): on CUDA the planner offloads
            what a bandwidth model says hides behind compute, on the CPU
            nothing (passes/offload.py). ``disable=["offload"]`` turns both off.
        data_dependent: standalone face only: what to do with code that needs
            tensor values while tracing (``.item()``, ``x[x > 0]``): "split"
            hands the call to ``torch.compile(backend="retrograd")``, which
            splits the graph there, with a warning; "error" raises
            ``UnsupportedError`` naming the op and line. The torch.compile
            face always splits (dynamo does).
        max_programs: how many compiled programs (one per input signature)
            a compiled object keeps, like dynamo's ``recompile_limit``; past
            it the least recently used is released, with one warning naming
            what changed (recompiles.py).
        dynamic: None (automatic, as torch.compile's default): a dimension
            that takes a second size is compiled once more as a symbolic
            size, and that program serves later sizes (dynamic.py); True:
            every size symbolic from the first call; False: one static
            program per size.
        recompile_limit: None, or the most programs a compiled object
            compiles; past it a call that would compile runs in eager
            PyTorch, with one warning (dynamo's ``recompile_limit``).
        cudagraphs: None (the default: on for CUDA programs), True or False:
            capture each program as a CUDA graph after a warm-up call and
            replay it (runtime/cudagraphs.py). A program that cannot be
            captured safely (tensors on the CPU, a host sync, a dynamic
            size, host offload) runs without, and the report says why;
            True also warns then.
        autotune: None (the default: on CUDA), True or False: time a few
            block sizes of each pointwise and unsplit reduction kernel and
            keep the fastest that computes what the rule's block does,
            bounded in time, cached on disk per kernel and device, reported
            in the codegen pass's stats (compiler/kernel_tuning.py). True
            forces it under the interpreter too (a test of the mechanism:
            its times mean nothing).
        matmul_templates: None (automatic): on CUDA each matmul with a fused
            pointwise prologue/epilogue runs as a Triton template where a
            bounded autotune, cached on disk, finds it faster than the extern
            aten call plus its separate pointwise kernel; on the CPU the
            extern call stays. True: always the template where one applies
            (tests exercise it under the interpreter); False: never
            (passes/matmul_fusion.py).

    Example:
        >>> Options.from_mapping({"executor": "fx", "disable": ["cleanup"]})
        Options(memory_budget=None, dump_dir=None, executor='fx', disable=('cleanup',), \
verify=False, save=(), recompute=(), offload=(), data_dependent='split', max_programs=16, \
dynamic=None, recompile_limit=None, matmul_templates=None, cudagraphs=None, \
autotune=None)
    """

    memory_budget: float | None = None
    dump_dir: str | None = None
    executor: str = "auto"
    disable: tuple[str, ...] = ()
    verify: bool = False
    save: tuple[str, ...] = ()
    recompute: tuple[str, ...] = ()
    offload: tuple[str, ...] = ()
    data_dependent: str = "split"
    max_programs: int = 16
    dynamic: bool | None = None
    recompile_limit: int | None = None
    matmul_templates: bool | None = None
    cudagraphs: bool | None = None
    autotune: bool | None = None

    @classmethod
    def known(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None = None) -> "Options":
        """Validate user options; ``RETROGRAD_DUMP`` fills ``dump_dir`` if unset."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.known()))
        if unknown:
            raise ValueError(
                f"retrograd: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"known options are: {', '.join(cls.known())}")
        if options.get("dump_dir") is None and os.environ.get("RETROGRAD_DUMP"):
            options["dump_dir"] = os.environ["RETROGRAD_DUMP"]
        return cls(**options)

    def __post_init__(self) -> None:
        self._check()   # direct construction validates too

    def _check(self) -> None:
        budget = self.memory_budget
        if budget is not None and (isinstance(budget, bool)
                                   or not isinstance(budget, (int, float))
                                   or not 0.0 < float(budget) <= 1.0):
            raise ValueError(
                f"retrograd: option memory_budget={budget!r} must be None or a float in (0, 1]")
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"retrograd: option executor={self.executor!r} must be one of {EXECUTORS}")
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise ValueError(f"retrograd: option dump_dir={self.dump_dir!r} must be a path")
        if self.data_dependent not in DATA_DEPENDENT_CHOICES:
            raise ValueError(f"retrograd: option data_dependent={self.data_dependent!r} must "
                             f"be one of {DATA_DEPENDENT_CHOICES}")
        limit = self.max_programs
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"retrograd: option max_programs={limit!r} must be a whole "
                             f"number of programs, at least 1")
        if not isinstance(self.dynamic, (bool, type(None))):
            raise ValueError(f"retrograd: option dynamic={self.dynamic!r} must be None "
                             f"(automatic), True or False")
        limit = self.recompile_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"retrograd: option recompile_limit={limit!r} must be None or "
                             f"a whole number of compiles, at least 1")
        if not isinstance(self.matmul_templates, (bool, type(None))):
            raise ValueError(f"retrograd: option matmul_templates={self.matmul_templates!r} "
                             f"must be None (automatic), True or False")
        if not isinstance(self.cudagraphs, (bool, type(None))):
            raise ValueError(f"retrograd: option cudagraphs={self.cudagraphs!r} must be None "
                             f"(on for CUDA programs), True or False")
        if not isinstance(self.autotune, (bool, type(None))):
            raise ValueError(f"retrograd: option autotune={self.autotune!r} must be None "
                             f"(on CUDA), True or False")
        if not isinstance(self.verify, bool):
            raise ValueError(f"retrograd: option verify={self.verify!r} must be True or False")
        for name in ("save", "recompute", "offload"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else value
            if not isinstance(value, (list, tuple, set, frozenset)) or not all(
                    isinstance(item, str) and item for item in value):
                raise ValueError(f"retrograd: option {name}={getattr(self, name)!r} must be "
                                 f"op names or fx node names (strings)")
            object.__setattr__(self, name, tuple(value))
        # "mm", "aten.mm" and "aten.mm.default" name the same op
        for kept_in in ("save", "offload"):   # an offloaded value is saved (on the host)
            clash = [(kept, dropped) for kept in getattr(self, kept_in)
                     for dropped in self.recompute if _op_key(kept) == _op_key(dropped)]
            if clash:
                named = sorted({item for pair in clash for item in pair})
                raise ValueError(f"retrograd: {named} named in both {kept_in} and recompute")
        disable = (self.disable,) if isinstance(self.disable, str) else tuple(self.disable)
        object.__setattr__(self, "disable", disable)
        # the names come from the declared pipeline (imported here: pipeline imports options)
        from retrograd.pipeline import pass_names, required_passes
        for name in disable:
            if name not in pass_names():
                raise ValueError(
                    f"retrograd: option disable names unknown pass {name!r}; "
                    f"passes are: {', '.join(pass_names())}")
            if name in required_passes():
                raise ValueError(
                    f"retrograd: pass {name!r} cannot be disabled: the program is built "
                    f"by it (use executor='fx' to bypass code generation)")
        if self.offload and "offload" in disable:
            raise ValueError(f"retrograd: option offload={list(self.offload)!r} names values "
                             f"to offload, but disable names the offload pass")
