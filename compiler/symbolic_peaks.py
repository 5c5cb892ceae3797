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
- ``measured_peak_bytes``: null. retrograd measures only the run verify's
  codegen check makes while compiling (measured_peak.py); a symbolic
  program is not run while compiling (verify checks it at each new size's
  first call, unmeasured).

``peak_sizes`` names the hints (``{"s0": 3}``) so the figures can be read
against them; ``measured_peak_note`` says all of the above in words.
"""

from __future__ import annotations

from retrograd.measured_peak import Measured
from retrograd.report import peak_fields
from retrograd.symbolic_passes import shape_env_of
from retrograd.symbolic_plan import SizedPlanner
from torch import fx

__all__ = ["NOT_MEASURED", "symbolic_peaks"]

NOT_MEASURED = ("not measured: a symbolic program is not run while compiling (verify=True "
                "checks it at each new size's first call, unmeasured)")


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


def symbolic_peaks(gm: fx.GraphModule, runner, checkpoint: dict | None) -> dict:
    """The ``memory`` section's peak fields for the symbolic program ``gm``
    (run by ``runner``, an ArenaRunner, or None where the fx graph runs as
    it is), with ``checkpoint`` the checkpoint pass's stats at the hints
    (None or ``{"skipped": why}`` where no plan ran). Module docstring."""
    arenas = runner is not None
    planner = runner.planner if arenas else SizedPlanner(gm)
    hints = _hints(planner, gm)
    program = None
    if hints is not None:
        plan = planner.plan(tuple(hints[str(s)] for s, _, _ in planner.bindings))
        program = plan.predicted_peak if arenas else plan.predicted_peak_without
    predicted = (checkpoint or {}).get("predicted_peak_bytes")
    sizes = ", ".join(f"{k}={v}" for k, v in (hints or {}).items()) or "no symbols"
    words = [NOT_MEASURED]
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
    fields = peak_fields(predicted, program, Measured(None, "; ".join(words)))
    fields["peak_sizes"] = hints
    return fields
