"""Triton source for kernels and the wrapper that runs a program."""

from __future__ import annotations

from retrograd.codegen import ops
from retrograd.codegen.pointwise import choose_block, generate_pointwise
from retrograd.codegen import reduction
from retrograd.codegen.reduction import choose_reduction_blocks, generate_reduction
from retrograd.codegen.reduction_split import generate_split_reduction, splittable
from retrograd.codegen.matmul_template import generate_matmul
from retrograd.codegen.pooling import POOLS, generate_pool
from retrograd.codegen.scan import SCANS, generate_scan
from retrograd.codegen.scatter import SCATTERS, generate_scatter
from retrograd.codegen.wrapper import generate_program
from retrograd.ir import Family, Kind, Program

__all__ = ["generate_sources", "lowered_ops"]


def lowered_ops() -> dict[str, list[str]]:
    """Every aten overload codegen turns into Triton, by kernel family
    (for the docs, the CLI and the OpInfo test)."""
    from retrograd.codegen.indexing import INDEXING
    from retrograd.codegen.reduction import REDUCTIONS
    families = {"pointwise": [*ops.LOWERINGS, *ops.RANDOM_OPS], "indexing": INDEXING,
                "reduction": REDUCTIONS, "scatter": SCATTERS, "pooling": POOLS, "scan": SCANS}
    return {family: sorted(str(op) for op in table) for family, table in families.items()}


def generate_sources(program: Program, interpreted: bool,
                     configure=None) -> tuple[dict[str, str], str]:
    """Source of every Triton kernel (by kernel name) and of ``program.py``.

    ``configure(kernel, program, family, default)``, if given, may replace
    the rule's block of a pointwise kernel (an int) or an unsplit reduction
    ((ROWS, RBLOCK)), and returns it with the launch's ``num_warps`` (None:
    Triton's default): the autotune hook (compiler/kernel_tuning.py)."""
    kernels = {}
    for kernel in program.kernels_of(Kind.TRITON):   # the generator by fusion's family
        if kernel.family == Family.MATMUL:
            kernel.source = generate_matmul(kernel, program.buffers, interpreted, program.name)
        elif kernel.family == Family.POOLING:
            block = choose_block(kernel.numel or 1 << 16, interpreted)
            kernel.source = generate_pool(kernel, program.buffers, block, program.name)
        elif kernel.family == Family.SCATTER:
            block = choose_block(kernel.numel, interpreted)
            kernel.source = generate_scatter(kernel, program.buffers, block, program.name)
        elif kernel.family == Family.SCAN:   # rows x the scanned extent, as a reduction
            rows, r_block = choose_reduction_blocks(kernel.numel, kernel.extent, interpreted)
            kernel.source = generate_scan(kernel, program.buffers, rows, r_block, program.name)
        elif kernel.family == Family.REDUCTION:
            inner = len(kernel.full_shape) - 1 in kernel.reduced_dims
            rows, r_block = reduction.choose_reduction_blocks(kernel.numel, kernel.extent,
                                                              interpreted, inner)
            split = reduction.choose_split(kernel.numel, kernel.extent, interpreted, rows,
                                           r_block)
            if split > 1 and splittable(kernel):
                kernel.source = generate_split_reduction(kernel, program.buffers, rows, r_block,
                                                         split, program.name)
            else:
                warps = None
                if configure is not None:
                    (rows, r_block), warps = configure(kernel, program, "reduction",
                                                       (rows, r_block))
                kernel.source = generate_reduction(kernel, program.buffers, rows, r_block,
                                                   program.name, num_warps=warps)
        else:
            block, warps = choose_block(kernel.numel, interpreted), None
            if configure is not None:
                block, warps = configure(kernel, program, "pointwise", block)
            kernel.source = generate_pointwise(kernel, program.buffers, block, program.name,
                                               num_warps=warps)
        kernels[kernel.name] = kernel.source
    return kernels, generate_program(program)
