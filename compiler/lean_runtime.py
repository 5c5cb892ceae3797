"""A lean autograd runtime for AOTAutograd's common case (issue 15, item 6).

AOTAutograd wraps the forward and backward programs it compiles in its
runtime: ``RuntimeWrapper`` (input mutations written back, outputs that
alias inputs or intermediates regenerated, grad mode and view replay set)
around ``CompiledFunction``, an ``autograd.Function`` whose forward and
backward handle RNG functionalization, effect tokens, tensor subclasses,
``BackwardState``, saved symbolic sizes and tangents of the wrong layout.
On the zoo's tiny models that machinery cost about as much as the programs
(``BENCHMARKS.md``: about a quarter of a CPU step).

``lean_runtimes()`` (entered by ``capture.compile_graph``) swaps, for the
graphs this thread compiles, AOTAutograd's runtime for ``LeanRuntime`` when
the graph's ``ViewAndMutationMeta`` (``fw_metadata``) and the compile spec
prove that none of that machinery has anything to do (``why_not_lean`` names
each condition); any other graph keeps AOTAutograd's. What the lean runtime
does is exactly what AOTAutograd's does for such a graph: inputs AOTAutograd
detaches are detached, grad mode and view replay are on while the forward
runs, saved tensors that are views are detached before ``save_for_backward``
(version-counter checks as AOTAutograd splits them), outputs that need no
gradient are marked non-differentiable, tangents are coerced to the layout
they were traced with, saved tensors are released before the backward
program runs (it frees each at its last use), the backward is compiled
lazily by AOTAutograd's own ``_AutogradBackwardCompiler``, and a backward
under ``create_graph=True`` gives gradients whose own backward raises.

The first call of each graph runs AOTAutograd's runtime (its first-call check
of custom ops' aliasing); so does any call under functorch transforms or
compiled autograd, which AOTAutograd's runtime special-cases.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch._functorch.aot_autograd  # first: runtime_wrappers alone is an import cycle
from retrograd.locking import compiling
from torch._functorch import config as functorch_config
from torch._functorch._aot_autograd import runtime_wrappers as aot_runtime
from torch._functorch._aot_autograd.schemas import MutationType, OutputType

__all__ = ["LeanRuntime", "lean_runtimes", "why_not_lean"]

_STATE = threading.local()   # .active: compile_graph runs in this thread; .chosen: its record
_ORIGINAL = aot_runtime.AOTDispatchAutograd.post_compile
_COMPILED_AUTOGRAD = torch._dynamo.compiled_autograd


def why_not_lean(spec) -> str | None:
    """Why AOTAutograd's runtime must stay for the graph of ``spec`` (an
    ``AOTDispatchAutogradCompileSpec``), or None when the lean one is exact."""
    meta = spec.fw_metadata
    conditions = [
        (spec.maybe_subclass_meta is not None, "tensor subclass inputs or outputs"),
        (not all(_plain_write(meta.input_info[i]) for i in meta.mutated_inp_runtime_indices)
         or bool(meta.mutated_graph_handled_indices_seen_by_autograd)
         or any(i is not None for i in meta.mutated_inp_stream_indices or []),
         "an input mutation other than a data write into an input that needs no gradient"),
        (bool(meta.indices_of_inputs_that_requires_grad_with_mutations_in_bw),
         "an input mutated in the backward"),
        (any(o.output_type != OutputType.non_alias for o in meta.output_info)
         or meta.num_intermediate_bases > 0, "an output aliasing an input or intermediate"),
        (meta.is_rng_op_functionalized or meta.num_graphsafe_rng_states > 0,
         "functionalized RNG"),
        (bool(meta.tokens) or meta.num_backward_tokens > 0, "effect tokens"),
        (bool(spec.backward_state_indices), "a BackwardState input"),
        (spec.disable_amp, "autocast on while compiling"),
        (meta.dynamic_outputs or bool(meta.dynamic_saved_tensors_idxs), "dynamic dims"),
        (meta.grad_enabled_mutation is not None, "a grad-mode change in the graph"),
        (_length(meta.opaque_objects_saved_for_backwards_slice) > 0, "saved opaque objects"),
        (spec.try_save_cache_entry is not None, "AOTAutograd's cache"),
        (spec.compiled_bw_func is None and not isinstance(
            spec.lazy_backward_info, aot_runtime.AutogradLazyBackwardCompileInfo),
         "a backward from AOTAutograd's cache"),
        (aot_runtime._should_disable_saved_tensors_hooks(), "inlined saved-tensor hooks"),
        (functorch_config.debug_assert, "AOTAutograd's debug asserts"),
    ]
    for holds, reason in conditions:
        if holds:
            return reason
    return None


def _plain_write(info) -> bool:
    """An input mutation the lean runtime writes back as AOTAutograd does: new
    data (no new shape, strides or storage) into an input that needs no
    gradient (batch norm's running statistics), copied in after the forward."""
    return info.mutates_data and not info.mutates_metadata and \
        not info.mutates_storage_metadata and not info.mutation_inductor_storage_resize \
        and not info.requires_grad and info.mutation_type == MutationType.MUTATED_OUT_GRAPH


def _length(piece: slice) -> int:
    return max(0, (piece.stop or 0) - (piece.start or 0))


def _post_compile(spec):
    """AOTAutograd's ``AOTDispatchAutograd.post_compile``, then, for a graph
    ``compile_graph`` compiles in this thread, the lean runtime where exact."""
    runtime = _ORIGINAL(spec)
    if not getattr(_STATE, "active", False):
        return runtime
    reason = why_not_lean(spec)
    _STATE.chosen.append(reason or "lean")
    return runtime if reason is not None else LeanRuntime(spec, runtime)


@contextlib.contextmanager
def lean_runtimes(chosen: list | None = None):
    """While compiling in this thread, let AOTAutograd's autograd runtime be
    replaced by ``LeanRuntime`` where ``why_not_lean`` allows. ``chosen``
    collects, per graph, ``"lean"`` or the reason it kept AOTAutograd's."""
    with compiling():   # the hook is installed once, under the compile lock
        if aot_runtime.AOTDispatchAutograd.post_compile is not _post_compile:
            aot_runtime.AOTDispatchAutograd.post_compile = staticmethod(_post_compile)
        outer = getattr(_STATE, "active", False), getattr(_STATE, "chosen", None)
        _STATE.active, _STATE.chosen = True, chosen if chosen is not None else []
        try:
            yield _STATE.chosen
        finally:
            _STATE.active, _STATE.chosen = outer


class LeanRuntime:
    """Called as AOTAutograd's runtime wrapper is (a list of flat inputs in,
    the list of outputs back), running the two programs through one small
    ``autograd.Function`` (``_function_for``)."""

    __slots__ = ("aot", "apply", "detach", "first", "written")
    _boxed_call = True

    def __init__(self, spec, aot_runtime_wrapper):
        self.aot = aot_runtime_wrapper
        function = _function_for(spec)
        # Function.apply without its Python prologue (functorch transforms
        # are sent to AOTAutograd's runtime, and no setup_context is defined)
        self.apply = super(torch.autograd.Function, function).apply
        self.detach = tuple(spec.indices_of_inps_to_detach)
        self.written = tuple(spec.fw_metadata.mutated_inp_runtime_indices)   # _plain_write
        self.first = True

    def __call__(self, args: list) -> list:
        if self.first or torch._C._are_functorch_transforms_active() \
                or _compiled_autograd_on():
            self.first = False
            return self.aot(args)
        originals = [args[i] for i in self.written]
        for index in self.detach:
            if isinstance(args[index], torch.Tensor):
                args[index] = args[index].detach()
        args = torch._functorch.utils.unwrap_dead_wrappers(args)
        replay, grad = torch._C._is_view_replay_enabled(), torch.is_grad_enabled()
        try:
            if not replay:
                torch._C._set_view_replay_enabled(True)
            if not grad:
                torch._C._set_grad_enabled(True)
            outputs = self.apply(*args)
        finally:
            if not grad:
                torch._C._set_grad_enabled(False)
            if not replay:
                torch._C._set_view_replay_enabled(False)
        if not originals:
            return list(outputs)
        for original, new in zip(originals, outputs):   # AOTAutograd's mutation epilogue
            if original.requires_grad:   # a leaf written without autograd seeing it
                original.detach().copy_(new)
            else:
                original.copy_(new)
        return list(outputs[len(originals):])


def _compiled_autograd_on() -> bool:
    """Compiled autograd is on (it special-cases AOTAutograd's own Function);
    a backward it reaches through the lean runtime raises (``_Backward._check``)."""
    return _COMPILED_AUTOGRAD.compiled_autograd_enabled or \
        _COMPILED_AUTOGRAD.in_compiled_autograd_region


def _surviving_grads(meta) -> list[int]:
    """The positions of the incoming gradients the backward program reads
    (AOTAutograd's backward prologue): those of written inputs that need one,
    then of outputs that need one (no intermediate bases here)."""
    written = meta.mutated_inp_runtime_indices
    inputs = [i for i, index in enumerate(written)
              if meta.input_info[index].mutates_data and meta.input_info[index].requires_grad]
    outputs = [len(written) + i for i, info in enumerate(meta.output_info)
               if issubclass(info.raw_type, torch.Tensor) and info.requires_grad_for_backward]
    return inputs + outputs


def _non_differentiable(meta) -> tuple[int, ...]:
    """The forward's returns (written inputs, then outputs) that need no gradient."""
    returns = [meta.input_info[i] for i in meta.mutated_inp_runtime_indices]
    return tuple(i for i, info in enumerate(returns + list(meta.output_info))
                 if not info.requires_grad)


def _function_for(spec) -> type[torch.autograd.Function]:
    """The ``autograd.Function`` running ``spec``'s forward and backward programs."""
    meta = spec.fw_metadata
    compiled_forward = spec.compiled_fw_func
    saved = _Saved(meta)
    returns = meta.num_forward_returns
    non_differentiable = _non_differentiable(meta)
    backward = _Backward(spec)

    class LeanFunction(torch.autograd.Function):
        """One compiled graph's forward and backward programs (lean_runtime.py)."""

        boxed_grads_call = True   # the gradients arrive as one list the backward clears

        @staticmethod
        def forward(ctx, *args):
            outputs = compiled_forward(list(args))
            if not isinstance(outputs, list):
                outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
            saved.save(ctx, outputs)
            results = outputs[:returns]
            frozen = [results[i] for i in non_differentiable
                      if isinstance(results[i], torch.Tensor)]
            if frozen:
                ctx.mark_non_differentiable(*frozen)
            ctx._materialize_non_diff_grads = False
            return tuple(results)

        @staticmethod
        def backward(ctx, grads: list):
            return backward(ctx, grads)

    return LeanFunction


class _Saved:
    """What the forward program returns past the user's outputs, kept on
    ``ctx`` as AOTAutograd keeps it (``_AutogradSavedState``)."""

    def __init__(self, meta):
        self.checked = meta.tensors_saved_for_backwards_with_vc_check_slice
        self.unchecked = meta.tensors_saved_for_backwards_no_vc_check_slice
        self.sizes = meta.symints_saved_for_backwards_slice

    def save(self, ctx, outputs: list) -> None:
        # Note [Detaching saved tensors in AOTAutograd]: a saved view is detached
        ctx.save_for_backward(*[x.detach() if x._is_view() else x
                                for x in outputs[self.checked]])
        ctx._tensors_no_vc_check = [x.detach() if x._is_view() else x
                                    for x in outputs[self.unchecked]]
        ctx.symints = outputs[self.sizes]


class _Backward:
    """The backward program's call: AOTAutograd's backward prologue, impl and
    epilogue for a graph ``why_not_lean`` admitted."""

    def __init__(self, spec):
        meta = spec.fw_metadata
        self.meta = meta
        self.expected = meta.num_outputs + meta.num_mutated_inp_runtime_indices
        self.surviving = _surviving_grads(meta)
        self.layouts = [m.memory_format for m in meta.subclass_tangent_meta]
        self.nondeterministic = meta.deterministic is not None and not meta.deterministic
        self.compiler = aot_runtime._AutogradBackwardCompiler(
            compiled_bw=spec.compiled_bw_func, lazy_backward_info=spec.lazy_backward_info,
            disable_amp=spec.disable_amp, bw_compiler=spec.bw_compiler,
            aot_config=spec.aot_config, fw_metadata=meta, try_save_cache_entry=None)

    def __call__(self, ctx, grads: list):
        self._check(len(grads))
        # no local name may outlive this list: the program frees each tangent at its last use
        tangents = [self._layout(grads[i], j) for j, i in enumerate(self.surviving)]
        grads.clear()
        args = [*ctx.symints, *ctx.saved_tensors, *ctx._tensors_no_vc_check, *tangents]
        del tangents
        if torch.is_grad_enabled():   # create_graph=True: gradients whose backward raises
            # the saved tensors are detached: a stand-in input makes the results need grad
            return _Once.apply(self, ctx, args, torch.empty(0, requires_grad=True))
        return self.run(ctx, args)

    def run(self, ctx, args: list) -> tuple:
        ctx.maybe_clear_saved_tensors()   # the program frees each at its last use
        once = not torch._C._autograd._get_current_graph_task_keep_graph()
        program = self.compiler.get_or_compile(saved_tensors_use_once=once)
        if not once and self.meta.bw_donated_idxs and functorch_config.donated_buffer:
            raise RuntimeError("retrograd: this backward was compiled with donated "
                               "buffers, which need retain_graph=False and "
                               "create_graph=False on every backward() call")
        outputs = program(args)
        return tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)

    def _check(self, count: int) -> None:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            raise RuntimeError("retrograd: a compiled backward cannot run inside "
                               "vmap/grad/vjp; compile inside the transform instead")
        if self.nondeterministic and torch.are_deterministic_algorithms_enabled():
            raise RuntimeError("retrograd: this compiled backward runs with "
                               "torch.use_deterministic_algorithms(True), but its forward was "
                               "traced with deterministic algorithms off")
        if _COMPILED_AUTOGRAD.in_compiled_autograd_region:
            raise RuntimeError("retrograd: compiled autograd reached a graph that ran "
                               "retrograd's lean runtime; enable compiled autograd before "
                               "the forward runs")
        if count != self.expected:
            raise AssertionError(f"expected {self.expected} gradients, got {count}")

    def _layout(self, tangent, index: int):
        """A tangent in the layout it was traced with (AOTAutograd's
        ``process_runtime_tangent``; anything not a plain tensor goes there)."""
        if type(tangent) is torch.Tensor:
            return aot_runtime.coerce_to_expected_memory_format(tangent, self.layouts[index])
        meta = self.meta
        return aot_runtime.AOTDispatchAutograd.process_runtime_tangent(
            tangent, meta.subclass_tangent_meta[index], index,
            meta.traced_tangents_descs[index], meta.compile_id_str)[0]


class _Once(torch.autograd.Function):
    """The backward program under ``create_graph=True``: its gradients are
    connected to a node whose own backward raises (no double backward), as
    AOTAutograd's ``CompiledFunctionBackward``."""

    @staticmethod
    def forward(ctx, backward: _Backward, outer_ctx, args: list, stand_in: torch.Tensor):
        return backward.run(outer_ctx, args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("retrograd: double backward through a compiled graph is not "
                           "supported")
