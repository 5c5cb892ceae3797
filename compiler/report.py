"""The report: schema 3, one per compiled graph (forward, backward or step).

Every figure comes from a pass or from the program; a figure nobody
produced is ``None`` (``null`` in JSON), never a guess.

Schema 2 adds ``ledger`` (the saved-tensor ledger: every value the forward
hands the backward, or that the backward recomputes instead, with the
user's source line) and ``pareto`` (saved bytes against recompute FLOPs and
predicted peak over the plans ``memory_budget`` can pick; dumps only). The
checkpoint pass's own rows and stack traces are moved out of its
``passes[].stats`` into these two fields.

Schema 3 adds ``communication``: the collectives of a distributed
``compile_step`` program (bytes per collective, where the schedule issues and
waits for each, and the overlap a stated bandwidth model predicts:
``passes/planning/collectives.py``); ``null`` for a program without any.

Schema 4 adds three peaks to ``memory`` (``peak_fields`` says what each counts):
``predicted_peak_bytes`` (the checkpoint plan's, over forward and backward),
``program_peak_bytes`` (this program's, from its memory timeline) and
``measured_peak_bytes`` with ``measured_peak_note`` (how it was measured, or
why it was not: ``measured_peak.py``). No field changed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from retrograd import memory_timeline
from retrograd.ir import Program
from retrograd.measured_peak import NOT_RUN, Measured
from retrograd.provenance import source_of

__all__ = ["SCHEMA", "PassRecord", "build_report", "ledger_rows", "peak_fields", "program_peak",
           "traffic"]

SCHEMA = 4

#: checkpoint stats that become report fields of their own, not pass stats
_MOVED = ("ledger", "pareto")


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    stats: dict[str, Any] = field(default_factory=dict)


def traffic(program: Program) -> dict[str, int]:
    """Bytes every Triton kernel and extern call reads and writes (views move none)."""
    read = written = 0
    for kernel in program.kernels:
        if kernel.kind == "view":
            continue
        read += sum(program.buffers[n].logical_bytes for n in kernel.inputs if n in program.buffers)
        written += sum(program.buffers[n].logical_bytes for n in kernel.outputs)
    return {"bytes_read": read, "bytes_written": written}


def _stat(records: list[PassRecord], pass_name: str, key: str):
    for record in records:
        if record.name == pass_name and key in record.stats:
            return record.stats[key]
    return None


def ledger_rows(records: list[PassRecord]) -> list[dict] | None:
    """The checkpoint pass's ledger with each stack trace turned into the
    user's ``file:line`` (``source``, null where the node has no trace)."""
    rows = _stat(records, "checkpoint", "ledger")
    if rows is None:
        return None
    fields = ("name", "op", "shape", "dtype", "bytes", "source", "decision", "reason",
              "recompute_flops")
    offloaded = _stat(records, "offload", "reasons") or {}   # saved, but on the host
    kept = _stat(records, "offload", "kept") or {}           # named, but left on the device
    return [{key: source_of(row.get("stack_trace")) if key == "source" else
             "offloaded" if key == "decision" and row["name"] in offloaded else
             _reason(row, offloaded, kept) if key == "reason" else
             row[key] for key in fields} for row in rows]


def _reason(row: dict, offloaded: dict[str, str], kept: dict[str, str]) -> str:
    """The checkpoint's reason, or the offload pass's for a value it offloaded
    or was asked to offload and could not."""
    if row["name"] in offloaded:
        return offloaded[row["name"]]
    if row["name"] in kept and row["decision"] == "saved":
        return f"{row['reason']}; not offloaded: {kept[row['name']]}"
    return row["reason"]


def _device_saved_bytes(records: list[PassRecord]) -> int | None:
    """Saved activation bytes the device holds: less those offloaded to the host."""
    saved = _stat(records, "checkpoint", "saved_activation_bytes")
    offloaded = _stat(records, "offload", "offloaded_bytes") or 0
    return None if saved is None else saved - offloaded


def program_peak(program: Program) -> int | None:
    """The peak of the memory timeline's ``held by the program`` series (arenas,
    the program's own allocations outside them from birth to death, extern
    scratch estimates; inputs not counted): buffer_reuse's footprint
    prediction, as the dump page charts it. None for a program of no kernels.
    A sweep over the intervals (those of this series have no arena offsets)."""
    timeline = memory_timeline.build(program)
    changes: dict[int, int] = {}
    for interval in timeline.intervals.get(memory_timeline.HELD, []):
        if interval.start <= interval.stop:
            changes[interval.start] = changes.get(interval.start, 0) + interval.nbytes
            changes[interval.stop + 1] = changes.get(interval.stop + 1, 0) - interval.nbytes
    if not timeline.steps:
        return None
    live = peak = 0
    for position in sorted(changes):
        live += changes[position]
        peak = max(peak, live)
    return peak


def peak_fields(predicted: int | None, program: int | None, measured: Measured) -> dict:
    """The report's three peaks (bytes; null where nobody produced one).

    - ``predicted_peak_bytes``: the checkpoint plan the program runs, scored
      by ``ledger.predicted_peak`` on the joint (or step) graph: the most
      bytes of activations and gradients alive at once over forward *and*
      backward (a saved value from its node to the end of the backward, a
      recomputed one again from its recomputation to its last reader), before
      fusion and the arena; inputs, parameters and tangents left out. One
      figure per joint graph, the same in its forward and backward reports,
      equal to the checkpoint stats' ``predicted_peak_bytes``.
    - ``program_peak_bytes``: this program's own peak (``program_peak``), after
      fusion and the arena.
    - ``measured_peak_bytes``: this program's measured peak, the scope of
      ``program_peak_bytes``; ``measured_peak_note`` says how, or why not.
    """
    return {"predicted_peak_bytes": predicted, "program_peak_bytes": program,
            "measured_peak_bytes": measured.bytes, "measured_peak_note": measured.note}


def _pass_dict(record: PassRecord) -> dict:
    entry = asdict(record)
    entry["stats"] = {k: v for k, v in entry["stats"].items()
                      if not (record.name == "checkpoint" and k in _MOVED)}
    return entry


def build_report(graph: str, graph_id: str, program: Program, records: list[PassRecord],
                 captured_nodes: int, final_nodes: int, compile_seconds: float,
                 measured: Measured = NOT_RUN) -> dict:
    extern_ops = Counter(kernel.op for kernel in program.kernels_of("extern"))
    return {
        "schema": SCHEMA,
        "graph": graph,
        "graph_id": graph_id,
        "nodes": {"captured": captured_nodes, "final": final_nodes},
        "passes": [_pass_dict(record) for record in records],
        "kernels": {
            "triton": len(program.kernels_of("triton")),
            "extern": len(program.kernels_of("extern")),
            "extern_ops": dict(sorted(extern_ops.items())),
            "views": len(program.kernels_of("view")),
            "pointwise_ops": _stat(records, "fusion", "pointwise_ops"),
            "pointwise_ops_in_triton": _stat(records, "fusion", "pointwise_ops_in_triton"),
            "pointwise_ops_extern": _stat(records, "fusion", "pointwise_ops_extern"),
            "ops_in_triton": _stat(records, "fusion", "ops_in_triton"),
        },
        "memory": {
            "saved_activation_bytes": _device_saved_bytes(records),
            "arena_bytes": _stat(records, "buffer_reuse", "arena_bytes"),
            "live_lower_bound_bytes": _stat(records, "buffer_reuse", "live_lower_bound_bytes"),
            "unplanned_bytes": _stat(records, "buffer_reuse", "unplanned_bytes"),
            **peak_fields(_stat(records, "checkpoint", "predicted_peak_bytes"),
                          program_peak(program), measured),
        },
        "traffic": traffic(program),
        "recompute": {
            "nodes": _stat(records, "checkpoint", "recomputed_nodes"),
            "flops": _stat(records, "checkpoint", "recomputed_flops"),
        },
        "ledger": ledger_rows(records),
        "pareto": _stat(records, "checkpoint", "pareto"),
        "communication": _stat(records, "schedule", "communication"),
        "compile_seconds": round(compile_seconds, 4),
    }


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=str) + "\n"
