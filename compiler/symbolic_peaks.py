"""The report's three peaks (schema 4, ``report.peak_fields``) for a
symbolic program: what can be said at the size hints, null where nothing can.

A symbolic program serves every size its guards admit, so no single peak is
its peak. What is known at compile time is the plan at the *size hints*
(the sizes of the call that traced it, the same sizes the checkpoint plan
is made at):

- ``predicted_peak_bytes``: the checkpoint plan's own prediction
  (``ledger.predicted_peak`` on the hinted joint or step graph), as in a
  static report; null where no checkpoint plan ran (the default partition,
  or the step's checkpoint pass skipped), and the note says so.
- ``program_peak_bytes``: the run-time memory plan (symbolic_plan.py)
  evaluated at the hints: the arenas plus every other value the program
  allocates, each from its node to its last reader, inputs left out (the
  scope of a static program's ``held by the program``); an op's own scratch
  is not in it. Under ``executor="fx"`` (no arenas): the same prediction
  for the graph's values alone, each freed after its last use as fx's code
  does. Other sizes get their own plan at their first call.
- ``measured_peak_bytes``: a symbolic program is not run while compiling,
  so with ``verify`` off it is null. Under ``verify=True`` the program's
  first call at the hints (the traced call, which verify checks; its
  backward for the backward half) runs under measured_peak.py's ``Probe``
  (``HintProbe``), and the report (and its dump) is rewritten with the
  figure; until that call runs, it is null with a note saying so. Its
  scope is ``program_peak_bytes``'s: what the program allocates, inputs
  neither counted nor credited when the program drops them early (the
  profiler leaves out frees of blocks allocated before it started, and
  warns about them on stderr; the probe keeps the call's inputs alive
  through the call, so there are none).

``peak_sizes`` names the hints (``{"s0": 3}``) so the figures can be read
against them; ``measured_peak_note`` says all of the above in words.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from retrograd.measured_peak import Measured, Probe
from retrograd.report import peak_fields
from retrograd.symbolic_passes import shape_env_of
from retrograd.symbolic_plan import SizedPlanner
from torch import fx

__all__ = ["NOT_MEASURED", "PENDING", "HintProbe", "symbolic_peaks"]

NOT_MEASURED = ("not measured: a symbolic program is not run while compiling, and verify is "
                "off (verify=True measures its first call at the size hints)")
PENDING = "not measured yet: verify=True measures the program's first call at the size hints"
HOW = ("measured: peak of torch's CPU allocations minus frees (profiler memory events) while "
       "the program ran its first call at the size hints ({sizes}), which verify=True measures; "
       "its inputs kept alive and not counted")


def _hints(planner: SizedPlanner, gm: fx.GraphModule) -> dict[str, int] | None:
    """Each symbol of the program's inputs at its hint, or None (no hint)."""
    env = shape_env_of(gm)
    if env is None:
        return {}
    known = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
    hints = {}
    for symbol, _, _ in planner.bindings:
        value = known.get(symbol)
        if value is None:
            return None
        hints[str(symbol)] = int(value)
    return hints


def _sizes(hints: dict[str, int] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (hints or {}).items()) or "no symbols"


def symbolic_peaks(gm: fx.GraphModule, runner, checkpoint: dict | None,
                   measured: Measured | None = None) -> dict:
    """The ``memory`` section's peak fields for the symbolic program ``gm``
    (run by ``runner``, an ArenaRunner, or None where the fx graph runs as
    it is), with ``checkpoint`` the checkpoint pass's stats at the hints
    (None or ``{"skipped": why}`` where no plan ran) and ``measured`` what
    ``HintProbe`` measured, or why not (None: verify is off, ``NOT_MEASURED``).
    Module docstring."""
    arenas = runner is not None
    planner = runner.planner if arenas else SizedPlanner(gm)
    hints = _hints(planner, gm)
    program = None
    if hints is not None:
        plan = planner.plan(tuple(hints[str(s)] for s, _, _ in planner.bindings))
        program = plan.predicted_peak if arenas else plan.predicted_peak_without
    predicted = (checkpoint or {}).get("predicted_peak_bytes")
    sizes = _sizes(hints)
    words = [NOT_MEASURED if measured is None else measured.note]
    if program is None:
        words.append("program_peak_bytes: null, a symbol of the inputs has no size hint")
    else:
        how = "the arena plan" if arenas else "the fx graph, each value freed after its last use"
        words.append(f"program_peak_bytes is predicted from {how} at the size hints ({sizes}; "
                     f"inputs and ops' scratch not counted); other sizes are planned at their "
                     f"first call")
    if predicted is None:
        why = (checkpoint or {}).get("skipped", "the default partition split the graph")
        words.append(f"predicted_peak_bytes: null, no checkpoint plan ({why})")
    else:
        words.append(f"predicted_peak_bytes is the checkpoint plan's, made at the size "
                     f"hints ({sizes})")
    fields = peak_fields(predicted, program,
                         Measured(None if measured is None else measured.bytes,
                                  "; ".join(words)))
    fields["peak_sizes"] = hints
    return fields


class HintProbe:
    """Wraps a symbolic half's boxed executable ``run`` (verify=True only):
    its first call at the size hints runs under measured_peak.py's ``Probe``,
    with the call's inputs kept alive until it returns (the scope of
    ``program_peak_bytes``), and ``report``'s peak fields are rewritten with
    the figure (``symbolic_peaks``), then ``rewritten()`` (the dump's copy).
    Other calls, and every call after that one, go straight to ``run``."""

    def __init__(self, run: Callable[[list], Any], gm: fx.GraphModule, runner,
                 checkpoint: dict | None, report: dict, rewritten: Callable[[], None]):
        self.run, self.gm, self.runner, self.checkpoint = run, gm, runner, checkpoint
        self.report, self.rewritten = report, rewritten
        self.planner = runner.planner if runner is not None else SizedPlanner(gm)
        self.hints = _hints(self.planner, gm)
        self.pending = self.hints is not None
        self.key = tuple(self.hints[str(s)] for s, _, _ in self.planner.bindings) \
            if self.pending else None
        self._boxed_call = True   # called with the list of inputs, which ``run`` may clear
        self._update(Measured(None, f"{PENDING} ({_sizes(self.hints)})" if self.pending else
                              "not measured: a symbol of the inputs has no size hint"))

    def _update(self, measured: Measured) -> None:
        """The report's peak fields with ``measured``, here and in the dump."""
        self.report["memory"].update(symbolic_peaks(self.gm, self.runner, self.checkpoint,
                                                    measured))
        self.rewritten()

    def __call__(self, args: list) -> Any:
        if not self.pending or self.planner.symbols(args) != self.key:
            return self.run(args)
        self.pending = False
        held = list(args)   # the inputs, alive through the call: no free the profiler warns of
        probe = Probe(self.run, held, HOW.format(sizes=_sizes(self.hints)))
        outputs = probe(args)
        del held
        self._update(probe.measured)
        return outputs
