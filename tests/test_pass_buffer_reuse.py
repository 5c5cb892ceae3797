"""The buffer_reuse pass on hand-built and fused programs: lifetimes, frees
after the last use, the live lower bound. (Arena offsets, windows and the
whole memory plan: tests/test_memory_plan.py.)"""

from __future__ import annotations

import pytest
import torch

from retrograd.ir import Kernel, Program
from retrograd.passes import buffer_reuse
from pass_helpers import assert_program_matches, buffer, context, fuse
from pass_helpers import seeded  # noqa: F401  (autouse: each test from seed 0)


def hand_built_program() -> Program:
    """
    0 triton k0:  a      -> t0        (t0: 16 floats, 64 bytes)
    1 view   v0:  t0     -> v         (a view of t0)
    2 triton k1:  a      -> t1        (t1: 32 floats, 128 bytes)
    3 extern k2:  v, t1  -> out       (a program output)
    4 triton k3:  out    -> t2        (t2: 8 halves, 16 bytes)
    5 triton k4:  t2, a  -> out2      (a program output)
    """
    buffers = {
        "a": buffer("a", (16,), "input"),
        "t0": buffer("t0", (4, 4)),
        "v": buffer("v", (4, 4), "view", view_of="t0", strides=(1, 4)),
        "t1": buffer("t1", (32,)),
        "out": buffer("out", (4, 4), "output"),
        "t2": buffer("t2", (8,), dtype="float16"),
        "out2": buffer("out2", (8,), "output"),
    }
    kernels = [
        Kernel("k0", "triton", [], ["a"], ["t0"]),
        Kernel("v0", "view", [], ["t0"], ["v"]),
        Kernel("k1", "triton", [], ["a"], ["t1"]),
        Kernel("k2", "extern", [], ["v", "t1"], ["out"]),
        Kernel("k3", "triton", [], ["out"], ["t2"]),
        Kernel("k4", "triton", [], ["t2", "a"], ["out2"]),
    ]
    return Program("hand", buffers, kernels, inputs=["a"], outputs=["out", "out2"])


def test_buffer_reuse_lifetimes_on_a_hand_built_program():
    program = hand_built_program()
    program.validate()
    spans = buffer_reuse.lifetimes(program)
    assert spans["a"] == (-1, 5)
    assert spans["t0"] == (0, 3)        # its view is read by kernel 3
    assert spans["v"] == (1, 3)
    assert spans["t1"] == (2, 3)
    assert spans["t2"] == (4, 5)
    assert spans["out"][1] == spans["out2"][1] == len(program.kernels)


def test_buffer_reuse_frees_after_last_use_and_never_outputs():
    program = hand_built_program()
    stats = buffer_reuse.run(program, context()).stats
    assert program.frees == {3: ["t0", "t1", "v"], 5: ["a", "t2"]}
    freed = [name for names in program.frees.values() for name in names]
    assert "out" not in freed and "out2" not in freed
    assert len(freed) == len(set(freed))
    # nothing is freed before a kernel that still reads it (or a view of it)
    for index, names in program.frees.items():
        for later in program.kernels[index + 1:]:
            readers = set(later.inputs) | {program.buffers[n].view_of for n in later.inputs}
            assert not readers & set(names), (index, later.name)
    assert program.buffers["t0"].first_use == 0 and program.buffers["t0"].last_use == 3
    assert stats["temporaries"] == 3
    assert stats["bytes_without_reuse"] == 64 + 128 + 16


def test_buffer_reuse_live_lower_bound():
    """Live temporary bytes per kernel: 64, 64, 192, 192, 16, 16 -> 192. Were
    the view not keeping t0 alive, kernel 2 would see 128 only."""
    program = hand_built_program()
    stats = buffer_reuse.run(program, context()).stats
    assert stats["live_lower_bound_bytes"] == 192
    assert buffer_reuse.live_lower_bound(program, buffer_reuse.lifetimes(program)) == 192


@pytest.mark.usefixtures("one_arena_per_busy_period")
def test_buffer_reuse_live_bound_uses_the_storage_a_strided_buffer_spans():
    program = Program(
        "strided",
        {"a": buffer("a", (4,), "input"),
         "t": buffer("t", (4, 100), strides=(1, 0)),      # expanded: 4 floats of storage
         "u": buffer("u", (3, 2), strides=(4, 1)),        # spans 3*4-2 = 10 floats
         "o": buffer("o", (4,), "output")},
        [Kernel("k0", "triton", [], ["a"], ["t"]),
         Kernel("k1", "triton", [], ["t"], ["u"]),
         Kernel("k2", "triton", [], ["u"], ["o"])],
        inputs=["a"], outputs=["o"])
    assert program.buffers["t"].nbytes == 16
    assert program.buffers["u"].nbytes == 40
    # t and u are alive together at k1; sizes round up to the arena's 16-byte alignment
    assert buffer_reuse.run(program, context()).stats["live_lower_bound_bytes"] == 16 + 48


def test_buffer_reuse_outputs_that_are_inputs_or_repeated():
    program = Program(
        "passthrough",
        {"a": buffer("a", (4,), "input"), "t": buffer("t", (4,)),
         "o": buffer("o", (4,), "output")},
        [Kernel("k0", "triton", [], ["a"], ["t"]), Kernel("k1", "triton", [], ["t"], ["o"])],
        inputs=["a"], outputs=["o", "a", "o", 3])
    buffer_reuse.run(program, context())
    freed = [name for names in program.frees.values() for name in names]
    assert freed == ["t"]
    assert program.frees == {1: ["t"]}


def test_buffer_reuse_frees_an_unused_input_on_entry():
    program = Program(
        "unused",
        {"a": buffer("a", (4,), "input"), "b": buffer("b", (4,), "input"),
         "o": buffer("o", (4,), "output")},
        [Kernel("k0", "triton", [], ["a"], ["o"])], inputs=["a", "b"], outputs=["o"])
    buffer_reuse.run(program, context())
    assert program.frees == {-1: ["b"], 0: ["a"]}


def test_buffer_reuse_on_a_fused_program_runs_correctly():
    """The frees it plans, executed: every value still exists when read."""
    x, w = torch.randn(4, 4), torch.randn(4, 4)

    def fn(x, w):
        a = x.exp()
        b = (a + a @ w).sigmoid()
        return b.t() * 2, b.view(16)
    program, _, gm = fuse(fn, x, w)
    buffer_reuse.run(program, context())
    outputs = {name for name in program.outputs if isinstance(name, str)}
    for index, names in program.frees.items():
        assert not set(names) & outputs
        for name in names:
            spans = buffer_reuse.lifetimes(program)
            assert spans[name][1] == index
    assert_program_matches(program, gm, [x, w])


# -- what the LoRA step needed (issue 13, item 3) ------------------------------------

def _product_read_through_a_reshape(read_again: bool):
    """mm -> view [2, 8, 8] -> pointwise -> view -> mm: the pointwise kernel
    reads the first product only through a reshape."""
    x, w, w2 = torch.randn(16, 4), torch.randn(4, 8), torch.randn(8, 3)

    def fn(x, w, w2):
        product = x @ w
        hidden = (product.view(2, 8, 8) * 2).relu()
        out = hidden.view(16, 8) @ w2
        return (out + product.sum() if read_again else out,)
    return fuse(fn, x, w, w2), (x, w, w2)


def test_in_place_through_a_reshape_of_a_matrix_product():
    """The pointwise result is written over the product it reads through a
    row-major reshape (the same element at the same address), so the two share
    one slot; the generated program still computes the graph's values."""
    from retrograd.codegen import generate_sources
    from retrograd.runtime.executor import GeneratedExecutable
    (program, _, gm), inputs = _product_read_through_a_reshape(read_again=False)
    stats = buffer_reuse.run(program, context()).stats
    [product] = [k.outputs[0] for k in program.kernels if k.op == "aten.mm.default"
                 and k.inputs[0] == program.inputs[0]]
    [hidden] = [k.outputs[0] for k in program.kernels if k.kind == "triton"]
    assert program.buffers[hidden].offset == program.buffers[product].offset
    assert stats["bytes_reused_in_place"] == 512
    assert stats["arena_bytes"] == 512
    kernels, wrapper = generate_sources(program, interpreted=True)
    got = GeneratedExecutable(program, wrapper, kernels, True)(list(inputs))
    torch.testing.assert_close(got[0], gm(*inputs)[0])


def test_no_reshape_in_place_while_the_product_is_read_later():
    (program, _, gm), inputs = _product_read_through_a_reshape(read_again=True)
    stats = buffer_reuse.run(program, context()).stats
    assert stats["bytes_reused_in_place"] == 0
    assert_program_matches(program, gm, inputs)
