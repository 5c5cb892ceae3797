"""The report: schema 1, one per compiled graph (forward, backward or step).

Every figure comes from a pass or from the program; a figure nobody
produced is ``None`` (``null`` in JSON), never a guess.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from retrograd.ir import Program

__all__ = ["PassRecord", "build_report", "traffic", "SCHEMA"]

SCHEMA = 1


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


def build_report(graph: str, graph_id: str, program: Program, records: list[PassRecord],
                 captured_nodes: int, final_nodes: int, compile_seconds: float) -> dict:
    extern_ops = Counter(kernel.op for kernel in program.kernels_of("extern"))
    return {
        "schema": SCHEMA,
        "graph": graph,
        "graph_id": graph_id,
        "nodes": {"captured": captured_nodes, "final": final_nodes},
        "passes": [asdict(record) for record in records],
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
            "saved_activation_bytes": _stat(records, "checkpoint", "saved_activation_bytes"),
            "arena_bytes": _stat(records, "buffer_reuse", "arena_bytes"),
            "live_lower_bound_bytes": _stat(records, "buffer_reuse", "live_lower_bound_bytes"),
            "unplanned_bytes": _stat(records, "buffer_reuse", "unplanned_bytes"),
        },
        "traffic": traffic(program),
        "recompute": {
            "nodes": _stat(records, "checkpoint", "recomputed_nodes"),
            "flops": _stat(records, "checkpoint", "recomputed_flops"),
        },
        "compile_seconds": round(compile_seconds, 4),
    }


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=str) + "\n"
